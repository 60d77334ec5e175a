"""Test set-up: 8 simulated CPU devices, quick compilation and the persistent compilation cache.

All must be configured before JAX initialises its backend, hence at import time. XLA's CPU
backend compiles at LLVM optimisation level 0 (``XLA_FLAGS``, which the processes the tests
start inherit): the suite's programs are small and mostly run once, so compiling is most of
their time, and at level 0 it is about 1.5x quicker while the results agree with the default
level's to float32 round-off, well inside every test's tolerance. The cache
is the one every entry point uses (``$JAX_COMPILATION_CACHE_DIR``, else
``~/.cache/diffusion_sde/jax``): outside the checkout, so that a CI job that keeps that
folder between its runs compiles each program once.
"""

import os

# Appended, so that flags already given (e.g. a device count) stay in force.
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0"

import jax  # noqa: E402

from diffusion_sde.compilation_cache import enable_compilation_cache  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
enable_compilation_cache()
