"""The package's layout, drawn from its imports (counting imports inside functions): layers that only import
downwards, the stages in the order of the data's journey, at most 10 floors, no module over 500 lines, no import
cycle, and a config that needs no torch. docs/architecture.md draws the same house."""

from __future__ import annotations

import ast
import subprocess
import sys
from typing import Iterator
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "tokenforget"

# Lowest first: a module may import its own layer and the layers before it, never one after it.
LAYERS: dict[str, tuple[str, ...]] = {
    "base": ("errors", "config", "command_config", "presets", "version", "training", "training.objectives", "score_methods", "metrics",
             "runfolder", "text_table", "columns", "diversity", "sampling"),
    "model": ("model",),
    "trainer": ("training.trainer", "training.fit"),
    "stages": ("stages",),
    "drop_in": ("training.trl",),  # TRL's SFTTrainer with the objective; reads the data's weights through the data stage
    "pipeline": ("pipeline",),
    "report": ("report",),
    "commands": ("commands",),
    "entry": ("cli", "__main__", "__init__", "trl"),  # trl: the drop-in's public path (`training/trl.py`)
}
# The data's journey through the stage layer: a stage imports only the stages before it.
JOURNEY = ("stage", "labels_in_data", "noise", "data", "demo_task", "natural", "weak", "verdicts", "reference", "score", "partition_streaming",
           "partition", "labels", "train", "preference", "harness", "evaluate")
MAX_FLOORS = 10
MAX_LINES = 500
OVER_FOR_NOW: dict[str, int] = {}  # modules allowed over MAX_LINES for now, with their line count
LIGHT = ("errors", "config", "command_config", "presets", "version")  # imported by the CLI's parser: no torch


