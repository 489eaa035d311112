"""Faults, for real: `python -m prospect.run` in subprocesses, real signals (SIGINT, SIGTERM, SIGUSR2,
SIGKILL), real broken files, a real W&B failure. Each test asserts the one-line error a person sees and
that nothing already computed is lost.

Runs use the tiny random model on CPU with one torch thread (several threads on a shared 2-core machine
make each frame ~100x slower), replies of 2 tokens and no evaluation. The interrupted runs stream a long
synthetic video (300 s, 600 frames) so that a signal sent after a few frames lands mid-conversation.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO

TINY = ["model=tiny_random", "model.device=cpu", "eval=none", "stream.max_new_tokens=2"]
LONG_VIDEO = "dataset.generate.seconds=300"  # 600 frames: a signal after a few frames lands mid-conversation
ERROR_PREFIX = "prospect: error: "


@pytest.fixture(scope="module")
def env(model_cache_dir, tiny_model) -> dict:
    """The subprocesses' environment; `tiny_model` makes sure the model's tokenizer is converted into the
    cache once, before several processes want it at the same time."""
    return {
        **os.environ, "HF_HUB_OFFLINE": "1", "PROSPECT_CACHE_DIR": str(model_cache_dir), "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true", "PYTHONUNBUFFERED": "1",
    }


class Run:
    """A `python -m ...` subprocess with its stdout/stderr in files (a full pipe would stall it)."""

    started: list[subprocess.Popen] = []  # killed after each test if still running (a failed assertion)

    def __init__(self, tmp_path: Path, name: str, args: list[str], env: dict, module: str = "prospect.run"):
        self.out, self.err = tmp_path / f"{name}.out", tmp_path / f"{name}.err"
        with self.out.open("w") as out, self.err.open("w") as err:
            self.process = subprocess.Popen([sys.executable, "-m", module, *args], cwd=REPO, stdout=out, stderr=err, env=env)
        Run.started.append(self.process)

    def wait(self, timeout: float = 300) -> int:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    @property
    def stdout(self) -> str:
        return self.out.read_text(errors="replace")

    @property
    def stderr(self) -> str:
        return self.err.read_text(errors="replace")

    def error_lines(self) -> list[str]:
        return [line for line in self.stderr.replace("\r", "\n").splitlines() if line.startswith(ERROR_PREFIX)]


@pytest.fixture(autouse=True)
def _no_process_left_behind():
    yield
    while Run.started:
        process = Run.started.pop()
        if process.poll() is None:
            process.kill()
            process.wait(30)


def run_to_end(tmp_path: Path, name: str, args: list[str], env: dict, module: str = "prospect.run", timeout: float = 300) -> Run:
    run = Run(tmp_path, name, args, env, module)
    run.wait(timeout)
    return run


def wait_for_frames(run: Run, pattern: str, frames: int, root: Path, timeout: float = 120) -> int:
    """Wait until the trace.jsonl matching `pattern` under `root` has at least `frames` lines."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for trace in root.glob(pattern):
            lines = trace.read_bytes().count(b"\n")
            if lines >= frames:
                return lines
        if run.process.poll() is not None:
            pytest.fail(f"the run ended (code {run.process.returncode}) before streaming {frames} frames:\n{run.stderr[-3000:]}")
        time.sleep(0.02)
    run.process.kill()
    pytest.fail(f"no {frames} frames streamed in {timeout} s")


def read_trace(folder: Path) -> list[dict]:
    text = (folder / "trace.jsonl").read_text()
    assert text.endswith("\n"), "trace.jsonl ends with a complete record"
    return [json.loads(line) for line in text.splitlines()]


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def assert_nothing_lost(folder: Path) -> tuple[dict, dict, list[dict]]:
    """results.json, predictions.json and trace.jsonl agree: every streamed frame is in the trace, every
    reply in the trace is in predictions.json, and results.json counts them."""
    results, predictions, trace = read_json(folder / "results.json"), read_json(folder / "predictions.json"), read_trace(folder)
    assert results["metrics"]["frames_processed"] == len(trace)
    by_conversation: dict[str, list[dict]] = {}
    for record in trace:
        by_conversation.setdefault(record["conversation"], []).append(record)
    conversations = {c["id"]: c for c in predictions["conversations"]}
    assert set(by_conversation) <= set(conversations)
    for cid, records in by_conversation.items():
        assert [r["index"] for r in records] == sorted({r["index"] for r in records}), f"{cid}: frames out of order or twice"
        generated = {f["index"]: f["gen"] for f in conversations[cid]["frames"] if f["gen"]}
        assert generated == {r["index"]: r["reply"] for r in records if "reply" in r}, f"{cid}: replies differ"
    return results, predictions, trace


