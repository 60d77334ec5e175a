"""Training: ``train_and_evaluate(config, workdir)``.

The story, top to bottom: set-up and the workdir, the device mesh, data, the SDE,
model and optimizer, the train state created with its sharding, the jitted multi-step
function, restore, then the loop (log, evaluate, snapshot, sample).

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

import functools
import json
import logging
import math
import pathlib
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from diffusion_sde import data as data_lib
from diffusion_sde import errors, plotting, sampling
from diffusion_sde import workdir as workdir_lib
from diffusion_sde.models import continuous_labels, get_model, get_score_fn
from diffusion_sde.sde import get_sde
from diffusion_sde.training import step as step_lib

# --- Optimizer ----------------------------------------------------------------------------


def get_optimizer(optim: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """Adam(W) with linear warm-up and global-norm gradient clipping, as the reference.

    The learning rate at optimizer step ``n`` (0-based) is ``lr * min((n + 1) / warmup, 1)``;
    gradients are clipped to norm ``grad_clip`` when ``grad_clip >= 0``.
    """
    if optim.optimizer.lower() not in ("adam", "adamw"):
        raise ValueError(f"Unknown optim.optimizer {optim.optimizer!r}; valid: ['Adam', 'AdamW']")
    warmup = max(int(optim.warmup), 0)

    def learning_rate(count):
        if warmup == 0:
            return optim.lr
        return optim.lr * jnp.minimum((count + 1) / warmup, 1.0)

    adam = optax.adamw(
        learning_rate,
        b1=optim.beta1,
        b2=optim.get("beta2", 0.999),
        eps=optim.eps,
        weight_decay=optim.weight_decay,
    )
    if optim.grad_clip >= 0:
        return optax.chain(optax.clip_by_global_norm(optim.grad_clip), adam)
    return adam


def create_train_state(key, *, model, optimizer, data_shape, conditional) -> step_lib.TrainState:
    """Fresh parameters (float32), their EMA copy, optimizer state and the run key."""
    key_params, key_dropout, key_run = jax.random.split(key, 3)
    x = jnp.zeros((1, *data_shape), jnp.float32)
    y = jnp.zeros((1,), jnp.int32) if conditional else None
    variables = model.init(
        {"params": key_params, "dropout": key_dropout}, x, jnp.zeros((1,)), y=y, train=False
    )
    params = variables["params"]
    return step_lib.TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        ema_params=jax.tree.map(jnp.copy, params),  # its own buffers: the state is donated
        opt_state=optimizer.init(params),
        key=key_run,
    )


# --- The jitted training steps ----------------------------------------------------------


def get_train_steps(config, sde, model, optimizer, mesh: Mesh):
    """The jitted ``train_steps(state, batches) -> (state, metrics)`` of a run.

    ``batches`` holds ``n`` global batches stacked as ``(n, B, ...)``; one call runs the
    ``n`` optimisation steps of ``step_lib.get_step_fn`` (``train_and_evaluate`` passes
    ``n = training.n_jitted_steps``) through ``lax.scan``, or written out one after the
    other on CPU (see below), with the state replicated and donated and each batch sharded
    over ``mesh``'s ``data`` axis. ``metrics`` are per step, shaped ``(n,)``.
    """
    loss_fn = step_lib.loss_fn_from_config(config, sde, model)
    step_fn = step_lib.get_step_fn(loss_fn, optimizer, config.model.ema_rate)
    replicated = NamedSharding(mesh, P())
    batch_sharding = NamedSharding(mesh, P(None, "data"))
    # XLA:CPU runs a training step inside a while loop (a scan, even of length 1) 2x
    # slower, and up to 15x with plain XLA convolutions, than the same step outside one:
    # the backward convolutions (jaxlib 0.10; experiments/benchmarks/train_step.py). On CPU
    # the n steps are therefore written out one after the other, at the price of compiling
    # n copies; accelerators keep the loop, which compiles one.
    unrolled = mesh.devices.flat[0].platform == "cpu"

    @functools.partial(
        jax.jit,
        in_shardings=(replicated, batch_sharding),
        out_shardings=(replicated, replicated),
        donate_argnums=0,
    )
    def train_steps(state, batches):
        if not unrolled:
            return jax.lax.scan(step_fn, state, batches)
        metrics = []
        for i in range(jax.tree.leaves(batches)[0].shape[0]):
            state, step_metrics = step_fn(state, jax.tree.map(lambda b, i=i: b[i], batches))
            metrics.append(step_metrics)
        return state, jax.tree.map(lambda *values: jnp.stack(values), *metrics)

    return train_steps


# --- Checkpoints --------------------------------------------------------------------------


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


# --- Helpers for the loop -----------------------------------------------------------------


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


# --- Training -----------------------------------------------------------------------------


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> Any:
    """Train a score model as ``config`` says, writing everything under ``workdir``.

    Resumes from the newest checkpoint in ``workdir/checkpoints`` when there is one.
    One run at a time: a second run on the same workdir stops with an error naming the
    first (``workdir.RunLock``). Returns the final :class:`step_lib.TrainState`.
    """
    workdir = workdir_lib.prepare(workdir)
    with workdir_lib.RunLock(workdir, enabled=jax.process_index() == 0):
        return _train_and_evaluate(config, workdir)


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> Any:
    # --- Set-up -------------------------------------------------------------------------
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

    # --- Mesh ---------------------------------------------------------------------------
    mesh = Mesh(np.asarray(jax.devices()), ("data",))
    if training.batch_size % mesh.size:
        raise errors.ConfigError(
            f"training.batch_size={training.batch_size} does not divide over {mesh.size} "
            f"devices; use a multiple of {mesh.size} (e.g. "
            f"{math.ceil(training.batch_size / mesh.size) * mesh.size})."
        )
    replicated = NamedSharding(mesh, P())
    batch_sharding = NamedSharding(mesh, P(None, "data"))  # (n_jitted_steps, batch, ...)

    # --- SDE, model, optimizer ----------------------------------------------------------
    sde = get_sde(config)
    model = get_model(config.model)
    optimizer = get_optimizer(config.optim)
    data_shape = data_lib.data_shape(config.data)
    conditional = config.model.get("num_classes", 0) > 0
    data_classes = data_lib.num_classes(config.data)
    if conditional and config.model.num_classes != data_classes:
        has = f"has {data_classes} classes" if data_classes else "has no class labels"
        raise errors.ConfigError(
            f"model.num_classes={config.model.num_classes} but {config.data.dataset} {has}; "
            "set model.num_classes to the number of classes, or 0 for an unconditional model."
        )
    sample_shape = (int(training.get("snapshot_num_samples", 64)), *data_shape)
    sampler = sampling.get_sampler(config.sampling, sde, sample_shape)  # validates names now

    # --- Train state, created directly with its (replicated) sharding -------------------
    init = functools.partial(
        create_train_state,
        model=model,
        optimizer=optimizer,
        data_shape=data_shape,
        conditional=conditional,
    )
    key = jax.random.PRNGKey(config.seed)
    abstract_state = jax.eval_shape(init, key)
    abstract_state = jax.tree.map(
        lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=replicated),
        abstract_state,
    )
    check_state_spec(workdir, abstract_state, write=is_main)
    manager = checkpoint_manager(workdir, config)
    state, restored_step = restore_latest(manager, abstract_state, set_aside_unreadable=True)
    if state is None:
        state = jax.jit(init, out_shardings=replicated)(key)
    start_step = int(state.step)
    if is_main:
        logging.info("Starting at step %d (restored: %s).", start_step, restored_step)
        # Lines a kill cut, and those of steps after the checkpoint, which are run again.
        workdir_lib.repair_jsonl(workdir / "metrics.jsonl", through_step=start_step)

    # --- Step function: n_jitted_steps optimisation steps per call ----------------------
    train_steps = get_train_steps(config, sde, model, optimizer, mesh)
    eval_loss_fn = jax.jit(step_lib.loss_fn_from_config(config, sde, model, train=False))

    # --- Data ---------------------------------------------------------------------------
    train_batches = data_lib.get_dataset(
        config.data,
        batch_size=training.batch_size,
        split="train",
        seed=config.seed,
        start_step=start_step,
    )
    eval_batches = data_lib.get_dataset(
        config.data, batch_size=training.batch_size, split="test", seed=config.seed + 1
    )

    def next_global_batches():
        local = [next(train_batches) for _ in range(n_jitted)]
        stacked = {k: np.stack([b[k] for b in local]) for k in ("x", "label")}
        return {
            k: jax.make_array_from_process_local_data(batch_sharding, v) for k, v in stacked.items()
        }

    # --- Sampling at snapshots ----------------------------------------------------------
    inverse_scaler = data_lib.get_data_inverse_scaler(config.data)
    sample_key = jax.random.PRNGKey(config.seed + 5)  # apart from the training keys

    sample_continuous = continuous_labels(
        config, ode=config.sampling.get("method", "pc").lower() == "ode"
    )

    @jax.jit
    def draw_samples(params, key):
        score_fn = get_score_fn(sde, model, {"params": params}, continuous=sample_continuous)
        return sampler(key, score_fn)

    def write_samples(state, step):
        if not (training.snapshot_sampling and is_main):
            return
        samples, nfe = draw_samples(state.ema_params, jax.random.fold_in(sample_key, step))
        samples = np.asarray(inverse_scaler(samples))
        plotting.save_samples(
            samples, workdir / "samples" / f"step_{step:08d}", title=f"step {step}, {int(nfe)} NFE"
        )

    # --- Loop ---------------------------------------------------------------------------
    writer = None
    if is_main:
        from tensorboardX import SummaryWriter

        writer = SummaryWriter(str(workdir / "tensorboard"))
    metrics_path = workdir / "metrics.jsonl"
    history: list[tuple[int, dict]] = []  # device metrics since the last check
    last_saved = restored_step
    progress = _progress_bar(start_step, training.n_iters, disable=not is_main)
    window_start, window_steps = time.time(), 0

    def save(state, step, *, force=False):
        nonlocal last_saved, history
        _check_finite(jax.device_get(history), last_saved)
        history = []
        workdir_lib.save_checkpoint(manager, step, state, force=force, last_step=last_saved)
        last_saved = step

    with _Interrupted() as interrupted:
        step = start_step
        while step < training.n_iters:
            state, metrics = train_steps(state, next_global_batches())
            history.append((step, metrics))
            step += n_jitted
            window_steps += n_jitted
            progress.update(n_jitted)

            if _crossed(step, n_jitted, training.log_freq) or step >= training.n_iters:
                fetched = jax.device_get(history)
                _check_finite(fetched, last_saved)
                loss = float(np.mean([np.mean(m["loss"]) for _, m in fetched]))
                grad_norm = float(np.mean([np.mean(m["grad_norm"]) for _, m in fetched]))
                steps_per_sec = window_steps / max(time.time() - window_start, 1e-9)
                window_start, window_steps = time.time(), 0
                history = []
                progress.set_postfix(loss=f"{loss:.4f}", refresh=False)
                if is_main:
                    record = {
                        "step": step,
                        "loss": loss,
                        "grad_norm": grad_norm,
                        "steps_per_sec": steps_per_sec,
                    }
                    _write_jsonl(metrics_path, record)
                    for name in ("loss", "grad_norm", "steps_per_sec"):
                        writer.add_scalar(f"train/{name}", record[name], step)

            if _crossed(step, n_jitted, training.eval_freq):
                batch = next(eval_batches)
                eval_key = jax.random.fold_in(jax.random.PRNGKey(config.seed + 2), step)
                eval_loss = float(eval_loss_fn(state.ema_params, eval_key, batch))
                if is_main:
                    _write_jsonl(metrics_path, {"step": step, "eval_loss": eval_loss})
                    writer.add_scalar("eval/loss", eval_loss, step)

            snapshot = step % training.snapshot_freq == 0 or step >= training.n_iters
            if snapshot or step % training.snapshot_freq_for_preemption == 0:
                save(state, step)
            if snapshot:
                write_samples(state, step)
            if interrupted.signal is not None:
                save(state, step, force=True)
                progress.close()
                raise SystemExit(
                    f"Stopped by signal {interrupted.signal} at step {step}; checkpoint saved. "
                    "Rerun the same command to continue."
                )
    progress.close()
    if writer is not None:
        writer.close()
    manager.close()
    return state


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
