"""Cross-package checks of the workspace layout and principles."""

from __future__ import annotations

import ast
import importlib
import sys
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {
    "optcore": "optcore",
    "psgd": "psgd",
    "torchsso": "torchsso",
    "grab-sampler": "grabsampler",
    "eigenpro3": "eigenpro3",
}
ALGORITHMS = {"psgd", "torchsso", "grabsampler", "eigenpro3"}


def _imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            roots.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("folder,module", PACKAGES.items())
def test_package_layout_and_metadata(folder, module):
    pkg = ROOT / "packages" / folder
    meta = tomllib.loads((pkg / "pyproject.toml").read_text())
    assert meta["project"]["name"] == folder
    assert meta["build-system"]["build-backend"] == "hatchling.build"
    deps = meta["project"]["dependencies"]
    assert any(d.startswith("torch>=") for d in deps), deps
    if folder != "optcore":
        assert "optcore" in [d.split(">")[0].split("=")[0].strip() for d in deps]
    assert (pkg / "src" / module / "py.typed").is_file()
    assert (pkg / "README.md").is_file() and (pkg / "tests").is_dir()
    imported = importlib.import_module(module)
    assert isinstance(getattr(imported, "__all__", None), list)


@pytest.mark.parametrize("folder,module", PACKAGES.items())
def test_no_algorithm_package_imports_another(folder, module):
    src = ROOT / "packages" / folder / "src" / module
    for path in src.rglob("*.py"):
        others = (_imported_roots(path) & ALGORITHMS) - {module}
        assert not others, f"{path.relative_to(ROOT)} imports {sorted(others)}"


def test_no_lock_files_or_index_addresses_committed():
    for path in ROOT.rglob("*"):
        if any(part in {".venv", ".nox", ".git", "node_modules"} for part in path.parts):
            continue
        assert path.name not in {"uv.lock", "poetry.lock", "pdm.lock"}, path
    for toml in [ROOT / "pyproject.toml", *ROOT.glob("packages/*/pyproject.toml")]:
        text = tomllib.loads(toml.read_text())
        assert "index" not in text.get("tool", {}).get("uv", {}), f"{toml} names a package index"
