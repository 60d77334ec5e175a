"""The command line under bad input and faults: one line and status 2 for a user error,
a full disk, two runs on one workdir, metrics.jsonl cut by a kill, a quiet normal run.

Every case runs ``diffusion_sde.main`` as ``python -m`` does, with its argv, exit status
and stderr. The user errors that stop before anything compiles share one interpreter
start-up (:data:`FORK_RUNNER`: JAX imported once, then one forked child per command
line), which saves the 3-10 s that importing JAX costs each on this machine; the runs
that train are separate ``python -m diffusion_sde.main`` processes.
"""

import contextlib
import errno
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import threading

import numpy as np
import pytest

from configs import digits_vp, toy_2d_vp
from diffusion_sde import errors, sampling
from diffusion_sde.compilation_cache import compilation_cache_directory
from diffusion_sde.sde import get_sde
from diffusion_sde.training import checkpoint, checks, workdir

ROOT = pathlib.Path(__file__).parents[1]
TOY = "--config=configs/toy_2d_vp.py"
TINY = [
    "--config.model.nf=16",
    "--config.model.num_layers=1",
    "--config.training.batch_size=64",
    "--config.training.n_jitted_steps=1",
    "--config.training.snapshot_sampling=False",
    "--config.training.snapshot_freq=10",
    "--config.training.snapshot_freq_for_preemption=10",
    "--config.training.log_freq=5",
    "--config.training.eval_freq=10",
    "--config.training.snapshot_num_samples=16",
    "--config.sampling.num_steps=25",
]


