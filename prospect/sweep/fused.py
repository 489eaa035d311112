"""A Hydra launcher that runs the jobs of a sweep which differ only in their context strategy as lanes of one
process (docs/sweeps.md, "Fused sweeps"): the model is loaded once and every frame is fed to all lanes together.

Select it with `hydra/launcher=fused`; `hydra.launcher.gpus=[0,1,2,3]` (default: every visible GPU) and
`hydra.launcher.lanes_per_gpu=12` (the most lanes one process runs at once), `hydra.launcher.batch_lanes` (null:
the lanes' steps are one batch where CUDA graphs run, lane after lane elsewhere, bitwise as each job alone;
true batches them on the CPU too: faster, equal to each job alone up to float rounding). What it does:

1. Prepares every job as the GPU-pool launcher does (prospect.sweep.gpu_pool). Lanes always run the
   optimized (static) step, so `stream.optimized: auto` is settled to true in each job's config before its
   job key is computed (a rerun with this launcher finds the same keys; a basic-launcher run on CPU, where
   auto means false, has other keys); `stream.optimized=false` is refused in one line.
2. A job whose key already has an ok result under cache_root is reused (no lane); jobs of the sweep that
   share a key are computed once, the others reuse that result once it is there (with cache=false every
   job is computed).
3. The rest are grouped by their resolved config without `strategy` and `logger` (`group_key`): jobs of
   one group read the same frames, text turns and model. The logger is left out as it does not change what
   a lane computes and each lane has its own anyway: its own W&B run, named as the job's would be
   (`logger.job_name`: STRATEGY-OVERRIDES, set per job since the lanes share one process), in the sweep's
   group. Everything else (model, dataset, eval, stream, seed, paths, and also cache and cache_root, which
   do not change results either but which run_jobs requires equal) must be equal within a group.
4. Each group is split into lane sets of at most lanes_per_gpu lanes (of balanced sizes: 13 lanes with 12
   per GPU run as 7 + 6, which two GPUs run at once). Each lane set is one worker process,
   `python -m prospect.sweep.fused PLAN.json`, pinned with CUDA_VISIBLE_DEVICES; at most one worker runs on
   each GPU at a time, lane sets go to whichever GPU is free (without GPUs: one CPU worker at a time).
5. The worker (`main`) holds the result-cache lock of its keys (two identical sweeps compute a key once),
   writes each job's .hydra/overrides.yaml and config.yaml (as Hydra does; the original task overrides),
   splits its lanes into sets of similar capacity (`capacity_sets`: `full`, whose buffer is the model's max
   positions, does not share a set with bounded strategies) and further when they would not fit the GPU's
   free memory (`split_for_memory`), and calls
   prospect.experiment.run_jobs (lanes=True), which writes each job's files into its folder (results.json with its job
   key, predictions.json, trace.jsonl, plots, a W&B run in the sweep's group); a lane that raises is
   recorded failed and the other lanes go on. Each job's run.log (Hydra's job log) gets its lane set's log
   lines, those of the other lanes included.
6. The sweep folder's `fused/` holds each worker's plan (`worker-N.json`), console output (`worker-N.log`)
   and `workers.json` (per worker: GPU, jobs, start, end, exit code). Each job folder's launcher.log names
   its worker while it runs and holds a copy of the worker's output once it ended; a job without
   results.json after its worker exited (killed, out of memory) is recorded failed, naming that log.

Signals are handled as by the GPU-pool launcher: forwarded to the running workers (whose lanes stop after
their frame and write their files), no further worker starts, the summary is written, exit 128 + signal.
A full disk too: a worker whose files had no room exits EXIT_DISK_FULL (its lanes stop, each job's
results.json written where it can be), no further worker starts, and prospect.run writes the summary where it
can, prints one line and exits EXIT_DISK_FULL.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Sequence

from hydra.core.utils import JobReturn, configure_log, filter_overrides, setup_globals
from omegaconf import OmegaConf

from prospect.signals import (EXIT_DISK_FULL, EXIT_USAGE, DiskFull, Interrupted, StopSignals, SweepStop, is_disk_full, print_error,
                              quiet_full_disk_logging)
from prospect.sweep.gpu_pool import (GpuPoolLauncher, PoolJob, check_launcher_settings, refuse, register_launcher, reported_disk_full,
                                     visible_gpus, write_hydra_files, written)
from prospect.tracking.job_files import write_json
from prospect.sweep.lane_memory import balanced_sizes, capacity_sets, chunks, memory_sets
from prospect.sweep.result_cache import find_result, key_lock, reuse_result, usable_result

log = logging.getLogger(__name__)

# Config keys that may differ between the lanes of one process (see the module docstring).
GROUP_EXCLUDED = ("strategy", "logger")
WORKERS_FOLDER = "fused"  # under the sweep folder: the workers' plans and logs (not a job folder: no .hydra)


# ------------------------------------------------------------------------------------------ grouping


def group_key(config: dict) -> str:
    """What the jobs of one lane process share: the resolved config without GROUP_EXCLUDED, as a short hash."""
    shared = copy.deepcopy(config)
    for dotted in GROUP_EXCLUDED:
        *parents, name = dotted.split(".")
        node = shared
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(name, None)
    text = json.dumps(shared, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def lane_sets(jobs: Sequence[PoolJob], lanes_per_gpu: int) -> list[list[PoolJob]]:
    """The jobs grouped by group_key (groups in order of their first job, jobs in sweep order), each group
    split into balanced lane sets of at most lanes_per_gpu."""
    groups: dict[str, list[PoolJob]] = {}
    for job in jobs:
        groups.setdefault(group_key(job.config), []).append(job)
    return [part for members in groups.values() for part in chunks(members, balanced_sizes(len(members), lanes_per_gpu))]


# ------------------------------------------------------------------------------------------ launcher


@dataclass
class Worker:
    """One lane set: a `python -m prospect.sweep.fused PLAN.json` process on one GPU."""

    index: int
    jobs: list[PoolJob]
    gpu: str | None = None
    process: subprocess.Popen | None = None
    log_path: Path | None = None
    started_at: float | None = None
    finished_at: float | None = None


def job_record(job: PoolJob) -> dict:
    """A PoolJob as JSON (what a worker needs of it)."""
    record = {f.name: getattr(job, f.name) for f in fields(PoolJob) if f.name not in ("process", "gpu", "result")}
    record["folder"] = str(job.folder)
    return record


def job_from_record(record: dict) -> PoolJob:
    return PoolJob(**{**record, "folder": Path(record["folder"])})


def first_free_worker(sweep_dir: Path) -> int:
    """The next worker number in the sweep folder: a resumed sweep numbers its workers after the earlier run's."""
    numbers = [int(m.group(1)) for p in (sweep_dir / WORKERS_FOLDER).glob("worker-*.json") if (m := re.fullmatch(r"worker-(\d+)\.json", p.name))]
    return max(numbers, default=-1) + 1


