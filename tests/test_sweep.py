"""Sweeps: the strategy grid, the result cache (dedupe and resume), failure isolation, the end-of-sweep
summary, prospect.report, the GPU-pool and submitit launchers, and the analysis notebook."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO
from prospect.validation import _job_override_lists


def sweep(tmp_path: Path, *args: str, name: str = "grid", env: dict | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    """`python -m prospect.run -m ARGS` into tmp_path/NAME with the result cache rooted at tmp_path."""
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "prospect.run", "-m", "logger=none", f"hydra.sweep.dir={tmp_path / name}",
         f"cache_root={tmp_path}", *args],
        cwd=REPO, capture_output=True, text=True, timeout=timeout, env=environment,
    )


def results(folder: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in sorted(folder.glob("*/results.json"))}


def test_strategy_grid_preset_expands_to_twelve_jobs():
    jobs = _job_override_lists(["experiment=strategy_grid"], True)
    assert len(jobs) == 12
    combos = {tuple(sorted(o for o in job if o.startswith("strategy"))) for job in jobs}
    assert ("strategy.last_keep_len=1024", "strategy=summarize_and_drop") in combos


@pytest.mark.slow  # ~80 s on 2 cores: in CI's slow pass
def test_grid_summary_cache_and_resume(tmp_path, model_cache_dir):
    """A 2 x 2 grid with the offline default on a short synthetic video."""
    args = ["strategy=drop_all,drop_middle", "strategy.last_keep_len=256,512", "dataset.generate.seconds=16",
            "strategy.max_seq_len=1024", "stream.max_new_tokens=12"]
    env = {"PROSPECT_CACHE_DIR": str(model_cache_dir)}
    first = sweep(tmp_path, *args, env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    grid = tmp_path / "grid"
    runs = results(grid)
    assert len(runs) == 4 and all(r["status"] == "ok" for r in runs.values())
    # drop_all ignores last_keep_len: one key, computed once, reused once
    assert sorted(bool(r.get("cached")) for r in runs.values()) == [False, False, False, True]
    for name in ("summary.csv", "summary.md", "pareto.png", "cache_timelines.png"):
        assert (grid / name).is_file(), name
    summary = (grid / "summary.md").read_text()
    assert summary.count("| ok |") == 3  # three distinct jobs

    second = sweep(tmp_path, *args, name="rerun", env=env)  # same command again: nothing recomputed
    assert second.returncode == 0, second.stderr[-3000:]
    assert all(r.get("cached") for r in results(tmp_path / "rerun").values())

    reused = next(r for r in runs.values() if r.get("cached"))
    assert reused["config"]["strategy"]["name"] == "drop_all"
    assert {r["config"]["strategy"]["last_keep_len"] for r in runs.values() if r["config"]["strategy"]["name"] == "drop_all"} == {256, 512}

    stamps = {p: p.stat().st_mtime_ns for p in grid.glob("*/results.json")}
    in_place = sweep(tmp_path, *args, env=env)  # resumed in the same folder: every job keeps its own result
    assert in_place.returncode == 0, in_place.stderr[-3000:]
    assert {p: p.stat().st_mtime_ns for p in grid.glob("*/results.json")} == stamps

    victim = next(p for p in grid.glob("*last_keep_len=512*strategy=drop_middle*"))
    (victim / "results.json").unlink()
    shutil.rmtree(tmp_path / "rerun")
    third = sweep(tmp_path, *args, name="resume", env=env)
    assert third.returncode == 0, third.stderr[-3000:]
    computed = [name for name, r in results(tmp_path / "resume").items() if not r.get("cached")]
    assert len(computed) == 1 and "drop_middle" in computed[0] and "last_keep_len=512" in computed[0]


def test_a_failing_job_keeps_the_others_and_the_summary(tmp_path):
    result = sweep(tmp_path, "model=oracle,smolvlm2_256m", "model.hub_id=HuggingFaceTB/absent-model", "dataset.generate.seconds=12")
    assert result.returncode == 1  # after writing the summary
    grid = tmp_path / "grid"
    runs = results(grid)
    statuses = {("oracle" if "oracle" in name else "absent"): r["status"] for name, r in runs.items()}
    assert statuses == {"oracle": "ok", "absent": "failed"}
    summary = (grid / "summary.md").read_text()
    assert "Failed or missing jobs" in summary and "absent-model" in summary
    assert (grid / "summary.csv").read_text().count("\n") == 3


def test_report_cli(tmp_path):
    assert sweep(tmp_path, "model=oracle", "strategy=drop_all,none", "dataset.generate.seconds=12").returncode == 0
    grid = tmp_path / "grid"
    (grid / "summary.md").unlink()
    report = subprocess.run([sys.executable, "-m", "prospect.report", str(grid)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert report.returncode == 0 and "| jobs |" in report.stdout and (grid / "summary.md").is_file()
    missing = subprocess.run([sys.executable, "-m", "prospect.report", str(tmp_path / "nope")], cwd=REPO, capture_output=True, text=True)
    assert missing.returncode == 2 and missing.stderr.strip() == f"prospect.report: error: {tmp_path / 'nope'}: no such directory"


@pytest.mark.slow  # CI's slow pass; by default test_gpu_pool_sweep_stops_on_sigterm runs the gpu_pool launcher end to end
def test_gpu_pool_pins_each_job_and_honours_concurrency(tmp_path):
    result = sweep(tmp_path, "hydra/launcher=gpu_pool", "hydra.launcher.gpus=[7,9]", "hydra.launcher.jobs_per_gpu=1", "model=oracle",
                   "strategy=none,drop_all,drop_middle,full", "dataset.generate.seconds=12", "cache=false")
    assert result.returncode == 0, result.stderr[-3000:]
    runs = list(results(tmp_path / "grid").values())
    assert len(runs) == 4
    spans = [(r["env"]["cuda_visible_devices"], r["started_at"], r["finished_at"]) for r in runs]
    assert {gpu for gpu, _, _ in spans} == {"7", "9"}
    for gpu in ("7", "9"):  # one job at a time per GPU
        mine = sorted((s, e) for g, s, e in spans if g == gpu)
        assert all(a[1] <= b[0] for a, b in zip(mine, mine[1:]))
    # ... and both GPUs busy at the same time
    assert any(s0 < e1 and s1 < e0 for g0, s0, e0 in spans for g1, s1, e1 in spans if g0 == "7" and g1 == "9")
    assert (tmp_path / "grid" / "summary.md").is_file()


@pytest.mark.slow  # CI's slow pass (~14 s); by default test_gpu_pool_sweep_stops_on_sigterm runs the gpu_pool launcher
def test_gpu_pool_reused_job_keeps_its_overrides(tmp_path):
    """A job that reuses a result gets .hydra/overrides.yaml like any other, so the summary does not call an
    override shared that varies; without that file its overrides are read from results.json's config."""
    import yaml

    from prospect.sweep.summary import write_summary

    result = sweep(tmp_path, "hydra/launcher=gpu_pool", "hydra.launcher.gpus=[7]", "model=oracle", "strategy=drop_all",
                   "strategy.last_keep_len=256,512", "dataset.generate.seconds=12")
    assert result.returncode == 0, result.stderr[-3000:]
    grid = tmp_path / "grid"
    reused = next(grid.glob("1_*"))
    assert json.loads((reused / "results.json").read_text())["cached"]  # drop_all ignores last_keep_len: one key
    assert "strategy.last_keep_len=512" in yaml.safe_load((reused / ".hydra" / "overrides.yaml").read_text())
    assert "last_keep_len: 512" in (reused / ".hydra" / "config.yaml").read_text()
    summary = (grid / "summary.md").read_text()
    shared = next(line for line in summary.splitlines() if line.startswith("Shared by all jobs:"))
    assert "last_keep_len" not in shared and "`strategy=drop_all`" in shared
    assert "| 0 1 | 256, 512 | ok |" in summary

    (reused / ".hydra" / "overrides.yaml").unlink()  # e.g. a sweep of an earlier version: unknown overrides
    written = write_summary(grid)
    assert written["overrides"].varying == ["strategy.last_keep_len"]
    assert {"model=oracle", "strategy=drop_all", "dataset.generate.seconds=12"} <= set(written["overrides"].shared)
    assert [r["strategy.last_keep_len"] for r in written["records"]] == ["256", "512"]  # 512 read from results.json
    assert any("no .hydra/overrides.yaml" in note for note in written["notes"])
    (reused / "results.json").write_text(json.dumps({**json.loads((reused / "results.json").read_text()), "config": {}}))
    assert "model=oracle" not in write_summary(grid)["overrides"].shared  # nothing known of job 1: nothing shared


