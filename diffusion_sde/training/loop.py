"""Training: ``train_and_evaluate(config, workdir)``.

The story, top to bottom, one function each: :func:`set_up` (the workdir, the device mesh,
the SDE, model, optimizer and sampler, the train state's shape and sharding),
:func:`restore` (the newest readable checkpoint, or a fresh state), :func:`train_batches`
(the data from the step the run is at), then the loop, whose periodic actions (log,
evaluate, snapshot, sample) are the methods of :class:`PeriodicActions`.

Parallelism is data-parallel over every device: the global batch is sharded over a
``Mesh(devices, ("data",))``, parameters are replicated, and ``jax.jit`` inserts the
gradient all-reduce; ``training.n_jitted_steps`` steps run per call through
``lax.scan``. On several hosts, call ``jax.distributed.initialize()`` first (``main.py``
does with ``--multihost``); each host then reads its own slice of every batch.

A run is a pure function of the config: the batch at step ``k`` and the step's key
``fold_in(key, k)`` depend only on ``config.seed`` and ``k``, so a run killed at any
point and restarted with the same command continues bit for bit.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import pathlib
import signal
import time
from collections.abc import Callable, Iterator

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from diffusion_sde import data as data_lib
from diffusion_sde import errors, host_memory, plotting, sampling
from diffusion_sde.compilation_cache import compiler_options
from diffusion_sde.models import continuous_labels, count_parameters, get_model, get_score_fn
from diffusion_sde.sde import SDE, get_sde
from diffusion_sde.training import checkpoint as checkpoint_lib
from diffusion_sde.training import state as state_lib
from diffusion_sde.training import step as step_lib
from diffusion_sde.training import workdir as workdir_lib


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str | pathlib.Path
) -> state_lib.TrainState:
    """Train a score model as ``config`` says, writing everything under ``workdir``.

    Resumes from the newest checkpoint in ``workdir/checkpoints`` when there is one.
    One run at a time: a second run on the same workdir stops with an error naming the
    first (``workdir.RunLock``). Returns the final :class:`~state.TrainState`.
    """
    workdir = workdir_lib.prepare(workdir)
    with workdir_lib.RunLock(workdir, enabled=jax.process_index() == 0):
        run = set_up(config, workdir)
        state, restored_step = restore(run)
        batches = train_batches(run, start_step=int(state.step))
        train_steps = step_lib.get_train_steps(config, run.sde, run.model, run.optimizer, run.mesh)
        actions = PeriodicActions(run, int(state.step), last_saved=restored_step)
        with _Interrupted() as interrupted:
            state = _loop(run, state, batches, train_steps, actions, interrupted)
        actions.close()
        return state


# --- Set-up -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Run:
    """What a training run is made of, built once by :func:`set_up`."""

    config: ml_collections.ConfigDict
    workdir: pathlib.Path
    is_main: bool  # process 0 writes the logs, samples and the workdir's records
    mesh: Mesh
    sde: SDE
    model: nn.Module
    optimizer: optax.GradientTransformation
    sampler: Callable
    abstract_state: state_lib.TrainState  # shapes, dtypes and (replicated) sharding
    manager: ocp.CheckpointManager


CPU_DEVICES = 2
# Above this many parameters a CPU run trains on one device (with both cores): DDPM++'s
# 55.7M trained no faster on two (4.2 s a step against 3.8-4.4 s) and needed 0.9 GiB more.
CPU_DATA_PARALLEL_MAX_PARAMETERS = 20_000_000


def training_devices(abstract_params) -> list:
    """The devices a run trains on: every device, except on a CPU with a network of more than
    :data:`CPU_DATA_PARALLEL_MAX_PARAMETERS` parameters, which trains on the first alone."""
    devices = jax.devices()
    if devices[0].platform == "cpu" and count_parameters(abstract_params) > (
        CPU_DATA_PARALLEL_MAX_PARAMETERS
    ):
        return devices[:1]
    return devices


def use_cpu_devices(batch_size: int) -> int:
    """Make this process's CPU two JAX devices, for the training step to run data-parallel
    over them, where the CPU has two cores or more, ``batch_size`` is even, and nothing has
    chosen a count yet (``$XLA_FLAGS``' ``--xla_force_host_platform_device_count``, the
    ``jax_num_cpu_devices`` config or ``$JAX_NUM_CPU_DEVICES``). Call it before anything
    touches the devices (``main.py`` does, for ``--mode=train``); a GPU or TPU host is not
    changed by it. Returns the count it set, or 0 where it left JAX's alone.

    XLA:CPU runs one device's program nearly one operation after the other, and only its
    convolutions and matrix products use both cores; two devices each run half the batch at
    once and keep both cores busy. Measured on a 2-core CPU on 2026-12-07 (glibc's huge pages
    on, see ``host_memory``): the digits step 51 ms instead of 79 ms (batch 128), the small
    1.75M network's step 0.38-0.40 s instead of 0.48-0.52 s (batch 16), with the same
    compile time for the first and 4-5 s more for the second.
    """
    chosen = "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", "")
    if chosen or jax.config.jax_num_cpu_devices != -1:
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if (cores or 1) < CPU_DEVICES or batch_size % CPU_DEVICES:
        return 0
    try:
        jax.config.update("jax_num_cpu_devices", CPU_DEVICES)
    except RuntimeError:  # the backend is up already (a notebook ran JAX before): leave it
        return 0
    return CPU_DEVICES


def set_up(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> Run:
    """Check what only a training run needs of the config, record the config in the
    workdir, and build the mesh, the SDE, model, optimizer and snapshot sampler."""
    is_main = jax.process_index() == 0
    (workdir / "samples").mkdir(parents=True, exist_ok=True)
    if is_main:
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2) + "\n")
    training = config.training
    n_jitted = int(training.n_jitted_steps)
    # n_iters need not be a multiple: like the reference, the last call may run past it.
    for name in ("snapshot_freq", "snapshot_freq_for_preemption"):
        if training[name] % n_jitted:
            raise errors.ConfigError(
                f"training.{name} ({training[name]}) must be a multiple of "
                f"training.n_jitted_steps ({n_jitted})."
            )
    data_classes = data_lib.num_classes(config.data)
    if config.model.get("num_classes", 0) > 0 and config.model.num_classes != data_classes:
        has = f"has {data_classes} classes" if data_classes else "has no class labels"
        raise errors.ConfigError(
            f"model.num_classes={config.model.num_classes} but {config.data.dataset} {has}; "
            "set model.num_classes to the number of classes, or 0 for an unconditional model."
        )
    sde = get_sde(config)
    model = get_model(config.model)
    optimizer = state_lib.get_optimizer(config.optim)
    sample_shape = (
        int(training.get("snapshot_num_samples", 64)),
        *data_lib.data_shape(config.data),
    )
    sampler = sampling.get_sampler(config.sampling, sde, sample_shape)  # validates names now
    abstract_state = state_lib.abstract_train_state(config, model, optimizer)
    mesh = Mesh(np.asarray(training_devices(abstract_state.params)), ("data",))
    if training.batch_size % mesh.size:
        raise errors.ConfigError(
            f"training.batch_size={training.batch_size} does not divide over {mesh.size} "
            f"devices; use a multiple of {mesh.size} (e.g. "
            f"{math.ceil(training.batch_size / mesh.size) * mesh.size})."
        )
    abstract_state = state_lib.placed_on(abstract_state, NamedSharding(mesh, P()))
    checkpoint_lib.check_state_spec(workdir, abstract_state, write=is_main)
    return Run(
        config=config,
        workdir=workdir,
        is_main=is_main,
        mesh=mesh,
        sde=sde,
        model=model,
        optimizer=optimizer,
        sampler=sampler,
        abstract_state=abstract_state,
        manager=checkpoint_lib.checkpoint_manager(workdir, config),
    )


def restore(run: Run) -> tuple[state_lib.TrainState, int | None]:
    """``(state, restored_step)``: the newest readable checkpoint (unreadable ones are set
    aside), or a fresh state created directly with its replicated sharding and step None."""
    state, restored_step = checkpoint_lib.restore_latest(
        run.manager, run.abstract_state, set_aside_unreadable=True
    )
    if state is None:
        init = state_lib.state_initializer(run.config, run.model, run.optimizer)
        replicated = NamedSharding(run.mesh, P())
        options = compiler_options(run.mesh.devices.flat[0].platform)
        state = jax.jit(init, out_shardings=replicated, compiler_options=options)(
            jax.random.PRNGKey(run.config.seed)
        )
    if run.is_main:
        logging.info("Starting at step %d (restored: %s).", int(state.step), restored_step)
        # Lines a kill cut, and those of steps after the checkpoint, which are run again.
        workdir_lib.repair_jsonl(run.workdir / "metrics.jsonl", through_step=int(state.step))
    return state, restored_step


def train_batches(run: Run, *, start_step: int) -> Iterator[dict]:
    """The global batches of ``training.n_jitted_steps`` steps at a time, from
    ``start_step`` on, stacked ``(n_jitted_steps, batch, ...)`` and sharded over the mesh's
    ``data`` axis (each host contributes its own slice)."""
    n_jitted = int(run.config.training.n_jitted_steps)
    local_batches = data_lib.get_dataset(
        run.config.data,
        batch_size=run.config.training.batch_size,
        split="train",
        seed=run.config.seed,
        start_step=start_step,
    )
    sharding = NamedSharding(run.mesh, P(None, "data"))
    while True:
        local = [next(local_batches) for _ in range(n_jitted)]
        stacked = {k: np.stack([b[k] for b in local]) for k in ("x", "label")}
        yield {k: jax.make_array_from_process_local_data(sharding, v) for k, v in stacked.items()}


# --- The loop -----------------------------------------------------------------------------


def _loop(run, state, batches, train_steps, actions, interrupted) -> state_lib.TrainState:
    training = run.config.training
    n_jitted = int(training.n_jitted_steps)
    step = start = int(state.step)
    while step < training.n_iters:
        state, metrics = train_steps(state, next(batches))
        if step == start:  # compiled: hand the compiler's freed memory back to the system
            host_memory.release_freed_memory()
        actions.record(step, metrics)
        step += n_jitted
        last = step >= training.n_iters
        if _crossed(step, n_jitted, training.log_freq) or last:
            actions.log(step)
        if _crossed(step, n_jitted, training.eval_freq):
            actions.evaluate(state, step)
        snapshot = step % training.snapshot_freq == 0 or last
        if snapshot or step % training.snapshot_freq_for_preemption == 0:
            actions.save(state, step)
        if snapshot:
            actions.write_samples(state, step)
        if interrupted.signal is not None:
            actions.save(state, step, force=True)
            actions.close()
            raise SystemExit(
                f"Stopped by signal {interrupted.signal} at step {step}; checkpoint saved. "
                "Rerun the same command to continue."
            )
    return state


class PeriodicActions:
    """What the loop does now and then: log the training metrics (``metrics.jsonl``,
    TensorBoard, the progress bar), evaluate the loss on a test batch, save a checkpoint,
    and write a grid of samples. It keeps the device metrics since the last check, so that
    a non-finite loss stops the run before a checkpoint of it is saved."""

    def __init__(self, run: Run, start_step: int, *, last_saved: int | None):
        config = run.config
        self.run = run
        self.history: list[tuple[int, dict]] = []  # device metrics since the last check
        self.last_saved = last_saved
        self.metrics_path = run.workdir / "metrics.jsonl"
        self.writer = None
        if run.is_main:
            from tensorboardX import SummaryWriter

            self.writer = SummaryWriter(str(run.workdir / "tensorboard"))
        self.progress = _progress_bar(start_step, config.training.n_iters, disable=not run.is_main)
        self.window_start, self.window_steps = time.time(), 0
        self.eval_batches = data_lib.get_dataset(
            config.data, batch_size=config.training.batch_size, split="test", seed=config.seed + 1
        )
        self.eval_loss_fn = jax.jit(
            step_lib.loss_fn_from_config(config, run.sde, run.model, train=False)
        )
        sample_continuous = continuous_labels(
            config, ode=config.sampling.get("method", "pc").lower() == "ode"
        )

        @jax.jit
        def draw_samples(params, key):
            score_fn = get_score_fn(
                run.sde, run.model, {"params": params}, continuous=sample_continuous
            )
            return run.sampler(key, score_fn)

        self.draw_samples = draw_samples
        self.sample_key = jax.random.PRNGKey(config.seed + 5)  # apart from the training keys
        self.inverse_scaler = data_lib.get_data_inverse_scaler(config.data)

    def record(self, step: int, metrics: dict) -> None:
        """Keep the per-step ``metrics`` of the call that started at ``step``."""
        n = int(self.run.config.training.n_jitted_steps)
        self.history.append((step, metrics))
        self.window_steps += n
        self.progress.update(n)

    def log(self, step: int) -> None:
        """Write the mean loss, gradient norm and steps/s since the last log."""
        fetched = jax.device_get(self.history)
        _check_finite(fetched, self.last_saved)
        self.history = []
        loss = float(np.mean([np.mean(m["loss"]) for _, m in fetched]))
        grad_norm = float(np.mean([np.mean(m["grad_norm"]) for _, m in fetched]))
        steps_per_sec = self.window_steps / max(time.time() - self.window_start, 1e-9)
        self.window_start, self.window_steps = time.time(), 0
        self.progress.set_postfix(loss=f"{loss:.4f}", refresh=False)
        if self.run.is_main:
            record = {
                "step": step,
                "loss": loss,
                "grad_norm": grad_norm,
                "steps_per_sec": steps_per_sec,
            }
            _write_jsonl(self.metrics_path, record)
            for name in ("loss", "grad_norm", "steps_per_sec"):
                self.writer.add_scalar(f"train/{name}", record[name], step)

    def evaluate(self, state: state_lib.TrainState, step: int) -> None:
        """The EMA parameters' loss on the next test batch."""
        eval_key = jax.random.fold_in(jax.random.PRNGKey(self.run.config.seed + 2), step)
        eval_loss = float(self.eval_loss_fn(state.ema_params, eval_key, next(self.eval_batches)))
        if self.run.is_main:
            _write_jsonl(self.metrics_path, {"step": step, "eval_loss": eval_loss})
            self.writer.add_scalar("eval/loss", eval_loss, step)

    def save(self, state: state_lib.TrainState, step: int, *, force: bool = False) -> None:
        """A checkpoint of ``step``, after checking that every loss since the last is finite."""
        _check_finite(jax.device_get(self.history), self.last_saved)
        self.history = []
        checkpoint_lib.save_checkpoint(
            self.run.manager, step, state, force=force, last_step=self.last_saved
        )
        self.last_saved = step

    def write_samples(self, state: state_lib.TrainState, step: int) -> None:
        """A grid of samples of the EMA parameters, ``samples/step_<step>.png`` (and .npz)."""
        if not (self.run.config.training.snapshot_sampling and self.run.is_main):
            return
        key = jax.random.fold_in(self.sample_key, step)
        # On one device: replicated parameters would have every device draw the same samples.
        params = jax.device_put(state.ema_params, jax.local_devices()[0])
        samples, nfe = self.draw_samples(params, key)
        plotting.save_samples(
            np.asarray(self.inverse_scaler(samples)),
            self.run.workdir / "samples" / f"step_{step:08d}",
            title=f"step {step}, {int(nfe)} NFE",
        )

    def close(self) -> None:
        self.progress.close()
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        self.run.manager.close()


