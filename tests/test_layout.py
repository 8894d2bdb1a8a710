"""The rooms of the house and what each may import (docs/architecture.md), checked on the source:
every import statement of every module, function-local ones included."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# room → modules (and their submodules) it must never import
FORBIDDEN = {
    "model": ["raymoe.actors", "raymoe.cluster", "raymoe.cli", "raymoe.protos", "ray", "grpc", "grpc_health",
              "fastapi", "starlette"],
    "actors": ["raymoe.cluster", "raymoe.cli", "raymoe.protos", "ray.serve", "grpc", "grpc_health", "fastapi",
               "starlette"],
    "cluster": ["raymoe.cli"],
    "protos": ["raymoe.model", "raymoe.actors", "raymoe.cluster", "raymoe.cli", "ray", "torch"],
}
LIMIT_LINES = 400  # hand-written files; the generated gRPC stubs are not
GENERATED = {"generator_pb2.py", "generator_pb2_grpc.py"}


def imports_of(path: Path, room: str) -> set[str]:
    """Absolute names of every module `path` imports (relative imports resolved inside raymoe.<room>)."""
    package = ["raymoe", room, *path.relative_to(ROOT / room).parent.parts]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            names.add(module)
            names |= {f"{module}.{a.name}" for a in node.names}  # `from . import x` may name a module
    return names


@pytest.mark.parametrize("room", sorted(FORBIDDEN))
def test_each_room_imports_only_what_it_may(room):
    broken = []
    for path in sorted((ROOT / room).rglob("*.py")):
        for name in sorted(imports_of(path, room)):
            if any(name == bad or name.startswith(bad + ".") for bad in FORBIDDEN[room]):
                broken.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not broken, "\n".join(broken)


def test_the_rules_see_imports():
    """The checker itself: it finds a relative import, a function-local one and `from . import x`."""
    found = imports_of(ROOT / "cluster" / "settings.py", "cluster")
    assert {"raymoe.cluster.requests", "raymoe.actors.pool", "raymoe.model.config"} <= found


def test_no_hand_written_file_over_the_limit():
    long = [f"{p.relative_to(ROOT)}: {n} lines" for room in ("model", "actors", "cluster", "cli", "protos")
            for p in sorted((ROOT / room).rglob("*.py")) if p.name not in GENERATED
            if (n := len(p.read_text().splitlines())) > LIMIT_LINES]
    assert not long, "\n".join(long)
