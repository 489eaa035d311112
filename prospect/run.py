"""`python -m prospect.run [overrides]`: one run (or `-m` for a sweep) of the streaming experiment.

Exit codes: 0 ok; 1 the run (or a sweep job) failed, results.json says why; 2 a bad command line or an
output folder that cannot be created; 3 a file of the run could not be written because the disk is full
(or a file-size limit, a read-only file system, a disk quota: ENOSPC, EFBIG, EROFS, EDQUOT): one line
`prospect: error: cannot write FILE: REASON (what was computed is in DIR)`, every file already written
stays valid (trace.jsonl keeps its complete lines, results.json says failed where it could still be
written) and a sweep starts no further job but writes its summary where it can (DIR: the sweep folder);
a disk already full before the run is told the same way, `cannot write into the output folder DIR:
REASON (nothing was run)`; 128 + the signal's number when SIGINT (130), SIGTERM (143) or SIGUSR2 (140,
submitit's preemption signal) stopped it: the run stops after the frame in progress, writes what it
computed (prospect/experiment.py) and a sweep starts no further job but still writes its summary.
"""

from __future__ import annotations

import errno
import os
import resource
import sys
import tempfile
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, open_dict

from prospect.signals import (EXIT_FAILED, EXIT_USAGE, DiskFull, Interrupted, StopSignals, Stopped, is_disk_full, print_error,
                              quiet_full_disk_logging)
from prospect.sweep import sweep_group
from prospect.validation import ConfigError, check_command_line, quote_path_overrides


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    """One job of the command (cli() validated every job's config before Hydra started)."""
    output_dir = HydraConfig.get().runtime.output_dir
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    stop = StopSignals.current().install()  # for the whole process: a signal between sweep jobs is not lost
    quiet_full_disk_logging()  # a full disk: run.log loses lines, stderr gets no "--- Logging error ---" traceback
    try:
        stop.check("before the job started")
        try:
            document = _job(cfg, output_dir, multirun)
        except OSError as error:  # a full disk outside the run's own writes (its folder, a reused result's copy)
            if not is_disk_full(error):
                raise
            raise DiskFull.of(error) from None
    except DiskFull as full:
        full.folder = output_dir
        if multirun and not os.environ.get("SUBMITIT_FOLDER"):
            full.sweep_dir = str(HydraConfig.get().sweep.dir)
            raise  # prospect.run's cli() writes the sweep summary, prints the line and exits EXIT_DISK_FULL
        print_error(full.message())
        if os.environ.get("SUBMITIT_FOLDER"):
            return  # a submitit job ends here, failed in its results.json where it could be written
        raise  # cli() exits EXIT_DISK_FULL
    except Interrupted as interrupted:
        where = f" (what was computed is in {output_dir})" if Path(output_dir, "results.json").is_file() else ""
        if not multirun or os.environ.get("SUBMITIT_FOLDER"):
            print_error(f"{interrupted}{where}")
        try:
            handed_over = interrupted.hand_over()
        except Exception as error:  # e.g. submitit: "Job not requeued because: ..."
            print(f"prospect: {type(error).__name__}: {error}", file=sys.stderr)
            handed_over = True
        if handed_over or os.environ.get("SUBMITIT_FOLDER"):
            # Inside a submitit job (SLURM or submitit_local): submitit's handler had the signal (SIGUSR2:
            # requeued and exited above when it could; SIGTERM: logged). This job ends here, failed in its
            # results.json, and the launcher collects it with the other jobs.
            return
        if multirun:
            interrupted.sweep_dir = str(HydraConfig.get().sweep.dir)
        raise  # prospect.run's cli() writes the sweep summary and exits 128 + signal
    if document is not None and document.get("status") != "ok" and not document.get("cached"):
        print_error(document.get("error") or "the run failed")
        if not multirun:
            sys.exit(EXIT_FAILED)  # a single run reports failure in its exit code (results.json is already written)


def _job(cfg: DictConfig, output_dir: str, multirun: bool) -> dict | None:
    from prospect.experiment import run  # lazy: torch and the model code load only once a job runs

    if multirun and cfg.logger.name == "wandb" and not cfg.logger.get("group"):
        with open_dict(cfg):
            cfg.logger.group = sweep_group(HydraConfig.get().sweep.dir)  # a sweep's jobs share one W&B group
    if multirun and cfg.cache:
        from prospect.sweep.result_cache import reuse_or_run  # lazy: the sweep's modules load only in a sweep

        return reuse_or_run(cfg, Path(output_dir), run)
    return run(cfg, output_dir)


INFO_FLAGS = ("-h", "--help", "-hh", "--hydra-help", "-c", "--cfg", "-i", "--info", "-sc", "--shell-completion", "-p", "--package")


