r"""Controllable generation with an unconditional score: inpainting, colorization and
class-conditional sampling (Song et al. 2021, section 5 and appendix I).

**Inpainting** (app. I.2). Known pixels :math:`\Omega` (``mask == 1``) of ``data`` are
imposed on the predictor--corrector sampler of :mod:`diffusion_sde.sampling` (its loop
``sampling.pc_loop``, with the replacement as ``after_move``): after the predictor moves to :math:`t_{i+1}` and after every corrector move at :math:`t_i`, the known
pixels are replaced by a fresh forward-diffused copy of the data,

.. math::  x_\Omega \leftarrow \alpha_t\, x_\Omega(0) + \sigma_t z, \qquad z \sim \mathcal N(0, I),

so the unknown pixels follow the reverse SDE of the joint score, whose known part is always
a sample of :math:`p_{0t}(\cdot \mid x_\Omega(0))`. Returned samples carry the known pixels
exactly. (The 2021 reference replaces once after all corrector moves of a step, and uses
the time :math:`t_i` also after the predictor, whose ``x`` already stands at
:math:`t_{i+1}`; here every replacement uses the time ``x`` stands at.)

This *replacement* method is an approximation: it drives the unknown pixels with
:math:`\nabla \log p_t(x_{\bar\Omega}, x_\Omega(t))` for a noisy :math:`x_\Omega(t)` rather
than with the score of :math:`p_t(x_{\bar\Omega} \mid x_\Omega(0))`. It samples the true
conditional when the noisy known pixels identify it before the unknown ones commit to a
mode (known structure much coarser than the unknown one; ``tests/test_controllable.py``)
and is biased towards the unconditional mode weights otherwise: for components at
:math:`(-1.5, \mp 3)` with weights 0.3, 0.1 and at :math:`(1.5, \mp 3)` with 0.15, 0.45 (std
0.3), given :math:`x_1 = -1.5` the mode :math:`x_2 = 3` has conditional weight 0.25 but
unconditional weight 0.55, and receives far more than 0.25 of the samples (the measured
share is noted in ``tests/test_controllable.py``).

**Colorization** (app. I.3) is inpainting in a decoupled colour space where the grey level
is one channel: see :func:`colorize`.

**Class-conditional sampling** (section 5, app. I.4). Bayes' rule gives the conditional score
:math:`\nabla_x \log p_t(x \mid y) = \nabla_x \log p_t(x) + \nabla_x \log p_t(y \mid x)`:
:func:`classifier_guided_score` adds the gradient of any classifier log-probability
function :math:`\log p_t(y \mid x)` (e.g. ``models.classifier_log_prob_fn`` of a
``models.NoiseConditionalClassifier`` trained by ``training.classifier.train_classifier``
on forward-diffused data), and :func:`classifier_free_guided_score` mixes the conditional
and unconditional scores of one network trained with label dropout (Ho & Salimans 2022).

``nfe`` counts evaluations of the ``score_fn`` handed to the sampler, as everywhere in this
package. A guided score costs more than one network evaluation: classifier guidance one
score and one classifier forward and backward pass, classifier-free guidance two score
networks (conditional and unconditional), per counted evaluation.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_sde.sampling import PCOptions, check_pc_options, pc_loop, pc_nfe, with_pc_options
from diffusion_sde.sde import SDE, ScoreFn, batch_broadcast

LogProbFn = Callable[[jax.Array, jax.Array], jax.Array]

# --- Inpainting ---------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames="score_fn")
def _inpaint_samples(key, sde, score_fn, data, mask, options):
    known = jnp.broadcast_to(mask, data.shape) != 0

    def impose_known(key, x, x_mean, t):
        # The known entries of x: a forward-diffused sample of data at t; of x_mean: its mean.
        mean, std = sde.marginal_prob(data, t)
        noisy = mean + batch_broadcast(std, data) * jax.random.normal(key, data.shape, data.dtype)
        return jnp.where(known, noisy, x), jnp.where(known, mean, x_mean)

    prior_key, start_key, loop_key = jax.random.split(key, 3)
    x = sde.prior_sampling(prior_key, data.shape).astype(data.dtype)
    x, _ = impose_known(start_key, x, x, jnp.full(data.shape[:1], sde.T, data.dtype))
    return jnp.where(known, data, pc_loop(loop_key, sde, score_fn, x, options, impose_known))


def _inpaint(key, sde, score_fn, data, mask, options):
    options = check_pc_options(sde, options)
    data = jnp.asarray(data)
    mask = jnp.asarray(mask)
    if jnp.broadcast_shapes(mask.shape, data.shape) != data.shape:
        raise ValueError(f"mask of shape {mask.shape} does not broadcast to data {data.shape}")
    return _inpaint_samples(key, sde, score_fn, data, mask, options), pc_nfe(options)


@with_pc_options
def inpaint(
    key: jax.Array,
    sde: SDE,
    score_fn: ScoreFn,
    data: jax.Array,
    mask: jax.Array,
    *,
    options: PCOptions,
) -> tuple[jax.Array, int]:
    r"""Fill in the unknown entries of ``data`` by predictor--corrector sampling with the
    known ones imposed (Song et al. 2021, app. I.2; see the module docstring).

    The grid, predictors, correctors and their arguments are those of
    :func:`diffusion_sde.sampling.pc_sample`, whose loop (:func:`~diffusion_sde.sampling.pc_loop`)
    this is. With :math:`\Omega` the known entries, after every corrector move at
    :math:`t_i` and after the predictor's move to :math:`t_{i+1}`,

    .. math::  x_\Omega \leftarrow \alpha_{t} x_\Omega(0) + \sigma_{t} z

    at the time ``t`` the sample stands at (fresh noise :math:`z` each time; the mean
    :math:`\alpha_t x_\Omega(0)` in the noise-free ``x_mean`` that ``denoise`` returns).
    The samples start from the prior with the known entries imposed at :math:`T`. The
    keyword arguments are those of ``pc_sample`` (the fields of ``sampling.PCOptions``).

    Args:
      key: PRNG key.
      sde, score_fn: the forward SDE and the (unconditional) score of the joint data.
      data: ``(B, *dims)``; only its known entries are read.
      mask: broadcastable to ``data.shape``; nonzero (1) where ``data`` is known.

    Returns:
      ``(samples, nfe)``: samples shaped like ``data``, equal to ``data`` on the known
      entries (exactly), and ``nfe = num_steps * (predictor evaluations + n_steps *
      corrector evaluations)``, as for ``pc_sample``.
    """
    return _inpaint(key, sde, score_fn, data, mask, options)


# --- Colorization -------------------------------------------------------------------------

# Rows: the grey axis (1, 1, 1)/sqrt 3, then (-2, 1, 1)/sqrt 6 and (0, 1, -1)/sqrt 2, an
# orthonormal basis of the chroma plane. This is the transpose of the matrix the 2021
# reference hard-codes (it multiplies row vectors from the right), written in closed form.
DECOUPLING_MATRIX = np.array(
    [
        [1.0 / math.sqrt(3.0)] * 3,
        [-2.0 / math.sqrt(6.0), 1.0 / math.sqrt(6.0), 1.0 / math.sqrt(6.0)],
        [0.0, 1.0 / math.sqrt(2.0), -1.0 / math.sqrt(2.0)],
    ],
    np.float32,
)


def decouple(images: jax.Array) -> jax.Array:
    r"""RGB ``(..., 3)`` to the decoupled space, :math:`u = M x` per pixel (``M`` =
    ``DECOUPLING_MATRIX``); channel 0 is the normalised grey level :math:`(r+g+b)/\sqrt 3`."""
    return jnp.einsum("ij,...j->...i", jnp.asarray(DECOUPLING_MATRIX, images.dtype), images)


def couple(decoupled: jax.Array) -> jax.Array:
    r"""Inverse of :func:`decouple`: :math:`x = M^\top u` (``M`` is orthogonal)."""
    return jnp.einsum("ji,...j->...i", jnp.asarray(DECOUPLING_MATRIX, decoupled.dtype), decoupled)


@dataclasses.dataclass(frozen=True)
class _DecoupledScore:
    """The score in the decoupled space: for :math:`u = M x`,
    :math:`\\nabla_u \\log p(M^\\top u) = M \\nabla_x \\log p(x)`. A frozen dataclass, hashed by
    ``score_fn``, so that the compiled sampler is reused for the same ``score_fn``."""

    score_fn: ScoreFn

    def __call__(self, decoupled: jax.Array, t: jax.Array) -> jax.Array:
        return decouple(self.score_fn(couple(decoupled), t))


@with_pc_options
def colorize(
    key: jax.Array, sde: SDE, score_fn: ScoreFn, gray: jax.Array, *, options: PCOptions
) -> tuple[jax.Array, int]:
    r"""Colour grey images with an RGB score model (Song et al. 2021, app. I.3).

    In the decoupled space :math:`u = M x` of the orthogonal matrix

    .. math::  M = \begin{pmatrix} 1/\sqrt3 & 1/\sqrt3 & 1/\sqrt3 \\
                                  -2/\sqrt6 & 1/\sqrt6 & 1/\sqrt6 \\
                                  0 & 1/\sqrt2 & -1/\sqrt2 \end{pmatrix}

    (``DECOUPLING_MATRIX``; the transpose of the 2021 reference's fixed matrix) channel 0 is
    :math:`(r + g + b)/\sqrt 3 = \sqrt 3\,\mathrm{gray}` with gray the mean of the three
    channels, and channels 1, 2 span the chroma plane orthogonal to it. Colorization is
    :func:`inpaint` of channel 0 :math:`= \sqrt 3\,\mathrm{gray}` in that space, with the
    score :math:`M s(M^\top u, t)`, mapped back by :math:`x = M^\top u`. Any orthogonal
    :math:`M' = \mathrm{diag}(1, Q) M` with the same first row (:math:`Q \in O(2)` rotating the
    chroma plane) gives the same distribution of colourings: the SDEs here are isotropic
    (scalar drift coefficient and diffusion), Gaussian noise is rotation invariant, the
    corrector steps depend on :math:`\lVert s \rVert` and :math:`\lVert z\rVert` only, and
    the replacement touches channel 0, which :math:`Q` leaves alone; only the noise drawn
    for a given key is rotated. The choice of :math:`M` is therefore a convention.

    A data-space example: with a model of RGB images ``x`` (B, H, W, 3) in [-1, 1],
    ``gray = x.mean(-1, keepdims=True)`` and ``colorize(key, sde, score_fn, gray,
    num_steps=1000)`` returns colourings whose channel mean is ``gray``. (The digits of
    ``experiments/controllable_digits.py`` have one channel, so colorization is shown in
    ``tests/test_controllable.py`` only.) The keyword arguments are those of :func:`inpaint`
    and ``pc_sample``, the same loop in the decoupled space.

    Args:
      key: PRNG key.
      sde: the forward SDE (isotropic, as all of :mod:`diffusion_sde.sde`).
      score_fn: the score of RGB images ``(B, H, W, 3)`` in the model's data space.
      gray: ``(B, H, W, 1)`` grey levels (the channel mean) in the same data space.

    Returns:
      ``(images, nfe)``: ``(B, H, W, 3)`` colourings with ``images.mean(-1)`` equal to
      ``gray[..., 0]`` up to float rounding, and the ``nfe`` of :func:`inpaint`.
    """
    gray = jnp.asarray(gray)
    if gray.ndim != 4 or gray.shape[-1] != 1:
        raise ValueError(f"colorize expects grey images (B, H, W, 1), got shape {gray.shape}")
    known = jnp.concatenate([math.sqrt(3.0) * gray, jnp.zeros_like(gray), jnp.zeros_like(gray)], -1)
    mask = jnp.array([1.0, 0.0, 0.0], gray.dtype)
    decoupled, nfe = _inpaint(key, sde, _DecoupledScore(score_fn), known, mask, options)
    return couple(decoupled), nfe


# --- Guided scores ------------------------------------------------------------------------


def classifier_guided_score(
    score_fn: ScoreFn, log_prob_fn: LogProbFn, labels: jax.Array, scale: float = 1.0
) -> ScoreFn:
    r"""The score of :math:`p_t(x \mid y)` from an unconditional score and a noise-conditional
    classifier (Song et al. 2021, eq. 14; Dhariwal & Nichol 2021 for ``scale`` != 1):

    .. math::  s(x, t \mid y) = s(x, t) + w\,\nabla_x \log p_t(y \mid x),

    exact for :math:`w` = ``scale`` = 1 and the true classifier; :math:`w > 1` sharpens
    towards :math:`p_t(x)\,p_t(y \mid x)^w`.

    Args:
      score_fn: ``score_fn(x, t)``, the unconditional score.
      log_prob_fn: ``log_prob_fn(x, t) -> (B, num_classes)`` log-probabilities
        :math:`\log p_t(y \mid x)`; example ``b``'s row may depend on ``x[b]`` only (no
        batch statistics), since the gradient is taken of the sum over the batch.
      labels: ``(B,)`` int target classes.
      scale: the guidance weight :math:`w`.

    Returns:
      ``guided(x, t)``; one call evaluates ``score_fn`` once and the classifier's forward
      and backward pass once.
    """
    labels = jnp.asarray(labels)

    def log_likelihood(x, t):
        log_probs = log_prob_fn(x, t)
        return jnp.sum(jnp.take_along_axis(log_probs, labels[:, None], axis=-1))

    def guided(x: jax.Array, t: jax.Array) -> jax.Array:
        return score_fn(x, t) + scale * jax.grad(log_likelihood)(x, t)

    return guided


def classifier_free_guided_score(
    conditional_score_fn: ScoreFn, unconditional_score_fn: ScoreFn, scale: float
) -> ScoreFn:
    r"""Classifier-free guidance (Ho & Salimans 2022):

    .. math::  \tilde s(x, t \mid y) = s(x, t) + w\,[s(x, t \mid y) - s(x, t)],

    :math:`w` = ``scale``: 0 is unconditional, 1 conditional, :math:`w > 1` the guided score of
    :math:`p_t(x)\,p_t(y \mid x)^w` with the network's implicit classifier. Ho & Salimans
    write :math:`\tilde\epsilon = (1 + w')\,\epsilon(x \mid y) - w'\,\epsilon(x)`, i.e.
    their :math:`w' = w - 1` (their 0 is the conditional model). Computed as
    :math:`(1 - w)\,s + w\,s(\cdot \mid y)`, so that :math:`w = 0` and :math:`w = 1` return
    the unconditional and conditional scores bit for bit.

    With a network trained with label dropout (``training.label_dropout``) the two scores
    are ``models.get_score_fn(..., class_labels=y)`` and ``class_labels=None`` (the null
    label).

    Returns:
      ``guided(x, t)``; one call evaluates both score functions.
    """

    def guided(x: jax.Array, t: jax.Array) -> jax.Array:
        unconditional = unconditional_score_fn(x, t)
        conditional = conditional_score_fn(x, t)
        return (1.0 - scale) * unconditional + scale * conditional

    return guided


# --- The noise-conditional classifier, re-exported ------------------------------------------
__all__ = [
    "classifier_free_guided_score",
    "classifier_guided_score",
    "colorize",
    "couple",
    "decouple",
    "inpaint",
]
