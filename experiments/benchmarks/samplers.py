"""Sampler benchmark with exact scores: quality, NFE and overhead of every sampler.

Data: Gaussian mixtures with unequal weights and narrow components, in 2-D (five modes on
a circle, stds 0.04--0.1) and 16-D (six modes), whose score under the VP SDE is exact
(``toy_scores.GaussianMixture``); the 2-D mixture again on EDM's path and on rectified
flow, with EDM's Heun sampler, the ODE solvers and Euler--Maruyama on the path's SDE. Each sampler runs ``--runs`` times on independent keys
(one compilation); the table gives:

- ``NFE``: score evaluations per run, as the sampler reports them (tests check that
  they are the evaluations it performs);
- ``SW ratio``: sliced Wasserstein-1 distance from a run's samples to a large set of
  fresh data samples, averaged over the runs, divided by the same distance for sets of
  exact samples (1.0 is as good as exact sampling; one run fluctuates by about 35%, as
  the distance is dominated by random mode counts: the noise of a mean over the runs is
  printed above each table);
- ``mode TV``: total variation between the mode weights and the fractions of samples
  assigned to each mode, averaged over the runs (exact sampling's value is printed above
  the table);
- ``wall ms``: the fastest run;
- ``overhead``: sampler time / (NFE x time of one score evaluation on the same batch),
  the latter from a compiled loop of NFE evaluations timed next to the sampler;
- ``beyond noise``: the same with one Gaussian draw of the batch's shape added to each
  evaluation, for the stochastic samplers (which draw one per evaluation): the cost of
  the sampler's loop itself.

A last table gives the PC samplers' overhead with a network score (the default run's
digits U-Net), where a Gaussian draw is negligible beside a score evaluation.

Both ratios use this process's CPU time (fastest of two runs), which other processes on
a shared machine do not inflate as they do wall time.

Every sampler runs on the same keys, so the ODE samplers share their prior samples (and
the PC samplers theirs): differences within a family are more precise than the quoted
noise of exact sampling, but the value a family converges to is one draw of that noise.

Run: ``python experiments/benchmarks/samplers.py`` (a few minutes on a laptop CPU), or
``--quick`` (about 30 s, the 2-D mixture and a few samplers). Likelihoods:
``experiments/benchmarks/likelihood.py``.
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_sde.sampling import edm_sample, ode_sample, pc_sample
from diffusion_sde.sde import EDMSDE, VPSDE, RectifiedFlow
from diffusion_sde.toy_scores import GaussianMixture

NUM_PROJECTIONS = 256
REFERENCE_FACTOR = 8  # Reference data set size / sample size.
BASELINE_SETS = 24  # Exact sample sets that normalise the distance.
TIMED_REFERENCES = 2  # Runs timed next to reference chains of score evaluations.


def _mixture(weights, means, stds, sde) -> GaussianMixture:
    # Centred (zero weighted mean), so that p_T is as close to the prior as it can be and
    # the samplers, not the prior's mismatch, decide the mode weights.
    means = means - weights @ means
    return GaussianMixture(*(jnp.asarray(a, jnp.float32) for a in (weights, means, stds)), sde)


def mixture_2d(sde) -> GaussianMixture:
    """Five modes on a circle of radius 2, weights 0.35 down to 0.05, stds 0.04--0.1."""
    angles = 2 * np.pi * np.arange(5) / 5
    means = 2.0 * np.stack([np.cos(angles), np.sin(angles)], axis=-1)
    weights = np.array([0.35, 0.25, 0.2, 0.15, 0.05])
    return _mixture(weights, means, np.array([0.05, 0.1, 0.04, 0.08, 0.06]), sde)


def mixture_16d(sde) -> GaussianMixture:
    """Six modes with means of norm about 2.4 (seeded), weights 0.3 down to 0.05."""
    means = np.random.default_rng(0).normal(size=(6, 16)) * 0.6
    weights = np.array([0.3, 0.25, 0.15, 0.15, 0.1, 0.05])
    return _mixture(weights, means, np.array([0.1, 0.15, 0.1, 0.2, 0.12, 0.1]), sde)


class SlicedW1:
    """Sliced Wasserstein-1 distance to a large reference set of data samples.

    The reference (``reference_factor`` times the sample size) is projected on
    ``NUM_PROJECTIONS`` random unit directions and sorted once; the 1-D W1 to a sample set
    of size ``n`` is then the mean gap between its sorted projections, each repeated
    ``reference_factor`` times, and the reference's sorted projections.
    """

    def __init__(self, key: jax.Array, reference: jax.Array, reference_factor: int):
        directions = jax.random.normal(key, (reference.shape[1], NUM_PROJECTIONS))
        self.directions = directions / jnp.linalg.norm(directions, axis=0)
        self.sorted_reference = jnp.sort(reference @ self.directions, axis=0)
        self.factor = reference_factor

    def __call__(self, x: jax.Array) -> float:
        return float(_sliced_w1(x, self.directions, self.sorted_reference, self.factor))


@functools.partial(jax.jit, static_argnums=3)
def _sliced_w1(x, directions, sorted_reference, factor):
    sorted_x = jnp.repeat(jnp.sort(x @ directions, axis=0), factor, axis=0)
    return jnp.mean(jnp.abs(sorted_x - sorted_reference))


def evaluation_chains(mixture: GaussianMixture, x: jax.Array):
    """Compiled reference loops on the batch ``x``: ``scores(count)`` makes ``count``
    chained score evaluations, ``scores_and_noise(count)`` also one Gaussian draw each.
    ``count`` is dynamic, so each compiles once."""
    t = jnp.full(x.shape[:1], 0.5)

    @functools.partial(jax.jit, static_argnums=1)
    def chain(count, with_noise):
        def body(i, y):
            y = y + 1e-6 * mixture.score(y, t)
            if with_noise:
                y = y + 1e-6 * jax.random.normal(jax.random.fold_in(jax.random.key(0), i), y.shape)
            return y

        return jax.lax.fori_loop(0, count, body, x)

    return functools.partial(chain, with_noise=False), functools.partial(chain, with_noise=True)


def timed(fn, *args):
    """``(result, wall seconds, CPU seconds of this process)`` of ``fn(*args)``."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = jax.block_until_ready(fn(*args))
    return result, time.perf_counter() - wall, time.process_time() - cpu


