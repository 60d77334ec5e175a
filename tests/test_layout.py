"""The house keeps standing: imports run down the layers, no module imports another's private
name, no function grows past 100 lines, and no file points outside the repository.

The layers, bottom to top (``docs/design.md`` draws them): a module may import a module of
a lower layer, and, inside a package, its siblings; never one of its own layer or above.
"""

import ast
import importlib
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).parents[1]
PACKAGE = ROOT / "diffusion_sde"

# Bottom to top. A package (models, training, evaluation) is one unit.
LAYERS = (
    ("errors", "plotting", "compilation_cache", "host_memory"),  # import nothing of ours
    ("sde", "data"),  # the forward processes; the datasets
    ("parametrization", "toy_scores"),  # what a network predicts; exact mixture scores
    ("ode_solvers",),
    ("losses", "sde_solvers", "likelihood"),
    ("sampling",),
    ("models",),  # networks and the network-to-score adapter
    ("controllable", "pretrained"),  # guided sampling; published checkpoints read
    ("__init__",),  # the public API of the method
    ("training",),  # state, step, checkpoints, the loop
    ("evaluation",),  # metrics, feature networks, the evaluation of a workdir
    ("main",),  # the entry point
)
RANK = {unit: rank for rank, units in enumerate(LAYERS) for unit in units}
MAX_FUNCTION_LINES = 100


def unit_of(module: str) -> str:
    """``diffusion_sde.training.step`` -> ``training``; ``diffusion_sde`` -> ``__init__``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(module: str, tree: ast.AST, is_package: bool):
    """``(line, imported module, [names])`` of every import of ``diffusion_sde`` code,
    those inside functions included."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "diffusion_sde":
                    yield node.lineno, alias.name, []
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                package = module.split(".")
                package = package if is_package else package[:-1]
                package = package[: len(package) - node.level + 1]
                base = ".".join([*package, *([base] if base else [])])
            if base.split(".")[0] != "diffusion_sde":
                continue
            names = [alias.name for alias in node.names]
            # `from diffusion_sde import sde` imports the module diffusion_sde.sde.
            submodules = [f"{base}.{name}" for name in names if _is_module(f"{base}.{name}")]
            if submodules:
                for submodule in submodules:
                    yield node.lineno, submodule, []
            else:
                yield node.lineno, base, names


def _is_module(name: str) -> bool:
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def violations(sources: dict[str, tuple[str, bool]]) -> list[str]:
    """Every upward import and every private name imported across modules, for
    ``{module: (source, is_package)}``."""
    found = []
    for module, (source, is_package) in sources.items():
        tree = ast.parse(source)
        unit = unit_of(module)
        aliases = {}  # local name -> diffusion_sde module, for `alias._private`
        for line, imported, names in imported_modules(module, tree, is_package):
            where = f"{module}:{line}"
            target = unit_of(imported)
            if imported == "diffusion_sde" and module != "diffusion_sde":
                found.append(f"{where} imports the package itself; import the module")
            elif target != unit and RANK[target] >= RANK[unit]:
                found.append(f"{where} imports {imported}: layer {target} is not below {unit}")
            for name in names:
                if name.startswith("_") and imported != module:
                    found.append(f"{where} imports the private name {imported}.{name}")
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("diffusion_sde"):
                for alias in node.names:
                    if _is_module(f"{node.module}.{alias.name}"):
                        aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in aliases
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
            ):
                found.append(
                    f"{module}:{node.lineno} uses the private name "
                    f"{aliases[node.value.id]}.{node.attr}"
                )
    return found


def package_sources() -> dict[str, tuple[str, bool]]:
    return {
        module_name(path): (path.read_text(), path.name == "__init__.py")
        for path in sorted(PACKAGE.rglob("*.py"))
    }


def test_every_module_has_a_layer():
    units = {unit_of(module) for module in package_sources()}
    assert units <= set(RANK), f"modules without a layer: {sorted(units - set(RANK))}"


def test_imports_run_down_the_layers_and_keep_private_names_private():
    assert violations(package_sources()) == []


@pytest.mark.parametrize(
    "module, planted",
    [
        ("diffusion_sde.sde", "from diffusion_sde.training import loop"),
        ("diffusion_sde.models.ddpm", "from diffusion_sde.training import step"),
        ("diffusion_sde.losses", "from diffusion_sde.models import get_model"),
        ("diffusion_sde.training.loop", "from diffusion_sde.evaluation import evaluate"),
        ("diffusion_sde.sampling", "from diffusion_sde import controllable"),
        ("diffusion_sde.losses", "def f():\n    from diffusion_sde import sampling"),
        ("diffusion_sde.controllable", "from diffusion_sde.sampling import _private_helper"),
        ("diffusion_sde.controllable", "from diffusion_sde import sampling\nsampling._helper"),
    ],
)
def test_a_planted_upward_or_private_import_is_caught(module, planted):
    sources = package_sources()
    before = set(violations(sources))
    source, is_package = sources[module]
    sources[module] = (source + "\n" + planted + "\n", is_package)
    found = set(violations(sources)) - before
    assert len(found) == 1 and next(iter(found)).startswith(module), found


def test_no_function_is_longer_than_100_lines():
    long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {length}")
    assert long == []


# An issue number ("issue" and a number), or a file of the shared workspace the clone lacks.
OUTSIDE_REFERENCE = re.compile(r"\b[Ii]ssues?\s+#?\d+|DESIGN\.md|\.\./shared")


def project_files():
    for pattern in ("*.md", "*.py", "*.ipynb", "Makefile", "pyproject.toml", ".ci/*"):
        yield from ROOT.glob(pattern)
    for folder in ("diffusion_sde", "configs", "experiments", "tests", "docs"):
        for path in (ROOT / folder).rglob("*"):
            if path.suffix in (".py", ".md", ".ipynb", ".sh", ".toml") and path.is_file():
                yield path


def test_no_file_points_outside_the_repository():
    found = []
    for path in sorted(set(project_files())):
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if OUTSIDE_REFERENCE.search(line) and path != pathlib.Path(__file__):
                found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()[:100]}")
    assert found == []


def test_the_public_names_are_imported_on_first_use():
    """``import diffusion_sde`` imports no JAX (the entry point restarts itself before it
    does); each name of ``__all__`` then resolves to its home module's object, a submodule
    is an attribute as when the package imported them eagerly, and any other name is an
    AttributeError."""
    script = (
        "import sys, diffusion_sde\n"
        "print('jax' in sys.modules)\n"
        "from diffusion_sde import VPSDE, pc_sample\n"
        "print('jax' in sys.modules, VPSDE.__module__, pc_sample.__module__)\n"
        "print(diffusion_sde.ode_solvers.__name__)\n"  # a submodule, as an attribute
    )
    process = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=120
    )
    assert process.stdout.split() == [
        "False",
        "True",
        "diffusion_sde.sde",
        "diffusion_sde.sampling",
        "diffusion_sde.ode_solvers",
    ]
    import diffusion_sde

    for name in diffusion_sde.__all__:
        value = getattr(diffusion_sde, name)
        home = importlib.import_module(f"diffusion_sde.{diffusion_sde._HOMES[name]}")
        assert value is getattr(home, name), name
    assert set(diffusion_sde.__all__) <= set(dir(diffusion_sde))
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        diffusion_sde.no_such_name  # noqa: B018
