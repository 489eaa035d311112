"""hydra/launcher=fused (prospect.sweep.fused): a sweep's jobs that differ only in strategy run as lanes of one
process per GPU. Real multiruns through `python -m prospect.run -m ... hydra/launcher=fused` with the tiny
random model on CPU, fake GPU ids for the multi-GPU spread; the memory arithmetic and the grouping as units."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import REPO, compose
from test_sweep import _processes_mentioning
from prospect.sweep.fused import group_key, lane_sets
from prospect.models.footprint import GIB, activation_bytes_per_lane, kv_bytes_per_lane
from prospect.sweep.lane_memory import balanced_sizes, split_for_memory
from prospect.sweep.gpu_pool import PoolJob
from prospect.tracking.results import job_key

# a short synthetic video, 4-token replies, a cache big enough for every last_keep_len of the grid
SMALL = ["model=tiny_random", "model.device=cpu", "dataset.generate.seconds=8", "strategy.max_seq_len=1300", "stream.max_new_tokens=4"]


def fused(tmp_path: Path, *args: str, name: str = "grid", model_cache_dir: Path | None = None, timeout: int = 300,
          wait: bool = True) -> subprocess.CompletedProcess | subprocess.Popen:
    """`python -m prospect.run -m ... hydra/launcher=fused ARGS` into tmp_path/NAME, result cache rooted at tmp_path."""
    logger = [] if any(a.startswith("logger=") for a in args) else ["logger=none"]
    command = [sys.executable, "-m", "prospect.run", "-m", *logger, f"hydra.sweep.dir={tmp_path / name}", f"cache_root={tmp_path}",
               "hydra/launcher=fused", "hydra.launcher.poll_s=0.05", *args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    if model_cache_dir is not None:
        env["PROSPECT_CACHE_DIR"] = str(model_cache_dir)
    if not wait:
        return subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                start_new_session=True)
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)


def jobs(folder: Path) -> dict[int, tuple[Path, dict]]:
    """{job number: (folder, results.json)} of a sweep folder."""
    found = {}
    for path in folder.glob("*/results.json"):
        found[int(path.parent.name.split("_", 1)[0])] = (path.parent, json.loads(path.read_text()))
    return dict(sorted(found.items()))


def _untimed_trace(job_folder: Path) -> list[dict]:
    """trace.jsonl without its timings and memory (what differs between two runs of the same job)."""
    rows = [json.loads(line) for line in (job_folder / "trace.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if not k.endswith("_ms") and "memory" not in k} for row in rows]


def workers(folder: Path) -> list[dict]:
    path = folder / "fused" / "workers.json"
    return json.loads(path.read_text()) if path.is_file() else []


def overrides_of(job_folder: Path) -> list[str]:
    return yaml.safe_load((job_folder / ".hydra" / "overrides.yaml").read_text())


def fused_key(overrides: list[str], tmp_path: Path) -> str:
    """The job key of a job's overrides as the fused launcher runs it: stream.optimized auto settled to true."""
    from omegaconf import OmegaConf

    config = OmegaConf.to_container(compose(*overrides), resolve=True)
    config["stream"]["optimized"] = True
    return job_key(config)


# ------------------------------------------------------------------------------------------ units


def test_memory_arithmetic_splits_lanes_that_would_not_fit():
    # SmolVLM2-2.2B text model in bf16, 4096-slot caches: 808 MB of K/V per lane (the 12-lane setup of docs/performance.md)
    kv = kv_bytes_per_lane(layers=24, kv_heads=32, head_dim=64, dtype_bytes=2, capacity=4096)
    assert kv == 2 * 24 * 32 * 64 * 2 * 4112 == 808_452_096  # 4096 slots, the scratch slot, aligned to 16
    lane = kv + activation_bytes_per_lane(hidden=2048, ffn=8192, vocab=49280, dtype_bytes=2)
    weights = int(4.4 * GIB)
    assert split_for_memory(12, 139 * GIB, weights, lane) == [12]  # an H200: all twelve together
    fit = (16 * GIB - weights - GIB) // lane  # weights + L x lane + the 1 GiB reserve <= free
    assert fit == 10
    assert split_for_memory(12, 16 * GIB, weights, lane) == [6, 6]  # 10 fit: two balanced sets
    assert split_for_memory(3, 2 * GIB, weights, lane) == [1, 1, 1]  # not even one fits: one lane per set (each fails alone)
    assert split_for_memory(5, 0, 0, 0) == [5]
    assert balanced_sizes(13, 12) == [7, 6] and balanced_sizes(3, 2) == [2, 1] and balanced_sizes(12, 12) == [12]
    assert balanced_sizes(0, 12) == []


