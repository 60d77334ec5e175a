"""Sampler throughput with a network score: images/s and NFE/s of the fast samplers.

The score is the CIFAR-10 DDPM++ network (``networks.py``'s ``ddpmpp`` preset, 61.8M
parameters, random weights: the cost, not the samples, is measured) on a batch of
``--batch`` 32x32x3 images under the VP SDE. For each sampler it prints the NFE, the wall
time of one compiled run (median of ``--repeats``, compilation excluded and printed apart),
images/s (batch / wall) and NFE/s (NFE / wall: batched network evaluations per second).

    python experiments/benchmarks/sampling_throughput.py --batch 128 --dtype bfloat16

Meant for an accelerator (``gpu_check.sh``); on a 2-core CPU use ``--batch 2``.
"""

from __future__ import annotations

import argparse
import functools
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections

from diffusion_sde.models import get_model, get_score_fn
from diffusion_sde.sampling import ode_sample, pc_sample, sde_sample
from diffusion_sde.sde import VPSDE

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from networks import PRESETS, median_time  # noqa: E402

SAMPLERS = {
    "UniPC-3, 10 steps": (ode_sample, dict(method="unipc_3", num_steps=10)),
    "DPM-Solver++(3M), 10 steps": (ode_sample, dict(method="dpm_solver_3", num_steps=10)),
    "SDE-DPM-Solver++(2M), 20 steps": (sde_sample, dict(method="dpm_solver_2_sde", num_steps=20)),
    "PC reverse diffusion, 100 steps": (
        pc_sample,
        dict(predictor="reverse_diffusion", corrector="none", num_steps=100),
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--conv-impl", default="xla")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    config = ml_collections.ConfigDict(dict(PRESETS["ddpmpp"][0], name="ncsnpp"))
    config.dtype, config.conv_impl = args.dtype, args.conv_impl
    model, sde, shape = get_model(config), VPSDE(), (args.batch, 32, 32, 3)
    variables = model.init(
        jax.random.key(0), jnp.zeros((1, 32, 32, 3)), jnp.zeros((1,)), train=False
    )
    score_fn = get_score_fn(sde, model, variables)
    print(
        f"jax {jax.__version__} on {jax.devices()[0].device_kind}: DDPM++ score, batch "
        f"{args.batch} x 32 x 32 x 3, {args.dtype}\n\n| sampler | NFE | compile s | wall s "
        "| images/s | NFE/s |\n|---|---:|---:|---:|---:|---:|"
    )
    for label, (sample, kwargs) in SAMPLERS.items():
        run = jax.jit(functools.partial(sample, sde=sde, score_fn=score_fn, shape=shape, **kwargs))
        start = time.perf_counter()
        compiled = run.lower(jax.random.key(1)).compile()
        compile_s = time.perf_counter() - start
        _, nfe = jax.block_until_ready(compiled(jax.random.key(1)))
        wall, _ = median_time(functools.partial(compiled, jax.random.key(2)), args.repeats)
        print(
            f"| {label} | {int(nfe)} | {compile_s:.1f} | {wall:.3f} | {args.batch / wall:.1f} "
            f"| {int(nfe) / wall:.1f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
