"""Digits FID against NFE for every fast solver, with the trained model of ``make run``.

    python experiments/digits_fid_vs_nfe.py --workdir runs/digits_vp

Loads the EMA parameters of WORKDIR's newest checkpoint (``configs/digits_vp.py``) and, for
each solver at 5, 10 and 20 NFE (Heun: 10 and 20; the adaptive reverse-SDE solvers at their
tolerances, whatever NFE they take), draws 1,000 samples in one batch (the same prior key
for all) and computes their digits FID (the digits classifier's features, the training
split's statistics, samples clipped and rounded to the 17 grey levels, as ``--mode=eval``)
against the 1,000-step predictor-corrector sampler of the config (reverse diffusion, no
corrector). Wall time is the compiled sampler's (compilation excluded, one run). Writes
``experiments/results/digits_fid_vs_nfe.{json,png}`` (the plot: FID against NFE, one line
per solver, the PC sampler as a dashed line) and prints a Markdown table.

FID of 1,000 samples is biased upwards; its noise is printed with the table as the
standard deviation over three prior keys of UniPC-3 at 10 NFE.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import jax
import numpy as np

from diffusion_sde import data as data_lib
from diffusion_sde.evaluation import metrics, reference_stats
from diffusion_sde.models import get_score_fn
from diffusion_sde.sampling import ode_sample, pc_sample, sde_sample
from diffusion_sde.training.checkpoint import load_trained

ROOT = pathlib.Path(__file__).resolve().parents[1]

NUM_SAMPLES = 1000
NFES = (5, 10, 20)
# label -> (sampler, keyword arguments, evaluations per step or None for adaptive)
SOLVERS = {
    "DDIM": (ode_sample, dict(method="ddim"), 1),
    "Heun": (ode_sample, dict(method="heun"), 2),
    "DPM-Solver++(2M)": (ode_sample, dict(method="dpm_solver_2"), 1),
    "DPM-Solver++(3M)": (ode_sample, dict(method="dpm_solver_3"), 1),
    "UniPC-2": (ode_sample, dict(method="unipc_2"), 1),
    "UniPC-3": (ode_sample, dict(method="unipc_3"), 1),
    "SDE-DPM-Solver++(2M)": (sde_sample, dict(method="dpm_solver_2_sde"), 1),
}
ADAPTIVE = {
    "adaptive SDE": [
        dict(method="adaptive", rtol=r, atol=a) for r, a in ((0.05, 0.0078), (0.1, 0.02))
    ],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default="runs/digits_vp")
    parser.add_argument("--out", default=str(ROOT / "experiments" / "results"))
    parser.add_argument("--pc_steps", type=int, default=1000)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from configs import digits_vp

    config = digits_vp.get_config()
    sde, model, state = load_trained(config, args.workdir)
    score_fn = get_score_fn(sde, model, {"params": state.ema_params}, continuous=True)
    shape = (NUM_SAMPLES, *data_lib.data_shape(config.data))
    inverse_scaler = data_lib.get_data_inverse_scaler(config.data)
    extractor = metrics.get_feature_extractor("digits")
    reference = reference_stats.compute_reference_statistics(config.data, extractor)
    eps = config.sampling.eps

    def evaluate(label, sample, kwargs, key=None):
        key = jax.random.key(0) if key is None else key
        run = jax.jit(lambda k: sample(k, sde, score_fn, shape, eps=eps, **kwargs))
        compiled = run.lower(key).compile()
        start = time.perf_counter()
        samples, nfe = jax.block_until_ready(compiled(key))
        wall = time.perf_counter() - start
        images = np.asarray(inverse_scaler(samples))
        fid = metrics.sample_quality(images, reference, extractor, rounding="round")["fid"]
        row = dict(solver=label, nfe=int(nfe), fid=float(fid), wall_s=wall, **kwargs)
        print(json.dumps(row), flush=True)
        return row

    rows = [
        evaluate("PC reverse diffusion", pc_sample,
                 dict(predictor="reverse_diffusion", corrector="none", num_steps=args.pc_steps))
    ]  # fmt: skip
    for label, (sample, kwargs, per_step) in SOLVERS.items():
        for nfe in NFES:
            if nfe % per_step == 0:
                rows.append(evaluate(label, sample, dict(kwargs, num_steps=nfe // per_step)))
    for label, settings in ADAPTIVE.items():
        rows += [evaluate(label, sde_sample, kwargs) for kwargs in settings]
    # The noise of a 1,000-sample FID: one solver on two more prior keys.
    noise_kwargs = dict(method="unipc_3", num_steps=10)
    noise = [r["fid"] for r in rows if r["solver"] == "UniPC-3" and r["nfe"] == 10] + [
        evaluate("UniPC-3", ode_sample, noise_kwargs, key=jax.random.key(k))["fid"] for k in (1, 2)
    ]
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "digits_fid_vs_nfe.json").write_text(
        json.dumps(dict(rows=rows, fid_noise_std=float(np.std(noise, ddof=1))), indent=1) + "\n"
    )
    plot(rows, out / "digits_fid_vs_nfe.png")
    print(f"\nFID noise (std over 3 prior keys, UniPC-3, 10 NFE): {np.std(noise, ddof=1):.3f}\n")
    print("| solver | " + " | ".join(f"{n} NFE: FID (wall s)" for n in NFES) + " |")
    print("|---|" + "---:|" * len(NFES))
    for label in SOLVERS:
        cells = {
            r["nfe"]: f"{r['fid']:.2f} ({r['wall_s']:.2f})" for r in rows if r["solver"] == label
        }
        print(f"| {label} | " + " | ".join(cells.get(n, "") for n in NFES) + " |")
    for r in rows:
        if r["solver"] not in SOLVERS:
            print(f"| {r['solver']} ({r['nfe']} NFE) | FID {r['fid']:.2f}, {r['wall_s']:.2f} s |")


def plot(rows, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    labels = list(dict.fromkeys(r["solver"] for r in rows))
    for label in labels:
        points = sorted((r["nfe"], r["fid"]) for r in rows if r["solver"] == label)
        if label.startswith("PC"):
            axes.axhline(
                points[0][1], color="k", linestyle="--", label=f"{label}, {points[0][0]} NFE"
            )
            continue
        axes.plot(*zip(*points, strict=True), marker="o", label=label)
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.set_xlabel("NFE")
    axes.set_ylabel("digits FID (1,000 samples)")
    axes.set_title("Digits VP model: FID against score evaluations")
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
