"""A run's workdir kept safe: usable, one run at a time, no partial files after a fault.

- :func:`prepare` makes the directory, or says in one line why it cannot be used (a
  file, read-only, a full disk).
- :class:`RunLock` lets one training run at a time write a workdir: ``run.lock`` holds
  the host and pid of the run and an advisory ``flock``, which the kernel drops when
  that process dies however it dies (SIGKILL included), so the lock of a dead run is
  taken over without anyone deleting it.
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
            f"No space left on the filesystem of {workdir} ({free_space(workdir)} free); "
            "free some space and rerun the same command.",
        )
    if error.errno in errors.NOT_WRITABLE:
        return errors.WorkdirError(
            error.errno,
            f"--workdir={workdir} cannot be written ({error.strerror}); give a directory you "
            "can write to, or fix its permissions.",
        )
    return error


def free_space(path: pathlib.Path) -> str:
    """The free space of the filesystem holding ``path``, for a message."""
    try:
        return format_bytes(shutil.disk_usage(path).free)
    except OSError:
        return "unknown"


def format_bytes(num_bytes: float) -> str:
    """``num_bytes`` in B, KiB, MiB or GiB, for a message."""
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