def test_worker_splits_a_lane_set_by_the_gpus_free_memory(tmp_path, monkeypatch):
    """memory_sets on a (mocked) GPU: the 2.2B architecture counted on the meta device (nothing loaded), 12 lanes
    of 4096-slot caches; 16 GiB free runs them as 6 + 6 (an H200's ~139 GiB: all 12, as seen on one)."""
    import torch
    from omegaconf import OmegaConf

    import prospect.models.vlm as vlm
    from prospect.models.footprint import model_footprint
    from prospect.sweep.lane_memory import memory_sets

    members = [PoolJob(i, [], tmp_path / str(i), None, True, str(tmp_path), None, OmegaConf.to_container(
        compose("model=smolvlm2_2b", "model.random_init=true", f"strategy={('drop_all', 'drop_middle', 'none')[i % 3]}"), resolve=True))
        for i in range(12)]
    text, parameters = model_footprint(members[0].config["model"])
    assert 2.2e9 < parameters < 2.3e9 and text.num_hidden_layers == 24
    assert [len(part) for part in memory_sets(members)] == [12]  # on CPU: never split
    monkeypatch.setattr(vlm, "resolve_device", lambda device: torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (16 * GIB, 141 * GIB))
    parts = memory_sets(members)
    assert [[j.index for j in part] for part in parts] == [list(range(6)), list(range(6, 12))]
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (139 * GIB, 141 * GIB))
    assert [len(part) for part in memory_sets(members)] == [12]


def test_worker_splits_lanes_by_capacity_so_full_does_not_widen_every_lane(tmp_path):
    """capacity_sets: every lane's buffer rows span the set's largest capacity, so `full` (the model's max positions,
    8192 for the offline model) runs apart from bounded strategies; lanes within 2x of each other stay together."""
    from omegaconf import OmegaConf

    from prospect.sweep.lane_memory import capacity_sets

    def job(index: int, *overrides: str) -> PoolJob:
        return PoolJob(index, list(overrides), tmp_path / str(index), None, True, str(tmp_path), None,
                       OmegaConf.to_container(compose("model=offline_smollm2", *overrides), resolve=True))

    members = [job(0, "strategy=none", "strategy.max_seq_len=768"), job(1, "strategy=full"),
               job(2, "strategy=drop_middle", "strategy.max_seq_len=1024"), job(3, "strategy=snapkv", "strategy.max_seq_len=768")]
    assert [[j.index for j in part] for part in capacity_sets(members)] == [[0, 2, 3], [1]]  # 768..1024 | 8192
    members.append(job(4, "strategy=drop_all"))  # 4096: with full (8192 <= 2 x 4096), apart from the small ones
    assert [[j.index for j in part] for part in capacity_sets(members)] == [[0, 2, 3], [1, 4]]
    assert capacity_sets(members[:1]) == [members[:1]]


def test_groups_differ_in_everything_but_strategy_and_logger(tmp_path):
    def job(index: int, *overrides: str) -> PoolJob:
        from omegaconf import OmegaConf

        return PoolJob(index, list(overrides), tmp_path / str(index), None, True, str(tmp_path), None,
                       OmegaConf.to_container(compose(*SMALL, *overrides), resolve=True))

    members = [job(i, f"strategy={s}", f"stream.max_new_tokens={n}", f"logger.job_name=j{i}")
               for i, (n, s) in enumerate((n, s) for n in (4, 6) for s in ("none", "drop_all", "drop_middle"))]
    assert group_key(members[0].config) == group_key(members[2].config) != group_key(members[3].config)
    assert [[j.index for j in part] for part in lane_sets(members, 12)] == [[0, 1, 2], [3, 4, 5]]  # two groups: two processes
    assert [[j.index for j in part] for part in lane_sets(members, 2)] == [[0, 1], [2], [3, 4], [5]]
    seeded = job(6, "strategy=none", "stream.max_new_tokens=4", "seed=1")
    assert group_key(seeded.config) != group_key(members[0].config)  # the seed changes the model's draws: not shared