def module_name(path: Path) -> str:
    """`stages/score.py` -> `stages.score`; a package's `__init__.py` -> the package (the root's: `__init__`)."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    parts = parts[:-1] if parts[-1] == "__init__" else parts
    return ".".join(parts) or "__init__"


def is_module(dotted: str) -> bool:
    rel = dotted.replace(".", "/")
    return (PACKAGE / f"{rel}.py").is_file() or (PACKAGE / rel / "__init__.py").is_file()


def imports_of(path: Path, at_run_time: bool = False) -> set[str]:
    """The tokenforget modules `path` imports anywhere (top level or inside a function), by `module_name`.
    `from tokenforget.stages import data` is the module `stages.data`; `from tokenforget import X` for a name X
    (not a module) is the package root, `__init__`. `at_run_time`: without the imports under `if TYPE_CHECKING:`
    (types a protocol names for the checker, never imported when the code runs)."""
    out: set[str] = set()
    for node in _nodes(ast.parse(path.read_text()), at_run_time):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and node.module.split(".")[0] == "tokenforget":
            base = node.module.removeprefix("tokenforget").removeprefix(".")
            for alias in node.names:
                sub = f"{base}.{alias.name}" if base else alias.name
                out.add(sub if is_module(sub) else (base or "__init__"))
        elif isinstance(node, ast.Import):
            out |= {a.name.removeprefix("tokenforget.") for a in node.names if a.name.startswith("tokenforget.")}
    return out


def _nodes(tree: ast.AST, at_run_time: bool) -> Iterator[ast.AST]:
    """Every node of `tree` (`ast.walk`); `at_run_time`: not those under `if TYPE_CHECKING:`."""
    for node in ast.iter_child_nodes(tree):
        if at_run_time and isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
            yield from (n for child in node.orelse for n in [child, *_nodes(child, at_run_time)])
            continue
        yield node
        yield from _nodes(node, at_run_time)


def sources() -> list[Path]:
    return [p for p in PACKAGE.rglob("*.py") if "tasks" not in p.relative_to(PACKAGE).parts]  # lm-eval's task code


def import_graph(at_run_time: bool = False) -> dict[str, set[str]]:
    return {module_name(p): imports_of(p, at_run_time) - {module_name(p)} for p in sources()}


def layer_of(module: str) -> int:
    """The index of `module`'s layer in LAYERS: the layer that names it, else the one that names its package;
    KeyError names a module no layer holds."""
    layers = list(LAYERS.values())
    for top in (module, module.split(".")[0]):
        for i, members in enumerate(layers):
            if top in members:
                return i
    raise KeyError(f"{module}: in no layer of tests/test_layout.py LAYERS (put it on a floor)")


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


def floors(graph: dict[str, set[str]]) -> dict[str, int]:
    """Each module's floor in an acyclic `graph`: 1 for a module that imports none, else 1 + its highest import's.
    A package's `__init__` (no code of its own but the root's lazy names) is not a floor for its importers."""
    out: dict[str, int] = {}

    def floor(node: str) -> int:
        if node not in out:
            deps = [d for d in graph.get(node, ()) if d in graph]
            out[node] = 1 + max((floor(d) for d in deps), default=0)
        return out[node]

    for node in graph:
        floor(node)
    return out


def test_checkers_find_what_they_are_given():
    """The checkers themselves: a -> b -> c -> a is a cycle, a tree is not; a chain of three is three floors."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []
    assert floors({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == {"a": 3, "b": 2, "c": 1}
    assert layer_of("stages.score") == 3 and layer_of("config") == 0 and layer_of("cli") == len(LAYERS) - 1


def test_type_only_imports_count_for_direction_not_for_floors(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("from typing import TYPE_CHECKING\nfrom tokenforget import errors\nif TYPE_CHECKING:\n"
                   "    from tokenforget import config\nelse:\n    import tokenforget.metrics\n")
    assert imports_of(src) == {"errors", "config", "metrics"}
    assert imports_of(src, at_run_time=True) == {"errors", "metrics"}


def test_no_import_cycle():
    graph = import_graph()
    assert {"pipeline.resolver", "runfolder", "stages.reference", "report.tables"} <= set(graph)  # the walk sees the package
    assert find_cycle(graph) == []


def test_every_module_has_a_layer_and_no_layer_imports_a_higher_one():
    graph = import_graph()
    upward = sorted(f"{a} ({list(LAYERS)[layer_of(a)]}) imports {b} ({list(LAYERS)[layer_of(b)]})"
                    for a, deps in graph.items() for b in deps if layer_of(b) > layer_of(a))
    assert upward == []


def test_stages_import_only_the_stages_before_them():
    graph = import_graph()
    stages = {m.removeprefix("stages.") for m in graph if m.startswith("stages.")}
    assert stages == set(JOURNEY)
    back = sorted(f"stages.{a} imports stages.{b}" for a in JOURNEY for b in JOURNEY
                  if f"stages.{b}" in graph[f"stages.{a}"] and JOURNEY.index(b) > JOURNEY.index(a))
    assert back == []


def test_nothing_imports_the_package_root():
    """`from tokenforget import __version__` would put the root (which names the whole API) under a module."""
    graph = import_graph()
    assert sorted(m for m, deps in graph.items() if "__init__" in deps) == []


def test_at_most_ten_floors():
    """Floors count what runs: a protocol's types imported for the checker alone (`if TYPE_CHECKING:`) add none,
    though the other tests see them (they may point down only)."""
    heights = floors(import_graph(at_run_time=True))
    top = max(heights.values())
    assert top <= MAX_FLOORS, sorted(heights.items(), key=lambda kv: -kv[1])[:5]


def test_no_module_over_500_lines():
    long = {module_name(p): n for p in sources()
            if (n := len(p.read_text().splitlines())) > OVER_FOR_NOW.get(module_name(p), MAX_LINES)}
    assert long == {}


def test_stage_modules_and_config_import_alone():
    """Each stage module imports in a process where the pipeline layer cannot be imported; the config modules
    import without torch."""
    light = "; ".join(f"import tokenforget.{m}" for m in LIGHT)
    stages = "; ".join(f"import tokenforget.stages.{s}" for s in JOURNEY)
    code = (f"import sys; {light}; assert 'torch' not in sys.modules, 'config imported torch'; "
            "sys.modules['tokenforget.pipeline'] = None; sys.modules['tokenforget.pipeline.resolver'] = None; " + stages)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PACKAGE.parents[1],
                         env={"PYTHONPATH": str(PACKAGE.parent), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-2000:]
