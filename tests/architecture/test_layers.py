"""The architecture's contracts, checked on the source: the packages form layers with no cycle,
serving stays free of TorchRec, only data/keys.py spells the feature keys, and only towers/ names a tower."""

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
    "towers": {"config", "data", "serving", "storage"},
    "sharding": {"config", "data", "storage", "towers"},
    "trainer": {"config", "data", "serving", "sharding", "storage", "towers"},
    "launch": {"trainer"},
    "bench": {"config", "data", "serving", "sharding", "storage", "towers", "trainer"},
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
    ("data", "from trainer.loop import train", "data may import only ['config', 'storage']"),
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


def tower_names_outside_the_registry(root: Path, names: list[str]) -> list[str]:
    """Modules outside towers/ that write a registered tower's name as a string: they would compare it."""
    literal = re.compile(r"""["'](%s)["']""" % "|".join(map(re.escape, names)))
    return [f"{name}:{path.read_text()[:m.start()].count(chr(10)) + 1}: {m.group(0)}"
            for name, path in sorted(modules(root).items()) if name.split(".")[0] != "towers"
            for m in literal.finditer(path.read_text())]


def test_only_the_registry_names_a_tower():
    import towers

    assert tower_names_outside_the_registry(ROOT, list(towers.TOWERS)) == [], \
        "ask the registry (towers.of(cfg)) instead of comparing model.query_tower"


def test_every_registered_tower_has_its_tiny_test_overrides():
    import towers
    from tests.conftest import TINY_TOWERS

    assert sorted(TINY_TOWERS) == sorted(towers.TOWERS)


def test_the_tower_name_check_catches_a_comparison(tmp_path):
    for name in ALLOWED:
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text("")
    (tmp_path / "towers" / "hstu.py").write_text("NAME = 'hstu'\n")
    (tmp_path / "trainer" / "build.py").write_text("x = 1\nsequence = cfg.model.query_tower == 'hstu'\n")
    assert tower_names_outside_the_registry(tmp_path, ["hstu"]) == ["trainer.build:2: 'hstu'"]


def test_a_trainer_process_starts_without_mlflow_matplotlib_or_pandas():
    """Every rank of every job imports the trainer; MLflow alone was a third of that start-up (about 3 s of
    CPU per process), and only the rank that tracks needs it (or matplotlib and pandas, for its plots and
    tables). They are imported where they are used."""
    code = ("import sys, trainer.__main__, trainer.loop, launch.run; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'mlflow', 'matplotlib', 'pandas'}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


# Touching a file system directly: only storage/ does it for data, checkpoints and exports. Each exception here is a
# local file by design, with the reason.
FILE_ACCESS = ("open", "Path", "pathlib", "shutil", "os.path", "os.remove", "os.unlink", "os.rename", "os.replace",
               "os.makedirs", "os.mkdir", "os.listdir", "os.scandir", "os.utime", "glob", "gzip.open",
               "pq.read_table", "pq.write_table", "pq.read_schema", "pq.read_metadata", "pq.ParquetFile",
               "pq.ParquetWriter", "pq.ParquetDataset", "pacsv.read_csv", "pacsv.open_csv", "faiss.read_index",
               "faiss.write_index", "torch.save", "torch.load")
# A reading call is fine when its first argument is an in-memory buffer or a stream storage opened.
STREAMS = ("BufferReader", "BytesIO", "open_input", "open_input_stream")
LOCAL_BY_DESIGN = {  # module: (the names it may use, or "*" for all; why)
    "config.loading": ("*", "job configs are YAML files of the checkout or the image"),
    "data.prepare.duckdb_engine": ("*", "DuckDB's spill and partition files: local scratch space, removed at the end"),
    "data.prepare.spark_engine": ("*", "zips the project's own code for Spark's executors (local scratch)"),
    "data.sources.files": ({"pacsv.open_csv"}, "parses CSV from a stream storage opened"),
    "serving.pyfunc": ("*", "the project's code that MLflow packages with the model"),
    "serving.runs": ("*", "the path of MLflow's local sqlite store"),
    "trainer.tracking.run_info": ("*", "the config file's name and the checkout's git commit"),
    "trainer.tracking.mlflow_logger": ("*", "MLflow's outbox and staged artifacts, local to the tracking rank"),
    "trainer.tracking.outbox": ("*", "the outbox file and staged artifacts it replays, local to the tracking rank"),
    "trainer.tracking.records": ("*", "the sqlite store's lock file, beside the local store"),
    "trainer.distributed": ({"os.utime"}, "torchelastic's error file, a local path torchrun gives each rank"),
    "trainer.__main__": ({"os.path.dirname", "os.path.relpath"}, "the interpreter's directory, in the printed "
                                                                 "commands"),
    "launch.run": ("*", "torchelastic's error files, local to each node's agent"),
    "trainer.export.artifact": ({"torch.save"}, "into a bytes buffer that storage writes"),
    "trainer.precision": ("*", "the kernel's /proc/cpuinfo, for the CPU's bf16 instructions"),
}


def dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{dotted(node.value)}.{node.attr}"
    return ""


def direct_file_access(path: Path) -> list[tuple[int, str]]:
    """(line, name) of every call of a FILE_ACCESS name and every import of pathlib, shutil or glob in a module."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
            found += [(node.lineno, n) for n in names if n and n.split(".")[0] in ("pathlib", "shutil", "glob")]
        elif isinstance(node, ast.Call):
            name = dotted(node.func)
            streamed = node.args and isinstance(node.args[0], ast.Call) and \
                dotted(node.args[0].func).rsplit(".", 1)[-1] in STREAMS
            if name and not streamed and any(name == f or name.startswith(f + ".") for f in FILE_ACCESS):
                found.append((node.lineno, name))
    return sorted(set(found))


def file_access_outside_storage(root: Path) -> list[str]:
    problems = []
    for name, path in sorted(modules(root).items()):
        if name.split(".")[0] in ("storage", "bench"):
            continue
        allowed, _ = LOCAL_BY_DESIGN.get(name, (set(), ""))
        problems += [f"{name}:{line}: {use}" for line, use in direct_file_access(path)
                     if allowed != "*" and use not in allowed]
    return problems


def test_only_storage_opens_data_checkpoint_and_export_paths():
    """Every data, checkpoint and export path is a URI that storage/ opens (bench/ writes its own local results)."""
    assert file_access_outside_storage(ROOT) == []
    assert set(LOCAL_BY_DESIGN) <= set(modules(ROOT)), "every exception names a module that exists"


@pytest.mark.parametrize("line", ["import shutil", "from pathlib import Path", "x = open('f')",
                                  "import pyarrow.parquet as pq\npq.read_table('data/x.parquet')",
                                  "import torch\ntorch.load('ckpt.pt')"])
def test_the_file_access_check_catches_a_direct_open(tmp_path, line):
    for name in ALLOWED:
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text("")
    (tmp_path / "data" / "bad.py").write_text(line + "\n")
    assert [p for p in file_access_outside_storage(tmp_path) if p.startswith("data.bad:")]
    (tmp_path / "data" / "bad.py").write_text("import io\nimport torch\ntorch.load(io.BytesIO(b''))\n")
    assert file_access_outside_storage(tmp_path) == [], "a buffer is not a path"
