"""Training end to end: sharding, multi-process, resume after SIGKILL, outputs, bad configs."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from configs import toy_2d_vp
from diffusion_sde import compilation_cache
from diffusion_sde.compilation_cache import compilation_cache_directory, compiler_options
from diffusion_sde.evaluation import evaluate
from diffusion_sde.models import get_model
from diffusion_sde.models.convolution import conv2d
from diffusion_sde.sde import get_sde
from diffusion_sde.training import checkpoint, loop
from diffusion_sde.training import state as state_lib
from diffusion_sde.training import step as step_lib

ROOT = pathlib.Path(__file__).parents[1]


def tiny_config(**training):
    config = toy_2d_vp.get_config()
    config.model.nf = 16
    config.model.num_layers = 1
    config.training.update(
        batch_size=64,
        n_iters=20,
        n_jitted_steps=5,
        snapshot_freq=10,
        snapshot_freq_for_preemption=10,
        log_freq=5,
        eval_freq=10,
        snapshot_num_samples=16,
    )
    config.training.update(training)
    config.sampling.num_steps = 25
    return config


TINY_OVERRIDES = [
    "--config.model.nf=16",
    "--config.model.num_layers=1",
    "--config.training.batch_size=64",
    "--config.training.n_jitted_steps=5",
    "--config.training.snapshot_freq_for_preemption=10",
    "--config.training.log_freq=5",
    "--config.training.eval_freq=10",
    "--config.training.snapshot_num_samples=16",
    "--config.sampling.num_steps=25",
]


def test_one_step_on_eight_devices_equals_one_device():
    assert jax.device_count() == 8
    config = tiny_config()
    config.optim.warmup = 0  # a full-size first step
    sde, model = get_sde(config), get_model(config.model)
    optimizer = state_lib.get_optimizer(config.optim)
    state = state_lib.create_train_state(
        jax.random.PRNGKey(0), model=model, optimizer=optimizer, data_shape=(2,), conditional=False
    )
    step_fn = step_lib.get_step_fn(
        step_lib.get_loss_fn(sde, model, reduce_mean=True), optimizer, 0.9
    )
    batch = {
        "x": jax.random.normal(jax.random.PRNGKey(1), (64, 2)),
        "label": jnp.zeros((64,), jnp.int32),
    }
    results = []
    for devices in (jax.devices()[:1], jax.devices()):
        mesh = Mesh(np.asarray(devices), ("data",))
        replicated, sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
        step = jax.jit(step_fn, in_shardings=(replicated, sharded), out_shardings=replicated)
        results.append(step(jax.device_put(state, replicated), jax.device_put(batch, sharded)))
    (state_1, metrics_1), (state_8, metrics_8) = results
    np.testing.assert_allclose(metrics_1["loss"], metrics_8["loss"], rtol=1e-6)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
        state_1.params,
        state_8.params,
    )
    # The step moved the parameters (the comparison is not between two untouched copies).
    moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), state.params, state_8.params)
    assert max(jax.tree.leaves(moved)) > 1e-4


def _tiny_steps_setup(num_steps: int):
    """``(config, sde, model, optimizer, state, batches, step_fn)`` of ``tiny_config`` (no
    warm-up) with ``num_steps`` batches of 64 stacked."""
    config = tiny_config()
    config.optim.warmup = 0
    sde, model = get_sde(config), get_model(config.model)
    optimizer = state_lib.get_optimizer(config.optim)
    state = state_lib.create_train_state(
        jax.random.PRNGKey(0), model=model, optimizer=optimizer, data_shape=(2,), conditional=False
    )
    batches = {
        "x": jax.random.normal(jax.random.PRNGKey(1), (num_steps, 64, 2)),
        "label": jnp.zeros((num_steps, 64), jnp.int32),
    }
    step_fn = step_lib.get_step_fn(
        step_lib.get_loss_fn(sde, model, reduce_mean=config.training.reduce_mean),
        optimizer,
        config.model.ema_rate,
    )
    return config, sde, model, optimizer, state, batches, step_fn


def test_train_steps_equal_a_scan_of_the_step_over_eight_devices():
    """``get_train_steps`` (steps written out on CPU, sharded over 8 devices) computes what a
    plain ``lax.scan`` of the step computes on one device: same losses, same parameters."""
    config, sde, model, optimizer, state, batches, step_fn = _tiny_steps_setup(3)
    scanned_state, scanned = jax.jit(lambda s, b: jax.lax.scan(step_fn, s, b))(state, batches)
    mesh = Mesh(np.asarray(jax.devices()), ("data",))
    train_steps = step_lib.get_train_steps(config, sde, model, optimizer, mesh)
    copy = jax.device_put(jax.tree.map(jnp.copy, state), NamedSharding(mesh, P()))
    new_state, metrics = train_steps(copy, batches)
    assert metrics["loss"].shape == (3,) and int(new_state.step) == 3
    np.testing.assert_allclose(metrics["loss"], scanned["loss"], rtol=1e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
        (new_state.params, new_state.ema_params),
        (scanned_state.params, scanned_state.ema_params),
    )
    assert not np.allclose(metrics["loss"][0], metrics["loss"][2])  # three different steps


def test_training_step_compiles_at_llvm_level_1_on_cpu_and_computes_the_same(monkeypatch):
    """On CPU the training step and the state's creation compile at LLVM optimisation level
    1 with the memory-optimised scheduler (``compiler_options``); an option that
    ``XLA_FLAGS`` sets wins, as this suite's level 0 does. A step compiled so computes what
    the suite's compiles."""
    memory_optimised = {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}
    assert compiler_options("cpu") == memory_optimised  # the suite's XLA_FLAGS set level 0
    assert compiler_options("gpu") is None and compiler_options("tpu") is None
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    both = {"xla_backend_optimization_level": 1, **memory_optimised}
    assert compiler_options("cpu") == both and compiler_options("gpu") is None
    flags = "--xla_backend_optimization_level=0 --xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_DEFAULT"
    monkeypatch.setenv("XLA_FLAGS", flags)
    assert compiler_options("cpu") is None
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")  # both options
    config, sde, model, optimizer, state, batches, step_fn = _tiny_steps_setup(1)
    mesh = Mesh(np.asarray(jax.devices()[:1]), ("data",))
    # The step hands the options to XLA, which refuses a name it does not know.
    with monkeypatch.context() as patch:
        patch.setattr(step_lib, "compiler_options", lambda platform: {"xla_no_such_option": 1})
        wrong = step_lib.get_train_steps(config, sde, model, optimizer, mesh)
        with pytest.raises(Exception, match="No such compile option"):
            wrong(jax.tree.map(jnp.copy, state), batches)
    train_steps = step_lib.get_train_steps(config, sde, model, optimizer, mesh)
    new_state, metrics = train_steps(jax.tree.map(jnp.copy, state), batches)
    expected_state, expected = jax.jit(step_fn)(state, jax.tree.map(lambda b: b[0], batches))
    np.testing.assert_allclose(metrics["loss"][0], expected["loss"], rtol=1e-6)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
        new_state.params,
        expected_state.params,
    )


