r"""Benchmark of a config's training step, as ``train.py`` runs it.

For a config file it builds the state and the jitted call of ``training.step.get_train_steps``
(the loss the config asks for, ``n`` optimisation steps through ``lax.scan``, state
donated, the batch sharded over every device) for ``n`` in ``--n_jitted_steps`` (default
1 and 5), and prints for each: the time to trace and lower it, XLA's compile time cold (an
empty persistent compilation cache) and cached (the same program again after
``jax.clear_caches()``, read back from the cache), seconds per step, examples/s, and the estimated wall time of
``training.n_iters`` steps. Then the network's own forward + backward pass on the same
global batch (``jax.grad`` of a sum of squares of its output: no SDE, no optimizer, no
EMA) and the ratio step / (forward + backward): what the rest of the step costs (the
target is <= 1.10). Last the parameter count and peak memory.

Usage::

    python experiments/benchmarks/train_step.py --config=configs/digits_vp.py
    python experiments/benchmarks/train_step.py --config=configs/toy_2d_vp.py \
        --config.training.batch_size=512
    python experiments/benchmarks/train_step.py \
        --config=configs/cifar10_ddpmpp_continuous_vp.py:small --calls=5

Timings are medians over ``--calls`` calls after a warm-up call; the process CPU time
(summed over threads) is printed beside the wall time, as other processes on a shared
machine inflate the wall time only. The load average is printed with them.
"""

from __future__ import annotations

import os
import pathlib
import resource
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from ml_collections import config_flags

from diffusion_sde import data as data_lib
from diffusion_sde.host_memory import restart_with_huge_pages
from diffusion_sde.models import count_parameters, get_model
from diffusion_sde.sde import get_sde
from diffusion_sde.training import loop
from diffusion_sde.training import state as state_lib
from diffusion_sde.training import step as step_lib

# Config files import their defaults as ``configs.*``, from the repository root.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))
from experiments.benchmarks.networks import median_time  # noqa: E402

config_flags.DEFINE_config_file("config", None, "Training configuration.", lock_config=True)
flags.DEFINE_integer("calls", 10, "Timed calls of each jitted function.")
flags.DEFINE_list("n_jitted_steps", ["1", "5"], "Steps per jitted call to compare.")
flags.mark_flags_as_required(["config"])
FLAGS = flags.FLAGS


def compile_seconds(jitted, *args) -> tuple[object, float, float, float]:
    """``(compiled, trace_s, cold_s, cached_s)``: tracing and lowering to StableHLO, then
    XLA's compilation with the (empty) persistent cache, and again from that cache after
    dropping every in-memory cache (``trace_s`` is of this second, untraced-again pass)."""
    start = time.perf_counter()
    jitted.lower(*args).compile()
    cold_total = time.perf_counter() - start
    jax.clear_caches()
    start = time.perf_counter()
    lowered = jitted.lower(*args)
    trace = time.perf_counter() - start
    start = time.perf_counter()
    compiled = lowered.compile()
    return compiled, trace, cold_total - trace, time.perf_counter() - start


