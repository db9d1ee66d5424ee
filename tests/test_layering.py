"""The package's layering: what imports torch, which package may import which, one schedule-name list.

Layers, bottom up (a package may import its own layer and those listed for it):

* base: the top-level modules (plan, schedules, events, timeline, errors, serde, graph, topology,
  hardware, costs, memory, activations, ``__init__``): only other base modules;
* program: base; simulator: base + program; planner: base + program + simulator;
  executor: base + program + simulator + planner;
* calibration, validation: anything except reports and cli/commands;
* reports: base + program + simulator, and never torch;
* ui (``pipetrain ui``'s page and server): base + program + simulator + planner (its torch-free
  modules: never ``planner.trace`` or ``planner.zoo``) + reports (the run directory's readers), and
  never torch; the command module traces the model and hands the ui the layer graph;
* export (``pipetrain export``'s writers, one module per target framework): base + program, and never
  torch; the command module builds the model on meta and hands the exporters its blocks;
* torchsched (torch's own schedules in the simulator): base + program + simulator + planner; torch
  only inside the functions of ``torchsched.orders`` (the package imports without it);
* cli (``cli.py``, ``commands/``, ``__main__``): anything; nothing else imports it.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "pipetrain"

BASE = frozenset({"plan", "schedules", "events", "timeline", "errors", "serde", "graph", "topology", "hardware", "costs", "sharding", "gemm",
                  "memory", "activations", "__init__"})
_BELOW_CALIBRATION = frozenset({"base", "program", "simulator", "planner", "executor", "calibration", "validation"})
ALLOWED: dict[str, frozenset[str]] = {
    "base": frozenset({"base"}),
    "program": frozenset({"base", "program"}),
    "simulator": frozenset({"base", "program", "simulator"}),
    "planner": frozenset({"base", "program", "simulator", "planner"}),
    "executor": frozenset({"base", "program", "simulator", "planner", "executor"}),
    "calibration": _BELOW_CALIBRATION,
    "validation": _BELOW_CALIBRATION,
    "reports": frozenset({"base", "program", "simulator", "reports"}),
    "ui": frozenset({"base", "program", "simulator", "planner", "reports", "ui"}),
    "export": frozenset({"base", "program", "export"}),
    "torchsched": frozenset({"base", "program", "simulator", "planner", "torchsched"}),
    "cli": _BELOW_CALIBRATION | {"reports", "ui", "export", "torchsched", "cli"},
}
#: Layers that must not import torch (at module level or inside functions).
TORCH_FREE_LAYERS = frozenset({"reports", "ui", "export"})
#: Modules a layer may not import although their layer is allowed: the planner's tracing and zoo need torch.
FORBIDDEN_MODULES: dict[str, tuple[str, ...]] = {"ui": ("pipetrain.planner.trace", "pipetrain.planner.zoo")}

#: Every module that imports without torch (one subprocess imports them all).
TORCH_FREE_MODULES = (
    "pipetrain", "pipetrain.plan", "pipetrain.schedules", "pipetrain.events", "pipetrain.timeline", "pipetrain.errors",
    "pipetrain.serde", "pipetrain.graph", "pipetrain.topology", "pipetrain.hardware", "pipetrain.costs", "pipetrain.memory",
    "pipetrain.activations",
    "pipetrain.program", "pipetrain.simulator", "pipetrain.planner.search", "pipetrain.planner.explain", "pipetrain.planner.grid",
    "pipetrain.planner.partition", "pipetrain.planner.job", "pipetrain.planner.build", "pipetrain.reports", "pipetrain.ui",
    "pipetrain.export",
    "pipetrain.torchsched",
    # torch only inside the functions that measure or trace
    "pipetrain.calibration.profile", "pipetrain.calibration.fit",
    "pipetrain.commands.plan", "pipetrain.commands.sweep", "pipetrain.commands.simulate", "pipetrain.commands.ui",
    "pipetrain.commands.export",
)


# ----- the checker -------------------------------------------------------------------------------
def module_name(path: Path, root: Path = ROOT) -> str:
    """``pipetrain/simulator/ops.py`` -> ``pipetrain.simulator.ops``; a package's ``__init__`` is the package."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_module(name: str) -> bool:
    p = ROOT.joinpath(*name.split("."))
    return p.with_suffix(".py").is_file() or (p / "__init__.py").is_file()


def layer_of(name: str) -> str | None:
    """The layer of a pipetrain module name (None: not pipetrain)."""
    parts = name.split(".")
    if parts[0] != "pipetrain":
        return None
    if len(parts) == 1 or parts[1] in BASE:
        return "base"
    if parts[1] in ("cli", "commands", "__main__"):
        return "cli"
    return parts[1]


