"""Likelihood benchmark: probability-flow log-likelihoods against exact mixture densities.

Data: Gaussian mixtures with unequal weights and narrow components, in 2 and 16
dimensions, whose score and log-density at every time are exact under each SDE
(``toy_scores.GaussianMixture``). For each SDE and trace estimator it prints NFE, the
mean absolute error per dimension of ``log_likelihood`` against the exact
``log p_eps(x)``, its mean signed error (the bias: a single Hutchinson probe is noisy per
example but unbiased), the mean absolute error with the exact ``p_T`` in place of the
prior (the solver's own error) and the median wall time of a compiled call. The last row of each block is the 2021
reference's way: ``scipy.integrate.solve_ivp`` RK45 on the host calling the same jitted
drift-and-exact-divergence at every stage, at the same tolerances.

Run: ``python experiments/benchmarks/likelihood.py`` (a few minutes on a laptop CPU).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import scipy.integrate

from diffusion_sde.likelihood import ESTIMATORS, _probability_flow_with_divergence, log_likelihood
from diffusion_sde.sde import VESDE, VPSDE, subVPSDE
from diffusion_sde.toy_scores import GaussianMixture

RTOL = ATOL = 1e-5
EPS = 1e-5
BATCH = {2: 256, 16: 64}
HEADER = (
    "| SDE | method | NFE | mean abs error/dim | bias/dim (± s.e.) | solver error/dim "
    "| wall time (s) |\n|---|---|---:|---:|---:|---:|---:|"
)


def mixture(sde, dim: int, seed: int = 0) -> GaussianMixture:
    """Four components, weights 0.4/0.3/0.2/0.1, stds 0.03--0.1, means in [-1, 1]^dim,
    shifted so the weighted mean is zero (then p_T is close to the prior)."""
    rng = np.random.default_rng(seed)
    weights = np.array([0.4, 0.3, 0.2, 0.1], np.float32)
    means = rng.uniform(-1.0, 1.0, (4, dim)).astype(np.float32)
    means -= weights @ means
    stds = np.array([0.05, 0.1, 0.03, 0.07], np.float32)
    return GaussianMixture(weights=weights, means=means, stds=stds, sde=sde)


def samples_at(key, data: GaussianMixture, n: int, t: float) -> jax.Array:
    data_key, noise_key = jax.random.split(key)
    x0 = data.sample(data_key, n)
    alpha, sigma = data.sde.marginal_coeffs(jnp.full((n,), t))
    return alpha[:, None] * x0 + sigma[:, None] * jax.random.normal(noise_key, x0.shape)


def errors_per_dim(data, x, logp, z):
    """Per dimension: mean |logp - log p_eps(x)|; the mean signed error and its standard
    error (the bias, zero for an unbiased estimator); and the mean |error| with the exact
    log p_T(z) in place of the prior (the solver's own error)."""
    n, dim = x.shape
    true = data.log_density(x, jnp.full((n,), EPS))
    errors = np.asarray(logp - true, np.float64) / dim
    solver_logp = logp - data.sde.prior_logp(z) + data.log_density(z, jnp.full((n,), data.sde.T))
    solver_errors = np.asarray(solver_logp - true, np.float64) / dim
    return (
        np.mean(np.abs(errors)),
        (np.mean(errors), np.std(errors) / np.sqrt(n)),
        np.mean(np.abs(solver_errors)),
    )


def on_device(data, x, estimator):
    key = jax.random.PRNGKey(1)
    run = lambda: log_likelihood(
        key, data.sde, data.score, x, estimator=estimator, rtol=RTOL, atol=ATOL, eps=EPS
    )
    logp, z, nfe = jax.block_until_ready(run())  # compile
    return int(nfe), *errors_per_dim(data, x, logp, z), median_seconds(run)


def median_seconds(run, repeats: int = 5) -> float:
    """Median wall time of ``run()`` after one more warm-up call (the first call after
    compilation is sometimes much slower on XLA:CPU)."""
    jax.block_until_ready(run())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(run())
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def host_rk45(data, x):
    """The reference's loop: solve_ivp on the flattened (x, delta_logp), one device call per
    stage, with the same drift and exact divergence as the ``exact`` estimator."""
    n, dim = x.shape
    probes = ESTIMATORS["exact"](None, (1, n, dim), x.dtype)
    vector_field = _probability_flow_with_divergence(data.sde, data.score, probes, mean=False)

    @jax.jit
    def flat_vector_field(t, y):
        drift, divergence = vector_field(t, (y[: n * dim].reshape(n, dim), None), None)
        return jnp.concatenate([drift.reshape(-1), divergence])

    fun = lambda t, y: np.asarray(flat_vector_field(t, jnp.asarray(y, jnp.float32)), np.float64)
    y0 = np.concatenate([np.asarray(x, np.float64).reshape(-1), np.zeros(n)])
    fun(EPS, y0)  # compile
    start = time.perf_counter()
    solution = scipy.integrate.solve_ivp(
        fun, (EPS, data.sde.T), y0, rtol=RTOL, atol=ATOL, method="RK45"
    )
    elapsed = time.perf_counter() - start
    y1 = solution.y[:, -1]
    z = jnp.asarray(y1[: n * dim].reshape(n, dim), jnp.float32)
    logp = data.sde.prior_logp(z) + jnp.asarray(y1[n * dim :], jnp.float32)
    return solution.nfev, *errors_per_dim(data, x, logp, z), elapsed


def main():
    print(f"rtol = atol = {RTOL}, eps = {EPS}; errors in nats per dimension.")
    for dim, batch in BATCH.items():
        print(f"\n### {dim}-D mixture, batch {batch}\n")
        print(HEADER)
        for sde in (VPSDE(), subVPSDE(), VESDE()):
            data = mixture(sde, dim)
            x = samples_at(jax.random.PRNGKey(0), data, batch, EPS)
            rows = [
                (name, on_device(data, x, name)) for name in ("exact", "rademacher", "gaussian")
            ]
            rows.append(("host RK45 (exact)", host_rk45(data, x)))
            for name, (nfe, error, (bias, bias_error), solver_error, seconds) in rows:
                print(
                    f"| {type(sde).__name__} | {name} | {nfe} | {error:.2e} | "
                    f"{bias:+.1e} ± {bias_error:.0e} | {solver_error:.2e} | {seconds:.3f} |"
                )


if __name__ == "__main__":
    main()
