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
"""

import functools
import os

QUICK_COMPILATION = "--xla_backend_optimization_level=0"
# Appended, so that flags already given (e.g. a device count) stay in force.
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {QUICK_COMPILATION}"

import jax  # noqa: E402
import pytest  # noqa: E402

from diffusion_sde.compilation_cache import enable_compilation_cache  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
enable_compilation_cache()


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