# ---- broken data ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def broken_data_run(tmp_path_factory, env) -> tuple[Run, Path, Path]:
    """One run over a ProAssist-format root with three broken samples: synthetic_001's frames file cut in
    half, synthetic_002's frames file missing, one line of synthetic_003 holding bytes that are not UTF-8, and
    a sample of synthetic_000 without any frames turn."""
    from prospect.data.synthetic import generate

    tmp = tmp_path_factory.mktemp("broken_data")
    generate(tmp / "root", videos=4, seconds=8, fps=2, seed=0, knowledge=True)
    data = tmp / "root" / "processed_data" / "synthetic"
    arrow = data / "frames" / "synthetic_001.arrow"
    arrow.write_bytes(arrow.read_bytes()[: arrow.stat().st_size // 2])
    (data / "frames" / "synthetic_002.arrow").unlink()
    annotation = data / "prepared" / "dialog-klg_test_L0_I1.jsonl"
    lines = annotation.read_bytes().splitlines(keepends=True)
    bad = next(i for i, line in enumerate(lines) if b'"synthetic_003"' in line and b"talk_some" in line)
    lines[bad] = lines[bad].replace(b'"content": "', b'"content": "\xff\xfe', 1)
    frameless = json.loads(lines[0])
    frameless["conversation"] = [turn for turn in frameless["conversation"] if turn["role"] != "frames"]
    frameless["metadata"]["user_id"] = "no_frames"
    lines.append(json.dumps(frameless).encode() + b"\n")
    annotation.write_bytes(b"".join(lines))
    out = tmp / "out"
    run = run_to_end(tmp, "run", [*TINY, "logger=none", "dataset=proassist", f"dataset.root={tmp / 'root'}", "dataset.subset=synthetic",
                                  "dataset.annotation=dialog-klg_test_L0_I1", f"hydra.run.dir={out}"], env)
    return run, out, annotation


def skipped_lines(run: Run) -> list[str]:
    return [line for line in run.stdout.splitlines() if "skipped sample:" in line]


def test_broken_samples_leave_the_others_streamed(broken_data_run):
    run, out, _ = broken_data_run
    assert run.process.returncode == 0, run.stderr[-3000:]
    results, predictions, trace = assert_nothing_lost(out)
    assert results["status"] == "ok"
    streamed = {"synthetic_000/0/no_talk_0", "synthetic_000/0/talk_some_1", "synthetic_003/0/no_talk_0"}
    assert {c["id"] for c in predictions["conversations"]} == streamed == {r["conversation"] for r in trace}
    assert len(skipped_lines(run)) == 6  # two lines each for 001 and 002, one for 003, one without frames
    assert "Traceback" not in run.stderr


def test_truncated_frames_file(broken_data_run):
    run, _, annotation = broken_data_run
    lines = [line for line in skipped_lines(run) if "synthetic_001" in line]
    assert len(lines) == 2 and all(f"{annotation}:" in line and "synthetic_001.arrow: not a readable arrow file" in line for line in lines)


def test_missing_frames_file(broken_data_run):
    run, _, annotation = broken_data_run
    lines = [line for line in skipped_lines(run) if "synthetic_002" in line]
    assert len(lines) == 2 and all("synthetic_002.arrow: frames file missing (video synthetic_002)" in line for line in lines)


def test_sample_without_frames(broken_data_run):
    run, _, annotation = broken_data_run
    [line] = [line for line in skipped_lines(run) if "no frames turn" in line]
    assert f"{annotation}:" in line and "video synthetic_000: the conversation has no frames turn" in line


def test_annotation_line_not_utf8(broken_data_run):
    run, _, annotation = broken_data_run
    [line] = [line for line in skipped_lines(run) if "synthetic_003" in line]
    assert f"{annotation}:8: video synthetic_003: not UTF-8 text" in line


# ---- signals ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("signum, code, logger", [(signal.SIGINT, 130, "none"),
                                                  pytest.param(signal.SIGTERM, 143, "wandb", marks=pytest.mark.slow)],
                         ids=["SIGINT", "SIGTERM-wandb"])
def test_signal_mid_conversation_keeps_what_was_computed(tmp_path, env, signum, code, logger):
    name = signal.Signals(signum).name
    out = tmp_path / "out"
    run = Run(tmp_path, "run", [*TINY, LONG_VIDEO, f"logger={logger}", f"hydra.run.dir={out}"], env)
    seen = wait_for_frames(run, "out/trace.jsonl", 5, tmp_path)
    run.signal(signum)
    assert run.wait() == code, run.stderr[-3000:]
    assert "Traceback" not in run.stderr

    results, predictions, trace = assert_nothing_lost(out)
    last = trace[-1]
    where = f"interrupted by {name} at frame {last['index']} of conversation {last['conversation']}"
    assert run.error_lines() == [f"{ERROR_PREFIX}{where} (what was computed is in {out})"]
    assert results["status"] == "failed" and results["error"] == where
    [conversation] = predictions["conversations"]
    assert seen <= len(trace) < conversation["num_frames"]  # stopped mid-conversation, after the frame in progress
    assert conversation["partial"] is True and conversation["frames_streamed"] == len(trace)
    assert conversation["stopped_at"] == {"index": last["index"], "time": last["time"]}
    assert conversation["error"].startswith(where)
    assert any(f["gen"] for f in conversation["frames"]), "the replies made before the signal are kept"
    if logger == "wandb":  # the W&B run is finished with the signal's exit code, its history has every frame once
        from prospect.tracking.wandb_records import read_wandb_records, summarize_records

        [log] = out.glob("wandb/offline-run-*/run-*.wandb")
        mirrored = summarize_records(read_wandb_records(log))
        assert mirrored["exit_code"] == code
        frames = [h for h in mirrored["history"] if "frame_index" in h["items"]]
        assert [h["items"]["frame_index"] for h in frames] == [r["index"] for r in trace]


