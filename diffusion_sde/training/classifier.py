"""Training a classifier: one Adam loop (:func:`fit_classifier`) that serves the
noise-conditional classifier of guided sampling (:func:`train_classifier`, on
forward-diffused data) and the feature classifiers of the sample-quality metrics
(``evaluation.feature_nets``)."""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from diffusion_sde.models.classifier import classifier_log_prob_fn
from diffusion_sde.sde import SDE, batch_broadcast


def classifier_loss(
    key: jax.Array,
    sde: SDE,
    model: nn.Module,
    params: Any,
    x: jax.Array,
    labels: jax.Array,
    *,
    eps: float = 1e-5,
) -> jax.Array:
    r"""Per-example cross-entropy of the classifier on forward-diffused data,

    .. math::  \ell = -\log p_\theta(y \mid x_t, t), \qquad t \sim U(\epsilon, T),\quad
       x_t = \alpha_t x_0 + \sigma_t z,\quad z \sim \mathcal N(0, I),

    so that the minimiser is the noise-conditional posterior :math:`p_t(y \mid x_t)`.
    Returns ``(B,)``.
    """
    t_key, noise_key = jax.random.split(key)
    t = jax.random.uniform(t_key, x.shape[:1], minval=eps, maxval=sde.T)
    mean, std = sde.marginal_prob(x, t)
    x_t = mean + batch_broadcast(std, x) * jax.random.normal(noise_key, x.shape, x.dtype)
    log_probs = classifier_log_prob_fn(sde, model, params)(x_t, t)
    return -jnp.take_along_axis(log_probs, labels[:, None], axis=-1)[:, 0]


def _iterator_batches(batches: Iterable) -> Iterator[tuple[jax.Array, jax.Array]]:
    for batch in batches:
        if isinstance(batch, dict):
            batch = batch["x"], batch["label"]
        x, labels = batch
        yield jnp.asarray(x), jnp.asarray(labels, jnp.int32)


def fit_classifier(
    key: jax.Array,
    loss_fn: Callable[[Any, jax.Array, jax.Array, jax.Array], jax.Array],
    params: Any,
    optimizer: optax.GradientTransformation,
    data: tuple[Any, Any] | Iterable,
    *,
    num_steps: int,
    batch_size: int,
) -> tuple[Any, np.ndarray]:
    r"""Minimise ``loss_fn(params, key, x, labels) -> scalar`` with ``optimizer``, one jitted
    step at a time, deterministically given ``key`` (and the data order).

    Step ``k`` uses ``key_k = fold_in(key, k)``. With array data ``(x, labels)`` the
    minibatch is drawn inside the compiled step, uniformly with replacement:
    ``batch_key, step_key = split(key_k)``, ``index = randint(batch_key, (batch_size,), 0, N)``,
    and the loss gets ``step_key``; with an iterable of batches (``{"x", "label"}`` dicts
    as ``data.get_dataset`` yields, or ``(x, labels)`` tuples) the loss gets ``key_k`` and
    the loop stops early when the iterable ends. (A Python loop of jitted steps: XLA:CPU
    runs small convolutions several times slower inside ``lax.scan``.)

    Returns ``(params, losses)``, the ``(steps,)`` minibatch losses; raises
    ``FloatingPointError`` when a loss is not finite.
    """

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def update(params, opt_state, key, x, labels):
        loss, grads = jax.value_and_grad(loss_fn)(params, key, x, labels)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    if isinstance(data, tuple):
        # The whole arrays go to the compiled step, which draws the minibatch itself.
        batches = itertools.repeat((jnp.asarray(data[0]), jnp.asarray(data[1], jnp.int32)))

        @functools.partial(jax.jit, donate_argnums=(0, 1))
        def step_fn(params, opt_state, key, x_all, labels_all):
            batch_key, step_key = jax.random.split(key)
            index = jax.random.randint(batch_key, (batch_size,), 0, x_all.shape[0])
            return update(params, opt_state, step_key, x_all[index], labels_all[index])

    else:
        batches, step_fn = _iterator_batches(data), update
    opt_state = optimizer.init(params)
    losses = []
    for step in range(num_steps):
        if (batch := next(batches, None)) is None:
            break
        params, opt_state, loss = step_fn(params, opt_state, jax.random.fold_in(key, step), *batch)
        losses.append(loss)
    losses = np.asarray(jnp.stack(losses))
    if not np.all(np.isfinite(losses)):
        bad = int(np.argmin(np.isfinite(losses)))
        raise FloatingPointError(f"classifier loss is not finite from step {bad} on")
    return params, losses


def train_classifier(
    key: jax.Array,
    sde: SDE,
    data: tuple[Any, Any] | Iterable,
    *,
    model: nn.Module,
    num_steps: int = 1000,
    batch_size: int = 128,
    learning_rate: float = 1e-3,
    eps: float = 1e-5,
) -> tuple[Any, np.ndarray]:
    r"""Train a noise-conditional classifier with Adam on :func:`classifier_loss`.

    Each step draws :math:`t \sim U(\epsilon, T)` and :math:`x_t \sim p_{0t}(x_t \mid x_0)` for
    a minibatch and takes one jitted Adam step on the mean cross-entropy. Deterministic
    given ``key`` (and the data order).

    Args:
      key: PRNG key (initialisation, minibatches, and the step's ``t`` and noise, folded
        with the step).
      sde: the forward SDE whose marginals the classifier learns.
      data: ``(x, labels)`` arrays (``x`` clean data in model space, ``(N, *dims)``;
        ``labels`` ``(N,)`` ints), sampled in uniform minibatches of ``batch_size`` with
        replacement; or an iterable of batches, ``{"x": ..., "label": ...}`` as
        ``data.get_dataset`` yields, or ``(x, labels)`` tuples.
      model: e.g. ``NoiseConditionalClassifier(num_classes=10)``.
      num_steps: optimisation steps (fewer if the iterable ends first).
      batch_size: minibatch size for array data.
      learning_rate: Adam's step size.
      eps: the smallest training time.

    Returns:
      ``(params, losses)``: the parameters, for :func:`classifier_log_prob_fn`, and the
      ``(steps,)`` minibatch losses.
    """
    init_key, loop_key = jax.random.split(key)
    if isinstance(data, tuple):
        example = jnp.asarray(data[0][:1])
    else:
        first = next(iter_batches := _iterator_batches(data))
        example, data = first[0][:1], itertools.chain([first], iter_batches)
    params = jax.jit(model.init)(init_key, example, jnp.zeros((1,), example.dtype))["params"]

    def loss_fn(params, key, x, labels):
        return jnp.mean(classifier_loss(key, sde, model, params, x, labels, eps=eps))

    return fit_classifier(
        loop_key,
        loss_fn,
        params,
        optax.adam(learning_rate),
        data,
        num_steps=num_steps,
        batch_size=batch_size,
    )
