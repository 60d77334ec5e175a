"""Host memory on Linux: huge pages for XLA:CPU's buffers, and the compiler's memory handed back.

Two facts of glibc's allocator cost a CPU training run time and memory (measured on a 2-core
CPU with jax 0.10.2 and glibc 2.36 on 2026-12-07, ``experiments/benchmarks/networks.py``):

- **Every run of a compiled program maps its temporary buffers afresh.** XLA:CPU allocates
  them as one block per run (0.42 GiB for the small 1.75M network's training step at batch
  16, 2.2 GiB for EDM's 55.7M DDPM++ at batch 8); glibc maps a block that large from the
  kernel and unmaps it when the run frees it, so the next run faults every 4 KiB page in
  again, the kernel zeroing each: 110,000 page faults a step for the small network and
  616,000 for DDPM++, a quarter of the step's CPU time in the kernel, with the two threads
  queueing on the process's page table. glibc's tunable ``glibc.malloc.hugetlb=1`` maps such
  blocks as transparent huge pages (2 MiB) instead: 850 faults a step for the small
  network and 13,500 for DDPM++, whose steps take 0.50 s instead of 0.67-0.71 s and 3.8-4.0
  s instead of 4.7 s. glibc reads its tunables when a process starts, so :func:`restart_with_huge_pages`
  restarts the command (``python -m diffusion_sde.main`` and the benchmarks call it first
  thing), and ``make`` exports the tunable to everything it runs, the test suite and its
  notebook kernels included. In a notebook, start Jupyter with it:
  ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1 jupyter lab``. A ``GLIBC_TUNABLES`` that already
  sets ``glibc.malloc.hugetlb`` is left as it is (``=0`` turns this off).
- **What the compiler frees stays with the process.** Compiling DDPM++'s training step
  leaves 1.6 GiB of freed but unreturned memory in glibc's arenas, on top of which the step's
  buffers then come: :func:`release_freed_memory` (``malloc_trim``) hands it back, and the
  peak of the whole benchmark falls from 4.9 GiB to 4.3 GiB. The training loop calls it once
  its first step has compiled.

Both are no-ops where they do not apply: another OS or C library, or transparent huge pages
switched off (``/sys/kernel/mm/transparent_hugepage/enabled`` reading ``[never]``).
"""

from __future__ import annotations

import ctypes
import os
import pathlib
import sys
from collections.abc import Mapping

TUNABLES_VARIABLE = "GLIBC_TUNABLES"
HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb=1"
_HUGE_PAGES_NAME = HUGE_PAGES_TUNABLE.partition("=")[0]
_THP_SETTING = pathlib.Path("/sys/kernel/mm/transparent_hugepage/enabled")
_MIN_GLIBC = (2, 35)  # the first glibc with glibc.malloc.hugetlb


def glibc_version() -> tuple[int, int] | None:
    """``(major, minor)`` of the C library this process runs on when it is glibc, else None."""
    try:
        name, _, version = os.confstr("CS_GNU_LIBC_VERSION").partition(" ")
    except (AttributeError, ValueError, OSError):
        return None
    if name != "glibc":
        return None
    major, _, minor = version.partition(".")
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def huge_pages_available() -> bool:
    """Whether glibc can map large blocks as transparent huge pages here: Linux, glibc 2.35
    or newer, and the kernel's transparent huge pages not switched off."""
    version = glibc_version()
    if not sys.platform.startswith("linux") or version is None or version < _MIN_GLIBC:
        return False
    try:
        return "[never]" not in _THP_SETTING.read_text()
    except OSError:
        return False


def with_huge_pages(environ: Mapping[str, str]) -> dict[str, str]:
    """A copy of ``environ`` whose ``GLIBC_TUNABLES`` also holds ``glibc.malloc.hugetlb=1``;
    unchanged where it already sets ``glibc.malloc.hugetlb`` to anything."""
    environment = dict(environ)
    tunables = [t for t in environment.get(TUNABLES_VARIABLE, "").split(":") if t]
    if not any(t.partition("=")[0] == _HUGE_PAGES_NAME for t in tunables):
        environment[TUNABLES_VARIABLE] = ":".join([*tunables, HUGE_PAGES_TUNABLE])
    return environment


def started_as_command() -> bool:
    """Whether the running ``__main__`` is what this interpreter's command line started,
    ``python -m module ...`` or ``python script.py ...``, rather than code run inside another
    program (a notebook's kernel, ``runpy``, ``python -c``)."""
    main = sys.modules.get("__main__")
    spec, path = getattr(main, "__spec__", None), getattr(main, "__file__", None)
    argv = sys.orig_argv[1:]
    if spec is not None and spec.name:
        names = {spec.name, spec.name.removesuffix(".__main__")}
        return any(a == "-m" and b in names for a, b in zip(argv, argv[1:], strict=False))
    script = os.path.abspath(path) if path else None
    return script is not None and any(os.path.abspath(a) == script for a in argv)


def restart_with_huge_pages() -> None:
    """Restart this process's command (``sys.orig_argv``, same PID) with
    :func:`with_huge_pages` of its environment; return at once instead where huge pages are
    not available, the environment says already, or the process was not started as this
    command (:func:`started_as_command`: a notebook's kernel is never restarted). Call it
    first thing in a script's ``__main__``: whatever ran before it runs again."""
    environment = with_huge_pages(os.environ)
    if environment == dict(os.environ) or not huge_pages_available() or not started_as_command():
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environment)


def release_freed_memory() -> bool:
    """Hand the memory glibc holds freed back to the kernel (``malloc_trim(0)``); call it
    after a large compilation. Returns whether it could (glibc only)."""
    if glibc_version() is None:
        return False
    ctypes.CDLL(None).malloc_trim(0)
    return True
