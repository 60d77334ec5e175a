"""The notebooks in ``experiments/`` run top to bottom, with small parameters, in a fresh kernel.

Each notebook's first code cell is tagged ``parameters`` (papermill's convention); the test
inserts a cell after it that overrides the sizes and points ``workdir`` at a temporary
directory, then executes every cell with nbclient in a kernel of this interpreter
(``sys.executable``, through a kernel spec written for the test, so nothing needs to be
registered with Jupyter), with the temporary directory as working directory. Any cell
error fails the test; the executed notebook is kept next to the workdir for inspection.
"""

import ast
import json
import os
import pathlib
import sys
import time

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

from diffusion_sde.compilation_cache import compilation_cache_directory

ROOT = pathlib.Path(__file__).parents[1]
NOTEBOOKS = ROOT / "experiments"
KERNEL_NAME = "diffusion-sde-test"
CELL_TIMEOUT_S = 600


def kernel_manager(directory: pathlib.Path, env: dict[str, str]) -> KernelManager:
    """A manager for a kernel running this interpreter with ``env`` added to the environment."""
    spec_dir = directory / "kernels" / KERNEL_NAME
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [
            sys.executable,
            "-m",
            "ipykernel_launcher",
            "-f",
            "{connection_file}",
            "--InteractiveShell.colors=nocolor",  # readable tracebacks in the test report
        ],
        "display_name": f"Python ({sys.executable})",
        "language": "python",
        "env": env,
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    specs = KernelSpecManager(kernel_dirs=[str(directory / "kernels")], ensure_native_kernel=False)
    return KernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=specs)


def parameters_cell_index(notebook) -> int:
    return next(
        i
        for i, cell in enumerate(notebook.cells)
        if cell.cell_type == "code" and "parameters" in cell.metadata.get("tags", [])
    )


def assigned_names(source: str) -> set[str]:
    return {
        target.id
        for node in ast.parse(source).body
        if isinstance(node, ast.Assign | ast.AnnAssign)
        for target in (node.targets if isinstance(node, ast.Assign) else [node.target])
        if isinstance(target, ast.Name)
    }


def run_notebook(
    name: str, tmp_path: pathlib.Path, env: dict[str, str] | None = None, **parameters
):
    """Execute ``experiments/<name>`` with ``parameters`` injected after its parameters cell;
    returns the executed notebook. ``workdir`` is set to ``tmp_path / "workdir"``."""
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    index = parameters_cell_index(notebook)
    parameters = {"workdir": str(tmp_path / "workdir"), **parameters}
    unknown = set(parameters) - assigned_names(notebook.cells[index].source)
    assert not unknown, f"{name} has no parameters {sorted(unknown)}"
    injected = "\n".join(f"{key} = {value!r}" for key, value in parameters.items())
    notebook.cells.insert(
        index + 1,
        nbformat.v4.new_code_cell(injected, metadata={"tags": ["injected-parameters"]}),
    )
    kernel_env = {
        "JAX_PLATFORMS": "cpu",
        "JAX_COMPILATION_CACHE_DIR": str(compilation_cache_directory()),
        "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),  # conftest's: compile as the suite does
        "MPLBACKEND": "module://matplotlib_inline.backend_inline",
        **(env or {}),
    }
    km = kernel_manager(tmp_path, kernel_env)
    client = NotebookClient(
        notebook, km=km, timeout=CELL_TIMEOUT_S, resources={"metadata": {"path": str(tmp_path)}}
    )
    start = time.perf_counter()
    try:
        client.execute()
    finally:
        # The client leaves a kernel it did not start alive: stop it, or its memory stays
        # held until the test process ends.
        if km.has_kernel:
            km.shutdown_kernel(now=True)
        nbformat.write(notebook, tmp_path / name)
        print(f"{name}: {time.perf_counter() - start:.1f} s")
    return notebook


def figures_shown(notebook) -> int:
    return sum(
        "image/png" in output.get("data", {})
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.outputs
    )


@pytest.mark.parametrize("path", sorted(NOTEBOOKS.glob("*.ipynb")), ids=lambda p: p.name)
def test_notebook_is_stored_clean_with_a_parameters_cell(path):
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    parameters = notebook.cells[parameters_cell_index(notebook)]
    assert "workdir" in assigned_names(parameters.source)
    assert parameters is next(c for c in notebook.cells if c.cell_type == "code")
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, "strip the outputs"


