"""A run's checkpoints: the orbax manager of ``workdir/checkpoints``, the state they must
fit, saving on a filesystem that may fill up, restoring the newest readable one, and
importing a published checkpoint as a workdir.

- :func:`check_state_spec` refuses a workdir whose checkpoints were written for another
  model or optimizer (``state_spec.json``), before any checkpoint is touched.
- :func:`save_checkpoint` saves only when the filesystem has room for the checkpoint; after
  a failed save (the disk filled up meanwhile) it removes the half-written
  ``*.orbax-checkpoint-tmp`` folder and stops with one message: the previous checkpoint
  stays the newest readable one.
- :func:`restore_latest` skips unreadable checkpoints (and, for training, sets them aside);
  :func:`load_trained` is what evaluation and sampling restore through.
- :func:`import_published` writes a published checkpoint (:mod:`diffusion_sde.pretrained`)
  as the checkpoint of a train state, so that ``--mode=sample`` and ``--mode=eval`` use it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import pathlib
import shutil
import sys
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from diffusion_sde import errors, pretrained
from diffusion_sde.models import get_model
from diffusion_sde.sde import get_sde
from diffusion_sde.training import state as state_lib
from diffusion_sde.training import workdir as workdir_lib

# --- The manager and the state its checkpoints must fit ---------------------------------


def checkpoint_manager(workdir: pathlib.Path, config) -> ocp.CheckpointManager:
    """Orbax manager over ``workdir/checkpoints``: keeps every ``snapshot_freq``-th step for
    good and the two most recent preemption snapshots."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=2,
        keep_period=config.training.snapshot_freq,
        create=True,
        enable_async_checkpointing=False,
        cleanup_tmp_directories=True,  # a save cut by a kill leaves a *-tmp folder
    )
    return ocp.CheckpointManager(workdir / "checkpoints", options=options)


def state_spec(abstract_state) -> list[list]:
    """The train state's leaves as ``[path, shape, dtype]``: what a checkpoint must match."""
    return [
        [jax.tree_util.keystr(path), list(leaf.shape), str(leaf.dtype)]
        for path, leaf in jax.tree_util.tree_leaves_with_path(abstract_state)
    ]


def check_state_spec(workdir: pathlib.Path, abstract_state, *, write: bool) -> None:
    """Refuse a workdir whose checkpoints were written for another model or optimizer.

    ``workdir/state_spec.json`` records the state's structure when the run starts; a
    later run whose config changes it stops here, before any checkpoint is touched.
    """
    path = workdir / "state_spec.json"
    spec = state_spec(abstract_state)
    if path.exists():
        saved = json.loads(path.read_text())
        if saved != spec:
            difference = next(
                (f"{a} vs {b}" for a, b in zip(saved, spec, strict=False) if a != b),
                f"{len(saved)} vs {len(spec)} arrays",
            )
            raise errors.ConfigError(
                f"The checkpoints in {workdir} do not fit this config's model and optimizer "
                f"(first difference, saved vs now: {difference}). Use the config that wrote "
                "them (config.json in the workdir) or a new --workdir."
            )
    elif write:
        path.write_text(json.dumps(spec) + "\n")


def restore_latest(
    manager: ocp.CheckpointManager, abstract_state, *, set_aside_unreadable: bool = False
) -> tuple[Any, int | None]:
    """Restore the newest readable checkpoint: ``(state, step)``, or ``(None, None)``.

    An unreadable checkpoint (corrupt, half-written) is skipped with a warning for the
    previous one; with ``set_aside_unreadable`` (training) it is first moved to
    ``checkpoints_unreadable/`` beside ``checkpoints/`` -- never deleted -- so that the
    resumed run can save that step again.
    """
    manager.reload()
    steps = sorted(manager.all_steps(), reverse=True)
    for step in steps:
        try:
            return manager.restore(step, args=ocp.args.StandardRestore(abstract_state)), step
        except Exception as error:  # noqa: BLE001 -- any unreadable checkpoint is skipped
            logging.warning("Checkpoint at step %d is unreadable: %s", step, error)
            if set_aside_unreadable:
                aside = pathlib.Path(manager.directory).parent / "checkpoints_unreadable"
                aside.mkdir(exist_ok=True)
                target = aside / f"{step}_{int(time.time())}"
                pathlib.Path(manager.directory, str(step)).rename(target)
                logging.warning("Moved it to %s; trying the previous checkpoint.", target)
                manager.reload()
    if steps and not set_aside_unreadable:
        raise errors.MissingCheckpointError(
            f"None of the checkpoints {steps} in {manager.directory} is readable; rerun "
            "--mode=train on this workdir (it sets unreadable checkpoints aside)."
        )
    return None, None


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
            f"about {workdir_lib.format_bytes(needed)}, {workdir_lib.format_bytes(free)} free. Stopped before writing; {advice}",
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
            f"(it needs about {workdir_lib.format_bytes(needed)}, {workdir_lib.free_space(directory)} free now); the partial "
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