@pytest.mark.slow  # CI's slow pass; by default tests/test_sweep.py stops a gpu_pool sweep with SIGTERM
def test_sigusr2_stops_a_sweep_and_the_summary_is_written(tmp_path, env):
    """submitit's preemption signal in a sweep: the job stops after its frame, no further job starts, the
    summary is written, exit 140; rerunning the command computes the interrupted job (and the one not started)."""
    args = ["-m", *TINY, LONG_VIDEO, "logger=none", "strategy=drop_all,none", f"hydra.sweep.dir={tmp_path / 'sweep'}",
            f"cache_root={tmp_path}"]
    run = Run(tmp_path, "sweep", args, env)
    wait_for_frames(run, "sweep/0_*/trace.jsonl", 5, tmp_path)
    run.signal(signal.SIGUSR2)
    assert run.wait() == 140, run.stderr[-3000:]
    [job] = (tmp_path / "sweep").glob("0_*")
    assert not list((tmp_path / "sweep").glob("1_*")), "no job starts after the interrupted one"
    results, _, trace = assert_nothing_lost(job)
    where = f"interrupted by SIGUSR2 at frame {trace[-1]['index']} of conversation {trace[-1]['conversation']}"
    assert results["status"] == "failed" and results["error"] == where
    assert run.error_lines() == [f"{ERROR_PREFIX}sweep stopped: {where} (jobs after it were not started; rerun the same command "
                                 "to resume: finished jobs are reused)"]
    summary = (tmp_path / "sweep" / "summary.md").read_text()
    assert "| failed |" in summary and "interrupted by SIGUSR2" in summary


# ---- sweeps: kill -9 and resume, two sweeps at once ----------------------------------------------------


def sweep_results(folder: Path) -> dict[str, dict]:
    return {p.parent.name.split("_", 1)[0]: read_json(p) for p in sorted(folder.glob("*/results.json"))}


def test_kill_9_mid_sweep_then_resume(tmp_path, env):
    """SIGKILL leaves job 1 without results.json and its lock file behind; the same command again reuses
    job 0 as it is, takes over the stale lock at once and recomputes job 1. (Job 0 streams a short video,
    job 1 the long one that is killed.)"""
    args = ["-m", *TINY, "dataset.generate.seconds=8,300", "logger=none", f"hydra.sweep.dir={tmp_path / 'sweep'}", f"cache_root={tmp_path}"]
    run = Run(tmp_path, "first", args, env)
    wait_for_frames(run, "sweep/1_*/trace.jsonl", 3, tmp_path)
    run.signal(signal.SIGKILL)
    assert run.wait() == -signal.SIGKILL
    sweep = tmp_path / "sweep"
    assert list(sweep_results(sweep)) == ["0"] and sweep_results(sweep)["0"]["status"] == "ok"
    [lock] = (tmp_path / ".locks").glob("*.lock")
    assert lock.read_text().endswith(f" {run.process.pid}")  # the killed process's lock is still there
    [first_job] = sweep.glob("0_*")
    stamp = (first_job / "results.json").stat().st_mtime_ns
    killed_frames = len(read_trace(next(sweep.glob("1_*"))))

    started = time.monotonic()
    again = run_to_end(tmp_path, "again", args, env)
    assert again.process.returncode == 0, again.stderr[-3000:]
    assert time.monotonic() - started < 120  # the stale lock did not hold it up (a live one waits 180 s)
    assert "taking over the stale lock" in again.stdout and f"process {run.process.pid} is gone" in again.stdout
    assert (first_job / "results.json").stat().st_mtime_ns == stamp  # job 0 reused as it was
    runs = sweep_results(sweep)
    assert {k: r["status"] for k, r in runs.items()} == {"0": "ok", "1": "ok"}
    results, _, trace = assert_nothing_lost(next(sweep.glob("1_*")))
    assert len(trace) > killed_frames and not list((tmp_path / ".locks").glob("*.lock"))
    assert "| failed |" not in (sweep / "summary.md").read_text()


@pytest.mark.slow  # CI's slow pass (~12 s)
def test_two_identical_sweeps_at_once_compute_each_job_once(tmp_path, env):
    common = ["-m", *TINY, "dataset.generate.seconds=60", "logger=none", "strategy=drop_all,none", f"cache_root={tmp_path}"]
    runs = [Run(tmp_path, name, [*common, f"hydra.sweep.dir={tmp_path / name}"], env) for name in ("a", "b")]
    for run in runs:
        assert run.wait() == 0, run.stderr[-3000:]
    jobs = [r for name in ("a", "b") for r in sweep_results(tmp_path / name).values()]
    assert len(jobs) == 4 and all(r["status"] == "ok" for r in jobs)
    computed: dict[str, int] = {}
    for r in jobs:
        computed[r["job_key"]] = computed.get(r["job_key"], 0) + (not r.get("cached"))
    assert len(computed) == 2 and set(computed.values()) == {1}, computed  # each key computed by one sweep only
    assert not list((tmp_path / ".locks").glob("*.lock"))