def main(argv):
    del argv
    # A fresh persistent cache, so that "cold" is cold and "cached" reads what it wrote.
    jax.config.update("jax_compilation_cache_dir", tempfile.mkdtemp(prefix="jax_cache_"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    config = FLAGS.config
    training = config.training
    loop.use_cpu_devices(int(training.batch_size))  # the devices training would use
    sde, model = get_sde(config), get_model(config.model)
    optimizer = state_lib.get_optimizer(config.optim)
    abstract = state_lib.abstract_train_state(config, model, optimizer)
    mesh = Mesh(np.asarray(loop.training_devices(abstract.params)), ("data",))
    replicated = NamedSharding(mesh, P())
    batch_sharding = NamedSharding(mesh, P(None, "data"))
    data_shape = data_lib.data_shape(config.data)
    conditional = config.model.get("num_classes", 0) > 0

    def fresh_state():
        state = state_lib.create_train_state(
            jax.random.PRNGKey(config.seed),
            model=model,
            optimizer=optimizer,
            data_shape=data_shape,
            conditional=conditional,
        )
        return jax.device_put(state, replicated)

    # The real data pipeline's batches, so the benchmark sees real shapes and dtypes.
    batches = data_lib.get_dataset(
        config.data, batch_size=training.batch_size, split="train", seed=config.seed
    )
    max_n = max(int(n) for n in FLAGS.n_jitted_steps)
    local = [next(batches) for _ in range(max_n)]
    train_steps = step_lib.get_train_steps(config, sde, model, optimizer, mesh)
    print(
        f"{config.data.dataset}, {training.sde}, model {config.model.name}, "
        f"{mesh.size} x {jax.devices()[0].platform}, batch {training.batch_size} x "
        f"{data_shape}; load average {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    header = (
        "| steps per call | trace + lower (s) | compile cold (s) | compile cached (s) "
        "| ms per step (CPU ms) "
        "| examples/s | n_iters would take |\n|---:|---:|---:|---:|---:|---:|---:|"
    )
    print(header)
    per_step = {}
    for n in (int(n) for n in FLAGS.n_jitted_steps):
        stacked = {k: np.stack([b[k] for b in local[:n]]) for k in ("x", "label")}
        stacked = jax.device_put(stacked, batch_sharding)
        state = fresh_state()
        compiled, trace_s, cold_s, cached_s = compile_seconds(train_steps, state, stacked)
        state, metrics = compiled(state, stacked)  # warm-up

        def call(compiled=compiled, stacked=stacked):
            nonlocal state
            state, metrics = compiled(state, stacked)
            return metrics

        wall_s, cpu_s = median_time(call, FLAGS.calls)
        per_step[n] = wall_s / n
        print(
            f"| {n} | {trace_s:.1f} | {cold_s:.1f} | {cached_s:.2f} | {1e3 * wall_s / n:.1f} "
            f"({1e3 * cpu_s / n:.0f}) | {training.batch_size * n / wall_s:,.0f} "
            f"| {training.n_iters * wall_s / n / 60:.1f} min |",
            flush=True,
        )

    # --- The network alone: forward + backward on the same global batch ------------------
    params = state.params
    x = jax.device_put(jnp.asarray(local[0]["x"]), NamedSharding(mesh, P("data")))
    labels = jnp.asarray(local[0]["label"]) if conditional else None
    time_cond = jnp.full((training.batch_size,), 0.5)

    @jax.jit
    def forward_backward(params, x, key):
        def sum_of_squares(params):
            output = model.apply(
                {"params": params}, x, time_cond, y=labels, train=True, rngs={"dropout": key}
            )
            return jnp.sum(output.astype(jnp.float32) ** 2)

        return jax.grad(sum_of_squares)(params)

    key = jax.random.key(1)
    jax.block_until_ready(forward_backward(params, x, key))
    network_s, network_cpu_s = median_time(lambda: forward_backward(params, x, key), FLAGS.calls)
    best_n = max(per_step)
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    device_peak = (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use")
    rows = [
        (
            "network forward+backward",
            f"{1e3 * network_s:.1f} ms (CPU {1e3 * network_cpu_s:.0f} ms)",
        ),
        (
            f"step / network ({best_n} steps per call)",
            f"{per_step[best_n] / network_s:.3f} (target <= 1.10)",
        ),
        ("parameters", f"{count_parameters(params):,}"),
        (
            "peak memory",
            f"{peak_gib:.2f} GiB host RSS"
            + ("" if device_peak is None else f", {device_peak / 2**30:.2f} GiB device"),
        ),
        ("final loss", f"{float(jnp.mean(metrics['loss'])):.4f}"),
        ("load average", " ".join(f"{v:.1f}" for v in os.getloadavg())),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


if __name__ == "__main__":
    restart_with_huge_pages()  # glibc's huge pages for XLA's buffers: host_memory's docstring
    app.run(main)
