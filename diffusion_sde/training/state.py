"""The train state: what a run carries from step to step, its optimizer, and its creation.

A run's state is a pure function of the config: :func:`abstract_train_state` gives its
shapes and dtypes without computing anything (``jax.eval_shape``), which is what a
checkpoint must match; :func:`create_train_state` fills it.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax

from diffusion_sde import data as data_lib
from diffusion_sde import errors

OPTIMIZERS = ("adam", "adamw")


@flax.struct.dataclass
class TrainState:
    """Everything a run needs to continue: the step, parameters, their EMA, the
    optimizer state and the run's base PRNG key (step keys are ``fold_in(key, step)``)."""

    step: jax.Array
    params: Any
    ema_params: Any
    opt_state: Any
    key: jax.Array


def get_optimizer(optim: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """Adam(W) with linear warm-up and global-norm gradient clipping, as the reference.

    The learning rate at optimizer step ``n`` (0-based) is ``lr * min((n + 1) / warmup, 1)``;
    gradients are clipped to norm ``grad_clip`` when ``grad_clip >= 0``.
    """
    if optim.optimizer.lower() not in OPTIMIZERS:
        raise errors.unknown_name("optim.optimizer", optim.optimizer, ["Adam", "AdamW"])
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


def create_train_state(key, *, model, optimizer, data_shape, conditional) -> TrainState:
    """Fresh parameters (float32), their EMA copy, optimizer state and the run key."""
    key_params, key_dropout, key_run = jax.random.split(key, 3)
    x = jnp.zeros((1, *data_shape), jnp.float32)
    y = jnp.zeros((1,), jnp.int32) if conditional else None
    variables = model.init(
        {"params": key_params, "dropout": key_dropout}, x, jnp.zeros((1,)), y=y, train=False
    )
    params = variables["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        ema_params=jax.tree.map(jnp.copy, params),  # its own buffers: the state is donated
        opt_state=optimizer.init(params),
        key=key_run,
    )


def state_initializer(config: ml_collections.ConfigDict, model: nn.Module, optimizer):
    """``init(key) -> TrainState`` of the run ``config`` describes."""
    return functools.partial(
        create_train_state,
        model=model,
        optimizer=optimizer,
        data_shape=data_lib.data_shape(config.data),
        conditional=(config.model.get("num_classes", 0) or 0) > 0,
    )


def abstract_train_state(
    config: ml_collections.ConfigDict, model: nn.Module, optimizer, *, sharding=None
) -> TrainState:
    """The shapes and dtypes of the run's state (``jax.eval_shape``: no compilation, no
    memory), each leaf placed on ``sharding`` when one is given."""
    abstract = jax.eval_shape(state_initializer(config, model, optimizer), jax.random.PRNGKey(0))
    return abstract if sharding is None else placed_on(abstract, sharding)


def placed_on(abstract, sharding):
    """``abstract`` (a tree of ``jax.ShapeDtypeStruct``) with every leaf placed on ``sharding``."""
    return jax.tree.map(
        lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding), abstract
    )