# ---- W&B ----------------------------------------------------------------------------------------------


def wandb_warnings(run: Run) -> list[str]:
    return [line for line in (run.stdout + run.stderr).splitlines() if "W&B mirror off" in line]


@pytest.mark.slow  # CI's slow pass; by default wandb fails mid-run in the next test
def test_wandb_failing_at_init_leaves_the_local_files(tmp_path, env):
    """An invalid W&B setting (WANDB_MODE=bogus, what W&B itself rejects): one warning, the run is complete."""
    out = tmp_path / "out"
    run = run_to_end(tmp_path, "run", [*TINY, "dataset.generate.seconds=8", "logger=wandb", f"hydra.run.dir={out}"],
                     {**env, "WANDB_MODE": "bogus"})
    assert run.process.returncode == 0, run.stderr[-3000:]
    [warning] = wandb_warnings(run)
    assert "wandb.init failed" in warning and "bogus" in warning
    results, predictions, trace = assert_nothing_lost(out)
    assert results["status"] == "ok" and len(trace) == predictions["conversations"][0]["num_frames"] and not run.error_lines()


def test_wandb_failing_mid_run_leaves_the_local_files(tmp_path, env):
    """W&B's service process dies mid-run (killed, as the OOM killer would): one warning, the run goes on,
    every local file is complete, and no W&B traceback at exit."""
    psutil = pytest.importorskip("psutil")
    out = tmp_path / "out"
    run = Run(tmp_path, "run", [*TINY, LONG_VIDEO, "logger=wandb", f"hydra.run.dir={out}"], env)
    wait_for_frames(run, "out/trace.jsonl", 5, tmp_path)
    services = [p for p in psutil.Process(run.process.pid).children(recursive=True) if p.name() == "wandb-core"]
    assert services, "W&B runs its service in a child process"
    for service in services:
        service.kill()
    assert run.wait() == 0, run.stderr[-3000:]
    [warning] = wandb_warnings(run)
    assert "logging the trace failed" in warning and "local files are unaffected" in warning
    results, predictions, trace = assert_nothing_lost(out)
    assert results["status"] == "ok" and len(trace) == predictions["conversations"][0]["num_frames"]
    assert "Traceback" not in run.stderr and not run.error_lines()


# ---- output folder, prospect.evaluate ---------------------------------------------------------------------


@pytest.mark.parametrize("multirun", [False, True], ids=["run", "sweep"])
def test_output_folder_that_cannot_be_created(tmp_path, env, multirun):
    """The folder's parent is a file (the check that also holds for root, whom chmod does not stop)."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder\n")
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    args = ["-m"] if multirun else []
    run = run_to_end(tmp_path, "run", [*args, *TINY, "logger=none", f"{key}={blocker / 'out'}"], env)
    assert run.process.returncode == 2
    assert run.stderr.strip() == f"{ERROR_PREFIX}{key}={blocker / 'out'}: cannot create the output folder: {blocker} is a file, not a folder"
    assert blocker.read_text() == "not a folder\n"


def test_evaluate_on_a_binary_file(tmp_path, env):
    binary = tmp_path / "predictions.json"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    run = run_to_end(tmp_path, "evaluate", [f"predictions={binary}"], env, module="prospect.evaluate")
    assert run.process.returncode == 2
    assert run.stderr.strip() == f"prospect.evaluate: error: {binary}: not JSON ('utf-8' codec can't decode byte 0x89 in position 0: invalid start byte)"
    assert not (tmp_path / "metrics.json").exists()


# ---- preemption through submitit: stop, requeue, resume -----------------------------------------------------


@pytest.mark.slow
def test_submitit_requeues_a_preempted_job_which_resumes_through_the_cache(tmp_path, env):
    """SIGUSR2 to a submitit job (what SLURM sends before a time limit or a preemption): the job writes its
    partial files, hands the signal to submitit, which requeues it; the requeued job recomputes in the same
    folder and the sweep ends ok."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    psutil = pytest.importorskip("psutil")
    args = ["-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10", *TINY, "dataset.generate.seconds=120", "logger=none",
            f"hydra.sweep.dir={tmp_path / 'sweep'}", f"cache_root={tmp_path}"]
    run = Run(tmp_path, "sweep", args, env)
    wait_for_frames(run, "sweep/0_*/trace.jsonl", 5, tmp_path)
    [job] = [p for p in psutil.Process(run.process.pid).children(recursive=True) if "submitit.core._submit" in " ".join(p.cmdline())]
    job.send_signal(signal.SIGUSR2)
    assert run.wait() == 0, run.stderr[-3000:]
    [folder] = (tmp_path / "sweep").glob("0_*")
    results, predictions, trace = assert_nothing_lost(folder)
    assert results["status"] == "ok" and len(trace) == predictions["conversations"][0]["num_frames"]
    logs = "".join(p.read_text(errors="replace") for p in (tmp_path / "sweep" / ".submitit").rglob("*_log.*"))
    assert "interrupted by SIGUSR2 at frame" in logs and "Requeued job" in logs


