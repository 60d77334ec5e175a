"""A run's workdir kept safe: usable, one run at a time, no partial files after a fault.

- :func:`prepare` makes the directory, or says in one line why it cannot be used (a
  file, read-only, a full disk).
- :class:`RunLock` lets one training run at a time write a workdir: ``run.lock`` holds
  the host and pid of the run and an advisory ``flock``, which the kernel drops when
  that process dies however it dies (SIGKILL included), so the lock of a dead run is
  taken over without anyone deleting it.
- :func:`save_checkpoint` saves through orbax only when the filesystem has room for
  the checkpoint, and after a failed save (the disk filled up meanwhile) removes the
  half-written ``*.orbax-checkpoint-tmp`` folder and stops with one message: the
  previous checkpoint stays the newest readable one.
- :func:`repair_jsonl` keeps ``metrics.jsonl`` valid JSON lines when a run resumes.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import logging
import os
import pathlib
import shutil
import socket
import sys
import threading
from typing import Any

import jax
import numpy as np

from diffusion_sde import errors

LOCK_NAME = "run.lock"


def prepare(workdir: str | pathlib.Path) -> pathlib.Path:
    """The absolute path of ``workdir``, created if missing and checked to be writable.

    Raises :class:`errors.WorkdirError` for a path that is a file or cannot be written,
    :class:`errors.DiskFullError` for a filesystem without room for a small file.
    """
    workdir = pathlib.Path(workdir).absolute()  # orbax needs absolute paths
    for parent in (workdir, *workdir.parents):
        if parent.exists() and not parent.is_dir():
            raise errors.WorkdirError(
                errno.ENOTDIR,
                f"--workdir={workdir}: {parent} is a file, not a directory; give a directory "
                "(it is created when missing).",
            )
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        probe = workdir / f".write_test_{socket.gethostname()}_{os.getpid()}"
        probe.write_bytes(b"0" * 512)
        probe.unlink()
    except OSError as error:
        raise _as_user_error(error, workdir) from error
    return workdir


def _as_user_error(error: OSError, workdir: pathlib.Path) -> errors.UserError | OSError:
    if errors.is_disk_full(error):
        return errors.DiskFullError(
            errno.ENOSPC,
            f"No space left on the filesystem of {workdir} ({_free(workdir)} free); free some "
            "space and rerun the same command.",
        )
    if error.errno in errors.NOT_WRITABLE:
        return errors.WorkdirError(
            error.errno,
            f"--workdir={workdir} cannot be written ({error.strerror}); give a directory you "
            "can write to, or fix its permissions.",
        )
    return error


def _free(path: pathlib.Path) -> str:
    try:
        return _size(shutil.disk_usage(path).free)
    except OSError:
        return "unknown"


def _size(num_bytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if num_bytes < 1024 or unit == "GiB":
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1024
    raise AssertionError


# --- One run per workdir --------------------------------------------------------------


def _process_start_time(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (clock ticks since boot), to tell a reused pid."""
    try:
        stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()[19]