def samplers(quick: bool) -> list[tuple[str, str, dict]]:
    """(family, name, keyword arguments) of every sampler and step count benchmarked."""
    if quick:
        pc = [("reverse_diffusion", "langevin", (100,)), ("euler_maruyama", "none", (100,))]
        ode = {"ddim": (20,), "heun": (10,), "dpm_solver_2": (20,), "dpm_solver_3": (10, 20)}
    else:
        pc = [
            ("reverse_diffusion", "langevin", (100, 300, 1000)),
            ("reverse_diffusion", "none", (1000,)),
            ("euler_maruyama", "none", (100, 1000)),
            ("ancestral_sampling", "none", (100, 1000)),
            ("none", "ald", (1000,)),
        ]
        ode = {
            "euler": (20, 100, 500),
            "ddim": (10, 20, 50),
            "heun": (5, 10, 25),
            "dpm_solver_2": (10, 20, 50),
            "dpm_solver_3": (5, 10, 20, 50),
        }
    rows = []
    for predictor, corrector, step_counts in pc:
        for num_steps in step_counts:
            kwargs = dict(predictor=predictor, corrector=corrector, num_steps=num_steps)
            if predictor == "none":  # Corrector-only: two moves per level, a larger step.
                kwargs |= dict(n_steps=2, snr=0.3)
            rows.append(("pc", f"{predictor} + {corrector}", kwargs))
    rows.append(("ode", "adaptive", dict(method="adaptive", rtol=1e-3, atol=1e-3)))
    if not quick:
        rows.append(("ode", "adaptive", dict(method="adaptive", rtol=1e-5, atol=1e-5)))
    for method, step_counts in ode.items():
        rows += [("ode", method, dict(method=method, num_steps=n)) for n in step_counts]
    return rows + edm_samplers(quick)


