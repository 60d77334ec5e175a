r"""Benchmark of a config's training step, as ``train.py`` runs it.

For a config file it builds the state, the loss the config asks for and the jitted call of
``training.n_jitted_steps`` optimisation steps (``lax.scan``, state donated, the batch
sharded over every device), then prints the compile time, seconds per step, images (or
points) per second, the parameter count and the peak memory, and an estimate of the
wall time of ``training.n_iters`` steps.

Usage::

    python experiments/benchmarks/train_step.py --config=configs/digits_vp.py
    python experiments/benchmarks/train_step.py --config=configs/toy_2d_vp.py \
        --config.training.batch_size=512
    python experiments/benchmarks/train_step.py \
        --config=configs/cifar10_ddpmpp_continuous_vp.py:small --calls=5

Timings are medians over ``--calls`` calls after the first (compiling) one; the load
average is printed with them, since a shared machine makes them noisy.
"""

from __future__ import annotations

import os
import pathlib
import resource
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from ml_collections import config_flags

from diffusion_sde import data as data_lib
from diffusion_sde import losses, train
from diffusion_sde.models import count_parameters, get_model
from diffusion_sde.sde import get_sde

# Config files import their defaults as ``configs.*``, from the repository root.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))
config_flags.DEFINE_config_file("config", None, "Training configuration.", lock_config=True)
flags.DEFINE_integer("calls", 10, "Timed calls of the jitted n-step function.")
flags.mark_flags_as_required(["config"])
FLAGS = flags.FLAGS


def main(argv):
    del argv
    config = FLAGS.config
    training = config.training
    n_jitted = int(training.n_jitted_steps)
    mesh = Mesh(np.asarray(jax.devices()), ("data",))
    replicated = NamedSharding(mesh, P())
    batch_sharding = NamedSharding(mesh, P(None, "data"))

    sde, model = get_sde(config), get_model(config.model)
    optimizer = train.get_optimizer(config.optim)
    data_shape = data_lib.data_shape(config.data)
    conditional = config.model.get("num_classes", 0) > 0
    state = train.create_train_state(
        jax.random.PRNGKey(config.seed),
        model=model,
        optimizer=optimizer,
        data_shape=data_shape,
        conditional=conditional,
    )
    state = jax.device_put(state, replicated)
    loss_fn = losses.get_loss_fn(
        sde,
        model,
        continuous=training.continuous,
        reduce_mean=training.reduce_mean,
        likelihood_weighting=training.likelihood_weighting,
        label_dropout=training.get("label_dropout", 0.0),
    )
    step_fn = losses.get_step_fn(loss_fn, optimizer, config.model.ema_rate)

    def train_steps(state, batches):
        return jax.lax.scan(step_fn, state, batches)

    train_steps = jax.jit(
        train_steps,
        in_shardings=(replicated, batch_sharding),
        out_shardings=(replicated, replicated),
        donate_argnums=0,
    )
    # The real data pipeline's batches, so the benchmark sees real shapes and dtypes.
    batches = data_lib.get_dataset(
        config.data, batch_size=training.batch_size, split="train", seed=config.seed
    )
    local = [next(batches) for _ in range(n_jitted)]
    stacked = {k: np.stack([b[k] for b in local]) for k in ("x", "label")}
    stacked = jax.device_put(stacked, batch_sharding)

    start = time.perf_counter()
    state, metrics = train_steps(state, stacked)
    jax.block_until_ready(metrics)
    compile_and_first = time.perf_counter() - start
    times = []
    for _ in range(FLAGS.calls):
        start = time.perf_counter()
        state, metrics = train_steps(state, stacked)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    per_call = statistics.median(times)
    per_step = per_call / n_jitted
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    rows = [
        ("config", f"{config.data.dataset}, {training.sde}, model {config.model.name}"),
        ("devices", f"{jax.device_count()} x {jax.devices()[0].platform}"),
        ("parameters", f"{count_parameters(state.params):,}"),
        ("batch", f"{training.batch_size} x {data_shape}, {n_jitted} steps per call"),
        ("compile + first call", f"{compile_and_first:.1f} s"),
        ("time per step", f"{per_step * 1e3:.1f} ms (median of {FLAGS.calls} calls)"),
        ("steps/s", f"{1 / per_step:.2f}"),
        ("examples/s", f"{training.batch_size / per_step:,.0f}"),
        ("n_iters at this speed", f"{training.n_iters * per_step / 60:.1f} min"),
        ("peak memory (RSS)", f"{peak_gib:.2f} GiB"),
        ("load average", " ".join(f"{v:.1f}" for v in os.getloadavg())),
        ("final loss", f"{float(jnp.mean(metrics['loss'])):.4f}"),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


if __name__ == "__main__":
    app.run(main)