class FusedLauncher(GpuPoolLauncher):
    process_name = "fused worker process"

    def __init__(self, gpus: Sequence[Any] | None = None, lanes_per_gpu: int = 12, poll_s: float = 0.2,
                 batch_lanes: bool | None = None) -> None:
        check_launcher_settings(gpus, poll_s, lanes_per_gpu=lanes_per_gpu)
        if batch_lanes is not None and not isinstance(batch_lanes, bool):
            refuse(f"hydra.launcher.batch_lanes={batch_lanes}: must be null (batched where CUDA graphs run), true or false")
        super().__init__(gpus, 1, poll_s)
        self.lanes_per_gpu = lanes_per_gpu
        self.batch_lanes = batch_lanes
        self.workers_started = 0  # over all launch() calls of the sweep (Hydra may launch it in batches)

    def _settle(self, resolved: dict) -> dict:
        """Lanes run the optimized step: `auto` becomes true (before the job key); false is refused."""
        optimized = resolved["stream"].get("optimized", "auto")
        if optimized is False or str(optimized).lower() == "false":
            refuse(f"stream.optimized={str(optimized).lower()}: hydra/launcher=fused runs every job as a lane of the optimized "
                   "(static) step; use stream.optimized=auto or true, or another launcher for the eager path")
        resolved["stream"]["optimized"] = True
        return resolved

    def _lane_config(self, job: PoolJob) -> dict:
        """The config the lane runs: the job's, in the sweep's W&B group, its W&B run named as a job's is."""
        config = copy.deepcopy(job.config)
        logger = config.setdefault("logger", {})
        if job.group:
            logger["group"] = job.group
        if "job_name" in logger and not logger["job_name"]:  # run_name(): strategy-override_dirname
            name = str(config.get("strategy", {}).get("name", "job"))
            logger["job_name"] = f"{name}-{job.override_dirname}" if job.override_dirname else name
        return config

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        gpus: list[str | None] = list(self.gpus or visible_gpus()) or [None]
        stop = SweepStop().install()
        running: list[Worker] = []
        self.full = None
        try:
            jobs = [self._prepare(list(o), initial_job_idx + i) for i, o in enumerate(job_overrides)]
            self.workers_started = max(self.workers_started, first_free_worker(sweep_dir))  # a resumed sweep keeps the old logs
            lanes, duplicates = self._sort(jobs)
            for job in lanes:
                job.config = self._lane_config(job)
            waiting = [Worker(n, members) for n, members in enumerate(lane_sets(lanes, self.lanes_per_gpu), self.workers_started)]
            self.workers_started += len(waiting)
            log.info("Launching %d jobs on GPUs %s: %d reused, %d sharing a lane's job key, %d lanes in %d lane set(s) of at "
                     "most %d, one process per GPU", len(jobs), gpus, len(jobs) - len(lanes) - len(duplicates), len(duplicates),
                     len(lanes), len(waiting), self.lanes_per_gpu)
            finished: list[Worker] = []
            forwarded = 0
            while running or (waiting and not self._stopping(stop)):
                forwarded = self._forward(stop, forwarded, running)
                for worker in [w for w in running if w.process.poll() is not None]:
                    running.remove(worker)
                    finished.append(worker)
                    if worker.process.returncode == EXIT_DISK_FULL and self.full is None:  # the next worker would fail the same way
                        self.full = reported_disk_full(worker.jobs, worker.log_path)
                    self._collect(worker, stop)
                    self._write_workers(sweep_dir, finished + running)
                self._settle_duplicates(duplicates, stop)
                busy = {w.gpu for w in running}
                for gpu in gpus:
                    if waiting and gpu not in busy and not self._stopping(stop):
                        worker = waiting.pop(0)
                        self._start_worker(worker, gpu, sweep_dir)
                        running.append(worker)
                        self._write_workers(sweep_dir, finished + running)
                time.sleep(self.poll_s)
            self._settle_duplicates(duplicates, stop)
        except (DiskFull, OSError) as error:  # the launcher's own writes (a plan, a reused job's files) had no room
            self.full = self.full or self._no_room(error)
        finally:
            stop.uninstall()
            if running:  # an error in the launcher itself: leave no worker running without it
                self._terminate(running)
        self._raise_if_stopped(stop)
        for job in jobs:
            if job.result is None:  # not expected: every job is a lane, a reuse or a duplicate
                self._finish(job, self._failed(job, "the fused launcher never ran this job"))
        return [job.result for job in jobs]

    def _sort(self, jobs: list[PoolJob]) -> tuple[list[PoolJob], dict[int, tuple[PoolJob, PoolJob]]]:
        """Reuse the jobs whose key has an ok result; returns (the jobs to compute as lanes, {index: (duplicate,
        the lane computing its key)})."""
        lanes: list[PoolJob] = []
        duplicates: dict[int, tuple[PoolJob, PoolJob]] = {}
        first: dict[str, PoolJob] = {}
        for job in jobs:
            if job.cache:
                source = find_result(job.cache_root, job.key, prefer=job.folder)
                if source is not None:
                    self._reuse(job, source)
                    continue
                if job.key in first:
                    duplicates[job.index] = (job, first[job.key])
                    continue
                first[job.key] = job
            lanes.append(job)
        return lanes, duplicates

    def _settle_duplicates(self, duplicates: dict[int, tuple[PoolJob, PoolJob]], stop: SweepStop) -> None:
        """Finish the jobs whose key's lane is done: reuse its ok result; after a failure record it (a rerun
        recomputes them), unless the sweep is stopping (a signal, a full disk: then they count as not started)."""
        for index, (job, source) in list(duplicates.items()):
            if source.result is None:
                continue
            if usable_result(source.folder, job.key):
                del duplicates[index]
                self._reuse(job, source.folder)
            elif not self._stopping(stop):
                del duplicates[index]
                error = (source.result.return_value or {}).get("error")
                write_hydra_files(job)
                self._finish(job, self._failed(job, f"job #{source.index} with the same job key {job.key} failed: {error}"))

    @staticmethod
    def _failed(job: PoolJob, error: str) -> dict:
        """Record `job` failed in its results.json (left absent when the disk has no room for it: the summary then
        says its files are incomplete)."""
        document = {"status": "failed", "error": error, "job_key": job.key}
        job.folder.mkdir(parents=True, exist_ok=True)
        written(lambda: write_json(job.folder / "results.json", document), job.folder / "results.json")
        return document

    def _start_worker(self, worker: Worker, gpu: str | None, sweep_dir: Path) -> None:
        folder = sweep_dir / WORKERS_FOLDER
        folder.mkdir(parents=True, exist_ok=True)
        plan = folder / f"worker-{worker.index}.json"
        worker.log_path = folder / f"worker-{worker.index}.log"
        search_path = [str(entry) for entry in (OmegaConf.select(self.config, "hydra.searchpath") or [])]
        plan.write_text(json.dumps({"worker": worker.index, "gpu": gpu, "batch_lanes": self.batch_lanes, "search_path": search_path,
                                    "jobs": [job_record(j) for j in worker.jobs]}, indent=1, default=str) + "\n")
        env = dict(os.environ)
        if gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = gpu
        lanes = " ".join(f"#{j.index}" for j in worker.jobs)
        log.info("\tworker %d on GPU %s, group %s: lanes %s (%s)", worker.index, gpu, group_key(worker.jobs[0].config), lanes,
                 " | ".join(" ".join(filter_overrides(j.overrides)) for j in worker.jobs))
        for lane, job in enumerate(worker.jobs):
            job.folder.mkdir(parents=True, exist_ok=True)
            (job.folder / "results.json").unlink(missing_ok=True)  # an earlier try's (not ok: else reused), never taken for this one's
            (job.folder / "launcher.log").write_text(self._pointer(job, lane, worker, gpu))
        with worker.log_path.open("w") as output:
            # its own session: a Ctrl-C at the terminal reaches the worker once, forwarded by the launcher (SweepStop)
            worker.process = subprocess.Popen([sys.executable, "-m", "prospect.sweep.fused", str(plan)], stdout=output,
                                              stderr=subprocess.STDOUT, env=env, cwd=os.getcwd(), start_new_session=True)
        worker.gpu, worker.started_at = gpu, time.time()
        for job in worker.jobs:
            job.process, job.gpu = worker.process, gpu

    @staticmethod
    def _pointer(job: PoolJob, lane: int, worker: Worker, gpu: str | None) -> str:
        where = f"CUDA_VISIBLE_DEVICES={gpu}" if gpu is not None else "no GPU id given"
        return (f"job #{job.index} runs as lane {lane + 1} of {len(worker.jobs)} in fused worker {worker.index} ({where}); "
                f"the worker's output: {worker.log_path}\n")

    def _collect(self, worker: Worker, stop: SweepStop) -> None:
        """After a worker exited: each job's launcher.log gets the worker's output, each job its result (a job
        without results.json failed, naming the exit; one the stopped worker never reached is not started)."""
        worker.finished_at = time.time()
        output = worker.log_path.read_text(errors="replace") if worker.log_path.is_file() else ""
        for lane, job in enumerate(worker.jobs):
            config = job.folder / ".hydra" / "config.yaml"  # the worker writes it when the lane's set begins
            started = (job.folder / "results.json").is_file() or (config.is_file() and config.stat().st_mtime >= worker.started_at - 1)
            log_file = job.folder / "launcher.log"
            written(lambda: log_file.write_text(self._pointer(job, lane, worker, worker.gpu) + output), log_file)
            if self._stopping(stop) and not started:
                continue  # the worker stopped before this lane's set began: not started, as a job the pool never started
            self._finish(job)

    @staticmethod
    def _write_workers(sweep_dir: Path, workers: list[Worker]) -> None:
        """fused/workers.json: which jobs ran together, where, when, and how each worker ended."""
        path = sweep_dir / WORKERS_FOLDER / "workers.json"
        indices = {w.index for w in workers}
        try:  # an earlier run of a resumed sweep: its rows stay
            earlier = [row for row in json.loads(path.read_text()) if row.get("worker") not in indices]
        except (OSError, ValueError, AttributeError):
            earlier = []
        rows = earlier + [{"worker": w.index, "gpu": w.gpu, "jobs": [j.index for j in w.jobs], "folders": [str(j.folder) for j in w.jobs],
                 "started_at": w.started_at, "finished_at": w.finished_at,
                 "returncode": w.process.returncode if w.process else None, "log": str(w.log_path)}
                for w in sorted(workers, key=lambda w: w.index)]
        path.parent.mkdir(parents=True, exist_ok=True)
        written(lambda: write_json(path, rows), path)  # atomic; no room: the sweep is stopping, its summary says so