def imports_of(source: str, name: str, *, is_package: bool, is_module: Callable[[str], bool] = _is_module) -> Iterator[tuple[int, str]]:
    """(line, imported module) for every import in ``source`` (module ``name``), inside functions too;
    ``from X import y`` yields ``X.y`` where that is a module, else ``X``; relative imports resolved."""
    package = name if is_package else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                mod = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            for alias in node.names:
                sub = f"{mod}.{alias.name}"
                yield node.lineno, sub if alias.name != "*" and is_module(sub) else mod


def violations(source: str, path: str, name: str, *, is_package: bool = False,
               is_module: Callable[[str], bool] = _is_module) -> list[str]:
    """``path:line -> target (rule)`` for each import that breaks the layering."""
    layer = layer_of(name)
    if layer is None:
        return []
    out = []
    for line, target in sorted(set(imports_of(source, name, is_package=is_package, is_module=is_module))):
        if layer in TORCH_FREE_LAYERS and (target == "torch" or target.startswith("torch.")):
            out.append(f"{path}:{line} -> {target} ({layer} must not import torch)")
        for banned in FORBIDDEN_MODULES.get(layer, ()):
            if target == banned or target.startswith(banned + "."):
                out.append(f"{path}:{line} -> {target} ({layer} must not import {banned}: it needs torch)")
        t_layer = layer_of(target)
        if t_layer is not None and t_layer not in ALLOWED[layer]:
            out.append(f"{path}:{line} -> {target} ({layer} may import only {', '.join(sorted(ALLOWED[layer]))})")
    return out


_SOURCE_READERS = {("ast", "parse"), ("inspect", "getsource"), ("inspect", "getsourcelines"), ("inspect", "getsourcefile"),
                   ("inspect", "getfile")}


def source_reads(source: str, path: str) -> list[str]:
    """``path:line: what`` where a module reads Python source: ``ast.parse``, ``inspect.getsource*``,
    another module's ``__file__``, or its own ``__file__`` next to a ``.py`` name."""
    out = []
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            if isinstance(node.value, ast.Name) and (node.value.id, node.attr) in _SOURCE_READERS:
                out.append(f"{path}:{node.lineno}: {node.value.id}.{node.attr}")
            elif node.attr == "__file__":
                out.append(f"{path}:{node.lineno}: another module's __file__")
        elif isinstance(node, ast.ImportFrom) and node.module in ("ast", "inspect"):
            for alias in node.names:
                if (node.module, alias.name) in _SOURCE_READERS:
                    out.append(f"{path}:{node.lineno}: from {node.module} import {alias.name}")
    for stmt in ast.walk(tree):
        if not isinstance(stmt, ast.stmt) or isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.If, ast.For,
                                                               ast.While, ast.With, ast.Try)):
            continue
        names = {n.id for n in ast.walk(stmt) if isinstance(n, ast.Name)}
        py = [n.value for n in ast.walk(stmt) if isinstance(n, ast.Constant) and isinstance(n.value, str) and ".py" in n.value]
        if "__file__" in names and py:
            out.append(f"{path}:{stmt.lineno}: __file__ with {py[0]!r}")
    return out


def _modules() -> list[tuple[Path, str]]:
    return [(p, module_name(p)) for p in sorted(PKG.rglob("*.py"))]


# ----- the tests ---------------------------------------------------------------------------------
def test_torch_free_modules_import_without_torch() -> None:
    code = (f"import sys; import {', '.join(TORCH_FREE_MODULES)}; from pipetrain.topology import topology_preset; "
            "topology_preset('dgx-h100:1'); loaded = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')); "
            "assert not loaded, loaded")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_import_graph_follows_the_layers() -> None:
    bad: list[str] = []
    for path, name in _modules():
        assert layer_of(name) in ALLOWED, f"{path}: module {name} is in no layer; add it to tests/test_layering.py"
        bad += violations(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT)), name, is_package=path.name == "__init__.py")
    assert not bad, "imports against the layering:\n" + "\n".join(bad)


def test_no_module_reads_python_source() -> None:
    bad: list[str] = []
    for path, _ in _modules():
        bad += source_reads(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT)))
    assert not bad, "modules reading Python source:\n" + "\n".join(bad)


