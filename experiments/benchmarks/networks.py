r"""Benchmark of the NCSN++/DDPM++ score network: size, speed and memory.

For one configuration it prints the parameter count, the forward time, the training-step
time (forward + denoising score matching loss + backward + Adam through optax), images/s,
the compile times and the peak memory. A training step is the VP noise-prediction loss of
DDPM++ (Ho et al. 2020; Song et al. 2021, eq. 7 with :math:`\lambda(t) = \sigma_t^2`),

.. math::  \mathcal L = \mathbb E_{t, x_0, \epsilon}
           \|\epsilon_\theta(\alpha_t x_0 + \sigma_t \epsilon,\ 999\,t) - \epsilon\|^2,

written here with a linear-:math:`\beta` VP schedule so that the benchmark depends on the
network alone.

Usage::

    python experiments/benchmarks/networks.py                       # EDM-style DDPM++, batch 8
    python experiments/benchmarks/networks.py --preset ncsnpp --batch 16
    python experiments/benchmarks/networks.py --conv-impl xla,patches   # compare implementations
    python experiments/benchmarks/networks.py --config configs/some_config.py  # its config.model
    python experiments/benchmarks/networks.py --set nf=64 --set ch_mult=1,2
    python experiments/benchmarks/networks.py --preset edm_ddpmpp_small --batch 16 --profile

Reference on a 2-core CPU (2 threads), batch 8 at 32x32x3, EDM-style DDPM++ (55.7M
parameters): PyTorch takes about 6.0 s per training step and 1.7 s per forward pass.
Timings are medians over ``--repeats`` runs after a warm-up; on a shared machine they are
noisy (the load average is printed with them).
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import os
import pathlib
import resource
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from diffusion_sde.compilation_cache import compiler_options
from diffusion_sde.host_memory import release_freed_memory, restart_with_huge_pages
from diffusion_sde.models import count_parameters, get_model
from diffusion_sde.models.convolution import CONV_IMPLS
from diffusion_sde.training import loop

# The repository root on sys.path: config files import their defaults as ``configs.*``, and
# this script its siblings as ``experiments.benchmarks.*``.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))
from experiments.benchmarks import step_profile  # noqa: E402

# The CIFAR-10 architectures of the paper (Song et al. 2021, table 3/appendix H) and the
# DDPM++ of EDM's CIFAR-10 runs (Karras et al. 2022), with their parameter counts.
_DDPMPP = dict(
    nf=128,
    ch_mult=(1, 2, 2, 2),
    num_res_blocks=4,
    attn_resolutions=(16,),
    dropout=0.1,
    resamp_with_conv=True,
    conditional=True,
    fir=False,
    fir_kernel=(1, 3, 3, 1),
    skip_rescale=True,
    resblock_type="biggan",
    progressive="none",
    progressive_input="none",
    progressive_combine="sum",
    embedding_type="positional",
    fourier_scale=16.0,
    init_scale=0.0,
    scale_by_sigma=False,
    nonlinearity="swish",
    centered=False,
    num_classes=0,
    dtype="float32",
    conv_impl="auto",
    sigma_min=0.01,
    sigma_max=50.0,
    num_scales=1000,
    image_size=32,
)
_NCSNPP = dict(_DDPMPP, embedding_type="fourier", fir=True, progressive_input="residual")
_NCSNPP.update(scale_by_sigma=True)
PRESETS = {
    "edm_ddpmpp": (dict(_DDPMPP, ch_mult=(2, 2, 2)), 55_732_739),
    "edm_ddpmpp_small": (dict(_DDPMPP, nf=32, ch_mult=(1, 2, 2), num_res_blocks=2), 1_754_147),
    "ddpmpp": (_DDPMPP, 61_804_419),
    "ddpmpp_deep": (dict(_DDPMPP, num_res_blocks=8), 106_632_579),
    "ncsnpp": (_NCSNPP, 62_758_787),
    "ncsnpp_deep": (dict(_NCSNPP, num_res_blocks=8), 107_586_947),
}


def _parse_value(text: str):
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text
    return tuple(value) if isinstance(value, list) else value


def build_model_config(args: argparse.Namespace) -> ml_collections.ConfigDict:
    if args.config:
        spec = importlib.util.spec_from_file_location("benchmark_config", args.config)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        config = module.get_config().model
    else:
        config = ml_collections.ConfigDict(dict(PRESETS[args.preset][0], name="ncsnpp"))
    for assignment in args.set:
        key, _, value = assignment.partition("=")
        config[key] = _parse_value(value if "," not in value else f"({value},)")
    if args.dtype:
        config.dtype = args.dtype
    return config


def median_time(fn, repeats: int) -> tuple[float, float]:
    """Median wall-clock and process CPU seconds of ``fn()`` (CPU time, summed over
    threads, is less sensitive than wall time to other processes on a shared machine)."""
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        jax.block_until_ready(fn())
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return statistics.median(wall), statistics.median(cpu)


def _compile(fn, *args):
    start = time.perf_counter()
    compiled = fn.lower(*args).compile()
    return compiled, time.perf_counter() - start


def vp_noise_prediction_loss(model, beta_min: float = 0.1, beta_max: float = 20.0):
    """``loss_fn(params, key, x0)``: the module docstring's loss on a linear-beta VP path,
    one draw of ``t`` and of the noise per example, with dropout as in training."""

    def loss_fn(params, key, x0):
        key_t, key_noise, key_dropout = jax.random.split(key, 3)
        t = jax.random.uniform(key_t, (x0.shape[0],), minval=1e-5, maxval=1.0)
        log_alpha = -0.25 * t**2 * (beta_max - beta_min) - 0.5 * t * beta_min
        alpha, sigma = jnp.exp(log_alpha), jnp.sqrt(1.0 - jnp.exp(2.0 * log_alpha))
        epsilon = jax.random.normal(key_noise, x0.shape)
        x_t = alpha[:, None, None, None] * x0 + sigma[:, None, None, None] * epsilon
        predicted = model.apply(
            {"params": params}, x_t, 999.0 * t, train=True, rngs={"dropout": key_dropout}
        )
        return jnp.mean(jnp.sum((predicted - epsilon) ** 2, axis=(1, 2, 3)))

    return loss_fn


def make_train_step(model, optimizer: optax.GradientTransformation):
    """``train_step(params, opt_state, key, x0) -> (params, opt_state, loss)``: one Adam step
    on :func:`vp_noise_prediction_loss`."""
    loss_fn = vp_noise_prediction_loss(model)

    def train_step(params, opt_state, key, x0):
        loss, grads = jax.value_and_grad(loss_fn)(params, key, x0)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return train_step


def _timed_call(fn, *args):
    start = time.perf_counter()
    result = jax.block_until_ready(fn(*args))
    return result, time.perf_counter() - start


def benchmark(model_config: ml_collections.ConfigDict, args: argparse.Namespace) -> dict:
    """Times of the network built by ``get_model(model_config)`` on a batch of
    ``args.batch`` images of ``args.image_size`` x ``args.image_size`` x ``args.channels``,
    medians over ``args.repeats`` calls; ``args.profile`` (optional) also prints
    :func:`step_profile.profile_step` of the training step."""
    model = get_model(model_config)
    shape = (args.batch, args.image_size, args.image_size, args.channels)
    key_init, key_data, key_step = jax.random.split(jax.random.key(0), 3)
    x = jax.random.uniform(key_data, shape)
    t = jnp.full((args.batch,), 0.5)
    time_cond = t * 999.0 if model_config.embedding_type == "positional" else t + 0.01

    abstract = jax.eval_shape(model.init, key_init, x, time_cond)
    num_params = count_parameters(abstract["params"])
    # Parameters do not depend on the batch: initialise on one example, as training does.
    # Initialisation and the training step compile as training compiles them (on CPU LLVM
    # level 1 and the memory-optimised scheduler, unless XLA_FLAGS sets them: compiler_options);
    # the forward pass as sampling does (XLA's defaults).
    options = compiler_options(jax.default_backend())
    init = jax.jit(model.init, compiler_options=options)
    variables, init_s = _timed_call(init, key_init, x[:1], time_cond[:1])
    # Training keeps no initialiser once the state exists (``loop.restore`` jits it for one
    # call), and neither does this: its compiled program holds 0.1-0.2 GiB of host memory.
    del init
    # After each compilation, as training does: the compiler's freed memory back to the system.
    release_freed_memory()

    forward = jax.jit(lambda variables, x, c: model.apply(variables, x, c))
    forward_compiled, forward_compile_s = _compile(forward, variables, x, time_cond)
    release_freed_memory()
    _, forward_first_s = _timed_call(forward_compiled, variables, x, time_cond)
    forward_s, forward_cpu_s = median_time(
        lambda: forward_compiled(variables, x, time_cond), args.repeats
    )

    # The training step on the devices training uses (``loop.training_devices``: on a CPU
    # split in two by ``loop.use_cpu_devices``, a small network trains data-parallel).
    mesh = Mesh(np.asarray(loop.training_devices(abstract["params"])), ("data",))
    optimizer = optax.adam(2e-4)
    params = jax.device_put(variables["params"], NamedSharding(mesh, P()))
    opt_state = optimizer.init(params)
    x = jax.device_put(x, NamedSharding(mesh, P("data")))
    step = jax.jit(
        make_train_step(model, optimizer), donate_argnums=(0, 1), compiler_options=options
    )
    step_compiled, step_compile_s = _compile(step, params, opt_state, key_step, x)
    release_freed_memory()
    (params, opt_state, _), step_first_s = _timed_call(
        step_compiled, params, opt_state, key_step, x
    )

    def one_step():
        nonlocal params, opt_state
        params, opt_state, loss = step_compiled(params, opt_state, key_step, x)
        return loss

    step_s, step_cpu_s = median_time(one_step, args.repeats)
    if getattr(args, "profile", False):
        step_profile.profile_step(step_compiled, one_step, calls=args.repeats)
    device_stats = jax.devices()[0].memory_stats() or {}
    return dict(
        num_params=num_params,
        step_devices=mesh.size,
        init_s=init_s,
        forward_s=forward_s,
        forward_cpu_s=forward_cpu_s,
        forward_first_s=forward_first_s,
        step_s=step_s,
        step_cpu_s=step_cpu_s,
        step_first_s=step_first_s,
        forward_compile_s=forward_compile_s,
        step_compile_s=step_compile_s,
        device_peak_bytes=device_stats.get("peak_bytes_in_use"),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="edm_ddpmpp", choices=sorted(PRESETS))
    parser.add_argument("--config", help="a config file with get_config(); uses its .model")
    parser.add_argument("--set", action="append", default=[], help="model field=value")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--channels", type=int, default=3)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"))
    parser.add_argument(
        "--conv-impl",
        default=None,
        help="comma-separated, of " + ", ".join(CONV_IMPLS) + " (default: the config's)",
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also trace --repeats training steps and print where their time goes",
    )
    args = parser.parse_args()

    model_config = build_model_config(args)
    loop.use_cpu_devices(args.batch)  # as training does, before anything touches the devices
    conv_impls = args.conv_impl.split(",") if args.conv_impl else [model_config.conv_impl]
    print(
        f"jax {jax.__version__} on {jax.devices()[0].device_kind} ({jax.default_backend()}), "
        f"{os.cpu_count()} cpus, load average {os.getloadavg()[0]:.2f}"
    )
    name = args.config or args.preset
    print(
        f"{name}: batch {args.batch}, {args.image_size}x{args.image_size}x{args.channels}, "
        f"dtype {model_config.get('dtype', 'float32')}"
    )
    for conv_impl in conv_impls:
        model_config.conv_impl = conv_impl
        result = benchmark(model_config, args)
        expected = "" if args.config or args.set else f" (expected {PRESETS[args.preset][1]:,})"
        peak_rss_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        device_peak = result["device_peak_bytes"]
        print(f"conv_impl {conv_impl}")
        print(f"  parameters      {result['num_params']:,}{expected}")
        print(f"  init            {result['init_s']:.1f} s (compile and run)")
        print(
            f"  forward         {result['forward_s']:.3f} s  "
            f"(CPU {result['forward_cpu_s']:.2f} s; compile {result['forward_compile_s']:.1f} s)"
        )
        print(
            f"  training step   {result['step_s']:.3f} s  "
            f"(CPU {result['step_cpu_s']:.2f} s; compile {result['step_compile_s']:.1f} s; "
            f"{result['step_devices']} device(s))"
        )
        print(
            f"  images/s        {args.batch / result['step_s']:.1f} training, "
            f"{args.batch / result['forward_s']:.1f} forward"
        )
        print(
            f"  peak memory     {peak_rss_gib:.2f} GiB host RSS (process so far)"
            + ("" if device_peak is None else f", {device_peak / 2**30:.2f} GiB device")
        )
        print(f"  load average    {os.getloadavg()[0]:.2f}", flush=True)


if __name__ == "__main__":
    restart_with_huge_pages()  # glibc's huge pages for XLA's buffers: host_memory's docstring
    main()
