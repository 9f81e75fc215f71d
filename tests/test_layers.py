"""ARCHITECTURE.md's floors are true: every import of every ``aim_ds`` module (those inside functions too) goes
to its own room or to a lower floor, nothing in the library imports the package facade, a driver, or the
checkout's top-level folders, and there are no import cycles. The floors are read from ARCHITECTURE.md, so the
document and the check cannot disagree; a planted upward, sideways or circular import shows the check bites."""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "aim_ds"
MAIN = "__main__.py"
# Top-level folders of the checkout that a wheel does not hold (data_prep does, but it is a driver above the library).
OUTSIDE = ("run", "bench", "tests", "data_prep", "demo", "scripts")


@dataclass(frozen=True)
class Floors:
    """``room -> floor``; a room is ``x/`` (a subpackage), ``x.py`` (a flat module) or ``__main__.py``."""

    floor_of_room: dict[str, int]

    @property
    def ground(self) -> int:
        return min(self.floor_of_room.values())

    @property
    def drivers(self) -> int:
        return max(self.floor_of_room.values())


def read_floors(markdown: str) -> Floors:
    """The ``| floor | rooms |`` table of ARCHITECTURE.md: the first integer of a row's first cell is its
    floor, the backticked names of its second cell its rooms."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(r"^\|\s*floor\s*\|\s*rooms\s*\|", line))
    floors: dict[str, int] = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        floor = int(re.search(r"\d+", cells[0]).group())
        for room in re.findall(r"`([^`]+)`", cells[1]):
            floors[room] = floor
    return Floors(floors)


def module_names(package_dir: Path) -> dict[str, Path]:
    """``{dotted name: file}`` of every module of the package at ``package_dir``."""
    names = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = [package_dir.name, *path.relative_to(package_dir).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The dotted names ``name`` imports anywhere in its file (a ``from X import y`` counts as ``X.y`` when
    that is a module, else ``X``); relative imports resolved."""
    return _imports(name, path, modules, at_import_time=False)


def _imports(name: str, path: Path, modules: dict[str, Path], *, at_import_time: bool) -> set[str]:
    """``imports_of``; with ``at_import_time``, only the imports run when the module is imported (not those
    inside a function, which run when it is called)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(), str(path))
    deferred: set[int] = set()
    if at_import_time:
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                deferred.update(id(node) for node in ast.walk(fn) if node is not fn)
    found = set()
    for node in ast.walk(tree):
        if id(node) in deferred:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                found.add(f"{target}.{alias.name}" if f"{target}.{alias.name}" in modules else target)
    return found


def room_of(name: str, floors: Floors) -> tuple[str, int]:
    """``(room, floor)`` of module ``name`` (``aim_ds.x...``); the ground floor is one room, so is the drivers'."""
    parts = name.split(".")
    if parts[-1] == "__main__":
        return "drivers", floors.floor_of_room[MAIN]
    if len(parts) > 2 or f"{parts[1]}/" in floors.floor_of_room:
        room = f"{parts[1]}/"
        if room not in floors.floor_of_room:
            raise AssertionError(f"{name}: its subpackage {room} is on no floor; add it to ARCHITECTURE.md's table")
    else:
        room = f"{parts[1]}.py"
    floor = floors.floor_of_room.get(room, floors.ground)
    return {floors.ground: "ground", floors.drivers: "drivers"}.get(floor, room), floor


def violations(package_dir: Path, floors: Floors) -> list[str]:
    """Every import the floors forbid, and every import cycle, as one line each. The floors hold for every
    import; a cycle counts when the imports that close it run at import time (an import inside a function,
    such as ``AIM.from_pretrained``'s, may close a loop inside one room: crossing rooms it would be an
    upward or sideways import, reported above)."""
    modules = module_names(package_dir)
    package = package_dir.name
    found = []
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = imports_of(name, path, modules)
        graph[name] = {t for t in _imports(name, path, modules, at_import_time=True) if t in modules}
        if name == package:
            continue  # the facade re-exports from anywhere below it
        room, floor = room_of(name, floors)
        for target in sorted(targets):
            top = target.split(".")[0]
            if top in OUTSIDE:
                found.append(f"{name} imports {target}: outside the package (a wheel does not hold it)")
            if top != package:
                continue
            if target == package:
                if room != "drivers":
                    found.append(f"{name} imports the package facade {package}; import the module itself")
                continue
            if target not in modules:
                continue  # a name the package does not have: not this test's business (the import fails anyway)
            target_room, target_floor = room_of(target, floors)
            if target_room != room and target_floor >= floor:
                way = "upward" if target_floor > floor else "sideways"
                found.append(
                    f"{name} ({room}, floor {floor}) imports {target} ({target_room}, floor {target_floor}): {way}"
                )
    found += [f"import cycle: {' -> '.join(cycle)}" for cycle in cycles(graph)]
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each strongly connected component of more than one module (or a self-import)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:  # Tarjan's algorithm; the package has a few hundred edges
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph.get(node, ()):
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def test_architecture_floors_hold() -> None:
    floors = read_floors((ROOT / "ARCHITECTURE.md").read_text())
    assert floors.floor_of_room.get("model/") is not None and floors.floor_of_room.get(MAIN) is not None
    problems = violations(ROOT / PACKAGE, floors)
    assert not problems, "ARCHITECTURE.md's floors are broken:\n" + "\n".join(problems)