class RunLock:
    """``with RunLock(workdir): ...`` holds ``workdir/run.lock`` for one run.

    A second run on the same workdir raises :class:`errors.WorkdirError` naming the
    first (host, pid, start time). The lock is an ``flock`` on the file, which the
    kernel releases when its process exits or is killed, so the lock of a dead run is
    simply taken over (and said so in the log). ``enabled=False`` (the processes other
    than 0 of a multi-host run) makes it a no-op.
    """

    def __init__(self, workdir: str | pathlib.Path, *, enabled: bool = True):
        self.path = pathlib.Path(workdir) / LOCK_NAME
        self.enabled = enabled
        self._fd: int | None = None

    def __enter__(self) -> RunLock:
        if self.enabled:
            self._acquire()
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()  # before closing: no one can lock the old inode in between
        os.close(self._fd)
        self._fd = None

    def _acquire(self) -> None:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_lock(self.path)
                os.close(fd)
                raise errors.WorkdirError(
                    errno.EBUSY,
                    f"{self.path.parent} is in use by another run ({_describe(holder)}): wait "
                    "for it to finish or stop it, or give another --workdir.",
                ) from None
            except OSError as error:  # a filesystem without flock: the pid alone decides
                if error.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                    os.close(fd)
                    raise
                holder = _read_lock(self.path)
                if holder and _alive(holder):
                    os.close(fd)
                    raise errors.WorkdirError(
                        errno.EBUSY,
                        f"{self.path.parent} is in use by another run ({_describe(holder)}); "
                        "wait for it, stop it, or give another --workdir.",
                    ) from None
            # The file may have been unlinked by its releasing owner between our open and
            # our flock: then the lock we hold is on a deleted inode; try again.
            try:
                if os.fstat(fd).st_ino != os.stat(self.path).st_ino:
                    os.close(fd)
                    continue
            except FileNotFoundError:
                os.close(fd)
                continue
            previous = _read_lock(self.path)
            if previous:
                logging.warning(
                    "Taking over the lock of a run that is gone (%s).", _describe(previous)
                )
            record = {
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "process_start": _process_start_time(os.getpid()),
                "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            }
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
            self._fd = fd
            return


def _read_lock(path: pathlib.Path) -> dict | None:
    try:
        return json.loads(path.read_text() or "null")
    except (OSError, ValueError):
        return None


def _alive(holder: dict) -> bool:
    """Whether the process named by a lock record still runs (on this host)."""
    if holder.get("host") != socket.gethostname():
        return True  # cannot tell: assume it runs
    pid = int(holder.get("pid", 0))
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    start = holder.get("process_start")
    return start is None or start == _process_start_time(pid)


def _describe(holder: dict | None) -> str:
    if not holder:
        return "its lock file is being written"
    return f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}"


# --- Checkpoints on a filesystem that may fill up -------------------------------------


def _directory_bytes(path: pathlib.Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def checkpoint_bytes(directory: pathlib.Path, state: Any) -> int:
    """Bytes a new checkpoint needs: the size of the newest one in ``directory``, or the
    state's array bytes when there is none, plus 5% and 64 KiB for orbax's metadata."""
    steps = sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())
    if steps:
        size = _directory_bytes(directory / str(steps[-1]))
    else:
        size = sum(leaf.nbytes for leaf in jax.tree.leaves(state))
    return int(size * 1.05) + 64 * 1024


def save_checkpoint(manager, step: int, state: Any, *, force: bool = False, last_step=None):
    """``manager.save(step, state)`` and wait for it, with a full disk told in one line.

    When the filesystem has less free space than :func:`checkpoint_bytes`, nothing is
    written; when the save fails for lack of space all the same, its partial
    ``<step>.orbax-checkpoint-tmp*`` folder is removed. Either way
    :class:`errors.DiskFullError` says which path, how much space is needed, and that
    the checkpoint of ``last_step`` is intact; the run resumes from it once space is
    freed.
    """
    import orbax.checkpoint as ocp

    directory = pathlib.Path(manager.directory)
    needed = checkpoint_bytes(directory, state)
    free = shutil.disk_usage(directory).free
    kept = (
        f"the checkpoint of step {last_step} is intact"
        if last_step is not None
        else "no checkpoint was saved yet"
    )
    advice = f"{kept}; free some space (or give a --workdir on a larger disk) and rerun."
    fits = free >= needed
    if jax.process_count() > 1:  # every process must take the same way: saving is collective
        from jax.experimental import multihost_utils

        fits = bool(np.all(multihost_utils.process_allgather(np.asarray(fits))))
    if not fits:
        raise errors.DiskFullError(
            errno.ENOSPC,
            f"Not enough space to save the checkpoint of step {step} in {directory}: it needs "
            f"about {_size(needed)}, {_size(free)} free. Stopped before writing; {advice}",
        )
    try:
        with _orbax_failure_noise_held():
            manager.save(step, args=ocp.args.StandardSave(state), force=force)
            manager.wait_until_finished()
    except Exception as error:
        if not errors.is_disk_full(error):
            raise
        for partial in directory.glob(f"{step}.orbax-checkpoint-tmp*"):
            shutil.rmtree(partial, ignore_errors=True)
        raise errors.DiskFullError(
            errno.ENOSPC,
            f"The disk filled up while saving the checkpoint of step {step} in {directory} "
            f"(it needs about {_size(needed)}, {_free(directory)} free now); the partial "
            f"checkpoint was removed and {advice}",
        ) from error


class _Held(logging.Filter):
    """Holds back orbax's and asyncio's log records of a failing save."""

    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if "/orbax/" in record.pathname or record.name == "asyncio":
            self.records.append(record)
            return False
        return True


