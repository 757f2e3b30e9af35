"""The architecture's contracts, checked on the source: the packages form layers with no cycle,
serving stays free of TorchRec, and only data/keys.py spells the feature keys."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

# Bottom to top. A package may import the packages listed for it, and nothing else of the project.
ALLOWED = {
    "storage": set(),
    "config": set(),
    "data": {"config", "storage"},
    "serving": {"data", "storage"},
    "sharding": {"config", "data", "storage"},
    "trainer": {"config", "data", "serving", "sharding", "storage"},
    "launch": {"trainer"},
    "bench": {"config", "data", "serving", "sharding", "storage", "trainer"},
}
# Serving is deployed without TorchRec: of the data layer it may use only these torch-free modules.
SERVING_MAY_USE = {"data.keys", "data.schema", "data.ragged", "data.errors"}
KEY_LITERALS = re.compile(r"""["'](hist_all["']|hist_last|hist_seq|user_id["']|cand_)""")


def modules(root: Path) -> dict[str, Path]:
    found = {}
    for package in ALLOWED:
        for path in (root / package).rglob("*.py"):
            parts = path.relative_to(root).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(path: Path, name: str) -> set[str]:
    """Every project module a file imports, at any depth (function-level imports count too)."""
    out = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            out.add(base)
            out.update(f"{base}.{alias.name}" for alias in node.names)
    return {m for m in out if m.split(".")[0] in ALLOWED}


def violations(root: Path) -> list[str]:
    found = modules(root)
    graph = {name: {m for m in imports(path, name) if m in found} for name, path in found.items()}
    problems = []
    for name in graph:
        package = name.split(".")[0]
        for target in sorted(imports(found[name], name)):
            other = target.split(".")[0]
            if other != package and other not in ALLOWED[package]:
                problems.append(f"{name} imports {target}: {package} may import only {sorted(ALLOWED[package])}")
            if package == "serving" and other == "data" and target in found and target not in SERVING_MAY_USE:
                problems.append(f"{name} imports {target}: serving may use only {sorted(SERVING_MAY_USE)} of data")
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                problems.append("import cycle: " + " -> ".join(trail[trail.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return problems


def test_packages_form_layers_without_cycles():
    assert violations(ROOT) == []


@pytest.mark.parametrize("package,line,expected", [
    ("data", "from trainer.train import train", "data may import only ['config', 'storage']"),
    ("serving", "import data.loader", "serving may use only"),
    ("sharding", "from trainer import checkpoint", "sharding may import only"),
])
def test_the_layer_check_catches_a_forbidden_import(tmp_path, package, line, expected):
    for name in ALLOWED:
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text("")
    (tmp_path / "data" / "loader.py").write_text("")
    (tmp_path / package / "bad.py").write_text(line + "\n")
    assert any(expected in problem for problem in violations(tmp_path))


def test_the_cycle_check_catches_a_cycle(tmp_path):
    for name in ALLOWED:
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text("")
    (tmp_path / "data" / "a.py").write_text("from data import b\n")
    (tmp_path / "data" / "b.py").write_text("import data.a\n")
    assert any(p.startswith("import cycle: data.a -> data.b -> data.a") for p in violations(tmp_path))


def test_only_the_key_module_spells_feature_keys():
    spelled = [str(path.relative_to(ROOT)) for path in modules(ROOT).values()
               if KEY_LITERALS.search(path.read_text()) and path != ROOT / "data" / "keys.py"]
    assert spelled == [], "feature keys are built with data/keys.py, never written as strings"


def test_a_trainer_process_starts_without_mlflow_matplotlib_or_pandas():
    """Every rank of every job imports the trainer; MLflow alone was a third of that start-up (about 3 s of
    CPU per process), and only the rank that tracks needs it (or matplotlib and pandas, for its plots and
    tables). They are imported where they are used."""
    code = ("import sys, trainer.__main__, trainer.train, launch.run; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'mlflow', 'matplotlib', 'pandas'}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