def test_memory_optimised_scheduler_keeps_fewer_bytes_of_a_winograd_gradient():
    """What the scheduler of ``compiler_options`` is for: the gradient of two residual
    Winograd F(4x4, 3x3) convolutions (32 channels, 16 px) keeps at least 20% fewer
    temporary bytes alive than under XLA:CPU's default scheduler (measured: 0.51 against
    0.78 MiB; EDM's DDPM++ training step 1.58 against 2.05 GiB)."""
    option = "xla_cpu_scheduler_type"
    chosen = compilation_cache.CPU_COMPILER_OPTIONS[option]

    def loss(kernels, x):
        for kernel in kernels:
            x = x + jax.nn.silu(conv2d(x, kernel, conv_impl="winograd4"))
        return jnp.sum(x**2)

    kernels = [0.05 * jax.random.normal(jax.random.PRNGKey(i), (3, 3, 32, 32)) for i in range(2)]
    x = jax.random.normal(jax.random.PRNGKey(9), (1, 16, 16, 32))
    temp = {
        scheduler: jax.jit(jax.grad(loss), compiler_options={option: scheduler})
        .lower(kernels, x)
        .compile()
        .memory_analysis()
        .temp_size_in_bytes
        for scheduler in ("CPU_SCHEDULER_TYPE_DEFAULT", chosen)
    }
    assert temp[chosen] <= 0.8 * temp["CPU_SCHEDULER_TYPE_DEFAULT"], temp