def first_fast(cases: list[tuple]) -> list:
    """pytest params (case[0] the id) of which only the first runs by default, the others in the slow pass: each
    starts a process, and tests/test_eval.py and tests/test_config.py check the same refusals in-process."""
    return [pytest.param(*case[1:], id=case[0], marks=() if n == 0 else pytest.mark.slow) for n, case in enumerate(cases)]


@pytest.mark.parametrize("override", first_fast([(o, o) for o in ["+eval._target_=os.system", "+eval.sentence_modle=x", "+model.foo=1", "+top=1"]]))
def test_unknown_key_stops_the_run_before_anything_loads(tmp_path, env, override):
    """A key no YAML of the job declares, added with +: one line naming it and the keys allowed, exit 2,
    before anything loads (no output folder is made)."""
    out = tmp_path / "out"
    run = Run(tmp_path, "unknown_key", [*TINY, override, f"hydra.run.dir={out}"], env)
    assert run.wait(120) == 2
    key = override.lstrip("+").split("=")[0]
    assert run.stderr.strip().splitlines() == run.error_lines()  # one line, nothing else
    assert len(run.error_lines()) == 1 and run.error_lines()[0].startswith(f"{ERROR_PREFIX}{key}: unknown key")
    assert " has: " in run.error_lines()[0]
    assert not out.exists()


def test_duplicate_samples_give_unique_conversation_ids(tmp_path, env):
    """An annotation file holding its samples twice (concatenated splits) plus a different sample under an id
    already used: every id in predictions.json is unique, each copy is named in one warning, the run is ok."""
    from prospect.data.synthetic import generate

    generate(tmp_path / "root", videos=1, seconds=8, fps=2, seed=0, knowledge=True)
    annotation = tmp_path / "root" / "processed_data" / "synthetic" / "prepared" / "dialog-klg_test_L0_I1.jsonl"
    lines = annotation.read_text().splitlines()
    changed = json.loads(lines[0])
    changed["conversation"] = changed["conversation"][:-1]
    annotation.write_text("\n".join([*lines, *lines, json.dumps(changed)]) + "\n")
    out = tmp_path / "out"
    run = run_to_end(tmp_path, "duplicates", [*TINY, "logger=none", "dataset=proassist", f"dataset.root={tmp_path / 'root'}",
                                              "dataset.subset=synthetic", "dataset.annotation=dialog-klg_test_L0_I1",
                                              f"hydra.run.dir={out}"], env)
    assert run.process.returncode == 0, run.stderr[-3000:]
    results, predictions, trace = assert_nothing_lost(out)
    ids = [c["id"] for c in predictions["conversations"]]
    assert len(ids) == len(set(ids)) == 3
    assert ids[2] == f"{ids[0]}#line{2 * len(lines) + 1}"
    assert {r["conversation"] for r in trace} == set(ids)
    logged = run.stdout + run.stderr
    for copy, original in ((len(lines) + 1, 1), (len(lines) + 2, 2)):
        assert f"{annotation}:{copy}: duplicate of line {original}, skipped" in logged
    assert "whose sample differs; this one is streamed as" in logged
    assert "Traceback" not in run.stderr


# ---- prospect.evaluate on files that are not predictions documents --------------------------------------

EVALUATE_ERROR = "prospect.evaluate: error: "
NOT_AN_OBJECT = "a predictions document is a JSON object with schema 'prospect.predictions/1'"


def evaluate_refuses(tmp_path: Path, env: dict, predictions: Path, timeout: float = 120) -> tuple[str, float]:
    """`python -m prospect.evaluate predictions=FILE` refuses FILE: exit 2, stderr one line naming the file, no
    traceback, no metrics.json. Returns the line without its prefix and the seconds the command took."""
    started = time.monotonic()
    run = run_to_end(tmp_path, "evaluate", [f"predictions={predictions}"], env, module="prospect.evaluate", timeout=timeout)
    seconds = time.monotonic() - started
    assert run.process.returncode == 2, run.stderr[-3000:]
    assert "Traceback" not in run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{EVALUATE_ERROR}{predictions}: "), lines
    assert not (predictions.parent / "metrics.json").exists()
    return lines[0][len(f"{EVALUATE_ERROR}{predictions}: "):], seconds


def predictions_with(*conversations) -> dict:
    """A predictions document (schema prospect.predictions/1) holding `conversations` as they are."""
    return {"schema": "prospect.predictions/1", "conversations": list(conversations)}


def a_conversation(cid: str = "v/x", **changes) -> dict:
    conversation = {"id": cid, "video_uid": "v", "subset": "assembly101", "user_type": "talk_some", "fps": 2, "num_frames": 40,
                    "frames": [{"index": 4, "gen": "Attach the cabin.", "ref": "Attach the cabin."}]}
    return {key: value for key, value in {**conversation, **changes}.items() if value is not None}


