"""Few-step benchmark with exact scores: every fast solver and time grid at 5-20 NFE.

The mixtures, distance and noise floor of ``samplers.py`` (2-D: five narrow modes; 16-D:
six modes; VP SDE, 2,048 samples per run): each cell is the sliced-Wasserstein ratio
(1.0 is exact sampling) averaged over ``--runs`` runs on independent keys, for the solver
(row) on the time grid at that NFE (column). Heun takes 2 evaluations a step, so it has
only the even NFE. The 2,000-NFE predictor-corrector sampler (reverse diffusion +
Langevin, 1,000 steps) and the adaptive solvers (ODE Dopri5; reverse-SDE, Jolicoeur-
Martineau et al. 2021, at a few tolerances, with their measured mean NFE) are the
references printed above each table. A last line per mixture names the best solver at
each NFE with its mode TV.

Run: ``python experiments/benchmarks/few_step.py`` (50 minutes on this shared 2-core CPU at load average 10), or
``--quick`` (2-D, a few solvers, 2 runs).
"""

from __future__ import annotations

import argparse
import functools
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from samplers import BASELINE_SETS, REFERENCE_FACTOR, SlicedW1, mixture_2d, mixture_16d

from diffusion_sde.ode_solvers import TIME_GRIDS
from diffusion_sde.sampling import ode_sample, pc_sample, sde_sample
from diffusion_sde.sde import VPSDE

NFES = (5, 8, 10, 15, 20)
# name -> (sampler, evaluations per step)
SOLVERS = {
    "ddim": (ode_sample, 1),
    "heun": (ode_sample, 2),
    "dpm_solver_2": (ode_sample, 1),
    "dpm_solver_3": (ode_sample, 1),
    "unipc_1": (ode_sample, 1),
    "unipc_1_bh2": (ode_sample, 1),
    "unipc_2": (ode_sample, 1),
    "unipc_3": (ode_sample, 1),
    "dpm_solver_1_sde": (sde_sample, 1),
    "dpm_solver_2_sde": (sde_sample, 1),
}
QUICK_SOLVERS = ("dpm_solver_3", "unipc_3", "dpm_solver_2_sde")
ADAPTIVE_SDE_TOLERANCES = ((0.05, 0.0078), (0.02, 0.0039), (0.01, 0.002))


class Scorer:
    """Mean SW ratio and mode TV of a sampler over ``runs`` keys."""

    def __init__(self, mixture, num_samples: int, runs: int):
        self.mixture, self.shape, self.runs = mixture, (num_samples, mixture.dim), runs
        reference_key, data_key = jax.random.split(jax.random.key(0))
        reference = mixture.sample(reference_key, REFERENCE_FACTOR * num_samples)
        self.sliced_w1 = SlicedW1(jax.random.key(1), reference, REFERENCE_FACTOR)
        keys = jax.random.split(data_key, BASELINE_SETS)
        exact = np.array([self.sliced_w1(mixture.sample(key, num_samples)) for key in keys])
        self.baseline = exact.mean()
        self.noise = exact.std() / self.baseline / np.sqrt(runs)

    def __call__(self, sample, **kwargs) -> tuple[float, float, float]:
        """``(SW ratio, mode TV, mean NFE)``."""
        run = functools.partial(
            sample, sde=self.mixture.sde, score_fn=self.mixture.score, shape=self.shape, **kwargs
        )
        distances, variations, nfes = [], [], []
        for r in range(self.runs):
            x, nfe = run(jax.random.key(3 + r))
            distances.append(self.sliced_w1(x))
            frequencies = self.mixture.mode_frequencies(x)
            variations.append(0.5 * float(jnp.sum(jnp.abs(frequencies - self.mixture.weights))))
            nfes.append(int(nfe))
        return np.mean(distances) / self.baseline, float(np.mean(variations)), np.mean(nfes)


def benchmark(mixture, num_samples: int, runs: int, quick: bool) -> None:
    scorer = Scorer(mixture, num_samples, runs)
    print(f"\n### {mixture.dim}-D mixture, VP SDE, {num_samples} samples, {runs} runs\n")
    print(f"Exact sampling: SW ratio 1 +- {scorer.noise:.2f} (std of a {runs}-run mean).")
    pc_steps = 100 if quick else 1000
    sw, tv, nfe = scorer(pc_sample, predictor="reverse_diffusion", corrector="langevin",
                         num_steps=pc_steps)  # fmt: skip
    print(f"References: PC reverse diffusion + Langevin, {nfe:.0f} NFE: SW {sw:.2f}, TV {tv:.3f}")
    sw, tv, nfe = scorer(ode_sample, method="adaptive", rtol=1e-5, atol=1e-5)
    print(f"- ODE adaptive Dopri5 (tol 1e-5), {nfe:.0f} NFE: SW {sw:.2f}, TV {tv:.3f}")
    for method in ("adaptive", "adaptive_per_example"):
        for rtol, atol in ADAPTIVE_SDE_TOLERANCES[: 1 if quick else None]:
            sw, tv, nfe = scorer(sde_sample, method=method, rtol=rtol, atol=atol)
            print(f"- SDE {method} (rtol {rtol}, atol {atol}), {nfe:.0f} NFE: SW {sw:.2f}, "
                  f"TV {tv:.3f}")  # fmt: skip
    print("\n| solver | grid | " + " | ".join(f"NFE {n}" for n in NFES) + " |")
    print("|---|---|" + "---:|" * len(NFES))
    best = {n: (np.inf, "", 0.0) for n in NFES}
    for name in QUICK_SOLVERS if quick else SOLVERS:
        sample, per_step = SOLVERS[name]
        for grid in TIME_GRIDS:
            cells = []
            for n in NFES:
                if n % per_step:
                    cells.append("")
                    continue
                sw, tv, _ = scorer(sample, method=name, num_steps=n // per_step, time_grid=grid)
                cells.append(f"{sw:.2f}")
                if sw < best[n][0]:
                    best[n] = (sw, f"{name} ({grid})", tv)
            print(f"| {name} | {grid} | " + " | ".join(cells) + " |", flush=True)
    print("\nBest at each NFE: " + "; ".join(
        f"{n}: {label} SW {sw:.2f}, TV {tv:.3f}" for n, (sw, label, tv) in best.items()
    ))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="2-D only, a few solvers")
    parser.add_argument("--samples", type=int, default=2048, help="samples per run")
    parser.add_argument("--runs", type=int, default=None, help="runs per cell (6; quick 2)")
    args = parser.parse_args()
    runs = args.runs or (2 if args.quick else 6)
    print(
        f"## Few-step solvers, exact scores (JAX {jax.__version__}, {jax.devices()[0].device_kind})"
    )
    benchmark(mixture_2d(VPSDE()), args.samples, runs, args.quick)
    if not args.quick:
        benchmark(mixture_16d(VPSDE()), args.samples, runs, args.quick)


if __name__ == "__main__":
    main()
