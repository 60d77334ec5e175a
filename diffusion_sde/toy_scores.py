r"""Exact scores of Gaussian-mixture data under any of the SDEs, for tests and benchmarks.

Data :math:`p_0 = \sum_k w_k\,\mathcal N(\mu_k, s_k^2 I)`. Every SDE here has a Gaussian
kernel :math:`p_{0t}(x_t \mid x_0) = \mathcal N(\alpha_t x_0, \sigma_t^2 I)`, so the perturbed
density is again a mixture,

.. math::  p_t(x) = \sum_k w_k\,\mathcal N\!\big(x;\ \alpha_t \mu_k,\ v_k(t) I\big),
   \qquad v_k(t) = \alpha_t^2 s_k^2 + \sigma_t^2,

with the exact score

.. math::  \nabla_x \log p_t(x) = \sum_k r_k(x, t)\,\frac{\alpha_t \mu_k - x}{v_k(t)},
   \qquad r_k(x, t) = \frac{w_k\,\mathcal N(x; \alpha_t\mu_k, v_k I)}{p_t(x)},

where :math:`r_k` is the posterior probability of component ``k``. Everything is a pure
function of arrays, so it can be used inside ``jax.jit``.

For ``VESDE`` the time-0 marginal carries the SDE's ``sigma_min`` noise (see ``VESDE``):
``log_density(x, 0)`` is the data density convolved with :math:`\mathcal N(0, \sigma_{min}^2)`.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from diffusion_sde.sde import SDE


def _flatten(x: jax.Array) -> jax.Array:
    return x.reshape(x.shape[0], -1)


@flax.struct.dataclass
class GaussianMixture:
    r"""Isotropic Gaussian mixture data seen through ``sde``.

    Attributes:
      weights: ``(K,)`` mixture weights :math:`w_k` (normalised on use).
      means: ``(K, *dims)`` component means :math:`\mu_k`.
      stds: ``(K,)`` component standard deviations :math:`s_k`.
      sde: the forward SDE giving :math:`(\alpha_t, \sigma_t)`.

    ``score`` has the signature of a score function, ``score(x, t)`` with ``x`` of shape
    ``(B, *dims)`` and ``t`` of shape ``(B,)``.
    """

    weights: jax.Array
    means: jax.Array
    stds: jax.Array
    sde: SDE

    @property
    def dim(self) -> int:
        """Number of data dimensions ``D = prod(dims)``."""
        return int(self.means[0].size)

    def _log_weights(self) -> jax.Array:
        return jnp.log(self.weights) - jnp.log(jnp.sum(self.weights))

    def _perturbed(self, t: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Component means ``(B, K, D)`` and variances ``(B, K)`` of :math:`p_t`."""
        alpha, sigma = self.sde.marginal_coeffs(t)
        means = alpha[:, None, None] * _flatten(self.means)[None]
        variances = alpha[:, None] ** 2 * self.stds[None] ** 2 + sigma[:, None] ** 2
        return means, variances

    def component_log_densities(self, x: jax.Array, t: jax.Array) -> jax.Array:
        r""":math:`\log w_k + \log \mathcal N(x; \alpha_t\mu_k, v_k(t) I)`, shaped ``(B, K)``."""
        means, variances = self._perturbed(t)
        squared = jnp.sum((_flatten(x)[:, None, :] - means) ** 2, axis=-1)
        log_normal = -0.5 * self.dim * jnp.log(2 * jnp.pi * variances) - squared / (2 * variances)
        return self._log_weights()[None] + log_normal

    def log_density(self, x: jax.Array, t: jax.Array) -> jax.Array:
        r""":math:`\log p_t(x)`, shaped ``(B,)``."""
        return jax.nn.logsumexp(self.component_log_densities(x, t), axis=-1)

    def posterior(self, x: jax.Array, t: jax.Array) -> jax.Array:
        r"""Component posteriors :math:`r_k(x, t)`, shaped ``(B, K)``, rows summing to 1."""
        return jax.nn.softmax(self.component_log_densities(x, t), axis=-1)

    def score(self, x: jax.Array, t: jax.Array) -> jax.Array:
        r""":math:`\nabla_x \log p_t(x)`, shaped like ``x``."""
        means, variances = self._perturbed(t)
        flat = _flatten(x)
        posterior = self.posterior(x, t)
        score = jnp.sum((posterior / variances)[..., None] * (means - flat[:, None, :]), axis=1)
        return score.reshape(x.shape)

    def sample(self, key: jax.Array, n: int) -> jax.Array:
        """``n`` clean data samples :math:`x_0 \\sim p_0` (without the VE ``sigma_min``)."""
        return self.sample_with_components(key, n)[0]

    def sample_with_components(self, key: jax.Array, n: int) -> tuple[jax.Array, jax.Array]:
        """``n`` data samples and the index ``(n,)`` of the component each came from."""
        component_key, noise_key = jax.random.split(key)
        components = jax.random.categorical(component_key, self._log_weights(), shape=(n,))
        noise = jax.random.normal(noise_key, (n,) + self.means.shape[1:])
        stds = self.stds[components].reshape((n,) + (1,) * (self.means.ndim - 1))
        return self.means[components] + stds * noise, components

    def mode_frequencies(self, x: jax.Array) -> jax.Array:
        """Fraction ``(K,)`` of the samples ``x`` whose most probable component at ``t = 0``
        is ``k``; compare with ``weights`` to judge mode coverage."""
        assignment = jnp.argmax(self.posterior(x, jnp.zeros(x.shape[0])), axis=-1)
        return jnp.mean(jax.nn.one_hot(assignment, self.weights.shape[0]), axis=0)

    def standardized_distance(self, x: jax.Array) -> jax.Array:
        r""":math:`\min_k \lVert x - \mu_k \rVert / (s_k \sqrt D)`, shaped ``(B,)``: about 1
        for a sample on a mode, large for one between modes."""
        squared = jnp.sum((_flatten(x)[:, None, :] - _flatten(self.means)[None]) ** 2, axis=-1)
        return jnp.sqrt(jnp.min(squared / (self.stds[None] ** 2 * self.dim), axis=-1))
