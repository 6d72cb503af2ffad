"""Nox sessions for the workspace (uv backend, no Python downloads).

``nox`` with no arguments runs lint, typecheck, every package's CPU tests and
the wheel build check. Other sessions: ``tests(package=..., device='cuda')``
(tagged ``cuda``), ``distributed``, ``bench``, ``demo`` (the README's main job).

Torch: when pip is pointed at a local wheel folder (``PIP_FIND_LINKS``) that
holds a torch wheel for this Python, that folder is handed to uv as
``UV_FIND_LINKS`` and torch is pinned to that build, so no session downloads a
different (multi-GB CUDA) build.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from pathlib import Path

import nox

ROOT = Path(__file__).parent
PACKAGES = {
    "optcore": "optcore",
    "psgd": "psgd",
    "torchsso": "torchsso",
    "grab-sampler": "grabsampler",
    "eigenpro3": "eigenpro3",
}

nox.options.default_venv_backend = "uv"
nox.options.reuse_existing_virtualenvs = True
nox.options.tags = ["default"]
os.environ.setdefault("UV_PYTHON_DOWNLOADS", "never")


def _configure_local_torch() -> None:
    links = os.environ.get("UV_FIND_LINKS") or os.environ.get("PIP_FIND_LINKS")
    if not links:
        return
    os.environ["UV_FIND_LINKS"] = links
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    for folder in re.split(r"[\s,]+", links):
        path = Path(folder.removeprefix("file://"))
        if not path.is_dir():
            continue
        for wheel in sorted(path.glob(f"torch-*-{tag}-*.whl")):
            version = wheel.name.split("-")[1]
            constraints = Path(tempfile.gettempdir()) / "optcore-nox-torch-constraint.txt"
            constraints.write_text(f"torch=={version}\n")
            os.environ.setdefault("UV_CONSTRAINT", str(constraints))
            return


_configure_local_torch()


def _install(session: nox.Session, *packages: str, groups: tuple[str, ...] = ("test",)) -> None:
    args: list[str] = []
    for name in dict.fromkeys(("optcore", *packages)):  # keep order, drop repeats
        args += ["-e", str(ROOT / "packages" / name)]
    for group in groups:
        args += ["--group", group]
    session.install(*args)


@nox.session(tags=["default"])
def lint(session: nox.Session) -> None:
    """ruff check and ruff format --check over the whole tree."""
    session.install("--group", "lint")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session(tags=["default"])
def typecheck(session: nox.Session) -> None:
    """mypy on each package's sources."""
    _install(session, *PACKAGES, groups=("typecheck",))
    # One run over every package's sources, so that all errors are reported at once.
    session.run("mypy", *(str(ROOT / "packages" / n / "src" / m) for n, m in PACKAGES.items()))


@nox.session
@nox.parametrize(
    "device",
    [
        nox.param("cpu", id="cpu", tags=["default", "cpu"]),
        nox.param("cuda", id="cuda", tags=["cuda"]),
    ],
)
@nox.parametrize("package", list(PACKAGES))
def tests(session: nox.Session, package: str, device: str) -> None:
    """One package's tests on one device. A session that runs zero tests fails."""
    _install(session, package)
    args = [str(ROOT / "packages" / package / "tests"), *session.posargs]
    if device == "cuda":
        has_cuda = session.run(
            "python", "-c", "import torch; print(torch.cuda.is_available())", silent=True
        )
        if "True" not in str(has_cuda):
            session.skip("CUDA is not available on this machine")
        session.env["REQUIRE_CUDA"] = "1"
        session.run("pytest", "-m", "cuda", *args)
    else:
        session.run("pytest", "-m", "not cuda and not slow", *args)


@nox.session(tags=["default"])
def workspace(session: nox.Session) -> None:
    """Cross-package tests under tests/ (layout, principles, the seeds' examples)."""
    _install(session, *PACKAGES)
    session.run("pytest", "-m", "not cuda and not slow", str(ROOT / "tests"), *session.posargs)


@nox.session
def distributed(session: nox.Session) -> None:
    """The multi-process (gloo) tests of every package and the cross-package ones."""
    _install(session, *PACKAGES)
    paths = [str(ROOT / "packages" / name / "tests") for name in PACKAGES]
    session.run("pytest", "-m", "distributed and not cuda", *paths, str(ROOT / "tests"))


@nox.session
def bench(session: nox.Session) -> None:
    """Quick benchmarks: each package's side-by-side comparison in its quick size."""
    _install(session, *PACKAGES, groups=("test", "bench"))
    session.run("python", str(ROOT / "benchmarks" / "demo.py"), "--quick", *session.posargs)


@nox.session
def demo(session: nox.Session) -> None:
    """The README's main job: each algorithm against its baseline on built-in data."""
    _install(session, *PACKAGES, groups=("test",))
    session.run("python", str(ROOT / "benchmarks" / "demo.py"), *session.posargs)


@nox.session(venv_backend="none", tags=["default"])
def build(session: nox.Session) -> None:
    """Every package's wheel builds alone and imports in a clean venv."""
    dist = Path(tempfile.mkdtemp(prefix="wheels-"))
    for name in PACKAGES:
        session.run("uv", "build", "--package", name, "--wheel", "-o", str(dist), external=True)
    core = sorted(dist.glob("optcore-*.whl"))
    for name, module in PACKAGES.items():
        venv = dist / f"venv-{name}"
        session.run("uv", "venv", "-q", "-p", sys.executable, str(venv), external=True)
        python = str(venv / "bin" / "python")
        wheels = {str(p) for p in core} | {
            str(p) for p in dist.glob(f"{name.replace('-', '_')}-*.whl")
        }
        session.run("uv", "pip", "install", "-q", "-p", python, *sorted(wheels), external=True)
        session.run(python, "-c", f"import {module}; print({module}.__name__, 'ok')", external=True)