# ------------------------------------------------------------------------------------------ worker


def _run_lane_set(jobs: list[PoolJob], batch_lanes: bool | None = None, search_path: Sequence[str] = ()) -> None:
    """Run one lane set through prospect.experiment.run_jobs; each job's JOB_NAME.log gets the log lines."""
    from prospect.experiment import run_jobs  # lazy: the launcher process itself never loads torch

    handlers = []
    for job in jobs:
        job.folder.mkdir(parents=True, exist_ok=True)
        write_hydra_files(job)
        handler = logging.FileHandler(job.folder / f"{job.job_name}.log")
        handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
        logging.getLogger().addHandler(handler)
        handlers.append(handler)
    quiet_full_disk_logging()  # a full disk: the logs lose lines, no "--- Logging error ---" traceback
    try:
        run_jobs([OmegaConf.create(j.config) for j in jobs], [j.folder for j in jobs], lanes=True, batch_lanes=batch_lanes,
                 search_path=list(search_path))
    except Exception as error:  # run_jobs records its lanes' failures; this is the set's own (e.g. a bug)
        if is_disk_full(error):  # no room (e.g. for a job's folder): the worker stops, and so does the sweep
            raise DiskFull.of(error) from None
        log.exception("lane set %s failed", " ".join(f"#{j.index}" for j in jobs))
        for job in jobs:
            if not (job.folder / "results.json").is_file():
                FusedLauncher._failed(job, f"lane set failed: {type(error).__name__}: {error}")
    finally:
        for handler in handlers:
            logging.getLogger().removeHandler(handler)
            handler.close()