@pytest.mark.parametrize("setting, message", [
    ("hydra.launcher.lanes_per_gpu=0", "prospect: error: hydra.launcher.lanes_per_gpu=0: must be an integer >= 1"),
    ("hydra.launcher.gpus=7", "prospect: error: hydra.launcher.gpus=7: must be a list of GPU ids, e.g. [0,1], or null for every visible GPU"),
    ("hydra.launcher.batch_lanes=sometimes", "prospect: error: hydra.launcher.batch_lanes=sometimes: must be null (batched where CUDA "
                                             "graphs run), true or false"),
    ("stream.optimized=false", "prospect: error: stream.optimized=false: hydra/launcher=fused runs every job as a lane of the "
                               "optimized (static) step; use stream.optimized=auto or true, or another launcher for the eager path"),
])
def test_bad_setting_is_one_line(tmp_path, setting, message):
    result = fused(tmp_path, "model=oracle", "strategy=none,drop_all", "dataset.generate.seconds=8", setting)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines() == [message]
    assert not list((tmp_path / "grid").glob("*/results.json"))  # nothing ran


# ------------------------------------------------------------------------------------------ sweeps


@pytest.mark.slow  # CI's slow pass; by default the wandb-runs test below runs the fused launcher end to end, and
# tests/test_lanes.py checks each lane against its job alone, bitwise
def test_strategy_grid_runs_as_lanes_and_a_rerun_computes_nothing(tmp_path, model_cache_dir):
    first = fused(tmp_path, "experiment=strategy_grid", *SMALL, model_cache_dir=model_cache_dir)
    assert first.returncode == 0, first.stderr[-3000:]
    grid = tmp_path / "grid"
    runs = jobs(grid)
    assert sorted(runs) == list(range(12))
    keys = set()
    for number, (folder, document) in runs.items():
        assert document["status"] == "ok", (folder.name, document.get("error"))
        overrides = overrides_of(folder)
        assert "experiment=strategy_grid" in overrides and not any(o.startswith("stream.optimized") for o in overrides)
        assert document["job_key"] == fused_key(overrides, tmp_path) == job_key(document["config"])
        assert document["config"]["stream"]["optimized"] is True
        for name in ("predictions.json", "trace.jsonl", ".hydra/config.yaml", "timeline.html", "cache_sizes.png"):
            assert (folder / name).is_file(), (folder.name, name)
        keys.add(document["job_key"])
    # strategies that ignore last_keep_len share a key: 6 distinct jobs, 6 lanes of one process
    assert len(keys) == 6 and sum(not d.get("cached") for _, d in runs.values()) == 6
    (worker,) = workers(grid)
    assert worker["returncode"] == 0 and len(worker["jobs"]) == 6
    lanes = set(worker["jobs"])
    for number in lanes:  # the lanes' own log and a copy of the worker's output
        assert (runs[number][0] / "run.log").is_file()
        assert "fused worker 0" in (runs[number][0] / "launcher.log").read_text()
    assert all(runs[n][1].get("cached") for n in set(runs) - lanes)  # duplicates reused the lane's result
    summary = (grid / "summary.md").read_text()
    assert summary.count("| ok |") == 6 and "Failed or missing" not in summary
    assert (grid / "summary.csv").read_text().count("\n") == 13  # header + one row per job
    # on CPU the basic launcher runs the eager step (auto = false there): another key
    basic = {**runs[0][1]["config"], "stream": {**runs[0][1]["config"]["stream"], "optimized": "auto"}}
    assert job_key(basic) != runs[0][1]["job_key"]
    # the same jobs run alone by the basic launcher on the optimized step: same key, same predictions and trace
    alone = subprocess.run([sys.executable, "-m", "prospect.run", "-m", "logger=none", f"hydra.sweep.dir={tmp_path / 'alone'}",
                            f"cache_root={tmp_path / 'alone'}", "experiment=strategy_grid", *SMALL, "stream.optimized=true",
                            "strategy=drop_middle,summarize_and_drop", "strategy.last_keep_len=512"],
                           cwd=REPO, capture_output=True, text=True, timeout=300,
                           env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PROSPECT_CACHE_DIR": str(model_cache_dir)})
    assert alone.returncode == 0, alone.stderr[-3000:]
    lane_by_key = {d["job_key"]: folder for folder, d in runs.values() if not d.get("cached")}
    compared = 0
    for folder, document in jobs(tmp_path / "alone").values():
        lane = lane_by_key[document["job_key"]]
        mine, theirs = (json.loads((f / "predictions.json").read_text())["conversations"] for f in (lane, folder))
        assert mine == theirs and any(frame["gen"] for c in mine for frame in c["frames"]), folder.name
        assert _untimed_trace(lane) == _untimed_trace(folder), folder.name
        compared += 1
    assert compared == 2

    second = fused(tmp_path, "experiment=strategy_grid", *SMALL, name="rerun", model_cache_dir=model_cache_dir)
    assert second.returncode == 0, second.stderr[-3000:]
    rerun = jobs(tmp_path / "rerun")
    assert sorted(rerun) == list(range(12)) and all(d.get("cached") for _, d in rerun.values())
    assert not (tmp_path / "rerun" / "fused").exists()  # no worker started
    assert {d["job_key"] for _, d in rerun.values()} == keys
    assert (tmp_path / "rerun" / "summary.md").read_text().count("| ok |") == 6


@pytest.mark.slow
def test_groups_and_lane_sets_spread_over_fake_gpus(tmp_path, model_cache_dir):
    """3 strategies x 2 max_new_tokens = 2 groups; lanes_per_gpu=2 splits a 3-lane group into 2 + 1; a job
    whose key is cached is no lane; the lane sets go to GPU ids 0 and 1, one process per id at a time."""
    common = [*SMALL[:-1], "eval=none"]
    cached = fused(tmp_path, *common, "strategy=drop_middle", "stream.max_new_tokens=4", name="earlier",
                   model_cache_dir=model_cache_dir)
    assert cached.returncode == 0, cached.stderr[-3000:]
    result = fused(tmp_path, *common, "strategy=none,drop_all,drop_middle", "stream.max_new_tokens=4,6", "hydra.launcher.gpus=[0,1]",
                   "hydra.launcher.lanes_per_gpu=2", model_cache_dir=model_cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    grid = tmp_path / "grid"
    runs = jobs(grid)
    assert len(runs) == 6 and all(d["status"] == "ok" for _, d in runs.values())
    tokens = {n: d["config"]["stream"]["max_new_tokens"] for n, (_, d) in runs.items()}
    reused = [n for n, (_, d) in runs.items() if d.get("cached")]
    assert len(reused) == 1 and runs[reused[0]][1]["config"]["strategy"]["name"] == "drop_middle" and tokens[reused[0]] == 4
    assert "earlier" in runs[reused[0]][1]["cached_from"]

    ran = workers(grid)
    lanes = [n for w in ran for n in w["jobs"]]
    assert sorted(lanes) == sorted(set(runs) - set(reused))  # every other job exactly one lane; the cached one none
    by_group = {}
    for w in ran:
        assert len({tokens[n] for n in w["jobs"]}) == 1  # a lane set never mixes groups
        by_group.setdefault(tokens[w["jobs"][0]], []).append(len(w["jobs"]))
    assert {k: sorted(v) for k, v in by_group.items()} == {4: [2], 6: [1, 2]}
    assert {w["gpu"] for w in ran} == {"0", "1"}
    for w in ran:
        log = Path(w["log"]).read_text()
        assert f"CUDA_VISIBLE_DEVICES={w['gpu']}," in log
        assert {runs[n][1]["env"]["cuda_visible_devices"] for n in w["jobs"]} == {w["gpu"]}
    for gpu in ("0", "1"):  # one process per GPU at a time
        spans = sorted((w["started_at"], w["finished_at"]) for w in ran if w["gpu"] == gpu)
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), spans
    first = sorted(ran, key=lambda w: w["started_at"])[:2]
    assert {w["gpu"] for w in first} == {"0", "1"} and first[1]["started_at"] < first[0]["finished_at"]  # both at once
    summary = (grid / "summary.md").read_text()
    assert summary.count("| ok |") == 6


def test_each_lane_is_its_own_wandb_run_in_the_sweeps_group(tmp_path, model_cache_dir):
    from prospect.sweep import sweep_group
    from test_tracking import wandb_log_of

    result = fused(tmp_path, "logger=wandb", *SMALL[:-1], "eval=none", "strategy=none,drop_all", model_cache_dir=model_cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    grid = tmp_path / "grid"
    runs = jobs(grid)
    assert len(runs) == 2 and len(workers(grid)) == 1  # two lanes of one process
    for folder, document in runs.values():
        logged = wandb_log_of(folder)
        strategy = document["config"]["strategy"]["name"]
        assert logged["run"]["name"] == f"{strategy}-{folder.name.split('_', 1)[1]}"  # as a job of another launcher names it
        assert logged["run"]["group"] == sweep_group(grid) and logged["exit_code"] == 0
        # eval=none: the stream's own scores still reach the W&B summary (with their intervals) and the history
        metrics, found = document["metrics"], document["intervals"]["ref_ppl"]
        assert logged["summary"]["ref_ppl"] == metrics["ref_ppl"] and "f1" not in logged["summary"]
        assert found["reason"].startswith("one conversation") and "ref_ppl_ci_low" not in logged["summary"]  # no interval of 1
        scored = [row["items"] for row in logged["history"] if "ref_nll" in row["items"]]
        assert len(scored) == metrics["ref_turns"] and all("speak_probability" in row["items"] for row in logged["history"])


def _fused_workers(grid: Path) -> dict[int, dict]:
    """{pid: plan} of the live fused worker processes of a sweep folder."""
    found = {}
    for line in _processes_mentioning(str(grid / "fused")):
        pid, _, command = line.partition(": ")
        if "prospect.sweep.fused" in command:
            found[int(pid)] = json.loads(Path(command.split()[-1]).read_text())
    return found


def _act_once_streaming(parent: subprocess.Popen, grid: Path, pattern: str, act, seconds: float = 120) -> str:
    """Once a trace matching `pattern` holds a frame, call act(); then wait for the sweep (killed, group and all,
    if it outlives the test) and return its stderr."""
    deadline = time.monotonic() + seconds
    try:
        while not any(p.stat().st_size for p in grid.glob(pattern)):
            assert parent.poll() is None, parent.communicate()[1][-3000:]
            assert time.monotonic() < deadline, f"no frame streamed in {seconds} s"
            time.sleep(0.05)
        act()
        return parent.communicate(timeout=240)[1]
    finally:
        if parent.poll() is None:
            os.killpg(parent.pid, signal.SIGKILL)
            parent.wait()


@pytest.mark.slow  # CI's slow pass only: the one test of a fused worker that dies (by default tests/test_faults.py
# kills a basic sweep with -9 and resumes it)
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="lists processes through /proc")
def test_a_killed_worker_fails_its_jobs_and_the_other_worker_goes_on(tmp_path, model_cache_dir):
    grid = tmp_path / "grid"
    parent = fused(tmp_path, "model=tiny_random", "model.device=cpu", "eval=none", "dataset.generate.seconds=120", "strategy=none,drop_all",
                   "stream.max_new_tokens=4,6", "hydra.launcher.gpus=[0,1]", model_cache_dir=model_cache_dir, wait=False)

    def kill_the_second_group() -> None:
        plans = _fused_workers(grid)
        os.kill(next(pid for pid, plan in plans.items() if all("max_new_tokens=6" in j["folder"] for j in plan["jobs"])), signal.SIGKILL)

    err = _act_once_streaming(parent, grid, "*max_new_tokens=6*/trace.jsonl", kill_the_second_group)
    assert parent.returncode == 1, err[-3000:]  # after the summary
    runs = jobs(grid)
    assert len(runs) == 4
    for number, (folder, document) in runs.items():
        if "max_new_tokens=6" in folder.name:
            assert document["status"] == "failed"
            assert document["error"] == (f"fused worker process was killed by SIGKILL before writing results.json "
                                         f"(see {folder / 'launcher.log'})")
            assert "fused worker" in (folder / "launcher.log").read_text()
        else:
            assert document["status"] == "ok", document.get("error")
    summary = (grid / "summary.md").read_text()
    assert "Failed or missing jobs" in summary and "killed by SIGKILL" in summary


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="lists processes through /proc")
def test_sigterm_stops_the_lanes_and_writes_the_summary(tmp_path, model_cache_dir):
    """SIGTERM to a fused sweep reaches its worker, whose lanes stop after their frame and write their files; no
    further worker starts; the summary is written; exit 143; no worker is left."""
    grid = tmp_path / "grid"
    parent = fused(tmp_path, "model=tiny_random", "model.device=cpu", "eval=none", "dataset.generate.seconds=240", "strategy=none,drop_all",
                   "stream.max_new_tokens=4,6", model_cache_dir=model_cache_dir, wait=False)
    err = _act_once_streaming(parent, grid, "*/trace.jsonl", lambda: parent.send_signal(signal.SIGTERM))
    assert parent.returncode == 143, err[-3000:]
    assert [line for line in err.splitlines() if line.startswith("prospect: error:")] == [
        "prospect: error: sweep stopped: interrupted by SIGTERM (jobs after it were not started; rerun the same command to resume: "
        "finished jobs are reused)"], err[-3000:]
    runs = jobs(grid)
    assert len(runs) == 2  # the first group's lanes; the second group's worker never started
    for folder, document in runs.values():
        assert document["status"] == "failed" and document["error"].startswith("interrupted by SIGTERM at frame"), document["error"]
        assert "max_new_tokens=4" in folder.name
    assert len(workers(grid)) == 1
    summary = (grid / "summary.md").read_text()
    assert "Failed or missing jobs" in summary and "interrupted by SIGTERM" in summary
    assert _processes_mentioning(str(grid)) == []
    first_log = (grid / "fused" / "worker-0.log").read_text()

    # the same command resumes: every job ends ok, the workers are numbered after the stopped run's, whose log stays
    again = fused(tmp_path, "model=tiny_random", "model.device=cpu", "eval=none", "dataset.generate.seconds=240", "strategy=none,drop_all",
                  "stream.max_new_tokens=4,6", model_cache_dir=model_cache_dir)
    assert again.returncode == 0, again.stderr[-3000:]
    assert len(jobs(grid)) == 4 and all(d["status"] == "ok" for _, d in jobs(grid).values())
    assert [w["worker"] for w in workers(grid)] == [0, 1, 2]
    assert (grid / "fused" / "worker-0.log").read_text() == first_log


