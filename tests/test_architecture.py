"""The layout the design asks for: data flows one way, and tools use public members."""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "backprop"
TOOLS = [
    "check",
    "curvature",
    "train.py",
    "train_checks.py",
    "checkpoint.py",
    "data_grad.py",
    "backward_net.py",
    "plot",
    "demo.py",
    "recurrent",
]


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def files(*names: str) -> list[Path]:
    out: list[Path] = []
    for name in names:
        path = PACKAGE / name
        out.extend(sorted(path.rglob("*.py")) if path.is_dir() else [path])
    return out


def test_the_executor_imports_no_concrete_layer() -> None:
    for path in files("graph"):
        layers = {m for m in imported_modules(path) if m.startswith("backprop.layers")}
        assert not layers, f"{path.name} imports {sorted(layers)}"


def test_jacobians_know_nothing_of_layers_or_models() -> None:
    for path in files("jacobian"):
        upward = {
            m
            for m in imported_modules(path)
            if m.startswith(("backprop.layer", "backprop.graph", "backprop.check"))
        }
        assert not upward, f"{path.name} imports {sorted(upward)}"


def test_tools_read_no_private_member_of_a_model() -> None:
    private = re.compile(r"\.(_nodes|_outputs|_order|_needs|_shapes|_values|_slots|_names)\b")
    for path in files(*TOOLS):
        text = path.read_text(encoding="utf-8")
        hits = private.findall(text)
        assert not hits, f"{path.relative_to(PACKAGE)} reads {sorted(set(hits))} of a model"


def test_no_module_is_over_about_600_lines() -> None:
    for path in files("."):
        n = len(path.read_text(encoding="utf-8").splitlines())
        assert n <= 620, f"{path.relative_to(PACKAGE)} has {n} lines"