DEEP = 100_000
NESTED = [
    ("array", "[" * DEEP + "]" * DEEP, f"starts with '[' (an array) at byte 0, not '{{': {NOT_AN_OBJECT}"),
    ("inside_a_document", '{"schema": "prospect.predictions/1", "conversations": ' + "[" * DEEP + "]" * DEEP + "}",
     "nested more than 64 levels deep at byte 117 (a predictions document nests 5)"),
    ("objects", '{"conversations": ' * DEEP + "1" + "}" * DEEP, "nested more than 64 levels deep at byte 1152 (a predictions document nests 5)"),
    ("another_object", '{"a": ' * DEEP + "1" + "}" * DEEP, f"its first key is 'a', not 'schema': {NOT_AN_OBJECT}"),
]


@pytest.mark.parametrize("text,expected", first_fast(NESTED))
def test_evaluate_on_a_deeply_nested_file(tmp_path, env, text, expected):
    """100,000 levels of brackets (json.loads would raise RecursionError): refused before parsing."""
    deep = tmp_path / "predictions.json"
    deep.write_text(text)
    assert evaluate_refuses(tmp_path, env, deep)[0] == expected


def test_evaluate_on_a_large_random_file(tmp_path, env):
    """100 MB of random bytes are refused at their first bytes (the file is read in 1 MB chunks, never whole);
    with PROSPECT_MAX_PREDICTIONS_MB under its size, from its size alone; a 2 GB (sparse) file too."""
    noise = tmp_path / "noise.json"
    with noise.open("wb") as file:
        for _ in range(100):
            file.write(os.urandom(2**20))
    message, seconds = evaluate_refuses(tmp_path, env, noise)
    assert message.startswith(("not JSON ('utf-8' codec can't decode", "starts with ")), message
    assert seconds < 20, f"{seconds:.1f} s to refuse 100 MB of random bytes"
    message, _ = evaluate_refuses(tmp_path, {**env, "PROSPECT_MAX_PREDICTIONS_MB": "50"}, noise)
    assert message == "100 MB, more than the 50 MB a predictions file may be (set PROSPECT_MAX_PREDICTIONS_MB to raise the limit)"
    huge = tmp_path / "huge.json"
    with huge.open("wb") as file:
        file.truncate(2 * 2**30)
    message, seconds = evaluate_refuses(tmp_path, env, huge)
    assert message == "2048 MB, more than the 256 MB a predictions file may be (set PROSPECT_MAX_PREDICTIONS_MB to raise the limit)"
    assert seconds < 20


SHAPES = [
    ("json_array", [predictions_with(a_conversation())], f"starts with '[' (an array) at byte 0, not '{{': {NOT_AN_OBJECT}"),
    ("conversation_a_string", predictions_with(a_conversation("a"), a_conversation("b"), a_conversation("c"), "v/d"),
     "conversations[3]: a string, not an object"),
    ("conversation_an_array", predictions_with([a_conversation()]), "conversations[0]: an array, not an object"),
    ("conversations_an_object", {"schema": "prospect.predictions/1", "conversations": {"v/x": a_conversation()}},
     "conversations: an object, not a list"),
    ("conversation_without_fps", predictions_with(a_conversation(fps=None)), "conversations[0] (id=v/x): missing key 'fps'"),
    ("conversation_without_id", predictions_with(a_conversation(id=None)), "conversations[0].id: missing"),
    ("frame_not_an_object", predictions_with(a_conversation(frames=[None])), "conversations[0] (id=v/x).frames[0]: null, not an object"),
    ("fps_beyond_any_video", predictions_with(a_conversation(fps=1e308)),
     "conversations[0] (id=v/x).fps=1e+308: must be a positive number (at most 1000)"),
    ("a_billion_frames", predictions_with(a_conversation(num_frames=10**9)),  # scoring would hold arrays of 10**9
     "conversations[0] (id=v/x).num_frames=1000000000: must be an integer in [0, 10000000]"),
    ("a_float_index", predictions_with(a_conversation(frames=[{"index": 1.0, "gen": "", "ref": ""}])),
     "conversations[0] (id=v/x).frames[0].index=1.0: not an integer"),
    ("perplexity_past_a_float", predictions_with(a_conversation(frames=[{"index": 4, "gen": "", "ref": "Hi", "ref_nll": 800.0,
                                                                         "ref_tokens": 1, "ref_top1": 0.0}])),
     "conversations[0] (id=v/x).frames[0].ref_nll=800.0: more than 700 nats per token over its 1 token(s) (exp would overflow)"),
    ("another_schema", {"schema": "other/2", "conversations": [[]] * 1000}, "schema='other/2'; expected 'prospect.predictions/1'"),
]


@pytest.mark.parametrize("document,expected", first_fast(SHAPES))
def test_evaluate_on_json_that_is_not_a_predictions_document(tmp_path, env, document, expected):
    """Valid JSON of the wrong shape: one line naming the file and the first thing wrong."""
    predictions = tmp_path / "predictions.json"
    predictions.write_text(json.dumps(document, indent=1))
    assert evaluate_refuses(tmp_path, env, predictions)[0] == expected


