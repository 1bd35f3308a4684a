"""The package's layout: no import cycle (counting imports inside functions), stage modules that do not import
the pipeline, and a config module that needs no torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "tokenforget"
STAGES = ("data", "noise", "reference", "score", "partition", "labels", "train", "benchmarks", "report")


def imports_of(path: Path) -> set[str]:
    """The tokenforget modules `path` imports anywhere (top level or inside a function)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tokenforget"):
            if node.module == "tokenforget":  # `from tokenforget import data as data_mod`: submodules by name
                out |= {a.name for a in node.names if (PACKAGE / f"{a.name}.py").is_file()}
            else:
                out.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            out |= {a.name.split(".")[1] for a in node.names if a.name.startswith("tokenforget.")}
    return out


def import_graph() -> dict[str, set[str]]:
    return {p.stem: imports_of(p) - {p.stem} for p in PACKAGE.glob("*.py") if p.stem not in ("__init__", "__main__")}


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One cycle of `graph` as a path [a, b, ..., a]; [] when there is none (depth-first, three colours)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node], path[len(path):] = 1, [node]
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = 2
        path.pop()
        return []

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return []


def test_cycle_finder_finds_a_cycle_it_is_given():
    """The checker itself: a -> b -> c -> a is found, a tree is not."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []


def test_no_import_cycle():
    graph = import_graph()
    assert {"pipeline", "runfolder", "reference", "compare_tables"} <= set(graph)  # the walk sees the package
    assert find_cycle(graph) == []


def test_stage_modules_do_not_import_the_pipeline():
    graph = import_graph()
    assert {s: graph[s] & {"pipeline", "compare", "plan", "cli"} for s in STAGES} == {s: set() for s in STAGES}


def test_stage_modules_and_config_import_alone():
    """Each stage module imports in a process where the pipeline cannot be imported; config imports without torch."""
    stages = "; ".join(f"import tokenforget.{s}" for s in STAGES)
    code = ("import sys; import tokenforget.config; assert 'torch' not in sys.modules, 'config imported torch'; "
            "sys.modules['tokenforget.pipeline'] = None; " + stages)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PACKAGE.parents[1],
                         env={"PYTHONPATH": str(PACKAGE.parent), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-2000:]
