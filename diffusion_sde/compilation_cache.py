"""The persistent compilation cache: compiled XLA programs kept on disk between processes.

Every entry point (``python -m diffusion_sde.main``, the notebooks, the test suite) calls
:func:`enable_compilation_cache` before its first compilation, so that all of them share
one folder outside the checkout: ``$JAX_COMPILATION_CACHE_DIR`` when set, else
``~/.cache/diffusion_sde/jax``. A later process that compiles the same program (same
computation, shapes, jaxlib and flags) reads it back instead of compiling it; a CI job
keeps its runs' compilations by keeping that folder.

Two things keep a program out of the cache (measured with jax 0.10):

- A host callback (``jax.debug.print``, ``pure_callback``, equinox's runtime errors): JAX
  does not write such programs. Our adaptive ODE solves are written without one for this
  reason (``ode_solvers.integrate_adaptive``).
- Another path: JAX hashes the cache folder's own path into every key (it passes
  ``<folder>/xla_gpu_per_fusion_autotune_cache_dir`` to XLA, part of the compile options).
  A cache copied or restored to another path misses every entry; keep it at one path.
"""

from __future__ import annotations

import os
import pathlib

import jax

ENVIRONMENT_VARIABLE = "JAX_COMPILATION_CACHE_DIR"
DEFAULT_DIRECTORY = pathlib.Path("~/.cache/diffusion_sde/jax")
# Programs that compile faster than this are not written: reading an entry back costs a
# few milliseconds, so only the thousands of one-operation programs of eager code (each
# compiled in a few milliseconds) are left out.
MIN_COMPILE_TIME_SECONDS = 0.1


def compilation_cache_directory() -> pathlib.Path:
    """``$JAX_COMPILATION_CACHE_DIR`` when set and not empty, else ``~/.cache/diffusion_sde/jax``."""
    return pathlib.Path(os.environ.get(ENVIRONMENT_VARIABLE) or DEFAULT_DIRECTORY).expanduser()


def enable_compilation_cache(directory: str | os.PathLike | None = None) -> pathlib.Path:
    """Turn JAX's persistent compilation cache on in ``directory`` (by default
    :func:`compilation_cache_directory`) and return it. Call it before the process's first
    compilation: JAX opens the cache once, at its first compilation."""
    path = pathlib.Path(directory).expanduser() if directory else compilation_cache_directory()
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_TIME_SECONDS)
    return path