BROKEN = [
    ("empty", "", f"empty, or only whitespace: {NOT_AN_OBJECT}"),
    ("data_after_the_end", '{"schema": "prospect.predictions/1", "conversations": []} {}',
     "not JSON: '{' at byte 58 after the document's end (the object that starts at byte 0)"),
    ("bracket_mismatch", '{"schema": "prospect.predictions/1", "conversations": [}', "not JSON: '}' at byte 55 closes the '[' at byte 54"),
    ("integer_of_5000_digits", '{"schema": ' + "7" * 5000 + "}", "not JSON (Exceeds the limit (4300 digits) for integer string conversion"),
]


@pytest.mark.parametrize("text,expected", first_fast(BROKEN))
def test_evaluate_on_a_broken_json_file(tmp_path, env, text, expected):
    predictions = tmp_path / "predictions.json"
    predictions.write_text(text)
    assert evaluate_refuses(tmp_path, env, predictions)[0].startswith(expected)


def test_every_hostile_predictions_file_is_refused_with_its_line(tmp_path):
    """Every case above, in-process (the command's subprocess runs the first of each kind by default, all of
    them in the slow pass): read_predictions refuses the file with the same one line."""
    from prospect.eval import PredictionsError, read_predictions

    cases = [*NESTED, *[(name, json.dumps(document, indent=1), expected) for name, document, expected in SHAPES], *BROKEN]
    for name, text, expected in cases:
        predictions = tmp_path / f"{name}.json"
        predictions.write_text(text)
        with pytest.raises(PredictionsError) as raised:
            read_predictions(predictions)
        assert str(raised.value).startswith(f"{predictions}: {expected}"), name
        assert "\n" not in str(raised.value)


# ---- a full disk: a file-size limit (ulimit -f) gives the error a full disk gives -----------------------------


DISK_FULL_VIDEO = "dataset.generate.seconds=60"  # 120 frames, about 68 KB of trace.jsonl


@pytest.fixture(scope="module")
def disk_full_video(env) -> str:
    """The 60 s video, generated before any run under a file-size limit (which could not write its frames)."""
    from prospect.data.synthetic import ensure_generated
    from prospect.validation import compose_config

    cfg = compose_config([*TINY, DISK_FULL_VIDEO, f"paths.cache_dir={env['PROSPECT_CACHE_DIR']}"])
    g = cfg.dataset.generate
    ensure_generated(cfg.dataset.root, g.videos, g.seconds, g.fps, g.seed, g.knowledge, bool(g.get("named_user", False)))
    return DISK_FULL_VIDEO


class LimitedRun(Run):
    """A `python -m prospect.run` whose process may write no file past `limit` bytes (RLIMIT_FSIZE, what `ulimit
    -f` sets): a write past it fails with EFBIG ("File too large"), as a full disk fails one with ENOSPC (Python
    ignores SIGXFSZ). Its own stdout and stderr files are under the limit too."""

    def __init__(self, tmp_path: Path, name: str, args: list[str], env: dict, limit: int):
        resource = pytest.importorskip("resource")
        hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
        if hard != resource.RLIM_INFINITY and hard < limit:
            pytest.skip(f"the file-size limit is already {hard} bytes")

        def limited() -> None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

        self.out, self.err = tmp_path / f"{name}.out", tmp_path / f"{name}.err"
        with self.out.open("w") as out, self.err.open("w") as err:
            try:
                self.process = subprocess.Popen([sys.executable, "-m", "prospect.run", *args], cwd=REPO, stdout=out, stderr=err,
                                                env=env, preexec_fn=limited)
            except subprocess.SubprocessError as error:  # setrlimit refused
                pytest.skip(f"cannot limit the file size here: {error}")
        Run.started.append(self.process)


def file_too_large() -> str:
    import errno
    import os

    return os.strerror(errno.EFBIG)


def assert_clean_stop(run: Run, line: str) -> None:
    """Exit 3 (prospect.signals.EXIT_DISK_FULL), the one error line, and no traceback anywhere."""
    assert run.wait() == 3, run.stderr[-3000:]
    assert run.error_lines() == [f"{ERROR_PREFIX}{line}"]
    output = run.stdout + run.stderr
    assert "Traceback" not in output and "Logging error" not in output, output[-3000:]


def assert_files_valid(folder: Path) -> None:
    """Every JSON file under `folder` parses, every trace.jsonl line parses, and no temporary file is left."""
    assert not list(folder.rglob("*.tmp")), "a failed atomic write leaves no temporary file"
    for path in folder.rglob("*.json"):
        json.loads(path.read_text())
    for trace in folder.rglob("trace.jsonl"):
        read_trace(trace.parent)


