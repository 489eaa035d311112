"""Stop signals and exit codes: the bottom layer every run path shares (stdlib only, so a launcher can import
it without loading torch).

While a run is on, SIGINT, SIGTERM and SIGUSR2 (submitit's preemption/time-limit signal) only set a flag
(`StopSignals`); the stream stops at the next safe point, after the frame in progress, by raising
`Interrupted`. trace.jsonl keeps every finished frame, predictions.json the replies of the conversation in
progress (marked partial), results.json says failed and names the signal, and `python -m prospect.run`
exits 128 + the signal's number. The same signal a second time stops at once. A sweep launcher (gpu_pool,
fused) records the signals with `SweepStop` and forwards them to its jobs. docs/sweeps.md, "Interruptions
and preemption", tells the user's side.

A full disk stops a run the same way (`DiskFull`, raised where a file of the run cannot be written: no
space, a file-size limit, a read-only file system, a quota): what was computed stays valid on disk, a sweep
starts no further job but writes its summary where it still can, and `python -m prospect.run` prints one
line and exits EXIT_DISK_FULL.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
import sys
import threading
from typing import Any, ClassVar, Iterable

EXIT_OK = 0
EXIT_FAILED = 1  # the run (or a sweep job) failed: its results.json says why
EXIT_USAGE = 2  # a bad command line or config, or an output folder that cannot be created: one line, nothing run
EXIT_DISK_FULL = 3  # a file of the run could not be written (disk full, file too large, read-only, quota): one line

# what a full or unwritable disk answers a write with: no space, over a file-size limit (ulimit -f), a read-only
# file system, over a disk quota
DISK_FULL_ERRNOS = frozenset(code for code in (errno.ENOSPC, errno.EFBIG, errno.EROFS, getattr(errno, "EDQUOT", None))
                             if code is not None)


def exit_code(signum: int) -> int:
    """The shell's code for a process stopped by `signum`: 128 + its number (130 SIGINT, 143 SIGTERM, 140 SIGUSR2)."""
    return 128 + int(signum)


def print_error(message: str) -> None:
    """`prospect: error: MESSAGE` on one line of stderr (the message's whitespace folded)."""
    print(f"prospect: error: {' '.join(str(message).split())}", file=sys.stderr, flush=True)


def is_disk_full(error: BaseException | None) -> bool:
    """Whether `error` is an OSError of a full or unwritable disk (DISK_FULL_ERRNOS)."""
    return isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2)  # SIGUSR2: submitit's "preempted / time is up"


class Stopped(BaseException):
    """What ends a run early but keeps what it computed: a stop signal (`Interrupted`) or a full disk
    (`DiskFull`). A BaseException, like KeyboardInterrupt, so that no per-conversation `except Exception`
    takes it for a failed conversation. In a multirun prospect.run sets `sweep_dir`; its cli() then writes the
    sweep summary, prints `sweep_message()` and exits `exit_code`."""

    sweep_dir: str | None = None
    summary_tried: bool = False  # the sweep summary was attempted already (it failed for lack of room)

    @property
    def exit_code(self) -> int:
        raise NotImplementedError

    def sweep_message(self) -> str:
        """The one line a stopped sweep prints."""
        raise NotImplementedError


class Interrupted(Stopped):
    """A stop signal reached a safe point (between frames). `exit_code` is the shell's 128 + signal number:
    130 SIGINT, 143 SIGTERM, 140 SIGUSR2."""

    def __init__(self, signum: int, where: str = "") -> None:
        self.signum = int(signum)
        self.signal_name = signal.Signals(signum).name
        self.where = where
        self.previous_handler: Any = None  # the handler installed before prospect's (submitit's), see hand_over
        self.sweep_dir: str | None = None  # set by prospect.run in a multirun: the summary is still written
        super().__init__(f"interrupted by {self.signal_name}{' ' + where if where else ''}")

    @property
    def exit_code(self) -> int:
        return exit_code(self.signum)

    def sweep_message(self) -> str:
        return f"sweep stopped: {self} (jobs after it were not started; rerun the same command to resume: finished jobs are reused)"

    def hand_over(self) -> bool:
        """Pass the signal on to the handler that was installed before prospect's, when that is another
        program's Python handler (submitit's: SIGUSR2 checkpoints and requeues the job, then exits; SIGTERM
        is logged). Python's own defaults are not called. Returns whether a handler was called."""
        handler = self.previous_handler
        if not callable(handler) or handler is signal.default_int_handler:
            return False
        handler(self.signum, None)
        return True


