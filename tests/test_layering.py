"""The layering rule of docs/architecture.md, checked on the source: experiments and command lines
-> torch glue and the conformance suite -> kernels -> reference -> helpers. A module imports only
from its own layer or below, so that the reference stays importable (and reviewable) without any
backend, and the kernels without PyTorch glue.

Every module must also have its row in docs/architecture.md's Files table: a new module without
one fails here, so the table cannot fall behind the code again.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
PACKAGE = SRC / "batchnorm"

# Lower number = lower layer. Keys are module-name prefixes; the longest match wins.
LAYERS = {
    "batchnorm._xp": 0,
    "batchnorm._args": 0,
    "batchnorm._errors": 0,
    "batchnorm.reference": 1,
    "batchnorm": 1,  # the package itself only re-exports the reference
    "batchnorm.kernels": 2,
    "batchnorm.torch": 3,
    "batchnorm.testing": 3,
    "batchnorm.experiments": 4,
    "batchnorm.bench": 4,
    "batchnorm.cli": 4,
    "batchnorm.__main__": 4,
    "batchnorm.verify": 4,
    "batchnorm.doctor_cli": 4,
    "batchnorm.examples": 4,
}

# Peers on one layer that must not lean on each other: the conformance suite checks torch code
# without importing our torch layers (it would then check itself), and the glue does not need it.
SEPARATE_PEERS = [
    ("batchnorm.torch", "batchnorm.testing"),
    ("batchnorm.testing", "batchnorm.torch"),
]

# Upward imports that are deliberate, each with its reason (shown in docs/architecture.md).
ALLOWED_UPWARD = {
    ("batchnorm.reference.composite", "batchnorm.kernels"): (
        "a backend *name* (backend='numba') is looked up lazily, inside the function, so that the "
        "reference imports without any kernel package"
    ),
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> tuple[str, int]:
    # "batchnorm" names the package itself only: a new top-level module needs its own entry
    matches = [
        p for p in LAYERS if module == p or (p != "batchnorm" and module.startswith(p + "."))
    ]
    if not matches:
        raise AssertionError(f"{module} has no layer: add it to LAYERS and docs/architecture.md")
    best = max(matches, key=len)
    return best, LAYERS[best]


def imports_of(source: str, module: str, is_package: bool) -> set[str]:
    """Every batchnorm module named by an import statement, at any depth (lazy imports count)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                if not is_package:
                    base = base[:-1]
                base = base[: len(base) - (node.level - 1)]
                stem = ".".join(base + ([node.module] if node.module else []))
                # `from . import x` may name a submodule: then the layer is x's
                names = [stem] if node.module else [_submodule(stem, a.name) for a in node.names]
            else:
                names = [node.module or ""]
        else:
            continue
        found.update(n for n in names if n == "batchnorm" or n.startswith("batchnorm."))
    return found


def _submodule(package: str, name: str) -> str:
    path = SRC.joinpath(*package.split("."), name)
    return f"{package}.{name}" if path.is_dir() or path.with_suffix(".py").exists() else package


def violations(module: str, source: str, is_package: bool = False) -> list[str]:
    own_prefix, own = layer_of(module)
    bad = []
    for target in sorted(imports_of(source, module, is_package)):
        prefix, layer = layer_of(target)
        allowed = any(
            (module == a or module.startswith(a + ".")) and prefix == b for a, b in ALLOWED_UPWARD
        )
        if layer > own and not allowed:
            bad.append(f"{module} (layer {own}) imports {target} (layer {layer})")
        if (own_prefix, prefix) in SEPARATE_PEERS:
            bad.append(f"{module} imports its peer {target}")
    return bad


def all_modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def test_the_checker_sees_an_upward_import():
    # The rule itself can fail: a reference module importing the torch glue, lazily.
    src = "def f():\n    from ..torch import BatchNorm2d\n    return BatchNorm2d\n"
    assert violations("batchnorm.reference.forward", src) == [
        "batchnorm.reference.forward (layer 1) imports batchnorm.torch (layer 3)"
    ]
    assert violations("batchnorm.kernels.numba_cpu.rows", "import batchnorm.experiments.data\n")
    assert violations("batchnorm.torch.fold", "from batchnorm.testing import check\n")
    assert not violations("batchnorm.torch.fold", "from ..reference import fold\n")
    with pytest.raises(AssertionError, match="has no layer"):
        violations("batchnorm.newthing", "")


def test_no_module_imports_upward():
    bad = []
    for path in all_modules():
        bad += violations(module_name(path), path.read_text(), path.name == "__init__.py")
    assert not bad, "imports against the layering rule:\n" + "\n".join(bad)


def test_every_layer_prefix_exists():
    # A renamed package must not leave its layer entry pointing at nothing (and so unchecked).
    names = {module_name(p) for p in all_modules()}
    for prefix in LAYERS:
        assert any(n == prefix or n.startswith(prefix + ".") for n in names), prefix


def files_table() -> str:
    text = (ROOT / "docs" / "architecture.md").read_text()
    start = text.index("## Files")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else len(text)]


@pytest.mark.parametrize("path", all_modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_every_module_has_a_row_in_the_architecture_table(path):
    rel = path.relative_to(SRC).as_posix()
    table = files_table()
    if path.name == "__init__.py":
        # a package's __init__ is covered by the package's own row
        rel = path.parent.relative_to(SRC).as_posix() + "/"
    assert f"`src/{rel}`" in table, f"docs/architecture.md's Files table has no row for src/{rel}"


def test_every_row_of_the_architecture_table_exists():
    # the other direction: a module renamed or removed must not leave its row behind
    import re

    for path in re.findall(r"`(src/batchnorm/[^`]*)`", files_table()):
        assert (ROOT / path).exists(), f"docs/architecture.md lists {path}, which does not exist"