def test_file_too_large_mid_run_keeps_what_was_computed(tmp_path, env, disk_full_video):
    out = tmp_path / "out"
    limit = 32 * 1024
    run = LimitedRun(tmp_path, "run", [*TINY, disk_full_video, "logger=none", f"hydra.run.dir={out}"], env, limit)
    message = f"cannot write {out / 'trace.jsonl'}: {file_too_large()}"
    assert_clean_stop(run, f"{message} (what was computed is in {out})")
    assert_files_valid(out)
    results, predictions, trace = assert_nothing_lost(out)  # the frame whose record had no room is in no file
    assert results["status"] == "failed" and results["error"] == message
    [conversation] = predictions["conversations"]
    assert 1 <= len(trace) < conversation["num_frames"] and conversation["partial"] is True
    assert conversation["frames_streamed"] == len(trace)
    assert (out / "trace.jsonl").stat().st_size <= limit


def test_file_size_limit_below_results_json(tmp_path, env, disk_full_video):
    """A limit so small that results.json cannot be written (hydra.output_subdir=null: Hydra's own files would
    not fit either): trace.jsonl keeps its complete lines, no results.json and no temporary file is left, and a
    sweep summary over the folder says the job's files are incomplete."""
    from prospect.sweep.summary import write_summary

    sweep = tmp_path / "sweep"
    out = sweep / "0_job"
    run = LimitedRun(tmp_path, "run", [*TINY, disk_full_video, "logger=none", f"hydra.run.dir={out}", "hydra.output_subdir=null"],
                     env, 2048)
    assert_clean_stop(run, f"cannot write {out / 'trace.jsonl'}: {file_too_large()} (what was computed is in {out})")
    assert not (out / "results.json").exists()
    assert_files_valid(out)
    assert read_trace(out)
    write_summary(sweep)
    assert "missing: no results.json: the job's files are incomplete" in (sweep / "summary.md").read_text()


@pytest.mark.slow  # CI's slow pass; by default a file too large stops a single run (test_file_too_large_mid_run_...)
@pytest.mark.parametrize("launcher", ["basic", "fused"])
def test_file_too_large_stops_a_sweep_with_its_summary(tmp_path, env, disk_full_video, launcher):
    """Job 0 runs out of room: it is recorded failed, job 1 (its own lane set under fused) never starts, the
    summary is written, and the sweep prints the one line and exits 3."""
    import csv

    sweep = tmp_path / "sweep"
    args = ["-m", *TINY[:-1], "stream.max_new_tokens=2,3", disk_full_video, "logger=none", f"hydra.sweep.dir={sweep}",
            f"cache_root={tmp_path}"]
    if launcher == "fused":
        args.append("hydra/launcher=fused")
    run = LimitedRun(tmp_path, "sweep", args, env, 32 * 1024)
    run.wait()
    [job] = sweep.glob("0_*")
    message = f"cannot write {job / 'trace.jsonl'}: {file_too_large()}"
    assert_clean_stop(run, f"{message} (what was computed is in {sweep})")
    assert not list(sweep.glob("1_*")), "no job starts after the one that ran out of room"
    assert_files_valid(sweep)
    results, _, trace = assert_nothing_lost(job)
    assert results["status"] == "failed" and results["error"] == message and trace
    summary = (sweep / "summary.md").read_text()
    assert "| failed |" in summary and message in summary
    with (sweep / "summary.csv").open() as handle:
        assert [row["status"] for row in csv.DictReader(handle)] == ["failed"]


def test_evaluate_on_a_full_disk_writes_no_half_metrics_file(tmp_path, env):
    """metrics.json finds no room (a file-size limit): one line, exit 3, no metrics.json and no .tmp left."""
    import resource

    predictions = tmp_path / "predictions.json"
    predictions.write_text(json.dumps(predictions_with(*(a_conversation(f"v/{n}") for n in range(40))), indent=1))
    limit = 2048  # bytes: the predictions file is read, metrics.json (with its per-subset tables) is larger

    def limited() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))

    with (tmp_path / "out").open("w") as out, (tmp_path / "err").open("w") as err:
        code = subprocess.run([sys.executable, "-m", "prospect.evaluate", f"predictions={predictions}"], cwd=REPO, env=env,
                              stdout=out, stderr=err, preexec_fn=limited, timeout=300).returncode
    stderr = (tmp_path / "err").read_text()
    assert code == 3, stderr[-2000:]
    assert stderr.strip().splitlines() == [f"prospect.evaluate: error: cannot write {tmp_path / 'metrics.json'}: File too large "
                                           "(nothing was written)"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["err", "out", "predictions.json"]


def test_file_size_limit_below_hydras_own_files_stops_before_anything_runs(tmp_path, env):
    """A limit Hydra's .hydra/*.yaml would outgrow (a few KB): one line, exit 3, before Hydra writes a file."""
    out = tmp_path / "out"
    run = LimitedRun(tmp_path, "tiny_limit", [*TINY, "logger=none", f"hydra.run.dir={out}"], env, 3 * 1024)
    assert run.wait(300) == 3, run.stderr[-3000:]
    assert run.stderr.strip().splitlines() == [
        f"{ERROR_PREFIX}cannot write into the output folder {out}: the file-size limit (ulimit -f) of 3072 bytes is below "
        "the 16384 bytes Hydra's own files may need (nothing was run)"]
    assert list(out.iterdir()) == []