def run_main(*args, prefix=("-m", "diffusion_sde.main"), timeout=300):
    # os.environ holds conftest's XLA_FLAGS: the run compiles as the suite does.
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(compilation_cache_directory()))
    return subprocess.run(
        [sys.executable, *prefix, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def train_main(workdir_path, n_iters, *extra, prefix=("-m", "diffusion_sde.main")):
    return run_main(
        TOY,
        f"--workdir={workdir_path}",
        *TINY,
        f"--config.training.n_iters={n_iters}",
        *extra,
        prefix=prefix,
    )


def assert_user_error(result, *fragments):
    """Status 2, and stderr is one line ``error: ...`` holding every fragment."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def train_records(path):
    lines = pathlib.Path(path).read_text().splitlines()
    records = [json.loads(line) for line in lines]  # every line is JSON
    return [r["step"] for r in records if "loss" in r]


# --- User errors that stop before anything compiles -------------------------------------


CASES = {
    "config file that does not exist": (
        ["--config=configs/digit_vp.py", "--workdir={tmp}/w"],
        ["cannot load the config file", "did you mean 'configs/digits_vp.py'"],
    ),
    "misspelt override": (
        [TOY, "--workdir={tmp}/w", "--config.training.batchsize=3"],
        ["--config.training.batchsize", "no field 'batchsize'", "did you mean 'batch_size'"],
    ),
    "misspelt group": (
        [TOY, "--workdir={tmp}/w", "--config.trainin.batch_size=3"],
        ["no field 'trainin'", "did you mean 'training'"],
    ),
    "override of the wrong type": (
        [TOY, "--workdir={tmp}/w", "--config.training.batch_size=abc"],
        ["--config.training.batch_size=abc", "invalid literal for int()"],
    ),
    "misspelt mode": (
        [TOY, "--workdir={tmp}/w", "--mode=evall"],
        ["--mode=evall", "did you mean 'eval'"],
    ),
    "no workdir": ([TOY], ["--workdir"]),
    "batch size 0": (
        [TOY, "--workdir={tmp}/w", "--config.training.batch_size=0"],
        ["training.batch_size=0 must be a positive integer"],
    ),
    "unknown SDE": (
        [TOY, "--workdir={tmp}/w", "--config.training.sde=vpsd"],
        [
            "training.sde='vpsd'",
            "did you mean 'vpsde'",
            "valid: cosine, edm, rectified_flow, subvpsde, vesde, vpsde",
        ],
    ),
    "eval on an empty workdir": (
        [TOY, "--workdir={tmp}/empty", "--mode=eval"],
        ["No readable checkpoint", "train first with --mode=train"],
    ),
    "sample on a workdir that does not exist": (
        [TOY, "--workdir={tmp}/missing", "--mode=sample"],
        ["No readable checkpoint"],
    ),
    "workdir that is a file": (
        [TOY, "--workdir={tmp}/a_file"],
        ["is a file, not a directory"],
    ),
    "image size the network cannot take": (
        [
            "--config=configs/digits_vp.py",
            "--workdir={tmp}/w",
            "--config.model.ch_mult=(1,2,2,2,2)",
        ],
        ["cannot take data of shape (8, 8, 1)", "must be a multiple of 16"],
    ),
    "conditional model on unlabelled data": (
        [TOY, "--workdir={tmp}/w", "--config.model.num_classes=3"],
        ["model.num_classes=3", "has no class labels"],
    ),
}


FORK_RUNNER = """
import json, os, runpy, sys
sys.path.insert(0, "")
import jax, absl.app, ml_collections  # the start-up every case shares
from diffusion_sde import errors
from diffusion_sde.evaluation import evaluate
from diffusion_sde.training import loop
results = []
for argv, err_path in json.loads(sys.argv[1]):
    pid = os.fork()
    if pid == 0:
        fd = os.open(err_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(fd, 2)
        sys.argv = ["diffusion_sde/main.py", *argv]
        try:
            runpy.run_module("diffusion_sde.main", run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as exit:
            code = exit.code if isinstance(exit.code, int) else 1
        except BaseException:
            import traceback
            traceback.print_exc()
            code = 1
        sys.stderr.flush()
        os._exit(code)
    results.append(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def user_errors(tmp_path_factory):
    """Every case of :data:`CASES` (and a config file with a syntax error) run once."""
    tmp = tmp_path_factory.mktemp("user_errors")
    (tmp / "empty").mkdir()
    (tmp / "a_file").write_text("")
    (tmp / "broken.py").write_text("def get_config(:\n    pass\n")
    cases = {name: [arg.format(tmp=tmp) for arg in args] for name, (args, _) in CASES.items()}
    cases["syntax error"] = [f"--config={tmp}/broken.py", f"--workdir={tmp}/w"]
    cases["debug"] = [TOY, f"--workdir={tmp}/w", "--config.training.sde=vpsd", "--debug"]
    jobs = [(argv, str(tmp / f"stderr_{i}")) for i, argv in enumerate(cases.values())]
    runner = run_main(json.dumps(jobs), prefix=("-c", FORK_RUNNER))
    assert runner.returncode == 0, runner.stderr[-3000:]
    codes = json.loads(runner.stdout.splitlines()[-1])
    results = {
        name: subprocess.CompletedProcess(argv, code, "", pathlib.Path(err).read_text())
        for name, (argv, err), code in zip(cases, jobs, codes, strict=True)
    }
    return tmp, results


@pytest.mark.parametrize("case", list(CASES))
def test_user_error_is_one_line_with_status_2(user_errors, case):
    tmp, results = user_errors
    assert_user_error(results[case], *CASES[case][1])
    assert not (tmp / "w" / "checkpoints").exists()


def test_syntax_error_in_a_config_file(user_errors):
    tmp, results = user_errors
    assert_user_error(
        results["syntax error"], f"syntax error in the config file {tmp}/broken.py, line 1"
    )


def test_a_user_error_through_python_m(tmp_path):
    """The same as the forked cases, in a process of its own."""
    assert_user_error(
        run_main(TOY, f"--workdir={tmp_path}", "--config.training.sde=vpsd"),
        "training.sde='vpsd'",
        "did you mean 'vpsde'",
    )


def test_debug_shows_the_traceback_of_a_user_error(user_errors):
    result = user_errors[1]["debug"]
    assert result.returncode != 0 and "Traceback" in result.stderr
    assert "ConfigError: training.sde='vpsd'" in result.stderr


def test_a_bug_keeps_its_traceback():
    assert errors.as_user_error(TypeError("unsupported operand")) is None
    assert errors.as_user_error(KeyError("params")) is None
    assert errors.as_user_error(ValueError("not one of ours")) is None
    full = OSError(errno.ENOSPC, "No space left on device", "/run/metrics.jsonl")
    assert "writing /run/metrics.jsonl" in str(errors.as_user_error(full))


@pytest.fixture
def read_only_directory(tmp_path):
    """A directory this process cannot write: chmod for a user, a read-only tmpfs for root."""
    path = tmp_path / "read_only"
    path.mkdir()
    if os.geteuid() != 0:
        path.chmod(0o555)
        yield path
        path.chmod(0o755)
        return
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(path)])
    if mounted.returncode != 0:
        pytest.skip("running as root without permission to mount a read-only tmpfs")
    yield path
    subprocess.run(["umount", str(path)], check=True)


def test_read_only_workdir(read_only_directory):
    assert_user_error(
        run_main(TOY, f"--workdir={read_only_directory}/run"),
        f"--workdir={read_only_directory}/run cannot be written",
    )


# --- Every name a config chooses, checked with the nearest valid name -----------------


@pytest.mark.parametrize(
    "field,value,suggestion",
    [
        ("data.dataset", "swissroll", "swiss_roll"),
        ("model.name", "mpl", "mlp"),
        ("training.sde", "subvp_sde", "subvpsde"),
        ("sampling.predictor", "euler_maruyam", "euler_maruyama"),
        ("sampling.corrector", "langvin", "langevin"),
        ("optim.optimizer", "adm", "adam"),
    ],
)
def test_unknown_names_suggest_the_nearest(field, value, suggestion):
    config = toy_2d_vp.get_config()
    group, name = field.split(".")
    config[group][name] = value
    with pytest.raises(errors.ConfigError, match=f"did you mean '{suggestion}'") as error:
        checks.check_config(config)
    assert isinstance(error.value, ValueError) and "valid: " in str(error.value)


def test_unknown_ode_method_and_time_grid():
    config = digits_vp.get_config()
    config.sampling.method = "ode"
    config.sampling.ode_method = "dpm_solver3"
    with pytest.raises(errors.ConfigError, match="did you mean 'dpm_solver_3'"):
        checks.check_config(config)
    config.sampling.ode_method = "heun"
    config.sampling.time_grid = "karas"
    with pytest.raises(errors.ConfigError, match="did you mean 'karras'"):
        checks.check_config(config)


def test_the_sampling_methods_checked_are_those_get_sampler_takes():
    """checks.check_config lists the methods itself (to suggest the nearest); they must be
    exactly those sampling.get_sampler accepts."""
    config = digits_vp.get_config()
    config.sampling.method = "bogus"
    with pytest.raises(errors.ConfigError, match="sampling.method='bogus'") as checked:
        checks.check_config(config)
    listed = re.search(r"valid: (.*)\.$", str(checked.value))[1].split(", ")
    sde = get_sde(config)
    with pytest.raises(ValueError, match="Unknown sampling.method") as built:
        sampling.get_sampler(config.sampling, sde, (1, 8, 8, 1))
    assert sorted(re.findall(r"'(\w+)'", str(built.value).split("valid:")[1])) == listed
    for method in listed:
        config.sampling.method = method
        sampling.get_sampler(config.sampling, sde, (1, 8, 8, 1))


def test_the_shipped_configs_pass_the_check():
    for module in (toy_2d_vp, digits_vp):
        checks.check_config(module.get_config())


# --- Two runs on one workdir; a trained workdir for the tests after -------------------

HOLD_LOCK = """
import sys, time
from diffusion_sde.training.workdir import RunLock
RunLock(sys.argv[1]).__enter__()
print("held", flush=True)
time.sleep(600)
"""


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A workdir trained to step 20 through the command line, after a second run was
    refused while another process held it, and whose lock, left by that process's
    SIGKILL, the run took over."""
    path = tmp_path_factory.mktemp("trained") / "run"
    path.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(path)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout.readline().strip() == "held"
    refused = train_main(path, 20)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert (path / workdir.LOCK_NAME).exists()  # left behind by the killed holder
    result = train_main(path, 20)
    assert result.returncode == 0, result.stderr[-3000:]
    return {"path": path, "refused": refused, "holder_pid": holder.pid, "train": result}


def test_second_run_on_a_workdir_is_refused_naming_the_first(trained):
    line = assert_user_error(trained["refused"], "is in use by another run")
    assert f"pid {trained['holder_pid']} on {os.uname().nodename}" in line


def test_lock_of_a_dead_run_is_taken_over_and_released(trained):
    assert "Taking over the lock of a run that is gone" in trained["train"].stderr
    assert f"pid {trained['holder_pid']}" in trained["train"].stderr
    assert not (trained["path"] / workdir.LOCK_NAME).exists()  # released at the end
    assert train_records(trained["path"] / "metrics.jsonl") == [5, 10, 15, 20]


def test_lock_in_process(tmp_path):
    with workdir.RunLock(tmp_path):
        record = json.loads((tmp_path / workdir.LOCK_NAME).read_text())
        assert record["pid"] == os.getpid() and record["host"] == os.uname().nodename
        # flock is per open file: a second RunLock, as another process would, is refused.
        with pytest.raises(errors.WorkdirError, match=f"pid {os.getpid()}"):
            workdir.RunLock(tmp_path).__enter__()
    assert not (tmp_path / workdir.LOCK_NAME).exists()
    with workdir.RunLock(tmp_path):  # free again
        pass


def test_normal_run_and_eval_print_no_library_noise(trained):
    noise = ("Unable to initialize backend", "read only", "read_only", "Traceback")
    train_log = trained["train"].stderr
    assert not any(n in train_log for n in noise), train_log[-3000:]
    # The only warning is ours, about the lock the killed process left.
    warnings = re.findall(r"^[WE]\d{4} [\d:. ]+\d+ (\S+):\d+\]", train_log, re.MULTILINE)
    assert warnings == ["workdir.py"], train_log[-3000:]
    result = run_main(
        TOY,
        f"--workdir={trained['path']}",
        *TINY,
        "--mode=sample",
        "--config.eval.num_samples=16",
        "--config.eval.batch_size=16",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert not any(n in result.stderr for n in noise), result.stderr[-3000:]
    assert not re.search(r"^[WE]\d{4} ", result.stderr, re.MULTILINE), result.stderr[-3000:]
    assert (trained["path"] / "eval" / "samples_step_00000020" / "shard_00000.npz").exists()


def test_config_that_does_not_fit_the_checkpoints(trained):
    result = run_main(TOY, f"--workdir={trained['path']}", *TINY, "--config.model.nf=32")
    assert_user_error(result, "do not fit this config's model", "config.json")


def test_metrics_and_partial_checkpoint_of_a_kill_are_repaired_on_resume(trained, tmp_path):
    path = tmp_path / "run"
    shutil.copytree(trained["path"], path)
    metrics = path / "metrics.jsonl"
    # As if killed after logging step 25 (past the checkpoint of step 20), mid-line.
    with metrics.open("a") as f:
        f.write(json.dumps({"step": 25, "loss": 0.5, "grad_norm": 1.0, "steps_per_sec": 1}))
        f.write('\n{"step": 30, "lo')
    # And the folder of a save the kill cut short.
    (path / "checkpoints" / "30.orbax-checkpoint-tmp" / "default").mkdir(parents=True)
    result = train_main(path, 20)  # resumes at step 20: nothing left to train
    assert result.returncode == 0, result.stderr[-3000:]
    assert metrics.read_text().endswith("\n")
    assert train_records(metrics) == [5, 10, 15, 20]
    assert sorted(p.name for p in (path / "checkpoints").iterdir()) == ["10", "20"]


def test_repair_jsonl(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 5, "loss": 1}\n{"step": 10, "eval_loss": 2}\n{"step": 15, "lo')
    assert workdir.repair_jsonl(path) == 1
    assert path.read_text() == '{"step": 5, "loss": 1}\n{"step": 10, "eval_loss": 2}\n'
    assert workdir.repair_jsonl(path, through_step=5) == 1
    assert path.read_text() == '{"step": 5, "loss": 1}\n'
    assert workdir.repair_jsonl(path, through_step=5) == 0


# --- A full disk ----------------------------------------------------------------------


@contextlib.contextmanager
def _mounted_tmpfs(path, size):
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)])


def _resize(path, size):
    subprocess.run(["mount", "-o", f"remount,size={size}", str(path)], check=True)


SKIP_SPACE_CHECK = """
import runpy, sys
sys.path.insert(0, "")
from diffusion_sde.training import checkpoint
checkpoint.checkpoint_bytes = lambda directory, state: 0  # let orbax run into the full disk
runpy.run_module("diffusion_sde.main", run_name="__main__", alter_sys=True)
"""


def _assert_disk_full_reported(result, *fragments):
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith("train:")]  # the progress bar
    errors_lines = [line for line in lines if line.startswith("error: ")]
    assert result.returncode == 2, result.stderr[-3000:]
    assert len(errors_lines) == 1, result.stderr[-3000:]
    for noise in ("Traceback", "Event loop is closed", "shutting down", "RESOURCE_EXHAUSTED"):
        assert noise not in result.stderr, result.stderr[-3000:]
    assert len(lines) <= 3, result.stderr[-3000:]  # the start-up log line(s), the error
    for fragment in fragments:
        assert fragment in errors_lines[0], errors_lines[0]


@pytest.mark.slow
def test_full_disk_stops_at_the_first_failed_save_and_resumes(tmp_path):
    """On a small tmpfs: a save that cannot fit stops the run with one line (checked
    before writing, and, with that check skipped, when orbax runs out of space mid-save);
    the checkpoint before it stays the newest, no partial folder is left, and the same
    command finishes the run once the filesystem is larger."""
    with _mounted_tmpfs(tmp_path / "small", "8m") as mount:
        run = mount / "run"
        first = train_main(run, 10)
        assert first.returncode == 0, first.stderr[-3000:]
        used = shutil.disk_usage(mount).used
        checkpoint = sum(f.stat().st_size for f in (run / "checkpoints" / "10").rglob("*"))
        _resize(mount, (used + checkpoint // 2) // 4096 * 4096)

        checked = train_main(run, 30)
        _assert_disk_full_reported(
            checked, "save the checkpoint of step 20", "checkpoint of step 10 is intact", "free"
        )
        steps = lambda: sorted(p.name for p in (run / "checkpoints").iterdir())
        assert steps() == ["10"]

        unchecked = train_main(run, 30, prefix=("-c", SKIP_SPACE_CHECK))
        _assert_disk_full_reported(
            unchecked, "disk filled up while saving the checkpoint of step 20", "removed"
        )
        assert steps() == ["10"]  # no *.orbax-checkpoint-tmp left
        assert not (run / workdir.LOCK_NAME).exists()

        _resize(mount, "8m")
        resumed = train_main(run, 30)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert steps() == ["10", "20", "30"]
        assert train_records(run / "metrics.jsonl") == [5, 10, 15, 20, 25, 30]


class _FailingManager:
    """A checkpoint manager whose save writes a partial folder, has a writer thread fail,
    and then raises as orbax does on a full disk."""

    def __init__(self, directory):
        self.directory = directory

    def save(self, step, args, force=False):
        (self.directory / f"{step}.orbax-checkpoint-tmp" / "default").mkdir(parents=True)
        message = (
            'RESOURCE_EXHAUSTED: Failed to write: No space left on device [os_error_code="28"]'
        )

        def writer():
            raise ValueError(message)

        thread = threading.Thread(target=writer)
        thread.start()
        thread.join()
        # As TensorStore's callbacks print it, straight to sys.stderr.
        sys.stderr.write('Traceback (most recent call last):\n  File "asyncio/base_events.py"')
        sys.stderr.write("\nRuntimeError: Event loop is closed\n")
        raise ValueError(message)

    def wait_until_finished(self):
        pass


def test_failed_save_removes_the_partial_checkpoint_quietly(tmp_path, capfd):
    directory = tmp_path / "checkpoints"
    (directory / "10").mkdir(parents=True)
    (directory / "10" / "data").write_bytes(b"0" * 1000)
    previous_hook, stderr = threading.excepthook, sys.stderr
    try:
        with pytest.raises(errors.DiskFullError, match="step 20.*step 10 is intact"):
            checkpoint.save_checkpoint(
                _FailingManager(directory), 20, {"x": np.zeros(4)}, last_step=10
            )
        print("after the failure", file=sys.stderr)
    finally:
        threading.excepthook, sys.stderr = previous_hook, stderr
    assert sorted(p.name for p in directory.iterdir()) == ["10"]
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Event loop" not in err
    assert "after the failure" in err


def test_space_is_checked_before_saving(tmp_path, monkeypatch):
    directory = tmp_path / "checkpoints"
    (directory / "10").mkdir(parents=True)
    (directory / "10" / "data").write_bytes(b"0" * 200_000)
    needed = checkpoint.checkpoint_bytes(directory, None)
    assert needed == int(200_000 * 1.05) + 64 * 1024  # the newest checkpoint's size

    class Usage:
        free = needed - 1

    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage)
    manager = _FailingManager(directory)
    expected = rf"needs about {needed / 1024:.1f} KiB, {(needed - 1) / 1024:.1f} KiB free"
    with pytest.raises(errors.DiskFullError, match=rf"{expected}\. Stopped before writing"):
        checkpoint.save_checkpoint(manager, 20, None, last_step=10)
    assert sorted(p.name for p in directory.iterdir()) == ["10"]  # nothing written
    # Without a checkpoint yet, the state's own bytes.
    (directory / "10" / "data").unlink()
    (directory / "10").rmdir()
    state = {"a": np.zeros(1000, np.float32), "b": np.zeros(10, np.int32)}
    assert checkpoint.checkpoint_bytes(directory, state) == int(4040 * 1.05) + 64 * 1024
