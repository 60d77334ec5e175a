"""Test set-up: 8 simulated CPU devices, quick compilation and the persistent compilation cache.

All must be configured before JAX initialises its backend, hence at import time. XLA's CPU
backend compiles at LLVM optimisation level 0 (``XLA_FLAGS``, which the processes the tests
start inherit): the suite's programs are small and mostly run once, so compiling is most of
their time, and at level 0 it is about 1.5x quicker while the results agree with the default
level's to float32 round-off, well inside every test's tolerance. The few programs whose
running time dominates (long Monte-Carlo simulations, the digits notebook's samplers) are
compiled at the default level instead: the fixtures ``optimised_jit`` and
``optimised_xla_flags``. The cache is the one every entry point uses
(``$JAX_COMPILATION_CACHE_DIR``, else ``~/.cache/diffusion_sde/jax``): outside the checkout,
so that a CI job that keeps that folder between its runs compiles each program once.
The trained digits feature classifier is shared by every test (and every pytest-xdist
worker) that needs one: ``trained_digits_classifier``. The modules with the longest tests
run first (``LONG_MODULES_FIRST``), so that the two workers end on short tests together.
"""

import fcntl
import functools
import os
import pathlib
import shutil

QUICK_COMPILATION = "--xla_backend_optimization_level=0"
# Appended, so that flags already given (e.g. a device count) stay in force.
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {QUICK_COMPILATION}"

import jax  # noqa: E402
import pytest  # noqa: E402

from diffusion_sde.compilation_cache import enable_compilation_cache  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
enable_compilation_cache()


# The modules whose tests take longest (a notebook, a training run: 15-65 s each on 2 cores),
# in decreasing order of their total time; the others follow in their usual order. With
# pytest-xdist each worker takes the next test when it is free, so when these ran last
# (alphabetically) one worker still ran a long test while the other had finished: 62 s of
# a 9 min 12 s run on 2026-12-07. Whole modules move, so their module fixtures are built once.
LONG_MODULES_FIRST = (
    "test_notebooks.py",
    "test_train.py",
    "test_fast_solvers.py",
    "test_pretrained.py",
    "test_ncsnpp.py",
    "test_models.py",
)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONG_MODULES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: keeps the rest


@pytest.fixture
def optimised_jit():
    """``jax.jit`` at XLA's default backend optimisation level (2), for the few test programs
    whose running time, not their compilation, dominates (Monte-Carlo simulations of 40,000
    paths over 2,000 steps run about 5x faster than at the suite's level 0). The program's
    ``compiler_options`` take precedence over ``XLA_FLAGS``."""
    return functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 2})


@pytest.fixture
def optimised_xla_flags():
    """The suite's ``XLA_FLAGS`` without level 0, for a process a test starts (a notebook
    kernel) whose running time dominates its compilation: the digits notebook's guided
    sampler runs 18x slower at level 0."""
    # Stripped: XLA reads an XLA_FLAGS that does not start with "--" as a file name.
    return os.environ["XLA_FLAGS"].replace(QUICK_COMPILATION, "").strip()


DIGITS_CLASSIFIER_FILE = "digits_classifier_v1.msgpack"


@pytest.fixture(scope="session")
def trained_digits_classifier(tmp_path_factory):
    """A directory holding the trained digits feature classifier, trained once per test run.

    The directory is shared by the pytest-xdist workers (the parent of their base temporary
    directories) and trained under a file lock by the first worker that asks. It starts with
    an unreadable cache file, which the training replaces. Tests read it, never write it:
    copy the file (``copy_digits_classifier``) into a test's own cache to change anything.
    """
    from diffusion_sde.evaluation import feature_nets

    base = tmp_path_factory.getbasetemp()
    if "PYTEST_XDIST_WORKER" in os.environ:  # base is <this run's temporary folder>/popen-gwN
        base = base.parent
    directory = base / "digits_classifier"
    directory.mkdir(exist_ok=True)
    with open(directory.parent / "digits_classifier.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not (directory / "trained").exists():
                (directory / DIGITS_CLASSIFIER_FILE).write_bytes(b"not msgpack")
                feature_nets.load_classifier("digits", cache_directory=directory)
                (directory / "trained").touch()
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return directory


@pytest.fixture
def copy_digits_classifier(trained_digits_classifier):
    """``copy(directory)``: puts the trained digits classifier into a cache ``directory``."""

    def copy(directory):
        directory = pathlib.Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        shutil.copy(trained_digits_classifier / DIGITS_CLASSIFIER_FILE, directory)
        return directory

    return copy
