"""The shape of the package: rooms import only the rooms below them, and nothing uses a
private Optuna API.

A room is a top-level module or subpackage of ``coqat`` (``coqat.cost``, ``coqat.records``).
``LAYERS`` lists them bottom to top; a room may import rooms of lower layers only, whether
the import is at module level or inside a function, so a function-level import can never
hide a cycle. docs/DESIGN.md draws the same picture.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "coqat"

#: bottom to top; rooms on one line are peers and must not import each other
LAYERS: list[set[str]] = [
    {"errors"},
    {"util"},
    {"rundir", "bitconfig"},
    {"records", "targets"},
    {"config"},
    {"cost", "quant"},
    {"kernels"},
    {"optim", "workloads"},
    {"exporters"},
    {"training"},
    {"bitsearch"},
    {"sweep", "reporting"},
    {"api"},
    {"demo"},
    {"cli"},
    {"__main__", "__init__"},
]


def _room_of(path: Path) -> str:
    rel = path.relative_to(PKG)
    return rel.parts[0].removesuffix(".py")


def _imports(path: Path):
    """(imported coqat room, line, inside a function?) for every import in the file."""
    tree = ast.parse(path.read_text())
    funcs = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    nested = {id(x) for f in funcs for x in ast.walk(f)}
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + ([f"{node.module}.{a.name}" for a in node.names]
                                     if node.module == "coqat" else [])
        for name in names:
            parts = name.split(".")
            if parts[0] == "coqat" and len(parts) > 1:
                yield parts[1], node.lineno, id(node) in nested


def test_every_room_is_in_a_layer():
    rooms = {_room_of(p) for p in PKG.rglob("*.py")} - {"schema"}
    listed = set().union(*LAYERS)
    assert rooms <= listed, f"rooms missing from LAYERS: {sorted(rooms - listed)}"


def test_rooms_import_only_lower_layers():
    level = {room: i for i, layer in enumerate(LAYERS) for room in layer}
    bad = []
    for path in sorted(PKG.rglob("*.py")):
        room = _room_of(path)
        for target, line, in_function in _imports(path):
            if target == room or target not in level:
                continue
            if level[target] >= level[room]:
                where = "in a function" if in_function else "at module level"
                bad.append(f"{path.relative_to(ROOT)}:{line} {room} -> {target} ({where})")
    assert not bad, "imports against the layering:\n" + "\n".join(bad)


def test_no_private_optuna_api():
    needles = ("._storage", "._trial_id", "optuna._", "system_attrs")
    hits = [f"{p.relative_to(ROOT)}:{i}" for p in PKG.rglob("*.py")
            for i, line in enumerate(p.read_text().splitlines(), 1)
            if "optuna" in p.read_text() and any(n in line for n in needles)]
    assert not hits, hits


def test_no_top_level_cli_module_is_installed():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "py-modules" not in project.get("tool", {}).get("setuptools", {})
    assert project["project"]["scripts"]["coqat"] == "coqat.cli:main"