def test_train_and_evaluate_writes_its_workdir(tmp_path):
    config = tiny_config()
    state = loop.train_and_evaluate(config, tmp_path)
    assert int(state.step) == 20
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == [
        "10",
        "20",
    ]
    assert (tmp_path / "samples" / "step_00000020.png").stat().st_size > 1000
    samples = np.load(tmp_path / "samples" / "step_00000020.npz")["samples"]
    assert samples.shape == (16, 2) and np.all(np.isfinite(samples))
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_records] == [5, 10, 15, 20]
    assert all(np.isfinite(r["loss"]) and r["steps_per_sec"] > 0 for r in train_records)
    assert any("eval_loss" in r for r in records)
    assert json.loads((tmp_path / "config.json").read_text())["training"]["n_iters"] == 20
    assert list((tmp_path / "tensorboard").iterdir())
    # Running the same command again finds the run complete and changes nothing.
    again = loop.train_and_evaluate(config, tmp_path)
    jax.tree.map(np.testing.assert_array_equal, state.params, again.params)

    # --mode=eval: two passes over two batches, resumable batch by batch.
    config.eval.update(batch_size=64, bpd_num_batches=2, bpd_num_passes=2)
    result = evaluate.evaluate(config, tmp_path)["bpd"]
    assert result["unit"] == "nats_per_dim" and result["num_examples"] == 128
    assert len(result["pass_means"]) == 2 and result["pass_means"][0] != result["pass_means"][1]
    np.testing.assert_allclose(np.mean(result["pass_means"]), result["mean"], rtol=1e-6)
    assert 0 < result["standard_error"] < 1 and np.isfinite(result["mean"])
    cache = tmp_path / "eval" / "bpd_step_00000020"
    saved = sorted(cache.glob("pass_*.npz"))
    assert len(saved) == 4 and json.loads(cache.with_suffix(".json").read_text()) == result
    kept_mtime = saved[0].stat().st_mtime_ns
    saved[-1].unlink()  # as if killed before the last batch
    assert evaluate.evaluate(config, tmp_path)["bpd"] == result
    assert saved[0].stat().st_mtime_ns == kept_mtime and saved[-1].exists()

    # A sweep over snapshots 1..3 (steps 10, 20, 30 at snapshot_freq 10): the two that
    # exist, one row each in eval/results.jsonl; none in range is an error naming the steps.
    config.eval.update(begin_ckpt=1, end_ckpt=3, bpd_num_batches=1, bpd_num_passes=1)
    rows = evaluate.evaluate(config, tmp_path)["rows"]
    assert [(row["step"], row["ckpt"]) for row in rows] == [(10, 1), (20, 2)]
    written = [json.loads(line) for line in (tmp_path / "eval" / "results.jsonl").open()]
    assert written == rows and all(np.isfinite(row["nats_per_dim"]) for row in rows)
    config.eval.update(begin_ckpt=4, end_ckpt=5)
    with pytest.raises(FileNotFoundError, match=r"steps 40\.\.50.*has the steps \[10, 20\]"):
        evaluate.evaluate(config, tmp_path)


def test_non_finite_loss_stops_with_step_range_and_keeps_checkpoint(tmp_path):
    config = tiny_config(n_iters=20)
    loop.train_and_evaluate(config, tmp_path)  # a good checkpoint at step 20
    bad = tiny_config(n_iters=40)
    bad.optim.lr = 1e30
    with pytest.raises(FloatingPointError, match=r"steps \d+\.\.\d+.*step 20"):
        loop.train_and_evaluate(bad, tmp_path)
    steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert steps[-1] == 20


