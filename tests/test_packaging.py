"""The package metadata: pyproject.toml and requirements.txt agree, and a built wheel carries the
code, the built-in weights, the example images and the `cellpose-web` command."""
from __future__ import annotations

import subprocess
import sys
import shutil
import zipfile
from pathlib import Path

import pytest

from cellpose_web import resources

try:
    import tomllib
except ImportError:  # Python 3.10: requirements-dev.txt installs tomli there
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]


def _requirements() -> list[str]:
    lines = (REPO / "requirements.txt").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith(("#", "-"))]


def test_pyproject_dependencies_are_requirements_txt():
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert meta["project"]["dependencies"] == _requirements()
    assert meta["project"]["scripts"]["cellpose-web"] == "cellpose_web.cli:main"


def meta_torch() -> list[str]:
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())
    return [r for r in meta["project"]["dependencies"] if r.startswith("torch")]


def test_install_script_pins_the_same_torch():
    torch_line = [r for r in _requirements() if r.startswith("torch")]
    assert torch_line == ["torch==2.13.0"]
    assert meta_torch() == torch_line  # pyproject.toml pins the same
    import torch
    assert torch.__version__.split("+")[0] == "2.13.0"  # what the tests run on is the pinned torch
    script = (REPO / "scripts" / "install.sh").read_text()
    assert "grep -E '^torch==' requirements.txt" in script  # the script reads the pin, never repeats it


def test_examples_found_in_the_checkout():
    d = resources.examples_dir()
    assert d == REPO / "examples"
    assert (d / "u2os_nuclei.tif").is_file()


@pytest.mark.slow
def test_wheel_carries_code_weights_examples_and_command(tmp_path):
    # built from a copy (the build writes build/ and *.egg-info beside the sources) without build
    # isolation (this environment's setuptools), so it works offline
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy2(REPO / name, src / name)
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", "*.partial.pt", "_runs")
    for name in ("cellpose_web", "examples"):
        shutil.copytree(REPO / name, src / name, ignore=skip)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path / "dist"), str(src)], check=True, cwd=tmp_path, timeout=300)
    wheel = next((tmp_path / "dist").glob("cellpose_web-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    code = {str(p.relative_to(REPO)).replace("\\", "/") for p in (REPO / "cellpose_web").rglob("*.py")}
    assert code <= names, sorted(code - names)
    weights = {str(p.relative_to(REPO)).replace("\\", "/") for p in (REPO / "cellpose_web" / "weights").rglob("*")
               if p.is_file() and not p.name.endswith(".partial.pt") and "_runs" not in p.parts}
    assert "cellpose_web/weights/lite.pt" in weights and weights <= names, sorted(weights - names)
    examples = {f"cellpose_web/examples/{p.name}" for p in (REPO / "examples").iterdir() if p.is_file()}
    assert "cellpose_web/examples/u2os_nuclei.tif" in examples and examples <= names, sorted(examples - names)
    entry = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "cellpose-web = cellpose_web.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()
