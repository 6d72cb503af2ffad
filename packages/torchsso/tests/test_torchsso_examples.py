"""The examples run end to end on the built-in data and print what they promise."""

from __future__ import annotations

import pathlib
import re

from optcore.testing import run_script

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


def _run(name: str) -> str:
    return run_script(EXAMPLES / name, unset=("DATA_DIR",))  # the built-in data


def _last_accuracy(text: str) -> float:
    return float(re.findall(r"test accuracy (\S+)", text)[-1])


def test_mlp_digits_learns():
    assert _last_accuracy(_run("mlp_digits.py")) > 0.95


def test_convnet_example_learns_on_the_fallback_data():
    assert _last_accuracy(_run("convnet_cifar10.py")) > 0.9


def test_vi_calibration_reports_every_predictive():
    rows = re.findall(r"^(.*?)\s+test accuracy (\S+)\s+ECE (\S+)$", _run("vi_calibration.py"), re.M)
    names = [r[0] for r in rows]
    assert any(n.startswith("VOGN, linearised") for n in names), names
    assert any(n.startswith("VOGN, sampled") for n in names), names
    assert "Adam" in names
    for _, acc, ece in rows:
        assert float(acc) > 0.9 and 0.0 <= float(ece) < 0.1, rows