class DiskFull(Stopped):
    """A file of the run could not be written for lack of room (DISK_FULL_ERRNOS): the run stops there, keeps
    every file already written valid, and exits EXIT_DISK_FULL. `str()`: `cannot write FILE: STRERROR`.
    `folder`: where what was computed is (the job's output folder; prospect.run sets it)."""

    def __init__(self, path: Any, strerror: str, errno_: int | None = None, folder: str | None = None) -> None:
        self.path, self.strerror, self.errno = str(path), strerror, errno_
        self.folder = folder
        self.sweep_dir: str | None = None
        super().__init__(f"cannot write {self.path}: {strerror}")

    @classmethod
    def of(cls, error: OSError, path: Any = None) -> "DiskFull":
        """`error` (a disk-full OSError) as DiskFull, naming `path` (default: the file the error names)."""
        where = path if path is not None else error.filename if error.filename is not None else "a file"
        return cls(where, error.strerror or os.strerror(error.errno), error.errno)

    @classmethod
    def parse(cls, message: str) -> "DiskFull | None":
        """The DiskFull a `cannot write FILE: STRERROR` message (a results.json's error) tells of, or None."""
        if not message.startswith("cannot write ") or ": " not in message:
            return None
        path, _, strerror = message[len("cannot write "):].rpartition(": ")
        return cls(path, strerror.split(" (what was computed", 1)[0])

    @property
    def exit_code(self) -> int:
        return EXIT_DISK_FULL

    def message(self, folder: str | None = None) -> str:
        """`cannot write FILE: STRERROR (what was computed is in DIR)` (DIR: `folder`, else the job's folder)."""
        where = folder or self.folder
        return f"{self} (what was computed is in {where})" if where else str(self)

    def sweep_message(self) -> str:
        return self.message(self.sweep_dir)


def quiet_full_disk_logging(logger: logging.Logger | None = None) -> None:
    """Let the handlers of `logger` (default: the root logger; e.g. Hydra's run.log) drop a record their file
    has no room for, instead of printing logging's "--- Logging error ---" traceback on stderr; any other
    error of a handler is reported as before. Safe to call again (a handler is changed once)."""
    for handler in (logger or logging.getLogger()).handlers:
        if getattr(handler, "quiet_when_disk_full", False):
            continue
        report = handler.handleError

        def handle_error(record: logging.LogRecord, report: Any = report) -> None:
            if not is_disk_full(sys.exc_info()[1]):
                report(record)

        handler.handleError = handle_error  # type: ignore[method-assign]
        handler.quiet_when_disk_full = True  # type: ignore[attr-defined]


class SignalFlags:
    """What both catchers share: while installed (from the main thread only: handlers cannot be set
    elsewhere), the stop signals are recorded in `received` instead of killing the process; `restore()`
    puts back the handlers found."""

    def __init__(self, signals: Iterable[int] = STOP_SIGNALS) -> None:
        self.signals = tuple(signals)
        self.received: list[int] = []
        self.previous: dict[int, Any] = {}

    def catch(self) -> bool:
        """Install `_handle` for every signal; False where this thread may not."""
        if threading.current_thread() is not threading.main_thread():
            return False
        for signum in self.signals:
            try:
                self.previous[signum] = signal.signal(signum, self._handle)
            except (ValueError, OSError):  # not settable here
                pass
        return True

    def restore(self) -> None:
        for signum, handler in self.previous.items():
            with contextlib.suppress(ValueError, OSError, TypeError):
                signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self.previous = {}

    def _handle(self, signum: int, frame: Any) -> None:
        raise NotImplementedError

    @property
    def signum(self) -> int | None:
        """The signal that stops the run: SIGUSR2 when it came at all (submitit requeues on it), else the first."""
        if not self.received:
            return None
        return signal.SIGUSR2 if signal.SIGUSR2 in self.received else self.received[0]


