"""Test set-up: 8 simulated CPU devices and a persistent compilation cache.

Both must be configured before JAX initialises its backend, hence at import time.
"""

import os
import pathlib

import jax

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update(
    "jax_compilation_cache_dir",
    os.environ.get(
        "JAX_COMPILATION_CACHE_DIR", str(pathlib.Path(__file__).parents[1] / ".jax_cache")
    ),
)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
