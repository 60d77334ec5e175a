"""The training step: a network's loss function and one optimisation step.

``get_loss_fn`` turns a network into a score function (``models.get_score_fn``) and feeds it
to a pure loss of :mod:`diffusion_sde.losses`; ``get_step_fn`` differentiates it and applies
the optimizer and the parameter EMA; ``get_train_steps`` jits several of them into one call
with the batch sharded over the device mesh (``loop.py`` runs it).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from diffusion_sde.compilation_cache import compiler_options
from diffusion_sde.losses import (
    DEFAULT_LOSS_OPTIONS,
    TIME_DISTRIBUTIONS,
    LossOptions,
    ddpm_loss,
    dsm_loss,
    resolve_weighting,
    smld_loss,
)
from diffusion_sde.models import get_score_fn
from diffusion_sde.sde import SDE, VESDE, VPSDE
from diffusion_sde.training.state import TrainState

LABEL_DROPOUT_STREAM = 7  # fold_in index of the label-dropout key within a step's key


def get_loss_fn(
    sde: SDE,
    model: nn.Module,
    *,
    continuous: bool = True,
    reduce_mean: bool = False,
    likelihood_weighting: bool = False,
    train: bool = True,
    eps: float = 1e-5,
    label_dropout: float = 0.0,
    weighting: str | None = None,
    time_distribution: str = "uniform",
    options: LossOptions = DEFAULT_LOSS_OPTIONS,
) -> Callable[[Any, jax.Array, dict], jax.Array]:
    """``loss_fn(params, key, batch) -> scalar`` for a network, as the config asks.

    Continuous training uses :func:`~diffusion_sde.losses.dsm_loss` with ``weighting``,
    ``time_distribution`` and ``options`` (``training.weighting``, ``training.time_distribution``;
    see there) through ``models.get_score_fn``, whose network target is
    ``model.config.parametrization`` or the path's default; discrete
    training uses :func:`ddpm_loss` (VP) or :func:`smld_loss` (VE) with the network fed
    the integer step / noise-level label. ``batch["label"]`` conditions class-conditional
    networks (``model.config.num_classes > 0``); with ``label_dropout`` > 0 (and ``train``)
    each label is replaced by the null label ``num_classes`` with that probability, so the
    one network learns the conditional and the unconditional score, as classifier-free
    guidance needs (Ho & Salimans 2022).
    """
    if not continuous and not isinstance(sde, VPSDE | VESDE):
        raise ValueError(
            f"Discrete training (training.continuous=False) is defined for VPSDE (DDPM) and "
            f"VESDE (SMLD), not {type(sde).__name__}; use training.continuous=True."
        )
    if not continuous and (weighting not in (None, "sigma2") or time_distribution != "uniform"):
        raise ValueError(
            "training.weighting and training.time_distribution apply to continuous training: "
            "discrete DDPM / SMLD training has its own loss (set training.continuous=True)."
        )
    resolve_weighting(weighting, likelihood_weighting)  # bad names fail before tracing
    if time_distribution not in TIME_DISTRIBUTIONS:
        raise ValueError(
            f"Unknown training.time_distribution {time_distribution!r}; "
            f"valid: {sorted(TIME_DISTRIBUTIONS)}"
        )
    num_classes = getattr(getattr(model, "config", None), "num_classes", 0)
    conditional = num_classes > 0
    if not 0.0 <= label_dropout < 1.0:
        raise ValueError(f"training.label_dropout must be in [0, 1), got {label_dropout}")
    if label_dropout > 0 and not conditional:
        raise ValueError(
            "training.label_dropout > 0 needs a class-conditional model: set "
            "model.num_classes to the number of classes of the data."
        )

    def loss_fn(params, key, batch):
        key_loss, key_dropout = jax.random.split(key)
        variables = {"params": params}
        class_labels = batch["label"] if conditional else None
        if conditional and train and label_dropout > 0:
            # A key of its own, so that label dropout leaves the other draws unchanged.
            dropped = jax.random.bernoulli(
                jax.random.fold_in(key, LABEL_DROPOUT_STREAM), label_dropout, class_labels.shape
            )
            class_labels = jnp.where(dropped, num_classes, class_labels)
        rngs = {"dropout": key_dropout} if train else {}
        if continuous:
            score_fn = get_score_fn(
                sde,
                model,
                variables,
                continuous=True,
                train=train,
                dropout_key=key_dropout if train else None,
                class_labels=class_labels,
            )
            return dsm_loss(
                key_loss,
                sde,
                score_fn,
                batch["x"],
                likelihood_weighting=likelihood_weighting,
                reduce_mean=reduce_mean,
                eps=eps,
                weighting=weighting,
                time_distribution=time_distribution,
                options=options,
            )

        def network(x, labels):
            return model.apply(
                variables, x, labels.astype(jnp.float32), y=class_labels, train=train, rngs=rngs
            )

        loss = ddpm_loss if isinstance(sde, VPSDE) else smld_loss
        return loss(key_loss, sde, network, batch["x"], reduce_mean=reduce_mean)

    return loss_fn


def get_step_fn(
    loss_fn: Callable[[Any, jax.Array, dict], jax.Array],
    optimizer: optax.GradientTransformation,
    ema_rate: float,
) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    r"""One optimisation step ``step_fn(state, batch) -> (state, metrics)``.

    Gradients of ``loss_fn`` at the step key ``fold_in(state.key, state.step)``, an optax
    update, and the parameter EMA :math:`\bar\theta \leftarrow r \bar\theta + (1 - r)\theta`
    with ``r = ema_rate``. Pure: under ``jax.jit`` with a sharded batch, XLA inserts the
    cross-device gradient mean.
    """

    def step_fn(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        key = jax.random.fold_in(state.key, state.step)
        loss, grads = jax.value_and_grad(loss_fn)(state.params, key, batch)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema_params = jax.tree.map(
            lambda ema, p: ema_rate * ema + (1.0 - ema_rate) * p, state.ema_params, params
        )
        new_state = state.replace(
            step=state.step + 1, params=params, ema_params=ema_params, opt_state=opt_state
        )
        return new_state, {"loss": loss, "grad_norm": optax.tree.norm(grads)}

    return step_fn


def loss_config(config: Any) -> dict[str, Any]:
    """The continuous loss's choices in ``config``, as ``get_loss_fn`` keyword arguments.

    ``training.weighting`` (default ``None``: ``training.likelihood_weighting`` decides, as
    in 2021), ``training.time_distribution`` (default ``uniform``) and the constants of
    :class:`~diffusion_sde.losses.LossOptions`: ``model.sigma_data`` (also EDM's
    preconditioning), ``training.min_snr_gamma``, ``training.log_normal_mean`` / ``_std``,
    ``training.logit_normal_mean`` / ``_std``; a missing field takes the paper's default.
    """
    training, defaults = config.training, LossOptions()
    options = LossOptions(
        sigma_data=config.model.get("sigma_data", defaults.sigma_data),
        **{
            name: training.get(name, getattr(defaults, name))
            for name in LossOptions._fields
            if name != "sigma_data"
        },
    )
    weighting = training.get("weighting", None) or None
    return dict(
        weighting=weighting,
        time_distribution=training.get("time_distribution", "uniform"),
        options=options,
    )


def loss_fn_from_config(config: Any, sde: SDE, model: nn.Module, *, train: bool = True):
    """:func:`get_loss_fn` with every choice read from ``config.training`` (and
    :func:`loss_config`): the training loss (``train=True``) or the evaluation loss."""
    training = config.training
    return get_loss_fn(
        sde,
        model,
        continuous=training.continuous,
        reduce_mean=training.reduce_mean,
        likelihood_weighting=training.likelihood_weighting,
        train=train,
        label_dropout=training.get("label_dropout", 0.0),
        **loss_config(config),
    )


def get_train_steps(config, sde, model, optimizer, mesh: Mesh):
    """The jitted ``train_steps(state, batches) -> (state, metrics)`` of a run.

    ``batches`` holds ``n`` global batches stacked as ``(n, B, ...)``; one call runs the
    ``n`` optimisation steps of ``get_step_fn`` (``train_and_evaluate`` passes
    ``n = training.n_jitted_steps``) through ``lax.scan``, or written out one after the
    other on CPU (see below), with the state replicated and donated and each batch sharded
    over ``mesh``'s ``data`` axis. ``metrics`` are per step, shaped ``(n,)``.
    """
    loss_fn = loss_fn_from_config(config, sde, model)
    step_fn = get_step_fn(loss_fn, optimizer, config.model.ema_rate)
    replicated = NamedSharding(mesh, P())
    batch_sharding = NamedSharding(mesh, P(None, "data"))
    # XLA:CPU runs a training step inside a while loop (a scan, even of length 1) several
    # times slower than the same step outside one: the backward convolutions
    # (experiments/benchmarks/train_step.py measures it). On CPU the n steps are therefore
    # written out one after the other, at the price of compiling n copies; accelerators
    # keep the loop, which compiles one.
    platform = mesh.devices.flat[0].platform
    unrolled = platform == "cpu"

    @functools.partial(
        jax.jit,
        in_shardings=(replicated, batch_sharding),
        out_shardings=(replicated, replicated),
        donate_argnums=0,
        compiler_options=compiler_options(platform),  # CPU: LLVM level 1, memory-optimised
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
