"""The wheel `pip install .` would install: one top-level package, `raymoe`, holding every source
file of the repository's package folders, the demo model and the proto; nothing else at the top.

Built offline (`--no-build-isolation --no-deps`: the setuptools already installed) from a copy of the
working tree without build/ and *.egg-info, so that a stale build folder cannot hide a missing file.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("model", "actors", "cluster", "cli", "protos")  # folder → raymoe.<folder>
NOT_INSTALLED = ("model", "actors", "cluster", "cli", "protos", "bench", "scripts", "k8s", "tests")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    src = tmp_path_factory.mktemp("src") / "raymoe"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", ".venv", "venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", "out"))
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
                    str(src), "-w", str(out)], check=True, capture_output=True, timeout=600)
    [path] = out.glob("raymoe-*.whl")
    with zipfile.ZipFile(path) as z:
        yield z


@pytest.fixture(scope="module")
def wheel_files(wheel) -> list[str]:
    return wheel.namelist()


def test_the_wheel_installs_one_top_level_package(wheel, wheel_files):
    tops = {name.split("/")[0] for name in wheel_files}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"raymoe"}
    assert not set(tops) & set(NOT_INSTALLED)
    [top_level] = [n for n in wheel_files if n.endswith(".dist-info/top_level.txt")]
    assert wheel.read(top_level).decode().split() == ["raymoe"]
    [entry_points] = [n for n in wheel_files if n.endswith(".dist-info/entry_points.txt")]
    assert "raymoe = raymoe.cli.main:main" in wheel.read(entry_points).decode()
    assert not any(name.startswith(("raymoe/bench/", "raymoe/scripts/", "raymoe/k8s/", "raymoe/tests/"))
                   for name in wheel_files)


def test_the_wheel_holds_every_package_file_the_demo_model_and_the_proto(wheel_files):
    files = set(wheel_files)
    for folder in PACKAGES:
        sources = {f"raymoe/{p.relative_to(ROOT).as_posix()}" for p in (ROOT / folder).rglob("*.py")
                   if "__pycache__" not in p.parts}
        assert sources and sources <= files, sorted(sources - files)
        assert f"raymoe/{folder}/__init__.py" in files
    demo = {p.name for p in (ROOT / "model" / "demo_model").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.model"} <= demo
    assert {f"raymoe/model/demo_model/{name}" for name in demo} <= files
    assert {"raymoe/protos/generator.proto", "raymoe/protos/generator_pb2.py",
            "raymoe/protos/generator_pb2_grpc.py"} <= files
    assert "raymoe/__init__.py" not in files  # a namespace package: nothing of its own at the top