def test_conversation_batch_auto_takes_what_the_gpu_share_holds():
    """stream.conversation_batch=auto on a GPU: the 2.2B's lanes (4096-token buffers) beside its weights."""
    from prospect.models.footprint import RESERVE_BYTES
    from prospect.stream.lanes import MAX_CONVERSATION_BATCH, batch_that_fits

    lane = kv_bytes_per_lane(layers=24, kv_heads=32, head_dim=64, dtype_bytes=2, capacity=4096) + \
        activation_bytes_per_lane(hidden=2048, ffn=8192, vocab=49280, dtype_bytes=2)
    free = 139 * GIB - 5 * GIB  # an H200 with the model loaded
    assert batch_that_fits(free, lane, 100, 1, RESERVE_BYTES) == MAX_CONVERSATION_BATCH == 16
    assert batch_that_fits(free, lane, 5, 1, RESERVE_BYTES) == 5  # never more than the dataset holds
    assert batch_that_fits(free, 12 * lane, 100, 1, RESERVE_BYTES) == 10  # 12 fused jobs: 12 lanes (~1 GiB each) per conversation
    assert batch_that_fits(18 * GIB, lane, 100, 4, RESERVE_BYTES) == 3  # a 24 GB card shared by 4 gpu_pool jobs
    assert batch_that_fits(GIB, lane, 100, 4, RESERVE_BYTES) == 1  # nothing fits: one conversation, as before
