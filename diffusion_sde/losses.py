r"""Score-matching losses: continuous denoising score matching and the discrete DDPM
and SMLD objectives, each one per-example function plus its batch mean.

Denoising score matching (Vincent 2011; Song et al. 2021, eq. 7) with the Gaussian
kernel :math:`x_t = \alpha_t x_0 + \sigma_t z` of any SDE in ``sde.py``:

.. math::  \mathcal L(\theta) = \mathbb E_{t \sim U[\epsilon, T]}\, \lambda(t)\,
   \mathbb E_{x_0, z} \big\| s_\theta(x_t, t) + z / \sigma_t \big\|^2 .

With ``likelihood_weighting=False`` the weight is :math:`\lambda(t) = \sigma_t^2`, so
the summand is :math:`\| \sigma_t s_\theta + z \|^2`; with ``likelihood_weighting=True``
it is :math:`\lambda(t) = g(t)^2`, which makes the loss an upper bound on the negative
log-likelihood (Song et al. 2021b, "Maximum likelihood training of score-based
diffusion models", Thm. 1). ``reduce_mean`` averages over data dimensions; otherwise
the sum over data dimensions is halved, as in the 2021 reference.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

from diffusion_sde.models import get_score_fn
from diffusion_sde.sde import SDE, VESDE, VPSDE, ScoreFn, batch_broadcast


def _reduce_over_data(values: jax.Array, reduce_mean: bool) -> jax.Array:
    """Mean over data dimensions, or half their sum; keeps the batch axis."""
    flat = values.reshape(values.shape[0], -1)
    return jnp.mean(flat, axis=-1) if reduce_mean else 0.5 * jnp.sum(flat, axis=-1)


def dsm_losses(
    key: jax.Array,
    sde: SDE,
    score_fn: ScoreFn,
    x: jax.Array,
    *,
    likelihood_weighting: bool = False,
    reduce_mean: bool = True,
    eps: float = 1e-5,
) -> jax.Array:
    """Per-example continuous DSM losses, shape ``(B,)``; see the module docstring.

    Draws ``t ~ U[eps, T]`` then ``z ~ N(0, I)`` from ``jax.random.split(key)``.
    """
    key_t, key_z = jax.random.split(key)
    t = jax.random.uniform(key_t, (x.shape[0],), minval=eps, maxval=sde.T)
    z = jax.random.normal(key_z, x.shape)
    mean, sigma = sde.marginal_prob(x, t)
    sigma = batch_broadcast(sigma, x)
    score = score_fn(mean + sigma * z, t)
    if not likelihood_weighting:
        return _reduce_over_data(jnp.square(score * sigma + z), reduce_mean)
    g2 = sde.sde(jnp.zeros_like(x), t)[1] ** 2
    return _reduce_over_data(jnp.square(score + z / sigma), reduce_mean) * g2


def dsm_loss(
    key: jax.Array,
    sde: SDE,
    score_fn: ScoreFn,
    x: jax.Array,
    *,
    likelihood_weighting: bool = False,
    reduce_mean: bool = True,
    eps: float = 1e-5,
) -> jax.Array:
    """Batch mean of :func:`dsm_losses`: the continuous-time training objective."""
    return jnp.mean(
        dsm_losses(
            key,
            sde,
            score_fn,
            x,
            likelihood_weighting=likelihood_weighting,
            reduce_mean=reduce_mean,
            eps=eps,
        )
    )


LabelFn = Callable[[jax.Array, jax.Array], jax.Array]


def ddpm_losses(
    key: jax.Array, vpsde: VPSDE, eps_fn: LabelFn, x: jax.Array, *, reduce_mean: bool = True
) -> jax.Array:
    r"""Per-example DDPM losses (Ho et al. 2020, eq. 14, the "simple" objective).

    .. math::  \| \epsilon_\theta(\sqrt{\bar\alpha_i}\,x_0 + \sqrt{1-\bar\alpha_i}\,\epsilon,\; i)
       - \epsilon \|^2, \qquad i \sim U\{0, \dots, N-1\},

    with :math:`\bar\alpha_i` from ``vpsde.alphas_cumprod`` (and its std from
    ``vpsde.sqrt_one_minus_alphas_cumprod``). ``eps_fn(x_i, i)`` predicts
    the noise from integer step labels ``i`` (shape ``(B,)``).
    """
    key_i, key_noise = jax.random.split(key)
    labels = jax.random.randint(key_i, (x.shape[0],), 0, vpsde.N)
    alpha_bar = batch_broadcast(vpsde.alphas_cumprod[labels], x)
    std = batch_broadcast(vpsde.sqrt_one_minus_alphas_cumprod[labels], x)
    noise = jax.random.normal(key_noise, x.shape)
    perturbed = jnp.sqrt(alpha_bar) * x + std * noise
    return _reduce_over_data(jnp.square(eps_fn(perturbed, labels) - noise), reduce_mean)


def ddpm_loss(
    key: jax.Array, vpsde: VPSDE, eps_fn: LabelFn, x: jax.Array, *, reduce_mean: bool = True
) -> jax.Array:
    """Batch mean of :func:`ddpm_losses`."""
    return jnp.mean(ddpm_losses(key, vpsde, eps_fn, x, reduce_mean=reduce_mean))


def smld_sigmas(vesde: VESDE) -> jax.Array:
    """SMLD noise levels in NCSN order: label 0 is ``sigma_max``, label N-1 ``sigma_min``."""
    return vesde.discrete_sigmas[::-1]


def smld_losses(
    key: jax.Array, vesde: VESDE, score_fn: LabelFn, x: jax.Array, *, reduce_mean: bool = True
) -> jax.Array:
    r"""Per-example SMLD / NCSN losses (Song & Ermon 2019, eq. 6, with weight
    :math:`\lambda(\sigma) = \sigma^2`).

    .. math::  \sigma_i^2 \,\big\| s_\theta(x_0 + \sigma_i z,\; i) + z / \sigma_i \big\|^2,
       \qquad i \sim U\{0, \dots, N-1\},

    with :math:`\sigma_i` from :func:`smld_sigmas` (descending). ``score_fn(x, i)``
    takes integer noise-level labels ``i`` (shape ``(B,)``).
    """
    key_i, key_noise = jax.random.split(key)
    labels = jax.random.randint(key_i, (x.shape[0],), 0, vesde.N)
    sigmas = smld_sigmas(vesde)[labels]
    sigma = batch_broadcast(sigmas, x)
    noise = jax.random.normal(key_noise, x.shape) * sigma
    target = -noise / sigma**2
    score = score_fn(x + noise, labels)
    return _reduce_over_data(jnp.square(score - target), reduce_mean) * sigmas**2


def smld_loss(
    key: jax.Array, vesde: VESDE, score_fn: LabelFn, x: jax.Array, *, reduce_mean: bool = True
) -> jax.Array:
    """Batch mean of :func:`smld_losses`."""
    return jnp.mean(smld_losses(key, vesde, score_fn, x, reduce_mean=reduce_mean))


# --- The training step -------------------------------------------------------------------


LABEL_DROPOUT_STREAM = 7  # fold_in index of the label-dropout key within a step's key


@flax.struct.dataclass
class TrainState:
    """Everything a run needs to continue: the step, parameters, their EMA, the
    optimizer state and the run's base PRNG key (step keys are ``fold_in(key, step)``)."""

    step: jax.Array
    params: Any
    ema_params: Any
    opt_state: Any
    key: jax.Array


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
) -> Callable[[Any, jax.Array, dict], jax.Array]:
    """``loss_fn(params, key, batch) -> scalar`` for a network, as the config asks.

    Continuous training uses :func:`dsm_loss` through ``models.get_score_fn``; discrete
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