def test_quickstart(tmp_path, optimised_xla_flags):
    notebook = run_notebook(
        "quickstart.ipynb",
        tmp_path,
        env={"XLA_FLAGS": optimised_xla_flags},
        N_ITERS=100,
        BATCH_SIZE=128,
        NUM_SAMPLES=256,
        PC_STEPS=30,
        DPM_STEPS=10,
        GRID_SIZE=20,
    )
    figures = sorted(p.name for p in (tmp_path / "workdir" / "figures").iterdir())
    assert figures == ["density.png", "loss.png", "samples.png"]
    assert figures_shown(notebook) == 3


def test_samplers(tmp_path):
    notebook = run_notebook(
        "samplers.ipynb",
        tmp_path,
        NUM_SAMPLES=256,
        RUNS=1,
        PC_STEPS=(25, 50),
        ODE_STEPS=(5, 10),
        ADAPTIVE_TOLERANCES=(1e-2,),
    )
    results = json.loads((tmp_path / "workdir" / "results.json").read_text())
    assert len(results) == 11 and all(len(rows) in (1, 2) for rows in results.values())
    assert (tmp_path / "workdir" / "figures" / "quality_vs_nfe.png").exists()
    assert figures_shown(notebook) == 2


def test_colab_tpu_on_four_simulated_devices(tmp_path):
    """A tiny NCSN++ on mock CIFAR-10 (no files, no download), data-parallel over 4 CPU devices."""
    notebook = run_notebook(
        "colab_tpu.ipynb",
        tmp_path,
        env={"XLA_FLAGS": os.environ["XLA_FLAGS"] + " --xla_force_host_platform_device_count=4"},
        SMALL=True,
        DATA_SOURCE="mock",
        N_ITERS=2,
        BATCH_SIZE=8,
        NUM_SAMPLES=4,
        SAMPLING_STEPS=10,
        # Faster to compile on CPU than the default patch convolutions; no evaluation pass.
        CONFIG_OVERRIDES={"model.conv_impl": "xla", "training.eval_freq": 1000},
    )
    outputs = "".join(
        output.get("text", "") for cell in notebook.cells for output in cell.get("outputs", [])
    )
    assert "4 devices" in outputs and "Mesh('data': 4" in outputs
    assert (tmp_path / "workdir" / "run" / "checkpoints" / "2").exists()
    assert figures_shown(notebook) == 2


def test_digits_trains_a_tiny_run_when_there_is_none(tmp_path, optimised_xla_flags):
    notebook = run_notebook(
        "digits.ipynb",
        tmp_path,
        env={"XLA_FLAGS": optimised_xla_flags},
        DIGITS_WORKDIR=str(tmp_path / "no_run_here"),
        TRAIN_ITERS=5,
        # One resolution, no attention, XLA convolutions: quick to compile on CPU.
        MODEL_OVERRIDES={
            "nf": 16,
            "ch_mult": (1,),
            "attn_resolutions": (),
            "num_res_blocks": 1,
            "conv_impl": "xla",
        },
        NUM_STEPS=25,
        ODE_STEPS=5,
        INPAINTINGS_PER_DIGIT=1,
        CLASSIFIER_STEPS=5,
        GUIDANCE_SCALES=(2.0,),
    )
    figures = sorted(p.stem for p in (tmp_path / "workdir" / "figures").iterdir())
    assert figures == [
        "class_conditional_0",
        "class_conditional_1",
        "classifier",
        "inpaint_centre_unknown",
        "inpaint_right_half_unknown",
        "loss",
        "samples_ode",
        "samples_pc",
    ]
    assert figures_shown(notebook) == len(figures)


@pytest.mark.slow  # about 80 s on 2 CPU cores: compiles three samplers
def test_pretrained_loads_the_fixture_checkpoint_and_samples_it(tmp_path):
    notebook = run_notebook(
        "pretrained.ipynb",
        tmp_path,
        NUM_SAMPLES=4,
        PC_STEPS=20,
        DPM_STEPS=4,
        ADAPTIVE_TOLERANCE=1e-2,
    )
    outputs = "".join(
        output.get("text", "") for cell in notebook.cells for output in cell.get("outputs", [])
    )
    assert "EMA parameters restored exactly: True" in outputs
    assert outputs.count("finite: True") == 3
    assert (tmp_path / "workdir" / "figures" / "samples.png").exists()
    assert figures_shown(notebook) == 1