# --- Helpers ------------------------------------------------------------------------------


class _Interrupted:
    """SIGTERM / SIGINT set a flag; the loop saves a checkpoint and exits cleanly."""

    def __init__(self):
        self.signal = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. a notebook worker): no handler
                pass
        return self

    def _handle(self, signum, frame):
        self.signal = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _check_finite(history: list[tuple[int, dict]], last_good_step: int | None) -> None:
    """Raise if any logged loss or gradient norm is not finite, naming the step range."""
    for first_step, metrics in history:
        values = np.concatenate([np.ravel(metrics["loss"]), np.ravel(metrics["grad_norm"])])
        if not np.all(np.isfinite(values)):
            bad = np.flatnonzero(~np.isfinite(np.ravel(metrics["loss"])))
            offset = int(bad[0]) if bad.size else 0
            raise FloatingPointError(
                f"Non-finite loss or gradient in steps {first_step + offset + 1}.."
                f"{first_step + np.size(metrics['loss'])}. The last good checkpoint "
                f"(step {last_good_step}) is intact; lower optim.lr, raise optim.warmup or "
                "check the data, then rerun the same command to resume from it."
            )


def _crossed(step: int, stride: int, period: int) -> bool:
    """Whether the last ``stride`` steps, ending at ``step``, passed a multiple of ``period``."""
    return step // period > (step - stride) // period


def _write_jsonl(path: pathlib.Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def _progress_bar(start: int, total: int, *, disable: bool):
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        initial=start,
        disable=disable,
        unit="step",
        dynamic_ncols=True,
        mininterval=2.0,
        desc="train",
    )
