"""The persistent compilation cache, and how long XLA:CPU spends compiling.

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

The programs a user waits on before anything happens, the training step and the creation
of the training state, are compiled on CPU at LLVM's optimisation level 1 instead of XLA's
default 2 (:func:`compiler_options`). Measured on a 2-core CPU on 2026-12-07 (alternating
runs, ``experiments/benchmarks/networks.py`` and ``train_step.py``, level 2 against 1): the
small 1.75M network's step compiles in 28 s instead of 36 s and its ``init`` in 9.6 s instead
of 15 s; EDM's DDPM++ step in 72-78 s instead of 75-89 s; the digits step in 10 s either way;
every step runs as fast (within the machine's noise). Level 0 compiles faster still but runs
the step 2.3x slower. Sampling and likelihood programs, whose running time is the wait, keep
the default.

They also use XLA:CPU's memory-optimised scheduler (``CPU_SCHEDULER_TYPE``), which orders the
operations to keep the fewest bytes alive; the default orders them for concurrency. Measured
on a 2-core CPU on 2026-12-08 (``networks.py`` and ``train_step.py``, one run each way unless
said): EDM's DDPM++ step keeps 1.58 GiB of temporary buffers instead of 2.05, the benchmark's
peak host memory is 3.74 GiB instead of 4.30, and the step runs in 3.36-3.44 s instead of
3.8-4.2 s and compiles in 37 s instead of 45 s; the small 1.75M network's step in 0.354-0.360
s instead of 0.379-0.382 s (two runs each), its buffers 0.172 GiB instead of 0.186; the digits
step in 55-63 ms either way. It is a heuristic: on some programs it keeps more (a chain of
dense layers here, 22 MiB against 19), so it is chosen for these programs by measurement.
"""

from __future__ import annotations

import os
import pathlib

import jax

ENVIRONMENT_VARIABLE = "JAX_COMPILATION_CACHE_DIR"
CPU_BACKEND_OPTIMIZATION_LEVEL = 1
# XLA:CPU's scheduler that orders a program's operations to keep the fewest bytes alive at
# once (the default orders them for concurrency).
CPU_SCHEDULER_TYPE = "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"
CPU_COMPILER_OPTIONS = {
    "xla_backend_optimization_level": CPU_BACKEND_OPTIMIZATION_LEVEL,
    "xla_cpu_scheduler_type": CPU_SCHEDULER_TYPE,
}
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


def compiler_options(platform: str) -> dict[str, int | str] | None:
    """The ``compiler_options`` of ``jax.jit`` for a training step or a state's creation on
    ``platform`` (``"cpu"``, ``"gpu"``, ``"tpu"``): on CPU, ``CPU_COMPILER_OPTIONS`` (LLVM
    optimisation level 1, the memory-optimised scheduler), nothing elsewhere. An option that
    ``$XLA_FLAGS`` sets wins (the test suite compiles at level 0), since a program's own
    options would override it; None when nothing is left."""
    if platform != "cpu":
        return None
    flags = os.environ.get("XLA_FLAGS", "")
    return {k: v for k, v in CPU_COMPILER_OPTIONS.items() if k not in flags} or None
