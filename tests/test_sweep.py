"""Sweeps: the strategy grid, the result cache (dedupe and resume), failure isolation, the end-of-sweep
summary, prospect.report, the GPU-pool and submitit launchers, and the analysis notebook."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
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
