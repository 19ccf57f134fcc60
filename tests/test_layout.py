"""The package's layout: rooms in layers, no module imports a higher layer, no import cycle.

Every import counts, the ones inside functions too: a lazy import that runs upward is still
a dependency that runs upward. Rooms, from the bottom:

0. `errors`, `tools`, `probes`, `cache` (no guardrail import above them); `policies` and
   `shipped` hold data
1. `runtime`: how the model runs
2. `gate` (InferAligner) and `budget` (InferenceGuard), which do not import each other
3. `decision`: what a request gets
4. `calibrate` (everything offline) and `tenants` (what a tenant may set)
5. `serve`: scheduler, workers, Guard, HTTP
6. `cli` and `integrations`
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"guardrail": ROOT / "guardrail", "guardrail.cache": ROOT / "cache"}
FOLDERS["guardrail.integrations"] = ROOT / "integrations"
FOLDERS["guardrail.policies"] = ROOT / "policies"

LAYERS = {
    "errors": 0,
    "tools": 0,
    "probes": 0,
    "cache": 0,
    "policies": 0,
    "shipped": 0,  # data: the embedded default's calibration artifacts
    "runtime": 1,
    "gate": 2,
    "budget": 2,
    "decision": 3,
    "calibrate": 4,
    "tenants": 4,
    "serve": 5,
    "cli": 6,
    "integrations": 6,
    "__init__": 6,  # `guardrail.Guard`, lazily
}


def modules() -> dict[str, Path]:
    found = {}
    for package, folder in FOLDERS.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = path
    return found


def room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports(path: Path, known: set[str]) -> set[str]:
    """The guardrail modules this file imports, anywhere in it."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            base = node.module
            for alias in node.names:
                full = f"{base}.{alias.name}"
                out.add(full if full in known else base)
        elif isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
    return {m for m in out if m in known}


def graph() -> dict[str, set[str]]:
    found = modules()
    known = set(found)
    return {m: imports(path, known) - {m} for m, path in found.items()}


def test_every_room_has_a_layer() -> None:
    rooms = {room(m) for m in graph()}
    assert rooms <= set(LAYERS), f"rooms without a layer: {sorted(rooms - set(LAYERS))}"


def test_no_module_imports_a_higher_layer() -> None:
    upward = [
        f"{m} -> {dep}"
        for m, deps in graph().items()
        for dep in deps
        if LAYERS[room(dep)] > LAYERS[room(m)] and room(m) != "__init__"
    ]
    assert not upward, "imports that run upward:\n" + "\n".join(sorted(upward))


def test_gate_and_budget_do_not_import_each_other() -> None:
    across = [
        f"{m} -> {dep}"
        for m, deps in graph().items()
        for dep in deps
        if {room(m), room(dep)} == {"gate", "budget"}
    ]
    assert not across, "\n".join(sorted(across))


def test_no_import_cycle() -> None:
    edges = graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(edges[node]):
            if state.get(dep) == 1:
                cycles.append([*path[path.index(dep) :], dep])
            elif dep not in state:
                visit(dep, [*path, dep])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    # A package's __init__ importing its own modules lazily is not a cycle worth reporting.
    real = [c for c in cycles if not any(n == "guardrail" for n in c)]
    assert not real, "import cycles:\n" + "\n".join(" -> ".join(c) for c in real)


def test_the_walk_sees_the_package() -> None:
    """Guards the test itself: a broken walk would pass every check above vacuously."""
    edges = graph()
    assert "guardrail.serve.worker" in edges
    assert "guardrail.runtime.forward" in edges["guardrail.serve.worker"]
    assert "guardrail.cache.artifacts" in edges
