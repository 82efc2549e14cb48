"""The module structure docs/ARCHITECTURE.md describes: dependencies point one way, stages are
independent, and no import cycle (module-level or inside functions) joins the pipeline's modules."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("data", "models", "pipeline")


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    """Module -> the project modules it imports anywhere in its body (`from pkg import mod` counted as pkg.mod)."""
    modules = {_module(p): p for package in PACKAGES for p in (ROOT / package).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module)
                found |= {f"{node.module}.{a.name}" for a in node.names}
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def test_data_and_models_never_import_pipeline():
    for module, targets in imports().items():
        if module.split(".")[0] in ("data", "models"):
            assert not [t for t in targets if t.startswith("pipeline")], module
        if module.startswith("data"):
            assert not [t for t in targets if t.startswith("models")], module


def test_stages_do_not_import_each_other():
    for module, targets in imports().items():
        if module.startswith("pipeline.stages.") and module != "pipeline.stages":
            assert not [t for t in targets if t.startswith("pipeline.stages")], module


def test_no_import_cycle():
    graph = imports()
    packages = {m for m in graph if any(other.startswith(m + ".") for other in graph)}  # package __init__s

    def edges(m):  # a package's __init__ importing its own submodules is not a cycle of logic
        return {t for t in graph[m] if not (m in packages and t.startswith(m + "."))}

    state: dict[str, int] = {}
    path: list[str] = []

    def visit(m):
        state[m] = 1
        path.append(m)
        for t in edges(m):
            if state.get(t) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(t):] + [t]))
            if t not in state:
                visit(t)
        path.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_config_enums_have_a_home_of_their_own():
    """ConfigEnum lives in pipeline.enums, which imports no project module: a module declaring a closed set
    (precision, sparsity, distillation, quantization) does not import the prune schedules to get it."""
    graph = imports()
    assert graph["pipeline.enums"] == set() and graph["pipeline.declared"] == set()
    for module in ("pipeline.precision", "pipeline.sparsity", "pipeline.distillation", "pipeline.quantization"):
        assert "pipeline.schedules" not in graph[module], module


def test_every_reader_offers_what_the_stages_read_of_the_data():
    """Context.data is typed by the DataSource protocol (pipeline/state.py): every allow-listed reader has each of
    its members, so the stages read them directly instead of probing with getattr."""
    import typing

    from data.readers import READERS, reader_class
    from pipeline.state import DataSource

    members = [m for m in typing.get_type_hints(DataSource)] + [
        m for m, v in vars(DataSource).items() if callable(v) and not m.startswith("_") or isinstance(v, property)]
    assert {"dims", "regions", "dataset", "case_spacing", "original_mask", "input_size"} <= set(members)
    for name in READERS:  # in_channels and num_classes are set by each reader's constructor
        missing = [m for m in members if not hasattr(reader_class(name), m) and m not in ("in_channels", "num_classes")]
        assert not missing, f"{name} lacks {missing}"
