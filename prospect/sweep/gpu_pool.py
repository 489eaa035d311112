"""A Hydra launcher for multi-GPU hosts: every job in a fresh `python -m prospect.run` process pinned to
one GPU with CUDA_VISIBLE_DEVICES, at most `jobs_per_gpu` jobs at a time on each GPU.

(Hydra's joblib launcher reuses worker processes, which cannot be re-pinned to another GPU, and
submitit's local executor gives every job GPU 0.) Select it with `hydra/launcher=gpu_pool`; set
`hydra.launcher.gpus=[0,1,2,3]` (default: every visible GPU) and `hydra.launcher.jobs_per_gpu=2`.
Jobs whose job key already has an ok result are reused instead of launched (their folder gets
.hydra/overrides.yaml and config.yaml, as a job of the basic launcher has); jobs sharing a key run once.

SIGINT, SIGTERM and SIGUSR2 to the launcher (the `python -m prospect.run -m` process) are forwarded to
the running jobs, which stop after their current frame and write what they computed; no new job starts,
the launcher waits for the running ones, and prospect.run writes the sweep summary and exits 128 + the
signal's number. A second signal is forwarded too (the jobs stop at once); a third kills the jobs. Jobs
run in their own session, so a Ctrl-C at the terminal reaches them once, through the launcher.

A job that exits EXIT_DISK_FULL (a file of its run had no room) stops the sweep the same way: no new job
starts (it would fail the same way), the running ones finish, and prospect.run writes the summary where it
can, prints the job's one line and exits EXIT_DISK_FULL. A job's results.json the launcher cannot write for
lack of room is left absent: the summary says that job's files are incomplete.

Hydra instantiates launchers only from its `hydra_plugins` namespace and only classes it registered,
so `register()` (called by `python -m prospect.run` before Hydra starts) files this class under
`hydra_plugins.prospect_gpu_pool`, the name conf/hydra/launcher/gpu_pool.yaml uses.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict

from prospect.stream.settings import GPU_SHARE_ENV
from prospect.signals import EXIT_DISK_FULL, EXIT_USAGE, DiskFull, Interrupted, SweepStop, is_disk_full, print_error
from prospect.sweep import sweep_group
from prospect.sweep.result_cache import find_result, reuse_result
from prospect.tracking.job_files import write_json
from prospect.tracking.results import job_key

log = logging.getLogger(__name__)


def visible_gpus() -> list[str]:
    """GPU ids this process may use: CUDA_VISIBLE_DEVICES if set, else every device torch sees."""
    if os.environ.get("CUDA_VISIBLE_DEVICES"):
        return [g.strip() for g in os.environ["CUDA_VISIBLE_DEVICES"].split(",") if g.strip()]
    try:
        import torch  # lazy: the launcher loads torch only to count GPUs, when CUDA_VISIBLE_DEVICES is unset

        return [str(i) for i in range(torch.cuda.device_count())]
    except ImportError:
        return []


@dataclass
class PoolJob:
    index: int
    overrides: list[str]
    folder: Path
    key: str | None
    cache: bool
    cache_root: str
    group: str | None
    config: dict | None = None
    task_overrides: list[str] = field(default_factory=list)  # what Hydra writes to the job's .hydra/overrides.yaml
    config_yaml: str = ""  # ... and to .hydra/config.yaml (the job's config, unresolved)
    output_subdir: str | None = ".hydra"
    override_dirname: str = ""  # hydra.job.override_dirname (the folder name's overrides part)
    job_name: str = "run"  # hydra.job.name (the job's log file is JOB_NAME.log)
    process: subprocess.Popen | None = None
    gpu: str | None = None
    result: JobReturn | None = None


def write_hydra_files(job: PoolJob) -> None:
    """.hydra/overrides.yaml and config.yaml of a job that reused a result, as Hydra writes them for a job it
    runs (the sweep summary reads each job's overrides from there)."""
    if not job.output_subdir:
        return
    folder = job.folder / job.output_subdir
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "overrides.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(job.task_overrides)), encoding="utf-8")
    (folder / "config.yaml").write_text(job.config_yaml, encoding="utf-8")


def written(write: Any, what: str) -> bool:
    """Call `write()`; when the disk has no room for it (DiskFull, or an OSError of a full disk), log that
    `what` was not written and go on (the sweep is stopping already). Returns whether it was written."""
    try:
        write()
        return True
    except (OSError, DiskFull) as error:
        if not (isinstance(error, DiskFull) or is_disk_full(error)):
            raise
        log.error("%s", error if isinstance(error, DiskFull) else DiskFull.of(error, what))
        return False


ERROR_LINE = "prospect: error: "


def reported_disk_full(jobs: Sequence["PoolJob"], output: Path | None) -> DiskFull:
    """What a process that exited EXIT_DISK_FULL ran out of room for: the `cannot write FILE: REASON` of its
    jobs' results.json, else the line it printed in `output` (its console log), else its first job's folder."""
    for job in jobs:
        try:
            error = json.loads((job.folder / "results.json").read_text()).get("error")
        except (OSError, ValueError, AttributeError):
            error = None
        found = DiskFull.parse(error) if isinstance(error, str) else None
        if found is not None:
            return found
    try:
        lines = output.read_text(errors="replace").splitlines() if output is not None else []
    except OSError:
        lines = []
    for line in reversed(lines):
        found = DiskFull.parse(line.partition(ERROR_LINE)[2]) if ERROR_LINE in line else None
        if found is not None:
            return found
    return DiskFull(jobs[0].folder if jobs else "the sweep's files", f"no room left (the process exited with code {EXIT_DISK_FULL})")


def search_path_override(config: Any) -> str | None:
    """The sweep's `hydra.searchpath=[...]` as an override for a job's own process, or None when it has none."""
    entries = [str(entry) for entry in (OmegaConf.select(config, "hydra.searchpath") or [])]
    return f"hydra.searchpath=[{','.join(entries)}]" if entries else None


def refuse(message: str) -> None:
    """A bad launcher setting: one line on stderr, exit 2 (as prospect.run's other command-line errors).
    SystemExit passes through Hydra's instantiate and error reporting, which would print three lines."""
    print_error(message)
    raise SystemExit(EXIT_USAGE)


def _signal_name(code: int | None) -> str | None:
    """'SIGTERM' for a process's return code -15 (killed by that signal), else None."""
    if code is None or code >= 0:
        return None
    try:
        return signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"


def check_launcher_settings(gpus: Any, poll_s: Any, **counts: Any) -> list[str] | None:
    """Refuse (one line, exit 2) a bad hydra.launcher setting: gpus a list of GPU ids (or null), each count of
    `counts` (e.g. jobs_per_gpu) an integer >= 1, poll_s a number > 0. Returns the GPU ids as strings."""
    for name, value in counts.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            refuse(f"hydra.launcher.{name}={value}: must be an integer >= 1")
    if isinstance(poll_s, bool) or not isinstance(poll_s, (int, float)) or not poll_s > 0:
        refuse(f"hydra.launcher.poll_s={poll_s}: must be a number of seconds > 0")
    if gpus is None:
        return None
    if isinstance(gpus, (str, int)) or not all(isinstance(g, (str, int)) and not isinstance(g, bool) and str(g).strip() for g in gpus):
        refuse(f"hydra.launcher.gpus={gpus}: must be a list of GPU ids, e.g. [0,1], or null for every visible GPU")
    return [str(g).strip() for g in gpus] or None


def remember_sweep_configs(loader: Any) -> None:
    """Compose each job's config once per sweep: Hydra's sweeper composes every job of a batch to check it
    (validate_batch_is_legal), then the launcher composes the same overrides again (`_prepare`). The loader
    keeps the first composition of each override list and hands out copies (composing takes ~0.1-0.2 s a job:
    a 12-job grid's second pass cost ~1-2.7 s of the sweep process's start-up)."""
    if getattr(loader, "remembered_sweep_configs", None) is not None:
        return
    compose = loader.load_sweep_config
    remembered: dict[tuple[int, tuple[str, ...]], tuple[DictConfig, DictConfig]] = {}

    def load_sweep_config(master_config: DictConfig, sweep_overrides: list[str]) -> DictConfig:
        key = (id(master_config), tuple(sweep_overrides))
        if key not in remembered or remembered[key][0] is not master_config:
            remembered[key] = (master_config, compose(master_config, list(sweep_overrides)))
        return copy.deepcopy(remembered[key][1])

    loader.load_sweep_config = load_sweep_config
    loader.remembered_sweep_configs = remembered


class GpuPoolLauncher(Launcher):
    process_name = "job process"  # what a job's failure message calls the process that died

    def __init__(self, gpus: Sequence[Any] | None = None, jobs_per_gpu: int = 1, poll_s: float = 0.2) -> None:
        self.gpus = check_launcher_settings(gpus, poll_s, jobs_per_gpu=jobs_per_gpu)
        self.jobs_per_gpu = jobs_per_gpu
        self.poll_s = poll_s
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context = config, hydra_context
        remember_sweep_configs(hydra_context.config_loader)

    def _prepare(self, overrides: list[str], index: int) -> PoolJob:
        sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
        with open_dict(sweep_config):
            sweep_config.hydra.job.id = index
            sweep_config.hydra.job.num = index
        folder = Path(str(sweep_config.hydra.sweep.dir)) / str(sweep_config.hydra.sweep.subdir)
        job = OmegaConf.to_container(sweep_config, resolve=False)
        job.pop("hydra", None)
        resolved = self._settle(OmegaConf.to_container(OmegaConf.create(job), resolve=True))
        wandb = resolved["logger"].get("name") == "wandb" and not resolved["logger"].get("group")
        group = sweep_group(str(sweep_config.hydra.sweep.dir)) if wandb else None
        subdir = sweep_config.hydra.get("output_subdir")
        return PoolJob(index, overrides, folder, job_key(resolved), bool(resolved.get("cache", True)),
                       str(resolved.get("cache_root", "multirun")), group, resolved,
                       task_overrides=[str(o) for o in sweep_config.hydra.overrides.task],
                       config_yaml=OmegaConf.to_yaml(OmegaConf.create(job)), output_subdir=str(subdir) if subdir else None,
                       override_dirname=str(sweep_config.hydra.job.override_dirname or ""),
                       job_name=str(sweep_config.hydra.job.name or "run"))

    def _settle(self, resolved: dict) -> dict:
        """The job's resolved config as the launcher will run it, before its job key is computed (here: as is)."""
        return resolved

    def _start(self, job: PoolJob, gpu: str | None) -> None:
        job.folder.mkdir(parents=True, exist_ok=True)
        folder = str(job.folder).replace("\\", "\\\\").replace("'", "\\'")  # quoted: job folders hold '=' and ','
        command = [sys.executable, "-m", "prospect.run", *job.overrides, f"hydra.run.dir='{folder}'"]
        if job.group:
            command.append(f"logger.group={job.group}")
        search_path = search_path_override(self.config)
        if search_path:  # a config folder of the user's (a strategy YAML outside conf/): the job composes with it too
            command.append(search_path)
        env = dict(os.environ)
        if gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = gpu
            env[GPU_SHARE_ENV] = str(self.jobs_per_gpu)  # stream.conversation_batch=auto sizes itself to its share
        log.info("\t#%d on GPU %s: %s", job.index, gpu, " ".join(filter_overrides(job.overrides)))
        with (job.folder / "launcher.log").open("w") as output:
            # its own session: a Ctrl-C at the terminal reaches the job once, forwarded by the launcher (SweepStop)
            job.process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=env, cwd=os.getcwd(),
                                           start_new_session=True)
        job.gpu = gpu

    def _finish(self, job: PoolJob, document: dict | None = None) -> None:
        results = job.folder / "results.json"
        if document is None:
            code = job.process.returncode if job.process else None
            if results.is_file():
                document = json.loads(results.read_text())
            else:  # the process died before writing its results (killed, out of memory, a full disk): record it
                killed = _signal_name(code)
                how = f"was killed by {killed}" if killed else f"exited with code {code}"
                document = {"status": "failed", "error": f"{self.process_name} {how} before writing results.json "
                            f"(see {job.folder / 'launcher.log'})", "job_key": job.key}
                written(lambda: write_json(results, document), results)  # no room: the summary says its files are incomplete
        ret = JobReturn(overrides=job.overrides, working_dir=str(job.folder), task_name="prospect.run", status=JobStatus.COMPLETED)
        ret.return_value = document
        job.result = ret

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        gpus: list[str | None] = list(self.gpus or visible_gpus()) or [None]
        log.info("Launching %d jobs on GPUs %s, %d per GPU", len(job_overrides), gpus, self.jobs_per_gpu)
        stop = SweepStop().install()
        running: list[PoolJob] = []
        self.full = None
        try:
            jobs = [self._prepare(list(o), initial_job_idx + i) for i, o in enumerate(job_overrides)]
            waiting = list(jobs)
            forwarded = 0  # signals of stop.received passed on to the running jobs
            while running or (waiting and not self._stopping(stop)):
                forwarded = self._forward(stop, forwarded, running)
                for job in [j for j in running if j.process.poll() is not None]:
                    running.remove(job)
                    if job.process.returncode == EXIT_DISK_FULL and self.full is None:  # the next job would fail the same way
                        self.full = reported_disk_full([job], job.folder / "launcher.log")
                    self._finish(job)
                if not self._stopping(stop):
                    self._schedule(waiting, running, gpus, stop)
                time.sleep(self.poll_s)
        except (DiskFull, OSError) as error:  # the launcher's own writes (a reused job's files) had no room
            self.full = self.full or self._no_room(error)
        finally:
            stop.uninstall()
            if running:  # an error in the launcher itself: leave no job running without it
                self._terminate(running)
        self._raise_if_stopped(stop)
        return [job.result for job in jobs]

    full: DiskFull | None = None  # a job (or the launcher) ran out of room: the sweep stops

    @staticmethod
    def _no_room(error: BaseException) -> DiskFull:
        """`error` as DiskFull; raised again when it is not about room."""
        if isinstance(error, DiskFull):
            return error
        if is_disk_full(error):
            return DiskFull.of(error)
        raise error

    def _stopping(self, stop: SweepStop) -> bool:
        """No new job starts: a stop signal came, or a job ran out of room for its files."""
        return bool(stop.received) or self.full is not None

    def _raise_if_stopped(self, stop: SweepStop) -> None:
        """After a full disk: raise DiskFull; after a stop signal: raise Interrupted; for prospect.run's cli() to
        write the summary and exit EXIT_DISK_FULL or 128 + signal."""
        if self.full is not None:
            self.full.sweep_dir = str(self.config.hydra.sweep.dir)
            raise self.full
        if stop.received:
            interrupted = Interrupted(stop.signum)
            interrupted.sweep_dir = str(self.config.hydra.sweep.dir)
            raise interrupted

    def _schedule(self, waiting: list[PoolJob], running: list[PoolJob], gpus: list[str | None], stop: SweepStop) -> None:
        """Reuse or start the waiting jobs that can go now (at most jobs_per_gpu running on each GPU)."""
        busy_keys = {j.key for j in running}
        for job in list(waiting):
            if stop.received:
                return  # a signal came meanwhile: nothing more starts
            if job.cache and job.key in busy_keys:
                continue  # the same key is being computed: reuse it once done
            source = find_result(job.cache_root, job.key, prefer=job.folder) if job.cache else None
            if source is not None:
                waiting.remove(job)
                self._reuse(job, source)
                continue
            load = {gpu: sum(1 for j in running if j.gpu == gpu) for gpu in gpus}
            gpu = min(gpus, key=lambda g: load[g])
            if load[gpu] >= self.jobs_per_gpu:
                return
            waiting.remove(job)
            self._start(job, gpu)
            running.append(job)
            busy_keys.add(job.key)

    def _reuse(self, job: PoolJob, source: Path) -> None:
        """Finish `job` with the ok result of the same job key found in `source` (copied into its folder)."""
        log.info("\t#%d reuses %s (job key %s)", job.index, source, job.key)
        document = reuse_result(source, job.folder, job.config)
        if source.resolve() != job.folder.resolve():  # resumed in place: the job's own .hydra stands
            write_hydra_files(job)
        self._finish(job, document)

    @staticmethod
    def _forward(stop: SweepStop, forwarded: int, running: list[PoolJob]) -> int:
        """Pass the signals received since the last call on to the running jobs (from the third on: SIGKILL to
        each job's process group). Returns how many signals have been forwarded."""
        while forwarded < len(stop.received):
            signum = stop.received[forwarded]
            forwarded += 1
            alive = [j for j in running if j.process.poll() is None]
            if not alive:
                continue
            kill = forwarded >= 3
            log.warning("%s to job(s) %s", "SIGKILL" if kill else f"forwarding {signal.Signals(signum).name}",
                        " ".join(f"#{j.index}" for j in alive))
            for job in alive:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    if kill:
                        os.killpg(job.process.pid, signal.SIGKILL)
                    else:
                        job.process.send_signal(signum)
        return forwarded

    @staticmethod
    def _terminate(running: list[PoolJob], grace_s: float = 30.0) -> None:
        """SIGTERM the running jobs, give them grace_s to write their files, then SIGKILL what is left."""
        for job in running:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                job.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for job in running:
            try:
                job.process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(job.process.pid, signal.SIGKILL)
                job.process.wait()


PLUGIN_MODULE = "hydra_plugins.prospect_gpu_pool"


def register_launcher(launcher: type, module_name: str, doc: str) -> None:
    """File a launcher class as hydra_plugins.<module_name>.<class name> and register it with Hydra."""
    if module_name not in sys.modules:
        try:
            namespace = importlib.import_module("hydra_plugins")
        except ImportError:  # no other Hydra plugin installed: the namespace does not exist yet
            namespace = types.ModuleType("hydra_plugins")
            namespace.__path__ = []
            sys.modules["hydra_plugins"] = namespace
        module = types.ModuleType(module_name, doc)
        setattr(module, launcher.__name__, launcher)
        sys.modules[module_name] = module
        setattr(namespace, module_name.rpartition(".")[2], module)
        launcher.__module__ = module_name
    Plugins.instance().register(launcher)


def register() -> None:
    """Make the launcher known to Hydra as hydra_plugins.prospect_gpu_pool.GpuPoolLauncher."""
    register_launcher(GpuPoolLauncher, PLUGIN_MODULE, "prospect's GPU-pool launcher (see prospect.sweep.gpu_pool)")
