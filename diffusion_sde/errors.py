"""Errors of the user's input, told as one line by ``python -m diffusion_sde.main``.

A :class:`UserError` is a mistake in what the user gave (a flag, a config file or
field, a workdir) or in the machine it runs on (a full disk): ``main.py`` prints its
message as ``error: ...`` on one line and exits with status 2, and keeps Python's
traceback for everything else (bugs). ``--debug`` shows the traceback always.

The classes also derive from the built-in exception a library caller would expect
(``ValueError`` for a config, ``FileNotFoundError`` for a missing checkpoint, ``OSError``
for a disk or a workdir), so ``except ValueError`` keeps working in notebooks and tests.

``training.checks.check_config`` reads a whole config before a run starts and raises these
errors, so that a misspelt name or a network that cannot take the data's shape is reported
before anything compiles.
"""

from __future__ import annotations

import difflib
import errno
import re
from collections.abc import Iterable
from typing import Any


class UserError(Exception):
    """An error of the user's input: its message says what is wrong and what to do."""

    def __str__(self) -> str:
        # An OSError made as (errno, message) would print as "[Errno N] message".
        return getattr(self, "strerror", None) or super().__str__()


class ConfigError(UserError, ValueError):
    """A config value (or a combination of them) that cannot work."""


class WorkdirError(UserError, OSError):
    """A workdir that cannot be used as asked (a file, read-only, taken by another run)."""


class MissingCheckpointError(UserError, FileNotFoundError):
    """``--mode=eval`` / ``sample`` on a workdir without the checkpoint they need."""


class DiskFullError(UserError, OSError):
    """The filesystem of the workdir ran out of space; the last checkpoint is intact."""


# --- Suggestions ----------------------------------------------------------------------


def did_you_mean(name: str, valid: Iterable[str]) -> str:
    """``" (did you mean 'x'?)"`` for the valid name nearest to ``name``, else ``""``."""
    close = difflib.get_close_matches(str(name), [str(v) for v in valid], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def unknown_name(field: str, name: Any, valid: Iterable[str]) -> ConfigError:
    """The error for ``--config.<field>=<name>`` when ``name`` is not one of ``valid``."""
    valid = sorted(valid)
    return ConfigError(
        f"{field}={name!r} is not a valid name{did_you_mean(name, valid)}; "
        f"valid: {', '.join(valid)}."
    )


def is_disk_full(error: BaseException) -> bool:
    """Whether ``error`` (or one it was raised from) says the disk or a quota is full.

    Orbax and TensorStore report ENOSPC as a ``ValueError`` whose text carries it.
    """
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(error)
        if "No space left on device" in text or "Disk quota exceeded" in text:
            return True
        error = error.__cause__ or error.__context__
    return False


# --- What main.py tells the user ------------------------------------------------------

NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)


def as_user_error(error: BaseException) -> UserError | None:
    """``error`` as the :class:`UserError` it is, or None for a bug (keep its traceback).

    Besides the :class:`UserError` s, a full disk and a file that cannot be written
    (permissions, a read-only filesystem) are the machine's, not the program's.
    """
    if isinstance(error, UserError):
        return error
    if is_disk_full(error):
        where = getattr(error, "filename", None)
        where = f" writing {where}" if where else ""
        return DiskFullError(
            errno.ENOSPC,
            f"No space left on the device{where}; free some space (or give a --workdir on a "
            "larger disk) and rerun the same command: it resumes from the last checkpoint.",
        )
    if isinstance(error, OSError) and error.errno in NOT_WRITABLE and error.filename:
        return WorkdirError(
            error.errno,
            f"Cannot write {error.filename} ({error.strerror}); give a --workdir you can "
            "write to, or fix its permissions.",
        )
    return None


def _last_line(text: str) -> str:
    lines = [line.strip() for line in str(text).strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _load_config(config_arg: str | None):
    """``get_config()`` of ``--config=PATH[:ARG]``, or None when that fails."""
    import importlib.util

    import ml_collections

    if not config_arg:
        return None
    path, *arguments = config_arg.split(":", 1)
    try:
        spec = importlib.util.spec_from_file_location("_config_for_the_message", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        config = module.get_config(*arguments)
    except Exception:  # noqa: BLE001 -- the message then falls back on the error's text
        return None
    return config if isinstance(config, ml_collections.ConfigDict) else None


def _override_error(argv, config) -> str | None:
    """The message for the first ``--config.a.b=v`` of ``argv`` that names no field."""
    if config is None:
        return None
    for arg in argv:
        if not arg.startswith("--config."):
            continue
        path = arg[len("--config.") :].split("=", 1)[0]
        node, parents = config, []
        for part in path.split("."):
            keys = list(node.keys()) if hasattr(node, "keys") else []
            if part not in keys:
                where = ".".join(parents) or "the config"
                hint = did_you_mean(part, keys)
                if not hint:
                    hint = f"; its fields: {', '.join(sorted(keys))}" if keys else ""
                return f"--config.{path}: {where} has no field {part!r}{hint}."
            node, parents = node[part], [*parents, part]
    return None


def describe_flag_error(error: BaseException, argv) -> str:
    """One line for an error raised while absl parsed the flags and loaded the config."""
    from absl import flags

    config_arg = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if isinstance(error, OSError) and "Failed loading config file" in str(error):
        path = (config_arg or "").split(":", 1)[0]
        return _missing_config_file(path, _last_line(error))
    if isinstance(error, SyntaxError):
        return (
            f"syntax error in the config file {error.filename}, line {error.lineno}: "
            f"{error.msg}; fix it and rerun."
        )
    if isinstance(error, KeyError | AttributeError):
        override = _override_error(argv, _load_config(config_arg))
        if override is not None:
            return override
    if isinstance(error, flags.Error):
        first = str(error).strip().splitlines()[0]
        last = _last_line(error)
        text = first if first == last else f"{first.split(':', 1)[0]}: {last}"
        enum = re.match(r"flag --(\w+)=(.*?): value should be one of <(.*)>", text)
        if enum:
            text += did_you_mean(enum[2], enum[3].split("|"))
        return text.removeprefix("flag ") + ("" if text.endswith((".", "?")) else ".")
    return (
        f"--config={config_arg}: get_config raised {type(error).__name__}: "
        f"{_last_line(error) or error!r}"
    )


def _missing_config_file(path: str, reason: str) -> str:
    import pathlib

    folder = pathlib.Path(path).parent
    names = sorted(p.name for p in folder.glob("*.py")) if folder.is_dir() else []
    close = difflib.get_close_matches(pathlib.Path(path).name, names, n=1, cutoff=0.6)
    hint = f" (did you mean {str(folder / close[0])!r}?)" if close else ""
    return (
        f"--config={path}: cannot load the config file ({reason}){hint}; give the path of "
        f"a config file, relative to {pathlib.Path.cwd()} or absolute, e.g. "
        "--config=configs/digits_vp.py."
    )