def edm_samplers(quick: bool) -> list[tuple[str, str, dict]]:
    """EDM's Heun sampler, deterministic and with churn (Karras et al. 2022, Algorithm 2)."""
    step_counts = (10, 18) if quick else (5, 10, 18, 40)
    rows = [("edm", "heun", dict(num_steps=n)) for n in step_counts]
    rows.append(("edm", "heun + churn", dict(num_steps=40, s_churn=10.0, s_noise=1.0)))
    return rows


def path_samplers(quick: bool) -> list[tuple[str, str, dict]]:
    """The samplers of the EDM and rectified-flow rows: EDM's, the ODE solvers, and
    Euler--Maruyama on the path's own reverse SDE."""
    rows = [("pc", "euler_maruyama + none", dict(predictor="euler_maruyama",
             corrector="none", num_steps=n)) for n in ((1000,) if quick else (200, 1000))]  # fmt: skip
    rows.append(("ode", "adaptive", dict(method="adaptive", rtol=1e-3, atol=1e-3)))
    ode = {"heun": (10,), "dpm_solver_3": (10, 20)} if quick else {
        "euler": (100,), "ddim": (20,), "heun": (5, 10, 25), "dpm_solver_3": (5, 10, 20)}  # fmt: skip
    for method, step_counts in ode.items():
        rows += [("ode", method, dict(method=method, num_steps=n)) for n in step_counts]
    return rows + edm_samplers(quick)