def test_every_subpackage_is_on_a_floor() -> None:
    floors = read_floors((ROOT / "ARCHITECTURE.md").read_text())
    rooms = {f"{p.parent.name}/" for p in (ROOT / PACKAGE).glob("*/__init__.py")}
    missing = sorted(rooms - set(floors.floor_of_room))
    assert not missing, f"subpackages on no floor of ARCHITECTURE.md's table: {missing}"


FAKE_TABLE = """
| floor | rooms |
|---|---|
| 3 drivers | `cli/`, every `__main__.py` |
| 2 | `train/`, `plan/` |
| 1 | `model/` |
| 0 ground | `io.py` |
"""


def _fake_package(tmp_path: Path, extra: dict[str, str]) -> Path:
    """A small package laid out as FAKE_TABLE says, with ``extra`` files (path -> source) on top."""
    files = {
        "__init__.py": "from .model.net import Net\n",
        "io.py": "import os\n",
        "helpers.py": "from .io import os\n",  # a flat module on no row: ground floor
        "model/__init__.py": "",
        "model/net.py": "from ..io import os\n\nclass Net: ...\n",
        "train/__init__.py": "",
        "train/loop.py": "from ..model.net import Net\nfrom ..helpers import os\n",
        "plan/__init__.py": "",
        "plan/memory.py": "def f():\n    from ..model import net\n",
        "plan/__main__.py": "from ..cli.plan import main\n",
        "cli/__init__.py": "",
        "cli/plan.py": "from ..plan.memory import f\nfrom ..train.loop import Net\n\ndef main(): ...\n",
        **extra,
    }
    root = tmp_path / "fakepkg"
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def test_the_check_passes_a_clean_tree(tmp_path: Path) -> None:
    assert violations(_fake_package(tmp_path, {}), read_floors(FAKE_TABLE)) == []


def test_a_loop_closed_inside_a_function_within_one_room_is_allowed(tmp_path: Path) -> None:
    """As ``AIM.from_pretrained`` imports ``model.pretrained``, which imports ``model.aim``: the loop closes
    only when the method is called, long after both modules are imported."""
    lazy = {"model/a.py": "from .b import x\n", "model/b.py": "def f():\n    from .a import y\n"}
    assert violations(_fake_package(tmp_path, lazy), read_floors(FAKE_TABLE)) == []


@pytest.mark.parametrize(
    ("planted", "expected"),
    [
        # upward, inside a function, as the planner once imported the training package
        ({"plan/report.py": "def f():\n    from ..cli import plan\n"}, "upward"),
        ({"model/net.py": "def g():\n    from fakepkg.train import loop\n"}, "upward"),
        ({"plan/report.py": "from ..train.loop import Net\n"}, "sideways"),
        ({"io.py": "from .model import net\n"}, "upward"),
        ({"train/data.py": "from .. import Net\n"}, "package facade"),
        ({"train/data.py": "import run.probe\n"}, "outside the package"),
        ({"model/a.py": "from .b import x\n", "model/b.py": "from .a import y\n"}, "import cycle"),
        (
            {
                "model/a.py": "from .b import x\n",
                "model/b.py": "import os\nfrom .c import z\n",
                "model/c.py": "from .a import y\n",
            },
            "import cycle",
        ),
    ],
)
def test_the_check_catches_a_planted_import(tmp_path: Path, planted: dict[str, str], expected: str) -> None:
    problems = violations(_fake_package(tmp_path, planted), read_floors(FAKE_TABLE))
    assert any(expected in line for line in problems), problems


def test_an_unlisted_subpackage_is_an_error(tmp_path: Path) -> None:
    root = _fake_package(tmp_path, {"extra/__init__.py": "", "extra/thing.py": "from ..io import os\n"})
    with pytest.raises(AssertionError, match="extra/ is on no floor"):
        violations(root, read_floors(FAKE_TABLE))
