"""results.json (status, metrics, job key, environment), the oracle, failures, BaselineGenerator."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from omegaconf import OmegaConf, open_dict

from conftest import REPO, compose
from prospect.experiment import run
from prospect.tracking.results import job_key

SEED_METRICS = {
    "frames_processed", "dialogues_generated", "dialogues_matched", "precision", "recall", "f1", "cache_compressions",
    "avg_cache_size", "max_cache_size", "time_per_frame", "peak_memory_mb",
}
PROASSIST_METRICS = {
    "jaccard_index", "missing_rate", "redundant_rate", "semantic_score", "time_diff", "num_matched", "num_mismatched",
    "num_missed", "num_redundant",
}
EXTRA_METRICS = {"time_per_frame_p95", "decode_ms_per_token", "tokens_generated"}


def key(*overrides: str) -> str:
    return job_key(OmegaConf.to_container(compose(*overrides), resolve=True))


def test_job_key_covers_what_changes_results_only(monkeypatch):
    base = key()
    assert key("model.device=cpu") == base  # "auto" is hashed as what it resolves to (no GPU here)
    assert key("model.device=cuda") != base and key("model.dtype=bfloat16") != base
    # compile counts where the step it compiles runs: the optimized path (off on this CPU under "auto")
    assert key("stream.compile=true") == key("stream.compile=false") == base
    # the sampling draw's version is part of sampled runs' keys only (greedy keys stayed as they were)
    sampled = OmegaConf.to_container(compose("stream.temperature=0.7"), resolve=True)
    before = job_key(sampled)
    monkeypatch.setattr("prospect.tracking.results.SAMPLING_VERSION", 1)
    assert job_key(sampled) != before and key() == base
    assert key("stream.optimized=true", "stream.compile=true") != key("stream.optimized=true") == key("stream.optimized=true", "stream.compile=auto")
    assert base == key() and len(base) == 16
    assert key("strategy.last_keep_len=256") != base
    assert key("strategy=drop_all", "strategy.last_keep_len=256") == key("strategy=drop_all")  # drop_all ignores it
    for same in ("logger=none", "logger.group=g1", "paths.cache_dir=/elsewhere", "dataset.root=/moved"):
        assert key(same) == base, same
    for different in ("model=tiny_random", "stream.max_new_tokens=50", "seed=1", "eval.match_threshold=0.6", "dataset.generate.seed=3",
                      "strategy.position_mode=contiguous", "eval.reference_scores=false", "eval.speak_probe=false",
                      "dataset.generate.named_user=true"):
        assert key(different) != base, different


@pytest.fixture
def small_cfg(synthetic_root, model_cache_dir):
    def make(*overrides: str):
        cfg = compose(
            "dataset=proassist", f"dataset.root={synthetic_root}", "dataset.subset=synthetic", "dataset.annotation=dialog-klg_test_L0_I1",
            "dataset.max_videos=1", "logger=none", *overrides,
        )
        with open_dict(cfg):
            cfg.paths.cache_dir = str(model_cache_dir)
        return cfg

    return make


def test_oracle_scores_f1_one_and_writes_every_file(small_cfg, tmp_path):
    document = run(small_cfg("model=oracle"), tmp_path)
    assert document["status"] == "ok" and document["error"] is None
    metrics = document["metrics"]
    assert metrics["f1"] == 1.0 and metrics["precision"] == 1.0 and metrics["recall"] == 1.0
    assert SEED_METRICS | PROASSIST_METRICS | EXTRA_METRICS <= set(metrics)
    for name in ("results.json", "predictions.json", "trace.jsonl", "timeline.html", "cache_sizes.png"):
        assert (tmp_path / name).is_file(), name
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["job_key"] == job_key(on_disk["config"]) and on_disk["config"]["model"]["name"] == "oracle"
    assert set(on_disk["per_conversation"]) == {"synthetic_000/0/no_talk_0", "synthetic_000/0/talk_some_1"}
    env = on_disk["env"]
    assert env["torch"] and env["transformers"] == "5.23.0" and env["device_name"]
    assert len(env["git_commit"] or "") == 40 and isinstance(env["git_dirty"], bool)


def test_rescoring_predictions_gives_identical_metrics(small_cfg, tmp_path):
    document = run(small_cfg("model=tiny_random", "model.device=cpu", "strategy.max_seq_len=512", "strategy.last_keep_len=64",
                             "stream.max_new_tokens=4"), tmp_path)
    assert document["status"] == "ok"
    result = subprocess.run(
        [sys.executable, "-m", "prospect.evaluate", f"predictions={tmp_path / 'predictions.json'}"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = document["metrics"]
    assert metrics["kv_cache_peak_mb"] == metrics["max_cache_size"] * 512 / 2**20  # tiny: 2 layers x 2 kv heads x 16 x fp32 x K,V
    rescored = json.loads((tmp_path / "metrics.json").read_text())["metrics"]
    for name, value in rescored.items():
        assert document["metrics"][name] == value, name
    # the stream's measured scores travel through predictions.json: the run and prospect.evaluate agree on them
    assert {"ref_ppl", "ref_nll", "ref_top1", "ref_turns", "speak_auc", "speak_prob_due"} <= set(rescored)
    assert rescored["ref_turns"] == sum(r["ref_turns"] for r in document["per_conversation"].values())
    header = next(line for line in result.stdout.splitlines() if line.startswith("subset"))
    assert "note:" not in result.stdout and header.split()[-3:] == ["ref_ppl", "ref_top1", "speak_auc"]
    assert [line.split()[0] for line in result.stdout.splitlines() if "interval over 2 conversations" in line] == [
        "f1", "ref_ppl", "ref_top1", "speak_auc"]
    intervals = document["intervals"]
    assert intervals["ref_ppl"]["low"] <= metrics["ref_ppl"] <= intervals["ref_ppl"]["high"]
    assert intervals["ref_ppl"]["conversations"] == 2 and "kv_cache_peak_mb" not in intervals  # a maximum: no interval


def test_failed_conversations_make_a_failed_run_that_keeps_results(small_cfg, tmp_path, synthetic_root):
    import shutil

    from test_data import write_frames

    root = tmp_path / "root"
    shutil.copytree(synthetic_root, root)
    write_frames(root / "processed_data/synthetic/frames/synthetic_000.arrow", 60, corrupt={40})
    cfg = small_cfg("model=tiny_random", "model.device=cpu", "strategy.max_seq_len=512", "strategy.last_keep_len=64",
                    "stream.max_new_tokens=4", f"dataset.root={root}", "dataset.max_videos=null")
    out = tmp_path / "out"
    document = run(cfg, out)
    assert document["status"] == "failed" and document["error"].startswith("2 of 4 conversations failed")
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["status"] == "failed" and "frame 40" in on_disk["per_conversation"]["synthetic_000/0/no_talk_0"]["error"]
    assert on_disk["metrics"]["frames_processed"] > 0 and "f1" in on_disk["metrics"]  # the rest is still evaluated


def test_cli_run_that_cannot_load_its_model_exits_1_with_results(tmp_path, model_cache_dir):
    env = {**__import__("os").environ, "HF_HUB_OFFLINE": "1", "PROSPECT_CACHE_DIR": str(model_cache_dir)}
    result = subprocess.run(
        [sys.executable, "-m", "prospect.run", "model=smolvlm2_256m", "model.hub_id=HuggingFaceTB/absent-model", "logger=none",
         "dataset.generate.seconds=12", f"hydra.run.dir={tmp_path}"],
        cwd=REPO, capture_output=True, text=True, timeout=300, env=env,
    )
    assert result.returncode == 1
    document = json.loads((tmp_path / "results.json").read_text())
    assert document["status"] == "failed" and "model.hub_id=HuggingFaceTB/absent-model: cannot load" in document["error"]
    assert "FAILED" in result.stdout + result.stderr


def test_baseline_generator(tiny_model, synthetic_conversations, tmp_path):
    from prospect.generators import BaselineGenerator
    from prospect.runners import VLMStreamRunner

    runner = VLMStreamRunner(model_name="tiny_random", device="cpu", torch_dtype="float32", max_new_tokens=4,
                             context_strategy_type="drop_middle", context_strategy_config={"last_keep_len": 64, "max_seq_len": 512},
                             model=tiny_model)
    metrics = BaselineGenerator(runner=runner, dataset=synthetic_conversations[:2], output_dir=tmp_path).run()
    assert SEED_METRICS <= set(metrics) and metrics["frames_processed"] == sum(c.num_frames for c in synthetic_conversations[:2])
    document = json.loads((tmp_path / "results.json").read_text())
    assert document["status"] == "ok" and document["metrics"] == metrics
    assert (tmp_path / "timeline.html").is_file() and (tmp_path / "predictions.json").is_file()


def test_an_interrupted_run_is_recorded_as_failed_with_what_it_computed(small_cfg, tmp_path, monkeypatch):
    import prospect.experiment as experiment
    from prospect.stream.oracle import OracleRunner

    class Interrupted(OracleRunner):
        calls = 0

        def run(self, conversation, result=None, progress=False):
            Interrupted.calls += 1
            if Interrupted.calls == 2:
                raise KeyboardInterrupt
            return super().run(conversation, result, progress)

    monkeypatch.setattr(experiment, "OracleRunner", Interrupted)  # the run path builds the oracle as its one lane
    with pytest.raises(KeyboardInterrupt):
        run(small_cfg("model=oracle"), tmp_path)
    document = json.loads((tmp_path / "results.json").read_text())
    assert document["status"] == "failed" and document["error"] == "interrupted (KeyboardInterrupt)"
    assert document["metrics"]["frames_processed"] > 0  # the first conversation is kept