def main(argv: list[str] | None = None) -> int:
    """`python -m prospect.sweep.fused PLAN.json`: one lane set of the fused launcher. Exit 0 (each lane's
    outcome is in its results.json), 128 + signal when a stop signal ended it, 2 for a bad plan."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        plan = json.loads(Path(argv[0]).read_text())
        jobs = [job_from_record(record) for record in plan["jobs"]]
    except (IndexError, OSError, ValueError, KeyError, TypeError) as error:
        print(f"prospect.sweep.fused: error: usage: python -m prospect.sweep.fused PLAN.json ({type(error).__name__}: {error})",
              file=sys.stderr)
        return EXIT_USAGE
    logging.basicConfig(stream=sys.stdout, level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s",
                        force=True)
    quiet_full_disk_logging()
    log.info("fused worker %s: CUDA_VISIBLE_DEVICES=%s, %d lane(s): %s", plan.get("worker"), os.environ.get("CUDA_VISIBLE_DEVICES"),
             len(jobs), " ".join(f"#{j.index}" for j in jobs))
    stop = StopSignals.current().install()  # for the whole worker: a signal between lane sets is not lost
    try:
        with contextlib.ExitStack() as locks:
            for root, key in sorted({(j.cache_root, j.key) for j in jobs if j.cache}):  # sorted: no deadlock between sweeps
                locks.enter_context(key_lock(root, key))
            lanes = []
            for job in jobs:  # another sweep may have computed a key meanwhile
                source = find_result(job.cache_root, job.key, prefer=job.folder) if job.cache else None
                if source is None:
                    lanes.append(job)
                    continue
                log.info("#%d reuses %s (job key %s)", job.index, source, job.key)
                reuse_result(source, job.folder, job.config)
                write_hydra_files(job)
            parts = [part for similar in capacity_sets(lanes) for part in memory_sets(similar)] if lanes else []
            for number, part in enumerate(parts):
                stop.check(f"before lane set {number + 1} of {len(parts)}")
                log.info("lane set %d of %d: %s", number + 1, len(parts), " ".join(f"#{j.index}" for j in part))
                _run_lane_set(part, plan.get("batch_lanes"), plan.get("search_path") or [])
    except Interrupted as interrupted:
        log.error("fused worker %s: %s", plan.get("worker"), interrupted)
        return interrupted.exit_code
    except (DiskFull, OSError) as error:  # a lane's file (or a job's .hydra files) had no room: the launcher stops the sweep
        full = error if isinstance(error, DiskFull) else DiskFull.of(error) if is_disk_full(error) else None
        if full is None:
            raise
        log.error("fused worker %s: %s", plan.get("worker"), full)
        with contextlib.suppress(OSError):
            print_error(full.message(", ".join(str(j.folder) for j in jobs)))  # the launcher reads this line
        return EXIT_DISK_FULL
    finally:
        stop.uninstall()
    return 0


PLUGIN_MODULE = "hydra_plugins.prospect_fused"


def register() -> None:
    """Make the launcher known to Hydra as hydra_plugins.prospect_fused.FusedLauncher."""
    register_launcher(FusedLauncher, PLUGIN_MODULE, "prospect's fused-lanes launcher (see prospect.sweep.fused)")


if __name__ == "__main__":
    sys.exit(main())
