"""Test set-up: 8 simulated CPU devices and the persistent compilation cache.

Both must be configured before JAX initialises its backend, hence at import time. The cache
is the one every entry point uses (``$JAX_COMPILATION_CACHE_DIR``, else
``~/.cache/diffusion_sde/jax``): outside the checkout, so that a CI job that keeps that
folder between its runs compiles each program once.
"""

import jax

from diffusion_sde.compilation_cache import enable_compilation_cache

jax.config.update("jax_num_cpu_devices", 8)
enable_compilation_cache()