def benchmark(
    mixture: GaussianMixture,
    num_samples: int,
    runs: int,
    quick: bool,
    rows: list[tuple[str, str, dict]] | None = None,
) -> None:
    sde, shape = mixture.sde, (num_samples, mixture.dim)
    reference_key, data_key = jax.random.split(jax.random.key(0))
    reference = mixture.sample(reference_key, REFERENCE_FACTOR * num_samples)
    sliced_w1 = SlicedW1(jax.random.key(1), reference, REFERENCE_FACTOR)
    total_variation = lambda x: (
        0.5 * float(jnp.sum(jnp.abs(mixture.mode_frequencies(x) - mixture.weights)))
    )
    # Exact sampling, to normalise the distance and show the metrics' noise.
    exact = [mixture.sample(key, num_samples) for key in jax.random.split(data_key, BASELINE_SETS)]
    exact_distances = np.array([sliced_w1(x) for x in exact])
    baseline = exact_distances.mean()
    noise = exact_distances.std() / baseline / np.sqrt(runs)
    exact_variation = np.mean([total_variation(x) for x in exact])
    scores, scores_and_noise = evaluation_chains(mixture, exact[0])
    for count in (1, 1):  # Compile, and warm up.
        timed(scores, count), timed(scores_and_noise, count)
    eval_time = min(timed(scores, 200)[2] for _ in range(3)) / 200
    noise_time = min(timed(scores_and_noise, 200)[2] for _ in range(3)) / 200 - eval_time
    path = type(sde).__name__
    print(f"\n### {mixture.dim}-D mixture, {path}, {num_samples} samples, {runs} runs\n")
    print(
        f"One score evaluation: {eval_time * 1e6:.0f} us; one Gaussian draw: "
        f"{noise_time * 1e6:.0f} us. Exact sampling: SW ratio 1 +- {noise:.2f} "
        f"(std of a {runs}-run mean), mode TV {exact_variation:.3f}.\n"
    )
    print("| sampler | settings | NFE | SW ratio | mode TV | wall ms | overhead | beyond noise |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for family, name, kwargs in samplers(quick) if rows is None else rows:
        sample = {"pc": pc_sample, "ode": ode_sample, "edm": edm_sample}[family]
        run = functools.partial(sample, sde=sde, score_fn=mixture.score, shape=shape, **kwargs)
        jax.block_until_ready(run(jax.random.key(2)))  # Compiles.
        distances, variations, walls, cpus, references = [], [], [], [], []
        for r in range(runs):
            (x, nfe), wall, cpu = timed(run, jax.random.key(3 + r))
            nfe = int(nfe)
            walls.append(wall)
            distances.append(sliced_w1(x))
            variations.append(total_variation(x))
            # NFE chained score evaluations (with one Gaussian draw each for the stochastic
            # samplers), timed next to the sampler.
            if r < TIMED_REFERENCES:
                cpus.append(cpu)
                evals_cpu = timed(scores, nfe)[2]
                stochastic = family == "pc" or kwargs.get("s_churn", 0) > 0
                noisy = timed(scores_and_noise, nfe)[2] if stochastic else evals_cpu
                references.append((evals_cpu, noisy))
        evals_cpu, reference_cpu = np.min(references, axis=0)
        overhead, beyond_noise = min(cpus) / evals_cpu, min(cpus) / reference_cpu
        settings = ", ".join(
            f"{k}={v}" for k, v in kwargs.items() if k not in ("predictor", "corrector", "method")
        )
        print(
            f"| {family}: {name} | {settings} | {nfe} | {np.mean(distances) / baseline:.2f} "
            f"| {np.mean(variations):.3f} | {min(walls) * 1e3:.1f} | {overhead:.2f} "
            f"| {beyond_noise:.2f} |",
            flush=True,
        )


def network_overhead(num_steps: int, batch: int) -> None:
    """The PC samplers' overhead with a network score: the digits DDPM++ U-Net of the
    default run (random weights: the cost, not the samples, is measured) on 8x8 images.

    A network evaluation costs far more than a Gaussian draw of its batch, so this is the
    overhead a user of a trained model sees; the reference is ``NFE`` chained network
    evaluations in one compiled loop.
    """
    import pathlib
    import sys

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))
    from configs import digits_vp
    from diffusion_sde.models import get_model, get_score_fn

    config = digits_vp.get_config()
    model = get_model(config.model)
    sde, shape = VPSDE(), (batch, 8, 8, 1)
    x = jax.random.normal(jax.random.key(0), shape)
    variables = model.init(jax.random.key(1), x[:1], jnp.zeros((1,)), train=False)
    score_fn = get_score_fn(sde, model, variables)
    t = jnp.full((batch,), 0.5)

    @functools.partial(jax.jit, static_argnums=0)
    def chain(count):
        return jax.lax.fori_loop(0, count, lambda i, y: y + 1e-6 * score_fn(y, t), x)

    print(f"\n### Network score: digits DDPM++ (random weights), batch {batch} x 8 x 8\n")
    print(
        "| sampler | NFE | CPU ms | NFE evaluations, CPU ms | overhead |\n|---|---:|---:|---:|---:|"
    )
    for predictor, corrector in (
        ("reverse_diffusion", "none"),
        ("euler_maruyama", "none"),
        ("ancestral_sampling", "none"),
        ("reverse_diffusion", "langevin"),
    ):
        run = functools.partial(
            pc_sample, sde=sde, score_fn=score_fn, shape=shape, predictor=predictor,
            corrector=corrector, num_steps=num_steps,
        )  # fmt: skip
        _, nfe = jax.block_until_ready(run(jax.random.key(2)))  # Compiles.
        nfe = int(nfe)
        timed(chain, nfe)
        sampler_cpu = min(timed(run, jax.random.key(3 + r))[2] for r in range(3))
        chain_cpu = min(timed(chain, nfe)[2] for _ in range(3))
        print(
            f"| pc: {predictor} + {corrector} | {nfe} | {sampler_cpu * 1e3:.0f} "
            f"| {chain_cpu * 1e3:.0f} | {sampler_cpu / chain_cpu:.3f} |",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="2-D only, a few samplers (~30 s)")
    parser.add_argument("--samples", type=int, default=2048, help="samples per run")
    parser.add_argument(
        "--runs", type=int, default=None, help="runs per sampler (default 6; quick 2)"
    )
    args = parser.parse_args()
    runs = args.runs or (2 if args.quick else 6)
    print(f"## Samplers with exact scores (JAX {jax.__version__}, {jax.devices()[0].device_kind})")
    benchmark(mixture_2d(VPSDE()), args.samples, runs, args.quick)
    if not args.quick:
        benchmark(mixture_16d(VPSDE()), args.samples, runs, args.quick)
    for path in (EDMSDE(), RectifiedFlow()):  # the same data on EDM's and the RF path
        benchmark(mixture_2d(path), args.samples, runs, args.quick, path_samplers(args.quick))
    network_overhead(num_steps=50 if args.quick else 200, batch=64)


if __name__ == "__main__":
    main()