class StopSignals(SignalFlags):
    """While active, SIGINT/SIGTERM/SIGUSR2 set a flag that `check()` turns into `Interrupted` at a safe
    point; the same signal a second time raises `Interrupted` at once, wherever the run is. Installed only
    from the main thread (signal handlers cannot be set elsewhere). Nested use shares the outer instance,
    so a sweep can keep one installed across its jobs (prospect.run) while each run() enters it again."""

    active: ClassVar["StopSignals | None"] = None

    def __init__(self, signals: Iterable[int] = STOP_SIGNALS) -> None:
        super().__init__(signals)
        self.raised = False  # an Interrupted was raised for the first signal
        self.where = ""  # the last safe point passed, for a forced stop's message
        self.writing = False  # the run is writing its files: a second signal must not cut them short
        self._depth = 0

    @classmethod
    def current(cls) -> "StopSignals":
        """The active instance, or a new (not yet installed) one."""
        return cls.active if cls.active is not None else cls()

    def install(self) -> "StopSignals":
        if self._depth == 0 and self.catch():
            StopSignals.active = self
        self._depth += 1
        return self

    def uninstall(self) -> None:
        self._depth -= 1
        if self._depth == 0 and self.previous:
            self.restore()
            if StopSignals.active is self:
                StopSignals.active = None

    def __enter__(self) -> "StopSignals":
        return self.install()

    def __exit__(self, *exc: Any) -> None:
        self.uninstall()

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        repeated = bool(self.received)  # any stop signal after the first forces the stop
        self.received.append(signum)
        if repeated and self.writing:  # never cut the result files short; a third signal exits without them
            if len(self.received) >= 3:
                os._exit(exit_code(signum))
            with contextlib.suppress(OSError):
                os.write(2, f"\nprospect: {name} received while writing the results: finishing them "
                            f"(send a signal again to exit at once without them)\n".encode())
            return
        if repeated:
            self.raised = True
            raise self._interrupted(signum, f"(sent twice: stopped at once{', ' + self.where if self.where else ''})")
        if len(self.received) == 1:  # os.write: a print could re-enter a stream the run is writing to (tqdm)
            with contextlib.suppress(OSError):
                os.write(2, f"\nprospect: {name} received: stopping after the current frame and writing what was computed "
                            f"(send {name} again to stop at once)\n".encode())

    def _interrupted(self, signum: int, where: str) -> Interrupted:
        stop = Interrupted(signum, where)
        stop.previous_handler = self.previous.get(signum)
        return stop

    def check(self, where: str = "") -> None:
        """A safe point: raise Interrupted (once) if a stop signal came."""
        if where:
            self.where = where
        if self.received and not self.raised:
            self.raised = True
            raise self._interrupted(self.signum, where)


class SweepStop(SignalFlags):
    """A sweep launcher's catcher (gpu_pool, fused): SIGINT/SIGTERM/SIGUSR2 only record the signal; the
    launcher's loop forwards each to the running jobs and starts no new one."""

    def install(self) -> "SweepStop":
        self.catch()
        return self

    def uninstall(self) -> None:
        self.restore()

    def _handle(self, signum: int, frame: Any) -> None:
        self.received.append(signum)
        name = signal.Signals(signum).name
        message = {
            1: f"{name} received: stopping the sweep: the running jobs stop after their current frame and write what they "
               f"computed, no new job starts, then the summary is written (send {name} again to stop the jobs at once)",
            2: f"{name} received again: the running jobs stop at once (a third signal kills them)",
            3: f"{name} received a third time: killing the running jobs",
        }.get(len(self.received))
        if message:  # os.write: nothing that could re-enter a stream being written
            with contextlib.suppress(OSError):
                os.write(2, f"\nprospect: {message}\n".encode())
