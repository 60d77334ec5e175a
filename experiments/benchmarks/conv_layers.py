r"""Benchmark of the convolution implementations (``conv_impl``) layer by layer.

For each image size it times, per implementation, one 3x3 SAME convolution (forward, the
reverse-mode pullback that gives both gradients, and a forward-mode JVP in the input) and a
stack of BigGAN residual blocks as NCSN++/DDPM++ use them (forward, and forward + backward
of a sum of squares in the parameters and the input, with dropout 0.1 as in training). It
is the measurement behind the thresholds of ``conv_impl="auto"``
(``diffusion_sde/models/convolution.py``), and shows where the time of
``experiments/benchmarks/networks.py`` goes.

Usage::

    python experiments/benchmarks/conv_layers.py                      # 32, 16, 8 px, 256 ch
    python experiments/benchmarks/conv_layers.py --sizes 32 --impls xla,winograd4
    python experiments/benchmarks/conv_layers.py --channels 128 --batch 16 --blocks 2

Times are the minimum over ``--repeats`` runs in milliseconds (on a shared machine the
minimum is the least noisy); each line also gives the largest relative difference of the
outputs and gradients from ``"xla"``.
"""

from __future__ import annotations

import argparse
import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_sde.models import convolution, layers


def min_time_ms(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return 1e3 * min(times)


def _relative(a, b) -> float:
    return max(
        float(jnp.max(jnp.abs(u - v)) / jnp.max(jnp.abs(v)))
        for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


class _Blocks(nn.Module):
    num_blocks: int
    conv_impl: str
    train: bool = False

    @nn.compact
    def __call__(self, x, temb):
        for _ in range(self.num_blocks):
            block = layers.ResnetBlockBigGANpp(dropout=0.1, conv_impl=self.conv_impl)
            x = block(x, temb, train=self.train)
        return x


def bench_conv(impl: str, x, kernel, g, reference, repeats: int) -> tuple[str, tuple]:
    def conv(x, kernel):
        return convolution.conv2d(x, kernel, conv_impl=impl)

    forward = jax.jit(conv)
    pullback = jax.jit(lambda x, kernel, g: jax.vjp(conv, x, kernel)[1](g))
    jvp = jax.jit(lambda x, kernel, dx: jax.jvp(lambda x: conv(x, kernel), (x,), (dx,))[1])
    outputs = (forward(x, kernel), pullback(x, kernel, g), jvp(x, kernel, g))
    error = 0.0 if reference is None else _relative(outputs, reference)
    return (
        f"forward {min_time_ms(forward, x, kernel, repeats=repeats):7.1f}  "
        f"vjp {min_time_ms(pullback, x, kernel, g, repeats=repeats):7.1f}  "
        f"jvp {min_time_ms(jvp, x, kernel, g, repeats=repeats):7.1f}  (rel. diff {error:.0e})"
    ), outputs


def bench_blocks(impl: str, x, temb, num_blocks: int, repeats: int) -> str:
    # Forward as in sampling (no dropout); forward + backward as in training, with dropout.
    net, training = _Blocks(num_blocks, impl), _Blocks(num_blocks, impl, train=True)
    variables = net.init(jax.random.key(2), x, temb)
    forward = jax.jit(lambda v, x: net.apply(v, x, temb))

    def loss(v, x):
        return jnp.sum(training.apply(v, x, temb, rngs={"dropout": jax.random.key(3)}) ** 2)

    grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
    start = time.perf_counter()
    grad.lower(variables, x).compile()
    compile_s = time.perf_counter() - start
    return (
        f"forward {min_time_ms(forward, variables, x, repeats=repeats):7.1f}  "
        f"forward+backward {min_time_ms(grad, variables, x, repeats=repeats):7.1f}  "
        f"(compile {compile_s:.1f} s)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="32,16,8", help="image sizes, comma-separated")
    parser.add_argument("--impls", default="xla,hybrid,winograd,winograd4,auto")
    parser.add_argument("--channels", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--blocks", type=int, default=4, help="residual blocks (0: none)")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    impls = args.impls.split(",")
    for impl in impls:
        convolution.resolve_conv_impl(impl)
    print(
        f"jax {jax.__version__} on {jax.default_backend()}, {os.cpu_count()} cpus, "
        f"batch {args.batch}, {args.channels} channels; milliseconds, minimum of {args.repeats}"
    )
    keys = jax.random.split(jax.random.key(0), 4)
    for size in map(int, args.sizes.split(",")):
        shape = (args.batch, size, size, args.channels)
        x, g = jax.random.normal(keys[0], shape), jax.random.normal(keys[1], shape)
        kernel = jax.random.normal(keys[2], (3, 3, args.channels, args.channels))
        kernel = kernel / (3.0 * args.channels**0.5)
        temb = jax.random.normal(keys[3], (args.batch, 4 * args.channels))
        print(f"{size}x{size}: one 3x3 convolution")
        reference = None
        for impl in ["xla"] + [i for i in impls if i != "xla"]:
            line, outputs = bench_conv(impl, x, kernel, g, reference, args.repeats)
            reference = outputs if reference is None else reference
            if impl in impls:
                print(f"  {impl:10s} {line}", flush=True)
        if args.blocks:
            print(f"{size}x{size}: {args.blocks} BigGAN residual blocks")
            for impl in impls:
                line = bench_blocks(impl, x, temb, args.blocks, args.repeats)
                print(f"  {impl:10s} {line}", flush=True)


if __name__ == "__main__":
    main()