def _processes_mentioning(text: str) -> list[str]:
    """Command lines of the live processes (but this one) whose command line holds `text`."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            command = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in command:
            found.append(f"{proc.name}: {command}")
    return found


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="lists processes through /proc")
def test_gpu_pool_sweep_stops_on_sigterm(tmp_path, model_cache_dir):
    """SIGTERM to a gpu_pool sweep reaches its running job, which stops after its frame and writes its files;
    no further job starts; the summary is written; the command exits 143; no job process is left."""
    grid = tmp_path / "grid"
    command = [sys.executable, "-m", "prospect.run", "-m", "logger=none", f"hydra.sweep.dir={grid}", f"cache_root={tmp_path}",
               "hydra/launcher=gpu_pool", "hydra.launcher.gpus=[7]", "hydra.launcher.poll_s=0.05", "model=tiny_random",
               "model.device=cpu", "eval=none", "dataset.generate.seconds=240", "strategy=none,drop_all"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PROSPECT_CACHE_DIR": str(model_cache_dir)}
    parent = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                              start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not any(p.stat().st_size for p in grid.glob("0_*/trace.jsonl")):
            assert parent.poll() is None, parent.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "job 0 streamed no frame in 120 s"
            time.sleep(0.05)
        parent.send_signal(signal.SIGTERM)
        out, err = parent.communicate(timeout=120)
    finally:
        if parent.poll() is None:
            os.killpg(parent.pid, signal.SIGKILL)
            parent.wait()
    assert parent.returncode == 143, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("prospect: error:")]
    assert len(errors) == 1 and errors[0].startswith("prospect: error: sweep stopped: interrupted by SIGTERM"), err[-3000:]
    job = json.loads(next(grid.glob("0_*/results.json")).read_text())
    assert job["status"] == "failed" and job["error"].startswith("interrupted by SIGTERM at frame"), job["error"]
    assert not list(grid.glob("1_*"))  # not started
    summary = (grid / "summary.md").read_text()
    assert "Failed or missing jobs" in summary and "interrupted by SIGTERM" in summary
    assert _processes_mentioning(str(grid)) == []


@pytest.mark.slow  # CI's slow pass (~17 s): a side launcher
def test_submitit_local_launcher(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    result = sweep(tmp_path, "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10", "model=oracle", "strategy=none,drop_all",
                   "dataset.generate.seconds=12")
    assert result.returncode == 0, result.stderr[-3000:]
    runs = results(tmp_path / "grid")
    assert len(runs) == 2 and all(r["status"] == "ok" for r in runs.values())
    assert (tmp_path / "grid" / "summary.md").is_file()


def test_slurm_preset_composes():
    from hydra import compose, initialize_config_dir

    from prospect.validation import CONF_DIR

    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["hydra/launcher=slurm", "hydra.launcher.partition=gpu"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher") and launcher.partition == "gpu" and launcher.gpus_per_node == 1


@pytest.mark.slow  # CI's slow pass (~13 s): the example notebook
def test_analysis_notebook_runs(tmp_path):
    import nbclient
    import nbformat

    assert sweep(tmp_path, "model=oracle", "strategy=drop_all,drop_middle", "dataset.generate.seconds=12").returncode == 0
    notebook = nbformat.read(REPO / "notebooks" / "analysis.ipynb", as_version=4)
    os.environ["PROSPECT_SWEEP_DIR"] = str(tmp_path / "grid")
    try:
        nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(REPO / "notebooks")}}).execute()
    finally:
        del os.environ["PROSPECT_SWEEP_DIR"]
    outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("Pareto front" in str(o.get("text", "")) for o in outputs)


def test_a_long_override_list_still_gives_a_job_folder_the_file_system_takes(tmp_path):
    """hydra.sweep.subdir is N_OVERRIDES; past 200 bytes (file names stop at 255) it is cut and a hash of the
    whole name added, so distinct jobs keep distinct folders and a long sweep command does not fail."""
    from prospect.sweep import JOB_FOLDER_BYTES, job_folder

    assert job_folder(3, "strategy=none,stream.max_new_tokens=4") == "3_strategy=none,stream.max_new_tokens=4"
    assert job_folder(0, "") == "0"
    long = ",".join(f"dataset.generate.key_{i}=é{i}" for i in range(40))
    names = {job_folder(n, long + suffix) for n in (0, 1) for suffix in ("", ",x=1")}
    assert len(names) == 4
    for name in names:
        assert len(name.encode()) <= JOB_FOLDER_BYTES and "..._" in name
        (tmp_path / name).mkdir()  # a name the file system takes
    # the config names it: a sweep job's folder comes from the resolver
    assert "${prospect.job_folder:${hydra.job.num},${hydra.job.override_dirname}}" in (REPO / "conf" / "config.yaml").read_text()