def test_corrupt_latest_checkpoint_falls_back_and_is_kept(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a relative workdir, as `make run` passes it
    config = tiny_config(n_iters=20)
    finished = loop.train_and_evaluate(config, "run")
    for path in (tmp_path / "run" / "checkpoints" / "20").rglob("*"):
        if path.is_file() and path.stat().st_size > 0:
            path.write_bytes(b"garbage")
    resumed = loop.train_and_evaluate(config, "run")  # restores 10, retrains 10..20
    jax.tree.map(np.testing.assert_array_equal, finished.params, resumed.params)
    assert len(list((tmp_path / "run" / "checkpoints_unreadable").iterdir())) == 1


def test_checkpoint_of_another_config_is_refused_not_overwritten(tmp_path):
    loop.train_and_evaluate(tiny_config(n_iters=10), tmp_path)
    other = tiny_config(n_iters=20)
    other.model.nf = 32
    with pytest.raises(ValueError, match="do not fit this config"):
        loop.train_and_evaluate(other, tmp_path)
    assert (tmp_path / "checkpoints" / "10").exists()


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("training.sde", "vpsd", "valid"),
        ("model.name", "unet9", "valid"),
        ("sampling.predictor", "heun_ish", "valid"),
        ("data.dataset", "cifar100000", "valid"),
        ("training.batch_size", 60, "does not divide over 8 devices"),
        ("training.label_dropout", 0.1, "needs a class-conditional model"),
        ("model.num_classes", 3, "has no class labels"),
        ("sampling.num_steps", 10, "too small for the DDPM chain"),
    ],
)
def test_bad_configs_fail_at_start_up(tmp_path, field, value, message):
    config = tiny_config()
    group, name = field.split(".")
    config[group][name] = value
    with pytest.raises(ValueError, match=message):
        loop.train_and_evaluate(config, tmp_path)
    assert not (tmp_path / "checkpoints").exists() or not any(
        p.name.isdigit() for p in (tmp_path / "checkpoints").iterdir()
    )


def _run_main(workdir, n_iters, *, env_extra=None, wait=True):
    command = [
        sys.executable,
        "-m",
        "diffusion_sde.main",
        "--config=configs/toy_2d_vp.py",
        f"--workdir={workdir}",
        f"--config.training.n_iters={n_iters}",
        "--config.training.snapshot_freq=1000",
        *TINY_OVERRIDES,
    ]
    env = dict(
        os.environ,
        JAX_COMPILATION_CACHE_DIR=str(compilation_cache_directory()),
        **(env_extra or {}),
    )
    process = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    if wait:
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr[-3000:]
    return process


def _final_params(workdir):
    """(step, params) of the newest checkpoint, restored as evaluation does."""
    _, _, state = checkpoint.load_trained(tiny_config(), workdir)
    return int(state.step), state.params


def test_resume_after_sigkill_is_bit_identical(tmp_path):
    n_iters = 60
    _run_main(tmp_path / "straight", n_iters)
    killed = tmp_path / "killed"
    process = _run_main(killed, n_iters, wait=False)
    deadline = time.time() + 240
    while time.time() < deadline:
        steps = [p.name for p in (killed / "checkpoints").glob("*") if p.name.isdigit()]
        if any(int(s) >= 20 for s in steps) or process.poll() is not None:
            break
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    _run_main(killed, n_iters)
    (step_a, a), (step_b, b) = _final_params(tmp_path / "straight"), _final_params(killed)
    assert step_a == step_b == n_iters
    jax.tree.map(np.testing.assert_array_equal, a, b)
    # metrics.jsonl stays JSON lines, each step once: the lines the killed run wrote past
    # its checkpoint (or cut) are dropped on resume and written again.
    logged = lambda p: [json.loads(line) for line in (p / "metrics.jsonl").read_text().splitlines()]
    steps = lambda p: [r["step"] for r in logged(p) if "loss" in r]
    assert steps(killed) == steps(tmp_path / "straight") == list(range(5, n_iters + 1, 5))


WORKER = """
import sys, jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.config.update("jax_num_cpu_devices", 2)
jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
sys.argv = sys.argv[:1] + sys.argv[3:]
from absl import app
from diffusion_sde import main
app.run(main.main)
"""


