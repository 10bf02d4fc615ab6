"""The rooms keep to their roles: imports run one way and no room holds most of the code."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ROOMS = ("models", "store", "streams", "serving", "evaluation", "bench", "devenv", "freshrec")
TOOLS = {"evaluation", "bench", "devenv"}


def _imports(room: str) -> dict[str, set[str]]:
    """``freshrec.<room>`` names each module of ``room`` imports, anywhere in its body."""
    found: dict[str, set[str]] = {}
    for path in sorted((ROOT / room).glob("*.py")):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
            elif isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
        found[path.name] = {
            n.split(".")[1] if n.count(".") else "freshrec"
            for n in names
            if n == "freshrec" or n.startswith("freshrec.")
        }
    return found


def test_models_import_no_other_room() -> None:
    for module, rooms in _imports("models").items():
        assert rooms <= {"models"}, f"models/{module} imports {sorted(rooms - {'models'})}"


def test_store_and_serving_build_only_on_models_and_settings() -> None:
    for room in ("store", "serving"):
        allowed = {room, "models", "store", "settings"}
        for module, rooms in _imports(room).items():
            assert rooms <= allowed, f"{room}/{module} imports {sorted(rooms - allowed)}"


def test_streams_imports_no_tool() -> None:
    for module, rooms in _imports("streams").items():
        assert not rooms & TOOLS, f"streams/{module} imports {sorted(rooms & TOOLS)}"


def test_no_room_holds_more_than_a_third_of_the_source_lines() -> None:
    lines = {
        r: sum(len(p.read_text().splitlines()) for p in (ROOT / r).glob("*.py")) for r in ROOMS
    }
    total = sum(lines.values())
    for room, count in lines.items():
        assert count <= total / 3 + 200, f"{room}/ holds {count} of {total} lines"
