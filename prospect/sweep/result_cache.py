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
import time
from pathlib import Path
from typing import Iterator

log = logging.getLogger(__name__)

RUN_FILES = ("predictions.json", "trace.jsonl", "timeline.html", "cache_sizes.png")


def find_result(root: str | Path, key: str, exclude: str | Path | None = None) -> Path | None:
    """The directory of an ok run with this job key under `root` (its predictions.json present), or None."""
    root = Path(root)
    exclude = Path(exclude).resolve() if exclude else None
    if not root.is_dir():
        return None
    for path in sorted(root.rglob("results.json")):
        folder = path.parent
        if exclude is not None and folder.resolve() == exclude:
            continue
        try:
            document = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if document.get("job_key") == key and document.get("status") == "ok" and (folder / "predictions.json").is_file():
            return folder
    return None


def reuse_result(source: Path, target: Path) -> dict:
    """Copy a finished run into `target`; its results.json records where it came from."""
    target.mkdir(parents=True, exist_ok=True)
    for name in RUN_FILES:
        if (source / name).is_file() and source.resolve() != target.resolve():
            shutil.copy2(source / name, target / name)
    document = json.loads((source / "results.json").read_text())
    document["cached"] = True
    document["cached_from"] = str(document.get("cached_from") or source)
    staging = target / "results.json.tmp"
    staging.write_text(json.dumps(document, indent=1, ensure_ascii=False) + "\n")
    os.replace(staging, target / "results.json")
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
def key_lock(root: str | Path, key: str, poll_s: float = 1.0, stale_after_s: float = 24 * 3600) -> Iterator[None]:
    """Hold the lock of one job key (a file under ROOT/.locks holding "host pid"); waits while another live
    process holds it. A lock of a dead process on this host, or older than stale_after_s, is taken over."""
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
            if dead or age > stale_after_s:
                path.unlink(missing_ok=True)
                continue
            if not waited:
                log.info("job key %s is being computed by %s; waiting to reuse it", key, host or pid)
                waited = True
            time.sleep(poll_s)
            continue
        os.write(handle, me.encode())
        os.close(handle)
        break
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
