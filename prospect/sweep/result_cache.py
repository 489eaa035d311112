"""Reuse of finished results across sweep jobs, keyed by job_key (results.json).

A sweep job whose key already has an ok result under the cache root (default `multirun/`) is not
recomputed: the earlier run's files are copied into the job's directory and its results.json is marked
`cached`. This deduplicates (strategies that ignore last_keep_len share a key) and resumes (rerunning a
killed sweep computes only the jobs without an ok result). A lock per key keeps two concurrent jobs with
the same key from computing it twice.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from omegaconf import OmegaConf

from prospect.signals import StopSignals
from prospect.tracking.job_files import OUTPUT_FILES, replace_atomically, write_json
from prospect.tracking.results import job_key

log = logging.getLogger(__name__)

RUN_FILES = tuple(name for name in OUTPUT_FILES if name != "results.json")  # copied when a result is reused


def usable_result(folder: Path, key: str) -> bool:
    """Whether `folder` holds a finished ok run with this job key (results.json, predictions.json, frames)."""
    try:
        document = json.loads((folder / "results.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return (
        document.get("job_key") == key
        and document.get("status") == "ok"
        and document.get("metrics", {}).get("frames_processed", 0) > 0
        and (folder / "predictions.json").is_file()
    )


def find_result(root: str | Path, key: str, prefer: str | Path | None = None) -> Path | None:
    """The directory of a finished ok run with this job key under `root` (`prefer` first: a job's own
    folder when a sweep is resumed in place), or None."""
    if prefer is not None and usable_result(Path(prefer), key):
        return Path(prefer)
    root = Path(root)
    if not root.is_dir():
        return None
    for path in sorted(root.rglob("results.json")):
        if usable_result(path.parent, key):
            return path.parent
    return None


def reuse_result(source: Path, target: Path, config: dict | None = None) -> dict:
    """Copy a finished run into `target`; its results.json records where it came from, and carries the
    target job's own `config` (same job key; e.g. a last_keep_len the strategy ignores). Each file is copied
    atomically and results.json comes last: a full disk (DiskFull) leaves no half a file and no results.json."""
    target.mkdir(parents=True, exist_ok=True)
    document = json.loads((source / "results.json").read_text())
    if source.resolve() == target.resolve():
        return document  # resumed in place: the job's own result stands
    for name in RUN_FILES:
        if (source / name).is_file():
            replace_atomically(target / name, lambda staging: shutil.copy2(source / name, staging))
    document["cached"] = True
    document["cached_from"] = str(document.get("cached_from") or source)
    if config is not None:
        document["config"] = config
    write_json(target / "results.json", document)
    return document


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def key_lock(root: str | Path, key: str, poll_s: float = 1.0, stale_after_s: float = 180.0) -> Iterator[None]:
    """Hold the lock of one job key: a file under ROOT/.locks holding "host pid", touched every
    stale_after_s / 6 while held. Waits while another live holder has it; takes over a lock whose process
    died on this host, or that nobody touched for stale_after_s (a job killed on another node)."""
    folder = Path(root) / ".locks"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{key}.lock"
    me = f"{socket.gethostname()} {os.getpid()}"
    waited = False
    while True:
        try:
            handle = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                host, _, pid = path.read_text().strip().rpartition(" ")
                age = time.time() - path.stat().st_mtime
            except (OSError, ValueError):
                continue  # released meanwhile
            dead = host == socket.gethostname() and pid.isdigit() and not _alive(int(pid))
            if dead or age > stale_after_s:  # its holder was killed (kill -9, node lost): nothing will release it
                why = f"process {pid} is gone" if dead else f"not touched for {age:.0f} s"
                log.warning("job key %s: taking over the stale lock of %s (%s)", key, host or "?", why)
                path.unlink(missing_ok=True)
                continue
            if not waited:
                log.info("job key %s is being computed by %s; waiting to reuse it", key, host or pid)
                waited = True
            StopSignals.current().check(f"while waiting for the lock of job key {key}")  # a stop signal ends the wait
            time.sleep(poll_s)
            continue
        try:
            os.write(handle, me.encode())
        except OSError:  # no room even for these few bytes: leave no empty lock behind
            path.unlink(missing_ok=True)
            raise
        finally:
            os.close(handle)
        break
    stop = threading.Event()

    def heartbeat() -> None:
        while not stop.wait(stale_after_s / 6):
            with contextlib.suppress(OSError):
                os.utime(path)

    beat = threading.Thread(target=heartbeat, daemon=True)
    beat.start()
    try:
        yield
    finally:
        stop.set()
        path.unlink(missing_ok=True)


def reuse_or_run(cfg: Any, output_dir: Path, run: Callable[[Any, Path], dict]) -> dict:
    """A sweep job under the result cache: under its job key's lock, reuse an ok result of the same key found
    under `cfg.cache_root` (its own folder first: a resumed sweep), else `run(cfg, output_dir)`."""
    config = OmegaConf.to_container(cfg, resolve=True)
    key = job_key(config)
    with key_lock(cfg.cache_root, key):
        source = find_result(cfg.cache_root, key, prefer=output_dir)
        if source is not None:
            print(f"prospect: job key {key} already has a result in {source}: reused (cache=false recomputes)")
            return reuse_result(source, output_dir, config)
        return run(cfg, output_dir)
