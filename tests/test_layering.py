"""Every import arrow points down: data knows tokens (not tasks, models or training), the training loop knows steps
(not RL), and only deepseek_jax.stages, above both loops, dispatches between them."""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "deepseek_jax"
FORBIDDEN = {"data": ("rl", "train", "infer", "model", "layers", "stages"), "train": ("rl", "stages"),
             "rl": ("stages",), "infer": ("train", "rl", "stages"),
             "serve": ("train", "rl", "stages")}


def imported(path: pathlib.Path) -> set[str]:
    """Every deepseek_jax module a file imports, at any depth (function-local imports count)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return {n for n in names if n.startswith("deepseek_jax.")}


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_point_down(package):
    bad = {f"{path.relative_to(PACKAGE)} imports {name}"
           for path in (PACKAGE / package).rglob("*.py") for name in imported(path)
           if name.split(".")[1] in FORBIDDEN[package]}
    assert not bad, sorted(bad)
    assert list((PACKAGE / package).rglob("*.py"))  # the package exists
