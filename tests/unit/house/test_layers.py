"""The house's floor plan, held by a test: no import cycles, and no import from a lower floor up to a higher one.

Floors, lowest first; a module may import its own wing and any lower floor, never a higher floor or another wing
of its own floor. Function-level imports count like module-level ones (a lazy import is still a dependency).
"""

import ast
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
PACKAGES = ("flows", "tasks", "registry", "recipes")
FLOORS = [
    ["tasks.base"],
    ["recipes"],
    ["tasks.store", "tasks.host"],
    ["tasks.models", "tasks.decisions"],
    ["tasks.calibration"],
    ["tasks.quantization"],
    ["tasks.backends"],
    ["tasks.profiles"],
    ["tasks.validation"],
    ["registry"],
    ["flows"],
    ["tasks.build"],  # legacy: what versions registered before the house move import at load (one release)
]


def modules() -> dict[str, Path]:
    found = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def import_graph() -> dict[str, set[str]]:
    mods = modules()

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    edges: dict[str, set[str]] = defaultdict(set)
    for mod, path in mods.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [resolve(a.name) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(up + ([base] if base else []))
                targets = [resolve(f"{base}.{a.name}") if f"{base}.{a.name}" in mods else resolve(base)
                           for a in node.names]
            else:
                continue
            edges[mod] |= {t for t in targets if t and t != mod}
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    sys.setrecursionlimit(10_000)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in list(edges):
        if v not in index:
            visit(v)
    return found


def wing_of(mod: str) -> tuple[int, str]:
    best = None
    for floor, wings in enumerate(FLOORS):
        for wing in wings:
            if (mod == wing or mod.startswith(wing + ".")) and (best is None or len(wing) > len(best[1])):
                best = (floor, wing)
    assert best is not None or mod == "tasks", f"{mod} lies in no wing of FLOORS"
    return best or (len(FLOORS), "tasks")


def test_every_module_lies_in_a_wing():
    loose = [m for m in modules() if m.count(".") == 1 and m.startswith("tasks.") and m != "tasks.build"
             and not (ROOT / m.replace(".", "/")).is_dir()]
    assert loose == [], f"tasks/ holds wings only; loose modules: {loose}"
    for mod in modules():
        wing_of(mod)


def test_there_are_no_import_cycles():
    assert cycles(import_graph()) == []


def test_no_import_runs_up_a_floor_or_sideways_into_another_wing():
    bad = []
    for mod, targets in import_graph().items():
        floor, wing = wing_of(mod)
        for target in targets:
            t_floor, t_wing = wing_of(target)
            if t_floor > floor or (t_floor == floor and t_wing != wing):
                bad.append(f"{mod} (floor {floor}, {wing}) imports {target} (floor {t_floor}, {t_wing})")
    assert bad == []


def test_a_wings_parts_never_import_its_face():
    """A face (`__init__`) hands names on; the parts below it import each other, never the face."""
    mods = modules()
    bad = [f"{mod} imports its face {target}" for mod, targets in import_graph().items() for target in targets
           if mods[target].name == "__init__.py" and mod.startswith(target + ".")]
    assert bad == []


def test_nothing_outside_the_backends_wing_compares_a_backend_name():
    names = {"reference", "trtllm", "vllm"}
    bad = []
    for mod, path in modules().items():
        if mod.startswith("tasks.backends") or mod.startswith("recipes"):
            continue  # the backends themselves, and the recipe's target types (one per backend)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare) and any(
                    isinstance(c, ast.Constant) and c.value in names for c in [node.left, *node.comparators]):
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert bad == []


def test_versions_registered_before_the_move_still_find_what_their_code_imports():
    """Their logged pyfunc code (registry/pyfunc_model.py before the move) does exactly this at load."""
    from tasks import backends
    from tasks.build import backend, verify_artifact
    from tasks.profiles import profile

    assert backend("reference") is backends.get("reference") and verify_artifact is profile.verify_artifact
