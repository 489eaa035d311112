"""A Hydra launcher for multi-GPU hosts: every job in a fresh `python -m prospect.run` process pinned to
one GPU with CUDA_VISIBLE_DEVICES, at most `jobs_per_gpu` jobs at a time on each GPU.

(Hydra's joblib launcher reuses worker processes, which cannot be re-pinned to another GPU, and
submitit's local executor gives every job GPU 0.) Select it with `hydra/launcher=gpu_pool`; set
`hydra.launcher.gpus=[0,1,2,3]` (default: every visible GPU) and `hydra.launcher.jobs_per_gpu=2`.
Jobs whose job key already has an ok result are reused instead of launched; jobs sharing a key run once.

Hydra instantiates launchers only from its `hydra_plugins` namespace and only classes it registered,
so `register()` (called by `python -m prospect.run` before Hydra starts) files this class under
`hydra_plugins.prospect_gpu_pool`, the name conf/hydra/launcher/gpu_pool.yaml uses.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict

from prospect.sweep import sweep_group
from prospect.sweep.result_cache import find_result, reuse_result

log = logging.getLogger(__name__)


def visible_gpus() -> list[str]:
    """GPU ids this process may use: CUDA_VISIBLE_DEVICES if set, else every device torch sees."""
    if os.environ.get("CUDA_VISIBLE_DEVICES"):
        return [g.strip() for g in os.environ["CUDA_VISIBLE_DEVICES"].split(",") if g.strip()]
    try:
        import torch

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
    process: subprocess.Popen | None = None
    gpu: str | None = None
    result: JobReturn | None = None


class GpuPoolLauncher(Launcher):
    def __init__(self, gpus: Sequence[Any] | None = None, jobs_per_gpu: int = 1, poll_s: float = 0.2) -> None:
        if jobs_per_gpu < 1:
            raise ValueError(f"hydra.launcher.jobs_per_gpu={jobs_per_gpu}: must be >= 1")
        self.gpus = [str(g) for g in gpus] if gpus else None
        self.jobs_per_gpu = jobs_per_gpu
        self.poll_s = poll_s
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context = config, hydra_context

    def _prepare(self, overrides: list[str], index: int) -> PoolJob:
        from prospect.tracking.results import job_key

        sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
        with open_dict(sweep_config):
            sweep_config.hydra.job.id = index
            sweep_config.hydra.job.num = index
        folder = Path(str(sweep_config.hydra.sweep.dir)) / str(sweep_config.hydra.sweep.subdir)
        job = OmegaConf.to_container(sweep_config, resolve=False)
        job.pop("hydra", None)
        resolved = OmegaConf.to_container(OmegaConf.create(job), resolve=True)
        wandb = resolved["logger"].get("name") == "wandb" and not resolved["logger"].get("group")
        group = sweep_group(str(sweep_config.hydra.sweep.dir)) if wandb else None
        return PoolJob(index, overrides, folder, job_key(resolved), bool(resolved.get("cache", True)),
                       str(resolved.get("cache_root", "multirun")), group, resolved)

    def _start(self, job: PoolJob, gpu: str | None) -> None:
        job.folder.mkdir(parents=True, exist_ok=True)
        folder = str(job.folder).replace("\\", "\\\\").replace("'", "\\'")  # quoted: job folders hold '=' and ','
        command = [sys.executable, "-m", "prospect.run", *job.overrides, f"hydra.run.dir='{folder}'"]
        if job.group:
            command.append(f"logger.group={job.group}")
        env = dict(os.environ)
        if gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = gpu
        log.info("\t#%d on GPU %s: %s", job.index, gpu, " ".join(filter_overrides(job.overrides)))
        with (job.folder / "launcher.log").open("w") as output:
            job.process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=env, cwd=os.getcwd())
        job.gpu = gpu

    def _finish(self, job: PoolJob, document: dict | None = None) -> None:
        results = job.folder / "results.json"
        if document is None:
            code = job.process.returncode if job.process else None
            if results.is_file():
                document = json.loads(results.read_text())
            else:  # the process died before writing its results (killed, out of memory): record it
                document = {"status": "failed", "error": f"job process exited with code {code} before writing results.json "
                            f"(see {job.folder / 'launcher.log'})", "job_key": job.key}
                results.write_text(json.dumps(document, indent=1) + "\n")
        ret = JobReturn(overrides=job.overrides, working_dir=str(job.folder), task_name="prospect.run", status=JobStatus.COMPLETED)
        ret.return_value = document
        job.result = ret

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        gpus: list[str | None] = list(self.gpus or visible_gpus()) or [None]
        log.info("Launching %d jobs on GPUs %s, %d per GPU", len(job_overrides), gpus, self.jobs_per_gpu)
        jobs = [self._prepare(list(o), initial_job_idx + i) for i, o in enumerate(job_overrides)]
        waiting = list(jobs)
        running: list[PoolJob] = []
        while waiting or running:
            for job in [j for j in running if j.process.poll() is not None]:
                running.remove(job)
                self._finish(job)
            busy_keys = {j.key for j in running}
            for job in list(waiting):
                if job.cache and job.key in busy_keys:
                    continue  # the same key is being computed: reuse it once done
                source = find_result(job.cache_root, job.key, prefer=job.folder) if job.cache else None
                if source is not None:
                    waiting.remove(job)
                    log.info("\t#%d reuses %s (job key %s)", job.index, source, job.key)
                    self._finish(job, reuse_result(source, job.folder, job.config))
                    continue
                load = {gpu: sum(1 for j in running if j.gpu == gpu) for gpu in gpus}
                gpu = min(gpus, key=lambda g: load[g])
                if load[gpu] >= self.jobs_per_gpu:
                    break
                waiting.remove(job)
                self._start(job, gpu)
                running.append(job)
                busy_keys.add(job.key)
            time.sleep(self.poll_s)
        return [job.result for job in jobs]


PLUGIN_MODULE = "hydra_plugins.prospect_gpu_pool"


def register() -> None:
    """Make the launcher known to Hydra as hydra_plugins.prospect_gpu_pool.GpuPoolLauncher."""
    import importlib
    import types

    from hydra.core.plugins import Plugins

    if PLUGIN_MODULE not in sys.modules:
        try:
            namespace = importlib.import_module("hydra_plugins")
        except ImportError:  # no other Hydra plugin installed: the namespace does not exist yet
            namespace = types.ModuleType("hydra_plugins")
            namespace.__path__ = []
            sys.modules["hydra_plugins"] = namespace
        module = types.ModuleType(PLUGIN_MODULE, "prospect's GPU-pool launcher (see prospect.sweep.gpu_pool)")
        module.GpuPoolLauncher = GpuPoolLauncher
        sys.modules[PLUGIN_MODULE] = module
        namespace.prospect_gpu_pool = module
        GpuPoolLauncher.__module__ = PLUGIN_MODULE
    Plugins.instance().register(GpuPoolLauncher)