@contextlib.contextmanager
def _orbax_failure_noise_held():
    """Orbax's writer threads print a traceback each, and asyncio logs every unretrieved
    future, and TensorStore's callbacks print "Event loop is closed" straight to
    ``sys.stderr``, when a save fails: hundreds of lines for one full disk. Hold them back
    while saving; after a disk-full failure drop them for good (the process is about to
    stop with one message), after any other failure let them through."""
    held = _Held()
    stderr = sys.stderr
    sys.stderr = _TracebacksHeld(stderr)
    handlers = logging.getLogger().handlers
    previous_hook = threading.excepthook
    thread_failures = []
    threading.excepthook = thread_failures.append
    for handler in handlers:
        handler.addFilter(held)
    disk_full = False
    try:
        yield
    except Exception as error:
        disk_full = errors.is_disk_full(error)
        raise
    finally:
        if disk_full:
            threading.excepthook = _drop_disk_full(previous_hook)
            sys.stderr.drop = True
        else:
            held_output, sys.stderr = sys.stderr.release(), stderr
            stderr.write(held_output)
            threading.excepthook = previous_hook
            for handler in handlers:
                handler.removeFilter(held)
            for record in held.records:
                logging.getLogger(record.name).handle(record)
            for failure in thread_failures:
                previous_hook(failure)


class _TracebacksHeld:
    """``sys.stderr`` passing text through but holding back each Python traceback block
    whose last line is a failing save's (a full disk, a closed event loop); with
    ``drop`` set, those are discarded. Other tracebacks (ours too) are written as usual."""

    _FAILED_SAVE = ("Event loop is closed", "No space left on device", "RESOURCE_EXHAUSTED")

    def __init__(self, stream):
        self._stream = stream
        self._block: list[str] | None = None
        self._partial = ""
        self.held: list[str] = []
        self.drop = False

    def write(self, text: str) -> int:
        self._partial += text
        *lines, self._partial = self._partial.split("\n")
        for line in lines:
            self._line(line + "\n")
        if self._block is None and self._partial and not "Traceback".startswith(self._partial):
            self._stream.write(self._partial)  # a progress bar's \r-line, an unended line
            self._partial = ""
        return len(text)

    def _line(self, line: str) -> None:
        if self._block is None:
            if line.startswith("Traceback (most recent call last):"):
                self._block = [line]
            else:
                self._stream.write(line)
            return
        self._block.append(line)
        if line.startswith((" ", "\t")):
            return
        block, self._block = "".join(self._block), None  # the exception's line ends it
        if not any(failure in line for failure in self._FAILED_SAVE):
            self._stream.write(block)
        elif not self.drop:
            self.held.append(block)

    def release(self) -> str:
        """Everything held back, and what is not written yet."""
        pending = "".join(self._block or []) + self._partial
        self._block, self._partial = None, ""
        return "".join(self.held) + pending

    def flush(self) -> None:
        self._stream.flush()

    def __getattr__(self, name):
        return getattr(self._stream, name)


def _drop_disk_full(previous_hook):
    def hook(args):
        if args.exc_value is None or not errors.is_disk_full(args.exc_value):
            previous_hook(args)

    return hook


# --- metrics.jsonl ----------------------------------------------------------------------


def repair_jsonl(path: pathlib.Path, *, through_step: int | None = None) -> int:
    """Rewrite ``path`` as valid JSON lines; returns the number of lines dropped.

    A kill while a line is written leaves it cut: it is dropped. With ``through_step``,
    records of later steps are dropped too (a run resumed from the checkpoint of that
    step writes them again). The file is replaced atomically, and only when needed.
    """
    if not path.exists():
        return 0
    raw = path.read_bytes()
    kept, dropped = [], 0
    for line in raw.split(b"\n"):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            dropped += 1
            continue
        step = record.get("step") if isinstance(record, dict) else None
        if through_step is not None and isinstance(step, int) and step > through_step:
            dropped += 1
            continue
        kept.append(line + b"\n")
    if dropped or (raw and not raw.endswith(b"\n")):
        temporary = path.with_name(path.name + ".tmp")
        temporary.write_bytes(b"".join(kept))
        temporary.replace(path)
        logging.info("%s: dropped %d cut or later line(s) on resume.", path, dropped)
    return dropped