# --- Restoring for evaluation and sampling ------------------------------------------------


def available_steps(workdir: str | pathlib.Path) -> list[int]:
    """The steps of the checkpoints under ``workdir/checkpoints``, oldest first."""
    directory = pathlib.Path(workdir).absolute() / "checkpoints"
    if not directory.is_dir():
        return []
    manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True))
    steps = sorted(manager.all_steps())
    manager.close()
    return steps


def load_trained(config, workdir: str | pathlib.Path, step: int | None = None):
    """``(sde, model, state)`` from the checkpoint of ``step`` in ``workdir``, or from the
    newest readable one when ``step`` is None, restored onto this process's first device
    whatever topology wrote it."""
    model = get_model(config.model)
    optimizer = state_lib.get_optimizer(config.optim)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract_state = state_lib.abstract_train_state(config, model, optimizer, sharding=device)
    check_state_spec(pathlib.Path(workdir), abstract_state, write=False)  # shapes and dtypes
    manager = ocp.CheckpointManager(
        pathlib.Path(workdir).absolute() / "checkpoints",
        options=ocp.CheckpointManagerOptions(read_only=True),
    )
    if step is None:
        state, _ = restore_latest(manager, abstract_state)
    elif step in manager.all_steps():
        state = manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
    else:
        available = sorted(manager.all_steps())
        manager.close()
        raise errors.MissingCheckpointError(
            f"No checkpoint of step {step} under {workdir}/checkpoints (it has {available})."
        )
    manager.close()
    if state is None:
        raise errors.MissingCheckpointError(
            f"No readable checkpoint under {workdir}/checkpoints; train first with "
            f"--mode=train and the same --workdir."
        )
    return get_sde(config), model, state


# --- A published checkpoint as a workdir ------------------------------------------------


def import_published(
    config: ml_collections.ConfigDict,
    workdir: str | pathlib.Path,
    path: str | pathlib.Path,
    format: str,
) -> pathlib.Path:
    """Write ``workdir`` (new or without checkpoints) so that ``--mode=sample`` and
    ``--mode=eval`` use the published checkpoint at ``path`` unchanged: an orbax checkpoint
    of a train state whose ``params`` are the raw weights and ``ema_params`` the EMA ones
    (the raw ones again when the file has none), at the source's step, plus
    ``config.json`` and ``state_spec.json``. Returns the checkpoint directory."""
    workdir = pathlib.Path(workdir).absolute()
    if (workdir / "checkpoints").exists() and any((workdir / "checkpoints").iterdir()):
        raise pretrained.CheckpointError(
            f"{workdir}/checkpoints already has checkpoints; import into a new --workdir"
        )
    params, ema_params, step = pretrained.convert_checkpoint(config, path, format)
    ema_params = params if ema_params is None else ema_params
    optimizer = state_lib.get_optimizer(config.optim)
    abstract = state_lib.abstract_train_state(config, get_model(config.model), optimizer)
    # The same tree as a trained run's state (leaf order and dtypes), so restore fits.
    params = jax.tree.map(lambda a, s: a.astype(s.dtype), params, abstract.params)
    ema_params = jax.tree.map(lambda a, s: a.astype(s.dtype), ema_params, abstract.ema_params)
    state = state_lib.TrainState(
        step=jnp.asarray(step, jnp.int32),
        params=params,
        ema_params=ema_params,
        opt_state=optimizer.init(params),
        key=jax.random.PRNGKey(config.seed),
    )
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "samples").mkdir(exist_ok=True)
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2) + "\n")
    check_state_spec(workdir, jax.eval_shape(lambda: state), write=True)
    manager = checkpoint_manager(workdir, config)
    manager.save(step, args=ocp.args.StandardSave(state), force=True)
    manager.wait_until_finished()
    manager.close()
    return workdir / "checkpoints"
