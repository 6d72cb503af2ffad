"""Test helpers: run a function in several gloo processes on CPU; run a script.

``spawn(world_size, fn, *args)`` starts ``world_size`` processes, initialises
a gloo process group in each (FileStore in a fresh temporary directory), calls
``fn(rank, world_size, *args)`` and returns every rank's result in rank order.
``fn`` must be importable by module path (a top-level function of an
importable module), because the children are started with ``spawn``.

``run_script(path, *args)`` runs a Python script (an example) in a fresh
interpreter and returns what it printed, failing with its stderr.
"""

from __future__ import annotations

import importlib
import importlib.util
import multiprocessing as mp
import os
import pickle
import queue as queue_module
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Callable
from typing import Any

import torch.distributed as dist

__all__ = ["run_script", "spawn"]


def _resolve(module: str, qualname: str, path: str | None) -> Callable[..., Any]:
    """Import ``module`` (by name, else from ``path``) and return ``qualname`` in it."""
    try:
        mod = importlib.import_module(module)
    except ImportError:
        if path is None:
            raise
        spec = importlib.util.spec_from_file_location(module, path)
        if spec is None or spec.loader is None:
            raise
        mod = importlib.util.module_from_spec(spec)
        sys.modules[module] = mod
        spec.loader.exec_module(mod)
    obj: Any = mod
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj  # type: ignore[no-any-return]


def _worker(
    rank: int,
    world_size: int,
    store_path: str,
    target: tuple[str, str, str | None],
    args: tuple[Any, ...],
    queue: Any,
) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        import torch

        fn = _resolve(*target)
        torch.set_num_threads(1)
        store = dist.FileStore(store_path, world_size)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size)
        try:
            result = fn(rank, world_size, *args)
        finally:
            dist.destroy_process_group()
        # Plain pickle (not torch's shared-memory reductions): tensors in the
        # result must outlive this process.
        queue.put((rank, True, pickle.dumps(result)))
    except BaseException:
        queue.put((rank, False, traceback.format_exc()))


def spawn(world_size: int, fn: Callable[..., Any], *args: Any, timeout: float = 120.0) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` gloo processes.

    Returns:
        The ranks' return values (must be picklable), in rank order.

    Raises:
        ValueError: if ``world_size < 1`` or ``fn`` is not a module-level function.
        RuntimeError: with the child's traceback when a rank fails, or on timeout.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    qualname = getattr(fn, "__qualname__", "")
    if not callable(fn) or "<locals>" in qualname or "<lambda>" in qualname:
        raise ValueError("fn must be a top-level function importable by module path")
    module = getattr(fn, "__module__", None) or "__main__"
    path = getattr(sys.modules.get(module), "__file__", None)
    target = (module, qualname, path)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory(prefix="optcore-spawn-") as tmp:
        store_path = os.path.join(tmp, "store")
        procs = [
            ctx.Process(
                target=_worker, args=(r, world_size, store_path, target, args, queue), daemon=False
            )
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        results: dict[int, Any] = {}
        errors: list[str] = []
        try:
            for _ in range(world_size):
                try:
                    rank, ok, value = queue.get(timeout=timeout)
                except queue_module.Empty as exc:
                    raise RuntimeError(f"spawn: no result from a rank within {timeout} s") from exc
                if ok:
                    results[rank] = pickle.loads(value)
                else:
                    errors.append(f"rank {rank} failed:\n{value}")
                    break
        finally:
            for p in procs:
                p.join(timeout=5 if errors or len(results) < world_size else timeout)
                if p.is_alive():
                    p.terminate()
                    p.join()
        if errors:
            raise RuntimeError("\n".join(errors))
    return [results[r] for r in range(world_size)]


def run_script(
    path: str | os.PathLike[str],
    *args: str,
    module: str | None = None,
    unset: tuple[str, ...] = (),
    timeout: float = 600.0,
) -> str:
    """Run ``python path *args`` (or ``python -m module *args path``) in a fresh interpreter.

    The child runs on one intra-op thread (``OMP_NUM_THREADS=1``), with the
    environment variables ``unset`` removed (e.g. ``DATA_DIR``, so that an example
    takes its built-in data).

    Returns:
        The script's standard output.

    Raises:
        AssertionError: with the script's standard error when it exits non-zero.
    """
    env = {k: v for k, v in os.environ.items() if k not in unset}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, *(["-m", module, *args, str(path)] if module else [str(path), *args])]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert out.returncode == 0, f"{' '.join(cmd)} exited {out.returncode}:\n{out.stderr}"
    return out.stdout