@pytest.mark.slow
def test_two_processes_agree_with_one(tmp_path):
    """Two processes x 2 CPU devices, joined by jax.distributed, each reading half of
    every batch, train as one process with 4 devices does."""
    import portpicker

    port = portpicker.pick_unused_port()
    args = [
        "--config=configs/toy_2d_vp.py",
        "--config.training.n_iters=20",
        "--config.training.snapshot_freq=1000",
        *TINY_OVERRIDES,
    ]
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(compilation_cache_directory()))
    workers = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                WORKER,
                f"localhost:{port}",
                str(rank),
                f"--workdir={tmp_path / 'multi'}",
                *args,
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(2)
    ]
    for worker in workers:
        _, stderr = worker.communicate(timeout=400)
        assert worker.returncode == 0, stderr[-3000:]
    single = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, jax; jax.config.update('jax_num_cpu_devices', 4); "
            "from absl import app; from diffusion_sde import main; app.run(main.main)",
            f"--workdir={tmp_path / 'single'}",
            *args,
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert single.returncode == 0, single.stderr[-3000:]
    (_, a), (_, b) = _final_params(tmp_path / "multi"), _final_params(tmp_path / "single")
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6), a, b)


def test_digits_run_trains_and_evaluates_bpd_and_sample_quality(
    tmp_path, monkeypatch, copy_digits_classifier
):
    """The default run's path (configs/digits_vp.py) end to end at a tiny size (with the
    digits classifier the suite trains once)."""
    from configs import digits_vp

    monkeypatch.setenv("DIFFUSION_SDE_CACHE", str(copy_digits_classifier(tmp_path / "cache")))
    config = digits_vp.get_config()
    config.model.update(nf=8, attn_resolutions=())
    # The config's own steps per call (one), as the default run uses.
    config.training.update(batch_size=32, n_iters=10, snapshot_freq=10, log_freq=5, eval_freq=10)
    config.training.update(snapshot_freq_for_preemption=10, snapshot_num_samples=16)
    config.sampling.num_steps = 25
    config.eval.update(batch_size=64, num_samples=100, bpd_num_batches=1, rtol=1e-3, atol=1e-3)
    loop.train_and_evaluate(config, tmp_path / "run")
    results = evaluate.evaluate(config, tmp_path / "run")
    bpd, quality = results["bpd"], results["sample_quality"]
    # Ten steps of training: a finite bits/dim, far from a trained model's, on the 64
    # examples of one evaluation batch.
    assert bpd["unit"] == "bits_per_dim" and bpd["num_examples"] == 64
    assert 0.5 < bpd["mean"] < 20
    assert quality["num_samples"] == 100 and quality["extractor"] == "digits"
    assert quality["fid"] > 0 and np.isfinite(quality["kid_mean"])
    # The classifier's own logits give an Inception-type score, in [1, number of classes].
    assert 1.0 <= quality["inception_score"] <= 10.0 and quality["rounding"] == "round"
    eval_dir = tmp_path / "run" / "eval"
    assert (eval_dir / "sample_quality_step_00000010.json").exists()
    assert len(list((eval_dir / "samples_step_00000010").glob("shard_*.npz"))) == 2
    assert (eval_dir / "reference_digits_digits.npz").exists()


_CPU_DEVICES_SCRIPT = """
import json, sys, jax
from diffusion_sde.training import loop
results = [loop.use_cpu_devices(7)]  # an odd batch: left as it is
results.append(loop.use_cpu_devices(128))  # two devices
results.append(loop.use_cpu_devices(128))  # chosen already
results.append(len(jax.devices()))
print(json.dumps(results))
"""


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores")
def test_use_cpu_devices_splits_the_cpu_in_two_unless_a_count_was_chosen():
    def run(xla_flags):
        environ = {k: v for k, v in os.environ.items() if k != "JAX_NUM_CPU_DEVICES"}
        environ["XLA_FLAGS"] = xla_flags
        command = [sys.executable, "-c", _CPU_DEVICES_SCRIPT]
        output = subprocess.check_output(command, env=environ, text=True, timeout=120)
        return json.loads(output.splitlines()[-1])

    assert run("--xla_backend_optimization_level=0") == [0, 2, 0, 2]
    assert run("--xla_force_host_platform_device_count=3") == [0, 0, 0, 3]


def test_training_devices_keep_a_large_network_on_one_cpu_device():
    small = {"w": jax.ShapeDtypeStruct((1000, 1000), jnp.float32)}
    large = {"w": jax.ShapeDtypeStruct((loop.CPU_DATA_PARALLEL_MAX_PARAMETERS + 1,), jnp.float32)}
    assert loop.training_devices(small) == jax.devices()  # the suite's 8 CPU devices
    assert loop.training_devices(large) == jax.devices()[:1]
