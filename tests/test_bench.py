"""`python -m prospect.bench` on CPU with the tiny model: both paths in one run, same greedy replies."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from prospect.bench.__main__ import build_parser
from prospect.context_strategies import zoo_strategies


def test_bench_compares_both_paths_in_one_run(tmp_path, model_cache_dir):
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, "-m", "prospect.bench", "--model", "tiny_random", "--device", "cpu", "--seconds", "20", "--turns", "4",
         "--reply-tokens", "5", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ, "PROSPECT_CACHE_DIR": str(model_cache_dir)},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["video"] == {"frames": 41, "reference_turns": 4, "reply_tokens": 5}
    for path in ("eager", "optimized"):
        figures = report[path]
        assert figures["frames"] == 41 and figures["replies"] == 4
        assert figures["ms_per_frame"] > 0 and figures["decode_ms_per_token"] > 0 and figures["peak_memory_mb"] > 0
    assert report["ratio_eager_over_optimized"] == pytest.approx(report["eager"]["ms_per_frame"] / report["optimized"]["ms_per_frame"])
    assert report["reply_agreement"] == 1.0  # fp32 on CPU: the optimized path reproduces the eager replies
    assert "eager/optimized" in result.stdout and "greedy replies identical on both paths: 100.0% of 4" in result.stdout
    measured = report["measurements"]  # the optimized path again, and with the stream's measurements on
    assert list(measured) == ["optimized_again", "optimized+reference_scores", "optimized+reference_scores+speak_probe"]
    assert measured["optimized+reference_scores"]["references_scored"] == 4 and measured["optimized_again"]["references_scored"] == 0
    assert measured["optimized+reference_scores+speak_probe"]["frames_probed"] == 41
    for name, figures in measured.items():  # on CPU the measurements change no reply
        assert figures["reply_agreement_with_optimized"] == 1.0, name
        assert figures["ratio_to_optimized"] == pytest.approx(figures["ms_per_frame"] / report["optimized"]["ms_per_frame"])
    assert "optimized+reference_scores+speak_probe:" in result.stdout
    compile = report["compile"]  # the optimized path with and without torch.compile: off here (auto = on CUDA)
    assert compile["compiled"] is False and compile["reply_agreement"] == 1.0
    assert set(compile["decode_ms_per_token"]) == {"uncompiled", "compiled"} and compile["decode_ms_per_token"]["uncompiled"] > 0
    assert "optimized path not compiled here" in result.stdout


def test_bench_rejects_bad_arguments():
    result = subprocess.run([sys.executable, "-m", "prospect.bench", "--turns", "0"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2 and "--turns, --reply-tokens and --seconds must be positive" in result.stderr


@pytest.mark.slow
def test_bench_grid_runs_the_three_sweeps(tmp_path, model_cache_dir):
    """Sequential eager, the GPU pool and the fused lanes in one command; on CPU every lane's replies equal the
    same job's run alone (the pool's), job key by job key."""
    out = tmp_path / "grid.json"
    result = subprocess.run(
        [sys.executable, "-m", "prospect.bench", "grid", "--fused", "--model", "tiny_random", "--seconds", "8", "--reply-tokens", "4",
         "--eager-jobs", "4", "--jobs-per-gpu", "2", "--summary-tokens", "16", "--grid-dir", str(tmp_path / "grid"), "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=1800, env={**os.environ, "PROSPECT_CACHE_DIR": str(model_cache_dir)},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(out.read_text())
    runs = report["grid"]
    assert runs["sequential_eager"]["ok"] == 4 and runs["concurrent_optimized"]["ok"] == 12 and runs["fused"]["ok"] == 12
    assert runs["fused"]["workers"][0]["lanes"] == 12
    split = runs["fused"]["time_split"]  # where the fused sweep's wall time went: the parts add up to it
    assert split["model_loading_s"] > 0 and split["streaming_s"] > 0 and split["before_first_worker_s"] > 0
    parts = ("before_first_worker_s", "model_loading_s", "streaming_s", "worker_rest_s", "after_last_worker_s")
    assert sum(split[k] for k in parts) == pytest.approx(runs["fused"]["wall_s"], abs=0.5)
    rest = split["worker_rest_parts"]  # the worker's rest split by its lanes' results stamps: each part took time
    assert min(rest.values()) > 0
    assert "the worker's rest: start-up" in result.stdout
    for ratio in ("concurrent_optimized/sequential_eager", "fused/sequential_eager", "fused/concurrent_optimized"):
        faster, slower = ratio.split("/")
        assert report["ratios"][ratio] == pytest.approx(runs[faster]["jobs_per_hour"] / runs[slower]["jobs_per_hour"])
    agreement = report["lane_agreement"]
    assert len(agreement["per_job"]) == 6 and agreement["replies"] > 0 and agreement["rate"] == 1.0  # 6 distinct job keys
    assert "| fused lanes (hydra/launcher=fused) | 12 (12) | 12 |" in result.stdout and "fused/sequential_eager:" in result.stdout
    assert Path(report["grid_dir"]).parent == tmp_path / "grid"  # this run's own folder: a rerun keeps it
    summarizing = [json.loads(p.read_text())["config"]["strategy"] for p in Path(report["grid_dir"]).rglob("results.json")]
    assert {s["summary_max_new_tokens"] for s in summarizing if s["name"] == "summarize_and_drop"} == {16}
    assert "summaries of up to 16 tokens" in result.stdout


@pytest.mark.slow
def test_a_stopped_bench_grid_keeps_its_finished_jobs_and_starts_no_later_part(tmp_path, model_cache_dir):
    """SIGTERM to the bench's process group (as `timeout` sends it) while the sequential eager sweep runs: the
    sweep, in a session of its own, gets it once from the bench and stops its job after the current frame (a
    second signal would stop it at once); the bench writes grid.json with the jobs that finished, counted up to
    the last one's end, says it was stopped, runs no later part and exits 143."""
    import signal
    import time

    out = tmp_path / "grid.json"
    bench = subprocess.Popen(
        [sys.executable, "-m", "prospect.bench", "grid", "--part", "sequential_eager,fused", "--model", "tiny_random", "--seconds", "8",
         "--reply-tokens", "4", "--eager-jobs", "4", "--summary-tokens", "16", "--grid-dir", str(tmp_path / "grid"), "--out", str(out)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PROSPECT_CACHE_DIR": str(model_cache_dir)},
        start_new_session=True)
    started = time.time()
    deadline = time.monotonic() + 600
    while not any(json.loads(p.read_text()).get("status") == "ok" for p in (tmp_path / "grid").rglob("results.json")):
        assert bench.poll() is None and time.monotonic() < deadline, "no eager job finished"
        time.sleep(0.2)
    os.killpg(bench.pid, signal.SIGTERM)
    signalled = time.time() - started
    stdout, stderr = bench.communicate(timeout=300)
    assert bench.returncode == 143, stderr[-2000:]
    report = json.loads(out.read_text())
    eager = report["grid"]["sequential_eager"]
    assert report["stopped_by"] == eager["stopped_by"] == "SIGTERM" and "fused" not in report["grid"]
    assert 1 <= eager["ok"] == eager["computed"] < 4 and eager["wall_s"] < signalled  # up to the last finished job's end
    assert eager["jobs_per_hour"] == pytest.approx(3600 * eager["ok"] / eager["wall_s"])
    eager_folder = Path(report["grid_dir"]) / "sequential_eager"
    assert (eager_folder / "summary.md").is_file()  # the sweep stopped itself and wrote its summary
    output = (eager_folder / "sweep.log").read_text()
    assert output.count("SIGTERM received") == 1 and "sent twice" not in output  # the signal reached the sweep once
    assert "stopped by SIGTERM" in stdout and not (Path(report["grid_dir"]) / "fused").exists()


@pytest.mark.parametrize("args, message", [
    (["--part", "fused,pool"], "--part 'fused,pool': expected a comma-separated list of sequential_eager, concurrent_optimized, fused, zoo_fused"),
    (["--fused", "--lanes-per-gpu", "0"], "--lanes-per-gpu 0: must be at least 1"),
    (["--jobs-per-gpu", "-2"], "--jobs-per-gpu -2: must be at least 1"),
    (["--summary-tokens", "0"], "--summary-tokens 0: must be at least 1"),
])
def test_bench_grid_rejects_bad_arguments_in_one_line(tmp_path, args, message):
    result = subprocess.run([sys.executable, "-m", "prospect.bench", "grid", *args, "--grid-dir", str(tmp_path)], cwd=REPO,
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip() == f"prospect.bench: error: {message}"
    assert not any(tmp_path.iterdir())  # nothing ran


@pytest.mark.slow  # CI's slow pass; by default the bench's two paths run (above) and the zoo's bad strategies fail in one line
def test_bench_zoo_times_every_bounded_strategy(tmp_path, model_cache_dir):
    out = tmp_path / "zoo.json"
    result = bench("zoo", model_cache_dir, "--seconds", "30", "--turns", "4", "--reply-tokens", "4", "--max-seq-len", "512",
                   "--reserved", "32", "--last-keep", "96", "--vision-batch", "4",
                   "--strategies", "drop_middle,tar_van,snapkv,snapkv:selection=shared,streammem:merge=false", "--out", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.loads(out.read_text())["strategies"]
    assert list(rows) == ["drop_middle", "tar_van", "snapkv", "snapkv:selection=shared", "streammem:merge=false"]
    for row in rows.values():
        assert row["reductions"] >= 1 and row["ms_per_reduction"] > 0 and row["ms_per_frame"] > 0
        assert row["max_cache"] <= 512
    assert "ms/reduction" in result.stdout and "snapkv" in result.stdout


@pytest.mark.parametrize("args, message", [
    (["--strategies", "drop_midle"], "--strategies drop_midle: strategy_type=drop_midle: choose one of"),
    (["--strategies", "snapkv:selection=per_token"], "--strategies snapkv:selection=per_token: selection=per_token: choose one of"),
    (["--strategies", "snapkv:selection"], "--strategies snapkv:selection: selection: expected key=value"),
    (["--strategies", "snapkv:windwo=4"], "--strategies snapkv:windwo=4: windwo: not a key of snapkv; it has: max_seq_len"),
    (["--strategies", "snapkv", "--last-keep", "4000"], "--strategies snapkv: last_keep_len=4000: last_keep_len + reserved_seq_len"),
])
def test_bench_zoo_rejects_bad_strategies_in_one_line(args, message):
    result = subprocess.run([sys.executable, "-m", "prospect.bench", "zoo", *args], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().startswith(f"prospect.bench: error: {message}") and "\n" not in result.stderr.strip()


def test_bench_zoo_times_every_bounded_strategy_by_default():
    """Without --strategies the zoo times the registry's bounded strategies (all but full), resolved after parsing."""
    from prospect.bench.zoo import build_strategies

    args = build_parser().parse_args(["zoo"])
    assert args.strategies is None
    assert list(build_strategies(args)) == zoo_strategies() and "full" not in zoo_strategies()


def bench(mode: str, model_cache_dir: Path, *args: str) -> subprocess.CompletedProcess:
    """`python -m prospect.bench MODE` on the tiny random model on CPU."""
    return subprocess.run([sys.executable, "-m", "prospect.bench", mode, "--model", "tiny_random", "--device", "cpu", *args],
                          cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PROSPECT_CACHE_DIR": str(model_cache_dir)})


@pytest.mark.slow  # CI's slow pass only (the bench's dataset mode); by default its bad counts fail in one line (below)
def test_bench_dataset_streams_conversations_one_by_one_and_batched(tmp_path, model_cache_dir):
    out = tmp_path / "dataset.json"
    result = bench("dataset", model_cache_dir, "--seconds", "16", "--turns", "4", "--reply-tokens", "5", "--conversations", "4",
                   "--conversation-batch", "3", "--max-seq-len", "700", "--reserved", "32", "--last-keep", "128", "--out", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["video"]["frames_each"] == [17, 22, 27, 33] and report["video"]["frames"] == 99  # 8 s to 16 s at 2 fps
    assert report["one_by_one"]["conversation_batch"] == 1 and report["batched"]["conversation_batch"] == 3
    assert report["ratio"] == pytest.approx(report["batched"]["frames_per_s"] / report["one_by_one"]["frames_per_s"])
    assert report["replies_compared"] == 12 and report["reply_agreement"] == 1.0  # CPU: lanes one at a time, bitwise
    assert "batched / one by one:" in result.stdout


def test_bench_dataset_rejects_a_bad_count_in_one_line():
    result = subprocess.run([sys.executable, "-m", "prospect.bench", "dataset", "--conversations", "0"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.strip() == "prospect.bench: error: --conversations 0: must be at least 1"


def test_time_split_of_a_fused_sweep_adds_up(tmp_path):
    """A hand-made fused sweep folder: one worker from t=103 to t=163 that loaded its model in 7.5 s, two lanes whose
    frame steps took 41.5 s and 40 s (5 s of summaries in the second: the first lane's steps held them too), in a
    sweep of 70 s started at t=100. The lanes' run started at t=105 and t=105.2 and their results were stamped at
    t=157 and t=158: the worker's 11 s of rest are 2 s of start-up, 6 s of files after the first results and 3 s
    in the run outside loading and frames."""
    from prospect.bench.grid import time_split

    (tmp_path / "fused").mkdir()
    log = tmp_path / "fused" / "worker-0.log"
    log.write_text("fused worker 0: 2 lanes\nmodel loaded in 7.5 s\n")
    folders = []
    lanes = (("0_a", [{"wall_ms": 20000.0}, {"wall_ms": 21500.0}], 105.0, 157.0),
             ("1_b", [{"wall_ms": 20000.0}, {"wall_ms": 20000.0, "summary_ms": 5000.0}], 105.2, 158.0))
    for name, steps, started, finished in lanes:
        (tmp_path / name).mkdir()
        (tmp_path / name / "trace.jsonl").write_text("".join(json.dumps(r) + "\n" for r in steps))
        (tmp_path / name / "results.json").write_text(json.dumps({"status": "ok", "started_at": started, "finished_at": finished}))
        folders.append(str(tmp_path / name))
    (tmp_path / "fused" / "workers.json").write_text(json.dumps(
        [{"worker": 0, "jobs": [0, 1], "folders": folders, "started_at": 103.0, "finished_at": 163.0, "log": str(log)}]))
    split = time_split(tmp_path, started_at=100.0, wall_s=70.0)
    parts = split.pop("worker_rest_parts")
    assert split == pytest.approx({"before_first_worker_s": 3.0, "model_loading_s": 7.5, "streaming_s": 41.5, "summaries_s": 5.0,
                                   "worker_rest_s": 11.0, "after_last_worker_s": 7.0})
    assert parts == pytest.approx({"start_s": 2.0, "outside_frames_s": 3.0, "files_s": 6.0})
    (tmp_path / "1_b" / "results.json").unlink()  # a lane without results (stopped): its worker's rest is not split
    assert "worker_rest_parts" not in time_split(tmp_path, started_at=100.0, wall_s=70.0)
    assert time_split(tmp_path / "nothing", 0.0, 1.0) is None


def test_time_split_counts_each_lane_set_of_a_worker_and_leaves_out_reused_results(tmp_path):
    """A worker from t=200 to t=300 runs two lane sets: A and B from t=202 (frame steps 30 s and 28 s, 4 s of
    summaries in B; results at t=240 and t=241), then C from t=245 (20 s, 2 s of summaries; results at t=280). D
    reuses the result of a run another sweep made meanwhile (cached; stamps t=210-220, a trace of 99 s): it did
    not run here. The model loaded in
    3 s and 2 s. Streaming is 30 + 20 s, the rest 100 - 5 - 50 = 45 s: 2 s of start-up, 5 + 20 s of files, 18 s
    outside the frames."""
    from prospect.bench.grid import time_split

    (tmp_path / "fused").mkdir()
    log = tmp_path / "fused" / "worker-0.log"
    log.write_text("model loaded in 3.0 s\nlane set 2 of 2\nmodel loaded in 2.0 s\n")
    folders = []
    for name, wall, summary, started, finished in (("0_a", 30.0, 0.0, 202.0, 240.0), ("1_b", 28.0, 4.0, 202.0001, 241.0),
                                                    ("2_c", 20.0, 2.0, 245.0, 280.0), ("3_d", 99.0, 0.0, 210.0, 220.0)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "trace.jsonl").write_text(json.dumps({"wall_ms": wall * 1000, "summary_ms": summary * 1000}) + "\n")
        (tmp_path / name / "results.json").write_text(json.dumps({"status": "ok", "started_at": started, "finished_at": finished,
                                                                  "cached": name == "3_d"}))
        folders.append(str(tmp_path / name))
    (tmp_path / "fused" / "workers.json").write_text(json.dumps(
        [{"worker": 0, "jobs": [0, 1, 2, 3], "folders": folders, "started_at": 200.0, "finished_at": 300.0, "log": str(log)}]))
    split = time_split(tmp_path, started_at=195.0, wall_s=110.0)
    assert split.pop("worker_rest_parts") == pytest.approx({"start_s": 2.0, "outside_frames_s": 18.0, "files_s": 25.0})
    assert split == pytest.approx({"before_first_worker_s": 5.0, "model_loading_s": 5.0, "streaming_s": 50.0, "summaries_s": 6.0,
                                   "worker_rest_s": 45.0, "after_last_worker_s": 5.0})


@pytest.mark.parametrize("log_writable", [True, False])
def test_a_parts_sweep_output_goes_to_its_log_and_an_unwritable_log_loses_no_result(tmp_path, caplog, log_writable):
    from prospect.bench.grid import _sweep
    from prospect.signals import SweepStop

    # a stand-in sweep command: prints, and writes one finished job's results.json where hydra.sweep.dir says
    script = ("import json, pathlib, sys; folder = pathlib.Path(sys.argv[1].split('=', 1)[1]) / '0'; "
              "folder.mkdir(parents=True); print('the sweep ran'); "
              "(folder / 'results.json').write_text(json.dumps({'status': 'ok', 'metrics': {'time_per_frame': 0.02}}))")
    folder = tmp_path / "part"
    if not log_writable:
        (folder / "sweep.log").mkdir(parents=True)  # a folder where the log should go: writing it fails
    run = _sweep("part", [sys.executable, "-c", script], folder, SweepStop())
    assert (run["jobs"], run["computed"], run["ok"], run["exit_code"]) == (1, 1, 1, 0)
    assert run["ms_per_frame"] == pytest.approx(20.0) and run["jobs_per_hour"] > 0
    if log_writable:
        assert (folder / "sweep.log").read_text() == "the sweep ran\n" and not caplog.records
    else:
        assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [
            f"part: cannot write {folder / 'sweep.log'} (Is a directory); its jobs' results still count"]