def test_checker_catches_planted_violations() -> None:
    """The checker itself: a base module importing the executor (in a function, and relatively),
    a report importing torch, a planner importing the CLI; and clean imports pass."""
    planted = (
        "import json\n"
        "from pipetrain.errors import PlanError\n"
        "def f():\n"
        "    from pipetrain.executor import trainer\n"
        "    from .simulator import engine\n"
        "    import pipetrain.cli\n"
    )
    bad = violations(planted, "pipetrain/plan.py", "pipetrain.plan")
    assert [b.split(" (")[0] for b in bad] == ["pipetrain/plan.py:4 -> pipetrain.executor.trainer",
                                               "pipetrain/plan.py:5 -> pipetrain.simulator.engine",
                                               "pipetrain/plan.py:6 -> pipetrain.cli"]
    assert violations("def g():\n    import torch.nn\n", "pipetrain/reports/x.py", "pipetrain.reports.x") == [
        "pipetrain/reports/x.py:2 -> torch.nn (reports must not import torch)"]
    assert violations("from ..commands import plan\n", "pipetrain/planner/x.py", "pipetrain.planner.x")[0].startswith(
        "pipetrain/planner/x.py:1 -> pipetrain.commands.plan (planner may import only")
    assert violations("from . import ops\nfrom pipetrain.program import lower\nimport numpy\n", "pipetrain/simulator/x.py",
                      "pipetrain.simulator.x") == []
    assert violations("from pipetrain.planner import search\n", "pipetrain/cli.py", "pipetrain.cli") == []
    assert violations("def h():\n    from pipetrain.planner.trace import trace_graph\n", "pipetrain/ui/x.py", "pipetrain.ui.x") == [
        "pipetrain/ui/x.py:2 -> pipetrain.planner.trace (ui must not import pipetrain.planner.trace: it needs torch)"]
    assert violations("from pipetrain.executor import plans\n", "pipetrain/ui/x.py", "pipetrain.ui.x")[0].startswith(
        "pipetrain/ui/x.py:1 -> pipetrain.executor.plans (ui may import only")
    assert violations("from pipetrain.planner.zoo import get_model_spec\n", "pipetrain/export/x.py", "pipetrain.export.x")[0].startswith(
        "pipetrain/export/x.py:1 -> pipetrain.planner.zoo (export may import only base, export, program)")
    assert violations("def f():\n    import torch\n", "pipetrain/export/x.py", "pipetrain.export.x") == [
        "pipetrain/export/x.py:2 -> torch (export must not import torch)"]
    assert violations("from pipetrain.export import export_plan\n", "pipetrain/commands/export.py", "pipetrain.commands.export") == []
    assert violations("from pipetrain.planner.explain import stage_tensors\nfrom pipetrain.reports import rundir\n",
                      "pipetrain/ui/x.py", "pipetrain.ui.x") == []
    assert source_reads("import ast\nt = ast.parse(open(f).read())\n", "m.py") == ["m.py:2: ast.parse"]
    assert source_reads("from pathlib import Path\ns = (Path(__file__).parent / 'engine.py').read_text()\n", "m.py") == [
        "m.py:2: __file__ with 'engine.py'"]
    assert source_reads("import pipetrain.plan as p\nsrc = open(p.__file__).read()\n", "m.py") == ["m.py:2: another module's __file__"]
    assert source_reads("from pathlib import Path\nt = (Path(__file__).parent / 'templates' / 'a.html').read_text()\n", "m.py") == []


@pytest.mark.parametrize("name, layer", [("pipetrain", "base"), ("pipetrain.timeline", "base"), ("pipetrain.program.lower", "program"),
                                         ("pipetrain.commands.run", "cli"), ("pipetrain.__main__", "cli"), ("numpy", None)])
def test_layer_of(name: str, layer: str | None) -> None:
    assert layer_of(name) == layer


def _string_collections(tree: ast.AST) -> Iterator[tuple[int, set[str]]]:
    for node in ast.walk(tree):
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            strs = {e.value for e in node.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)}
            if strs:
                yield node.lineno, strs


def test_one_list_of_schedule_names() -> None:
    """The schedule names are spelled out once, in pipetrain/schedules.py; everything else imports them."""
    from pipetrain.schedules import SCHEDULE_NAMES

    names = set(SCHEDULE_NAMES)
    found = []
    for top in ("pipetrain", "benchmarks", "examples"):
        for path in sorted((ROOT / top).rglob("*.py")):
            for line, strs in _string_collections(ast.parse(path.read_text(encoding="utf-8"))):
                if names <= strs:
                    found.append(f"{path.relative_to(ROOT)}:{line}")
    assert len(found) == 1 and found[0].startswith("pipetrain/schedules.py:"), f"schedule-name lists: {found}"
