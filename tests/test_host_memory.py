"""Host memory: glibc's huge pages cut the page faults of XLA:CPU's runs, and ``malloc_trim``
hands freed memory back (``diffusion_sde.host_memory``)."""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

from diffusion_sde import host_memory

needs_huge_pages = pytest.mark.skipif(
    not host_memory.huge_pages_available(), reason="needs glibc >= 2.35 and transparent huge pages"
)
needs_glibc = pytest.mark.skipif(host_memory.glibc_version() is None, reason="needs glibc")


@pytest.mark.parametrize(
    "before, after",
    [
        (None, "glibc.malloc.hugetlb=1"),
        ("", "glibc.malloc.hugetlb=1"),
        ("glibc.malloc.arena_max=2", "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"),
        ("glibc.malloc.hugetlb=0", "glibc.malloc.hugetlb=0"),  # the user's choice stays
        ("glibc.malloc.hugetlb=2:glibc.malloc.tcache_count=0", None),
    ],
)
def test_with_huge_pages_adds_the_tunable_unless_it_is_set(before, after):
    environ = {"PATH": "/bin"} if before is None else {"PATH": "/bin", "GLIBC_TUNABLES": before}
    result = host_memory.with_huge_pages(environ)
    assert result["GLIBC_TUNABLES"] == (before if after is None else after)
    assert result["PATH"] == "/bin" and environ.get("GLIBC_TUNABLES") == before  # a copy


# Restarts itself with huge pages (unless GLIBC_TUNABLES says otherwise), then runs a program
# whose run needs a 256 MiB temporary buffer five times and prints the page faults per run.
_FAULTS_SCRIPT = textwrap.dedent(
    """
    import json, os, resource
    from diffusion_sde import host_memory
    host_memory.restart_with_huge_pages()
    import jax, jax.numpy as jnp

    def f(x, w):  # a product's transposed input: an intermediate XLA does not fuse away
        return jnp.sum(jnp.tanh(x).T @ w)

    x, w = jnp.ones((2**15, 2**11)), jnp.ones((2**15, 2))
    compiled = jax.jit(f).lower(x, w).compile()
    jax.block_until_ready(compiled(x, w))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        jax.block_until_ready(compiled(x, w))
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5
    temp = compiled.memory_analysis().temp_size_in_bytes
    print(json.dumps(dict(faults=faults, temp=temp, tunables=os.environ.get("GLIBC_TUNABLES"))))
    """
)


def _run_faults_script(script: pathlib.Path, environ: dict[str, str]) -> dict:
    process = subprocess.run(
        [sys.executable, str(script)],
        env=environ,
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    return json.loads(process.stdout.splitlines()[-1])


@needs_huge_pages
def test_restart_with_huge_pages_cuts_the_page_faults_of_each_run(tmp_path):
    script = tmp_path / "faults.py"
    script.write_text(_FAULTS_SCRIPT)
    environ = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    restarted = _run_faults_script(script, environ)
    opted_out = _run_faults_script(script, {**environ, "GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"})
    assert restarted["tunables"] == "glibc.malloc.hugetlb=1"
    assert opted_out["tunables"] == "glibc.malloc.hugetlb=0"  # left as the user set it
    assert restarted["temp"] >= 2**27
    # Without huge pages every run faults its temporary buffer in again, 4 KiB at a time...
    assert opted_out["faults"] >= 0.5 * opted_out["temp"] / 4096
    # ... with them, 2 MiB at a time.
    assert restarted["faults"] <= 0.05 * opted_out["faults"]


@needs_glibc
def test_release_freed_memory_hands_back_what_glibc_keeps():
    # 3,000 blocks of 64 KiB from the heap, all freed but the last, which keeps glibc from
    # trimming the heap by itself: the 190 MiB stay resident until malloc_trim.
    script = textwrap.dedent(
        """
        import ctypes, os
        from diffusion_sde import host_memory
        libc = ctypes.CDLL(None)
        libc.malloc.restype = ctypes.c_void_p
        libc.free.argtypes = [ctypes.c_void_p]
        page = os.sysconf("SC_PAGE_SIZE")
        def resident():
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * page
        blocks = [libc.malloc(1 << 16) for _ in range(3000)]
        for block in blocks:
            ctypes.memset(block, 1, 1 << 16)
        for block in blocks[:-1]:
            libc.free(block)
        held = resident()
        released = host_memory.release_freed_memory()
        print(released, held - resident())
        """
    )
    process = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60
    )
    released, returned = process.stdout.split()
    assert released == "True"
    assert int(returned) >= 150 * 2**20


_STARTED_AS = textwrap.dedent(
    """
    import os
    from diffusion_sde import host_memory
    print(host_memory.started_as_command())
    host_memory.restart_with_huge_pages()
    print(os.environ.get("GLIBC_TUNABLES"))
    """
)


@needs_huge_pages
def test_restart_only_restarts_the_command_itself(tmp_path):
    script = tmp_path / "started_as.py"
    script.write_text(_STARTED_AS)
    outer = tmp_path / "outer.py"  # runs the script inside itself, as a notebook's kernel would
    outer.write_text(f"import runpy\nrunpy.run_path({str(script)!r}, run_name='__main__')\n")
    environ = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}

    def run(*argv):
        return subprocess.run(
            [sys.executable, *argv], env=environ, capture_output=True, text=True, check=True
        ).stdout.split()

    # The script itself, restarted once: the first run printed True before its restart.
    assert run(str(script)) == ["True", "True", "glibc.malloc.hugetlb=1"]
    # Inside another program (``runpy`` here, a notebook's kernel alike): never restarted.
    assert run(str(outer)) == ["False", "None"]
    assert run("-c", _STARTED_AS) == ["False", "None"]