def _output_folder(argv: list[str]) -> tuple[str, str, Path] | None:
    """(key, value, folder): the run's output folder (hydra.run.dir, or hydra.sweep.dir with -m) as the
    command line sets it, its literal part (up to the first ${...}); None when nothing is written."""
    if any(arg in INFO_FLAGS or arg.startswith("--cfg") for arg in argv):
        return None  # nothing is written
    multirun = any(arg in ("-m", "--multirun") for arg in argv)
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    value = "multirun" if multirun else "outputs"
    for arg in argv:
        name, sep, text = arg.partition("=")
        if sep and name.lstrip("+") == key:
            value = text
    text = value.strip("'\"")
    if "${" in text:  # e.g. multirun/${now:%Y-%m-%d}: the folders before the interpolation
        literal = text.split("${", 1)[0]
        text = literal if literal.endswith("/") else os.path.dirname(literal)
    folder = Path(text or ".").expanduser()
    return key, value, folder if folder.is_absolute() else Path.cwd() / folder


def output_dir_problem(argv: list[str], create: bool = False) -> str | None:
    """Why the run's output folder (hydra.run.dir, or hydra.sweep.dir with -m) cannot be created, or None.

    Looks at the folder's literal part (up to the first ${...}): a file in the way of it stops everyone,
    root included. With `create`, the folder is also made and a file written into it and removed, which
    catches read-only mounts and folders only root's chmod bypass would let through."""
    found = _output_folder(argv)
    if found is None:
        return None
    key, value, folder = found
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        return f"{key}={value}: cannot create the output folder: {existing} is a file, not a folder"
    if create:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            return f"{key}={value}: cannot create the output folder: {error.strerror or error} ({error.filename or folder})"
        try:
            with tempfile.TemporaryFile(dir=folder):
                pass
        except OSError as error:
            return f"{key}={value}: cannot write into the output folder {folder}: {error.strerror or error}"
    return None


ROOM_PROBE_BYTES = 64 * 1024  # more than Hydra writes before the first job starts (multirun.yaml, .hydra/*.yaml)
MIN_FILE_SIZE_LIMIT = 16 * 1024  # a file-size limit below it fails inside Hydra's own files (each a few KB)
NO_ROOM_ERRNOS = frozenset(code for code in (errno.ENOSPC, getattr(errno, "EDQUOT", None)) if code is not None)


def no_room(argv: list[str]) -> DiskFull | None:
    """DiskFull when the output folder (made by output_dir_problem) has no room for a few kilobytes: a disk
    already full, or a disk quota used up, is told in prospect's one line before Hydra writes its files, whose
    failure Hydra would report with a traceback. (A file-size limit is not a lack of room: the run starts, and
    stops with DiskFull at the first file that outgrows it; a read-only folder is output_dir_problem's.)"""
    found = _output_folder(argv)
    if found is None or not found[2].is_dir():
        return None
    soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    hydra_writes = any(arg in ("-m", "--multirun") for arg in argv) or "hydra.output_subdir=null" not in argv
    if hydra_writes and soft != resource.RLIM_INFINITY and soft < MIN_FILE_SIZE_LIMIT:
        return DiskFull(found[2], f"the file-size limit (ulimit -f) of {soft} bytes is below the {MIN_FILE_SIZE_LIMIT} "
                                  "bytes Hydra's own files may need", errno.EFBIG)
    try:
        with tempfile.TemporaryFile(dir=found[2]) as probe:
            probe.write(bytes(ROOM_PROBE_BYTES))
            probe.flush()
    except OSError as error:
        if error.errno in NO_ROOM_ERRNOS:
            return DiskFull.of(error, found[2])
    return None


def cli() -> None:
    """Validate the command line in one line (exit 2) before Hydra starts, then run."""
    sys.argv[1:] = quote_path_overrides(sys.argv[1:])
    problem = output_dir_problem(sys.argv[1:])  # first: it is instant, composing every job's config is not
    if problem:
        print_error(problem)
        sys.exit(EXIT_USAGE)
    try:
        check_command_line(sys.argv[1:])
    except ConfigError as error:
        print_error(error)
        sys.exit(EXIT_USAGE)
    problem = output_dir_problem(sys.argv[1:], create=True)  # once the command is known to be valid
    if problem:
        print_error(problem)
        sys.exit(EXIT_USAGE)
    full = no_room(sys.argv[1:])
    if full is not None:
        print_error(f"cannot write into the output folder {full.path}: {full.strerror} (nothing was run)")
        sys.exit(full.exit_code)
    from prospect.sweep import register_launchers  # lazy: the launchers' modules load once the command line is valid

    try:
        register_launchers()  # hydra/launcher=gpu_pool, fused: every prospect launcher conf/hydra/launcher/ names
    except ConfigError as error:
        print_error(error)
        sys.exit(EXIT_USAGE)
    try:
        main()
    except Stopped as error:  # a stop signal or a full disk (a single run printed its line already)
        if error.sweep_dir:
            from prospect.sweep.callbacks import summarize_sweep  # lazy: the summary's imports cost seconds

            if not error.summary_tried:
                summarize_sweep(error.sweep_dir, interrupted=str(error))  # never raises: a failure is logged
            print_error(error.sweep_message())
        sys.exit(error.exit_code)
    from prospect.sweep.callbacks import failed_jobs  # lazy: as above, and only after a sweep

    if failed_jobs():
        sys.exit(EXIT_FAILED)  # after the sweep summary was written


if __name__ == "__main__":
    cli()
