"""stream.conversation_batch: a job streams several conversations of its dataset at once, as lanes of one model
(docs/stream.md, "Conversations as lanes"). Real runs of `python -m prospect.run` with the tiny random model on
CPU: each conversation's predictions and trace equal those of the conversations streamed one after the other,
alone and under the fused launcher (strategies x conversations). Bad values: tests/test_config.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from test_fused import _untimed_trace, fused, jobs

# 2 videos x 2 user types = 4 conversations of 12 s; a cache small enough that each conversation reduces once
DATA = ["model=tiny_random", "model.device=cpu", "dataset.generate.videos=2", "dataset.generate.seconds=12", "dataset.user_types=null",
        "strategy.max_seq_len=800", "strategy.reserved_seq_len=32", "strategy.last_keep_len=128", "stream.max_new_tokens=4"]
SUMMARY_ROOM = "strategy.max_seq_len=1300"  # a summary's restart (knowledge and summary) needs more room


def prospect_run(tmp_path: Path, model_cache_dir: Path, *args: str, folder: str) -> subprocess.CompletedProcess:
    sweep = ["-m", f"hydra.sweep.dir={tmp_path / folder}"] if "-m" in args else [f"hydra.run.dir={tmp_path / folder}"]
    command = [sys.executable, "-m", "prospect.run", *sweep, "logger=none", f"cache_root={tmp_path}",
               *[a for a in args if a != "-m"]]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PROSPECT_CACHE_DIR": str(model_cache_dir)}
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)


def by_conversation(trace: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for record in trace:
        out.setdefault(record["conversation"], []).append({k: v for k, v in record.items() if k != "wall_ms"})
    return out


def assert_same_job(batched: Path, alone: Path) -> dict:
    """The same predictions (dataset order), each conversation's trace, job key and scores; returns batched's results."""
    mine, theirs = (json.loads((f / "results.json").read_text()) for f in (batched, alone))
    assert mine["status"] == theirs["status"] == "ok", (mine.get("error"), theirs.get("error"))
    assert mine["job_key"] == theirs["job_key"]
    assert json.loads((batched / "predictions.json").read_text()) == json.loads((alone / "predictions.json").read_text())
    assert by_conversation(_untimed_trace(batched)) == by_conversation(_untimed_trace(alone))
    for name in ("ref_ppl", "speak_auc", "F1", "cache_tokens_mean"):
        if name in theirs["metrics"]:
            assert mine["metrics"][name] == theirs["metrics"][name], name
    return mine


@pytest.mark.slow  # CI's slow pass: the command line with stream.conversation_batch; by default tests/test_lanes.py
# checks conversations as lanes bitwise, and test_batches_take_the_longest_conversations_first_... below runs stream_jobs
def test_a_job_streams_its_conversations_in_batches_as_it_would_one_by_one(tmp_path, model_cache_dir):
    alone = prospect_run(tmp_path, model_cache_dir, *DATA, "strategy=summarize_and_drop", SUMMARY_ROOM, "stream.optimized=true",
                         "stream.conversation_batch=1", folder="alone")
    assert alone.returncode == 0, alone.stderr[-3000:]
    batched = prospect_run(tmp_path, model_cache_dir, *DATA, "strategy=summarize_and_drop", SUMMARY_ROOM, "stream.conversation_batch=3",
                           folder="batched")
    assert batched.returncode == 0, batched.stderr[-3000:]
    results = assert_same_job(tmp_path / "batched", tmp_path / "alone")
    assert results["conversation_batch"] == 3 and results["config"]["stream"]["optimized"] is True
    predictions = json.loads((tmp_path / "batched" / "predictions.json").read_text())["conversations"]
    assert len(predictions) == 4 and any(frame["gen"] for c in predictions for frame in c["frames"])
    trace = [json.loads(line) for line in (tmp_path / "batched" / "trace.jsonl").read_text().splitlines()]
    firsts = [record["conversation"] for record in trace[:3]]
    assert len(set(firsts)) == 3  # the first batch's three conversations streamed side by side
    assert sum("summary" in record["events"] for record in trace) >= 4
    assert "streaming 3 conversations at once" in (tmp_path / "batched" / "run.log").read_text()


@pytest.mark.slow  # CI's slow pass; tests/test_lanes.py checks strategies x conversations as lanes bitwise by default
def test_fused_lanes_compose_with_conversation_batches(tmp_path, model_cache_dir):
    """hydra/launcher=fused with conversation_batch 2: 2 strategies x 2 conversations as lanes of one process;
    each job equals the same job run alone, one conversation after the other."""
    strategies = "strategy=drop_middle,snapkv"
    lanes = fused(tmp_path, *DATA, strategies, "stream.conversation_batch=2", name="lanes", model_cache_dir=model_cache_dir)
    assert lanes.returncode == 0, lanes.stderr[-3000:]
    alone = prospect_run(tmp_path, model_cache_dir, "-m", *DATA, strategies, "stream.optimized=true", "stream.conversation_batch=1",
                         folder="alone")
    assert alone.returncode == 0, alone.stderr[-3000:]
    mine, theirs = jobs(tmp_path / "lanes"), jobs(tmp_path / "alone")
    assert sorted(mine) == sorted(theirs) == [0, 1]
    for number in mine:
        results = assert_same_job(mine[number][0], theirs[number][0])
        assert results["lanes"]["conversation_batch"] == 2 and results["lanes"]["jobs"] == 2
        trace = [json.loads(line) for line in (mine[number][0] / "trace.jsonl").read_text().splitlines()]
        assert sum(len(record.get("reductions", [])) for record in trace) >= 4


def test_batches_take_the_longest_conversations_first_and_files_keep_dataset_order(tmp_path, tiny_model, synthetic_conversations):
    """stream_jobs with batch 2 over conversations of 20, 57 and 35 frames: the first batch holds the 57- and
    35-frame ones (similar lengths), the second the 20-frame one; predictions.json lists them in dataset order and
    each equals its conversation streamed alone."""
    import dataclasses

    from prospect.context_strategies import create_strategy
    from prospect.experiment import stream_jobs
    from prospect.stream.lanes import LaneRunner
    from prospect.stream.runner import StreamRunner
    from prospect.stream.settings import StreamSettings
    from prospect.tracking.job_files import JobFiles

    first, last = synthetic_conversations[0], synthetic_conversations[-1]
    conversations = [dataclasses.replace(first, id="short", frames=first.frames[:20]), last,
                     dataclasses.replace(first, id="mid", frames=first.frames[:35])]
    settings = StreamSettings(max_new_tokens=4, optimized=True)
    small = dict(max_seq_len=384, reserved_seq_len=32, last_keep_len=64)
    runner = LaneRunner(tiny_model, [create_strategy("drop_middle", **small) for _ in range(2)], settings)
    batches = []
    original = runner.run
    runner.run = lambda streamed, *a, **k: batches.append([c.id for c in streamed]) or original(streamed, *a, **k)
    results: list = []
    files = JobFiles(tmp_path, results)
    try:
        stream_jobs(runner, conversations, [files], [results], batch=2)
    finally:
        files.close()
    assert batches == [[last.id, "mid"], ["short"]]
    predictions = json.loads((tmp_path / "predictions.json").read_text())["conversations"]
    assert [c["id"] for c in predictions] == ["short", last.id, "mid"] == [r.conversation.id for r in results]
    trace = [json.loads(line) for line in (tmp_path / "trace.jsonl").read_text().splitlines()]
    for conversation, result in zip(conversations, results):
        alone = StreamRunner(tiny_model, create_strategy("drop_middle", **small), settings).run(conversation)
        assert result.replies == alone.replies and len(result.trace) == conversation.num_frames
        mine = [r for r in trace if r["conversation"] == conversation.id]
        assert [r["cache_after"] for r in mine] == [r["cache_after"] for r in alone.trace]


class _BrokenFrames:
    """A frame source whose frames from `at` on cannot be read (a corrupt video)."""

    def __init__(self, source, at: int):
        self.source, self.at = source, at

    def image(self, original_index: int):
        if original_index >= self.at:
            raise OSError(f"corrupt video frame {original_index}")
        return self.source.image(original_index)


def _stream(tmp_path, model, conversations, batch, stop=None, strategy="drop_middle"):
    """stream_jobs of one drop_middle job over `conversations`, `batch` at once; returns (results, predictions.json)."""
    from prospect.context_strategies import create_strategy
    from prospect.experiment import stream_jobs
    from prospect.stream.lanes import LaneRunner
    from prospect.stream.settings import StreamSettings
    from prospect.tracking.job_files import JobFiles

    settings = StreamSettings(max_new_tokens=4, optimized=True)
    small = dict(max_seq_len=384, reserved_seq_len=32, last_keep_len=64)
    runner = LaneRunner(model, [create_strategy(strategy, **small) for _ in range(batch)], settings)
    results: list = []
    files = JobFiles(tmp_path, results)
    raised = None
    try:
        stream_jobs(runner, conversations, [files], [results], stop, batch=batch)
    except BaseException as error:
        raised = error
    finally:
        files.close()
    predictions = {c["id"]: c for c in json.loads((tmp_path / "predictions.json").read_text())["conversations"]}
    return results, predictions, raised


def test_a_conversation_whose_frames_fail_fails_alone_in_its_batch(tmp_path, tiny_model, synthetic_conversations):
    import dataclasses

    first, last = synthetic_conversations[0], synthetic_conversations[-1]
    broken = dataclasses.replace(first, id="broken", frame_source=_BrokenFrames(first.frame_source, at=20))
    healthy = dataclasses.replace(last, id="healthy", frames=last.frames[:40])
    (tmp_path / "batched").mkdir()
    (tmp_path / "alone").mkdir()
    results, predictions, raised = _stream(tmp_path / "batched", tiny_model, [broken, healthy], batch=2)
    alone, _, _ = _stream(tmp_path / "alone", tiny_model, [healthy], batch=1)
    assert raised is None
    by_id = {r.conversation.id: r for r in results}
    assert by_id["broken"].error == "OSError: corrupt video frame 20" and 0 < len(by_id["broken"].trace) <= 20
    assert predictions["broken"]["error"] == "OSError: corrupt video frame 20"
    assert by_id["healthy"].error is None and "error" not in predictions["healthy"]
    assert by_id["healthy"].replies == alone[0].replies and len(by_id["healthy"].trace) == 40


def test_a_system_prompt_that_does_not_fit_fails_its_conversation_alone(tmp_path, tiny_model, synthetic_conversations):
    import dataclasses

    first, last = synthetic_conversations[0], synthetic_conversations[-1]
    long = dataclasses.replace(first, id="long_prompt", system_prompt="Watch closely. " * 200, frames=first.frames[:12])
    healthy = dataclasses.replace(last, id="healthy", frames=last.frames[:12])
    results, predictions, raised = _stream(tmp_path, tiny_model, [long, healthy], batch=2)
    by_id = {r.conversation.id: r for r in results}
    assert raised is None and "KV buffer full" in by_id["long_prompt"].error and by_id["long_prompt"].trace == []
    assert by_id["healthy"].error is None and len(by_id["healthy"].trace) == 12


def test_a_stop_mid_batch_keeps_the_conversations_it_finished_whole(tmp_path, tiny_model, synthetic_conversations):
    """SIGTERM at step 30 of a batch of a 10-frame, a 57-frame and a failing conversation: the first was done at
    step 10 and stays whole (scored), the second is marked partial with its 31 frames, the third keeps its own error."""
    import dataclasses

    from prospect.signals import Interrupted

    first, last = synthetic_conversations[0], synthetic_conversations[-1]
    short = dataclasses.replace(first, id="short", frames=first.frames[:10])
    broken = dataclasses.replace(first, id="broken", frame_source=_BrokenFrames(first.frame_source, at=20))

    class StopAtFrame30:
        def check(self, where: str) -> None:
            if where.startswith("at frame 30 "):
                raise Interrupted(15, where)

    results, predictions, raised = _stream(tmp_path, tiny_model, [short, last, broken], batch=3, stop=StopAtFrame30())
    assert isinstance(raised, Interrupted) and "at frame 30 of conversations" in str(raised)
    assert "partial" not in predictions["short"] and "error" not in predictions["short"]
    assert predictions["broken"]["error"] == "OSError: corrupt video frame 20" and "partial" not in predictions["broken"]
    assert predictions[last.id]["partial"] is True and predictions[last.id]["frames_streamed"] == 31
    assert len({r.conversation.id: r for r in results}["short"].trace) == 10


def test_an_explicit_batch_has_one_job_key_before_and_after_the_run_settles_it():
    """The result cache looks a job up by the key of its composed config (stream.optimized auto) and the run writes
    the key of the settled one (optimized true): an explicit conversation_batch > 1 runs optimized, so both agree on
    CPU too; the oracle streams nothing and ignores the setting."""
    from omegaconf import OmegaConf

    from conftest import compose
    from prospect.tracking.results import job_key

    composed = OmegaConf.to_container(compose("model=tiny_random", "stream.conversation_batch=2"), resolve=True)
    settled = {**composed, "stream": {**composed["stream"], "optimized": True}}
    alone = {**composed, "stream": {**composed["stream"], "conversation_batch": 1, "optimized": True}}
    assert job_key(composed) == job_key(settled) == job_key(alone)
    oracle = OmegaConf.to_container(compose("model=oracle", "stream.conversation_batch=3"), resolve=True)
    plain = OmegaConf.to_container(compose("model=oracle"), resolve=True)
    assert job_key(oracle) == job_key(plain)
