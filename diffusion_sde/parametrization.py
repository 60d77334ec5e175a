r"""What a network predicts on an affine path, and the exact conversions between them.

On a path :math:`x_t = \alpha_t x_0 + \sigma_t \epsilon` (``sde.py``) every prediction target
is an affine function of the data prediction :math:`\hat x_0` given :math:`x = x_t`
(Kingma et al. 2021; Salimans & Ho 2022; Karras et al. 2022; Lipman et al. 2023):

======================  ===============================================================
name                    target, and :math:`\hat x_0` from the network output ``out``
======================  ===============================================================
``eps``                 :math:`\epsilon = (x - \alpha x_0)/\sigma`;
                        :math:`\hat x_0 = (x - \sigma\,\text{out})/\alpha`
``x0``                  :math:`x_0`
``v``                   :math:`v = \alpha\epsilon - \sigma x_0`;
                        :math:`\hat x_0 = (\alpha x - \sigma\,\text{out})/(\alpha^2 + \sigma^2)`
``score``               :math:`\nabla\log p_{0t} = (\alpha x_0 - x)/\sigma^2`;
                        :math:`\hat x_0 = (x + \sigma^2\,\text{out})/\alpha`
``velocity``            :math:`u = \dot\alpha x_0 + \dot\sigma\epsilon`;
                        :math:`\hat x_0 = (\sigma\,\text{out} - \dot\sigma x)/(\dot\alpha\sigma - \dot\sigma\alpha)`
``edm``                 EDM's :math:`F` with :math:`D = c_{skip}\tilde x + c_{out} F(c_{in}\tilde x, c_{noise})`,
                        :math:`\tilde x = x/\alpha`, :math:`\tilde\sigma = \sigma/\alpha`
======================  ===============================================================

``v`` is Salimans & Ho's :math:`v` (their :math:`\alpha^2 + \sigma^2 = 1`; the general form
is kept so that it is exact on every path). ``velocity`` is the flow-matching target
:math:`dx_t/dt`, :math:`z - x_0` on rectified flow. With the data prediction the score is
Tweedie's :math:`s = (\alpha\hat x_0 - x)/\sigma^2`, and a regression of the target is a
weighted regression of :math:`\hat x_0`, so the same minimiser (``losses.py``).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from diffusion_sde.sde import SDE, batch_broadcast

PARAMETRIZATIONS: tuple[str, ...] = ("eps", "x0", "v", "score", "velocity", "edm")

# EDM's sigma_data (Karras et al. 2022, Table 1): the std of the data, 0.5 for images in [-1, 1].
SIGMA_DATA = 0.5


class PathCoeffs(NamedTuple):
    """``alpha_t``, ``sigma_t`` and their time derivatives, broadcast against ``x``."""

    alpha: jax.Array
    sigma: jax.Array
    d_alpha: jax.Array
    d_sigma: jax.Array


def path_coeffs(sde: SDE, t: jax.Array, x: jax.Array, *, derivatives: bool = True) -> PathCoeffs:
    """:class:`PathCoeffs` of ``sde`` at ``t`` (shape ``(B,)``), shaped to broadcast with ``x``.

    With ``derivatives=False`` the derivatives are ``None`` (only ``velocity`` needs them)
    and ``alpha_t, sigma_t`` are ``sde.marginal_coeffs(t)`` as computed everywhere else.
    """
    if not derivatives:
        alpha, sigma = sde.marginal_coeffs(t)
        return PathCoeffs(batch_broadcast(alpha, x), batch_broadcast(sigma, x), None, None)
    return PathCoeffs(*(batch_broadcast(c, x) for c in sde.marginal_coeffs_and_derivatives(t)))


def needs_derivatives(name: str) -> bool:
    """Whether the conversions of ``name`` use the time derivatives of the path."""
    return name == "velocity"


def check_parametrization(name: str) -> str:
    """``name`` if it is one of :data:`PARAMETRIZATIONS`, else a ``ValueError`` listing them."""
    if name not in PARAMETRIZATIONS:
        raise ValueError(
            f"Unknown model.parametrization {name!r}; valid: {sorted(PARAMETRIZATIONS)}"
        )
    return name


def edm_preconditioning(
    sigma: jax.Array, sigma_data: float = SIGMA_DATA
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    r"""EDM's ``(c_skip, c_out, c_in, c_noise)`` at noise level :math:`\sigma`
    (Karras et al. 2022, Table 1):

    .. math::  c_{skip} = \frac{\sigma_d^2}{\sigma^2 + \sigma_d^2},\quad
       c_{out} = \frac{\sigma\sigma_d}{\sqrt{\sigma^2 + \sigma_d^2}},\quad
       c_{in} = \frac{1}{\sqrt{\sigma^2 + \sigma_d^2}},\quad
       c_{noise} = \tfrac14 \ln\sigma.
    """
    total = sigma**2 + sigma_data**2
    c_skip = sigma_data**2 / total
    c_out = sigma * sigma_data / jnp.sqrt(total)
    c_in = 1.0 / jnp.sqrt(total)
    c_noise = 0.25 * jnp.log(sigma)
    return c_skip, c_out, c_in, c_noise


def _affine_form(
    name: str, c: PathCoeffs, x: jax.Array, sigma_data: float
) -> tuple[jax.Array, jax.Array, jax.Array]:
    r"""``(r, q, b)`` with :math:`r\,\text{target} = q\,x_0 + b(x)`: the target of type
    ``name`` as the affine function of the data prediction that the module table gives."""
    alpha, sigma, d_alpha, d_sigma = c
    if name == "eps":
        return sigma, -alpha, x
    if name == "x0":
        return 1.0, 1.0, 0.0
    if name == "v":
        return sigma, -(alpha**2 + sigma**2), alpha * x
    if name == "score":
        return sigma**2, alpha, -x
    if name == "velocity":
        return sigma, d_alpha * sigma - d_sigma * alpha, d_sigma * x
    if name == "edm":
        c_skip, c_out, _, _ = edm_preconditioning(sigma / alpha, sigma_data)
        return c_out, 1.0, -(c_skip * (x / alpha))
    raise ValueError(check_parametrization(name))


def to_data_prediction(
    name: str, c: PathCoeffs, output: jax.Array, x: jax.Array, sigma_data: float = SIGMA_DATA
) -> jax.Array:
    r"""The data prediction :math:`\hat x_0` from a network ``output`` of type ``name`` at ``x``
    (see the module table); ``c`` from :func:`path_coeffs`."""
    r, q, b = _affine_form(name, c, x, sigma_data)
    return (r * output - b) / q


def from_data_prediction(
    name: str, c: PathCoeffs, x0: jax.Array, x: jax.Array, sigma_data: float = SIGMA_DATA
) -> jax.Array:
    """The target of type ``name`` given the data prediction ``x0`` at ``x``: the inverse of
    :func:`to_data_prediction`."""
    r, q, b = _affine_form(name, c, x, sigma_data)
    return (q * x0 + b) / r


def to_score(
    name: str, c: PathCoeffs, output: jax.Array, x: jax.Array, sigma_data: float = SIGMA_DATA
) -> jax.Array:
    r"""The score :math:`(\alpha\hat x_0 - x)/\sigma^2` from a network ``output`` of type
    ``name``; for ``eps`` written :math:`-\text{out}/\sigma` and for ``score`` the output
    itself, the 2021 adapters' exact arithmetic."""
    if name == "eps":
        return -output / c.sigma
    if name == "score":
        return output
    x0 = to_data_prediction(name, c, output, x, sigma_data)
    return (c.alpha * x0 - x) / c.sigma**2


def network_input(name: str, c: PathCoeffs, x: jax.Array, sigma_data: float = SIGMA_DATA):
    r"""What the network sees: :math:`c_{in}\tilde x = c_{in} x/\alpha` for ``edm``
    (EDM's input scaling), ``x`` itself otherwise."""
    if name == "edm":
        _, _, c_in, _ = edm_preconditioning(c.sigma / c.alpha, sigma_data)
        return c_in * (x / c.alpha)
    return x
