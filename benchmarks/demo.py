"""The side-by-side demo: each package's algorithm against its baseline.

Runs every package's quick comparison (``benchmarks/<package>_demo.py``, a
``run(quick: bool) -> list[dict]`` function) on built-in data with progress
bars and prints one table. Packages whose comparison is not built yet are
listed as such.

Usage::

    uvx nox -s demo                 # full demo (each part under 2 minutes on CPU)
    uvx nox -s demo -- --quick      # smoke-sized
    uvx nox -s demo -- --only psgd  # one package
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path
from types import ModuleType

HERE = Path(__file__).parent
PARTS = {
    "psgd": "psgd_demo",
    "torchsso": "torchsso_demo",
    "grab-sampler": "grabsampler_demo",
    "eigenpro3": "eigenpro3_demo",
}
COLUMNS = ("package", "task", "method", "metric", "value", "seconds")


def _load(name: str) -> ModuleType | None:
    path = HERE / f"{name}.py"
    if not path.is_file():
        return None
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def format_table(rows: list[dict]) -> str:
    """Markdown table of the demo rows."""
    cells = [[_fmt(r.get(c, "")) for c in COLUMNS] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(COLUMNS)]
    line = "| " + " | ".join(c.ljust(w) for c, w in zip(COLUMNS, widths)) + " |"
    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = ["| " + " | ".join(v.ljust(w) for v, w in zip(row, widths)) + " |" for row in cells]
    return "\n".join([line, rule, *body])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke-sized runs")
    parser.add_argument("--only", choices=sorted(PARTS), action="append", help="run only these")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args(argv)

    rows: list[dict] = []
    missing: list[str] = []
    failed: list[str] = []
    for package, module_name in PARTS.items():
        if args.only and package not in args.only:
            continue
        module = _load(module_name)
        if module is None or not hasattr(module, "run"):
            missing.append(package)
            continue
        print(f"\n== {package} ==", flush=True)
        start = time.perf_counter()
        try:
            rows.extend(module.run(quick=args.quick))
        except Exception as exc:  # keep the other parts running; report at the end
            failed.append(f"{package}: {type(exc).__name__}: {exc}")
        print(f"({package}: {time.perf_counter() - start:.1f} s)", flush=True)

    print()
    if rows:
        print(format_table(rows))
    for package in missing:
        print(f"- {package}: comparison not built yet")
    for line in failed:
        print(f"- FAILED {line}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
