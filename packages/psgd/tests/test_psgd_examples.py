"""The examples run end to end and print what their docstrings promise."""

from __future__ import annotations

import pathlib
import re

from optcore.testing import run_script

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


def _run(name: str) -> str:
    return run_script(EXAMPLES / name)


def _numbers(text: str, pattern: str) -> dict[str, float]:
    return {m[0]: float(m[1]) for m in re.findall(pattern, text)}


def test_rosenbrock_reaches_the_minimum():
    last = _run("rosenbrock.py").strip().splitlines()[-1]
    loss = float(re.search(r"loss ([^,]+),", last)[1])  # type: ignore[index]
    assert loss < 1e-8, last


def test_rank_decomposition_newton_variants_converge():
    losses = _numbers(_run("rank_decomposition.py"), r"(\w+): loss (\S+) after")
    assert set(losses) == {"LRANewton", "KronNewton"}
    assert max(losses.values()) < 1e-7, losses


def test_delayed_xor_kron_solves_it():
    assert "psgd.Kron: solved after" in _run("delayed_xor.py")


def test_logistic_digits_whitening_variants_classify():
    acc = _numbers(_run("logistic_digits.py"), r"(\w+): train loss .* accuracy (\S+)")
    assert {"KronWhiten", "LRAWhiten", "AdamW"} <= set(acc)
    assert min(acc.values()) > 0.9, acc


def test_mnist1d_kron_beats_adamw():
    loss = _numbers(_run("mnist1d_mlp.py"), r"([\w.]+): test loss (\S+),")
    assert loss["psgd.Kron"] < loss["AdamW"], loss
