import pytest
import torch

import torchsso


def _probs() -> tuple[torch.Tensor, torch.Tensor]:
    # top-class confidences 0.95, 0.65, 0.75, 0.85 (one per bin of 10); the second is wrong
    probs = torch.tensor([[0.95, 0.05], [0.65, 0.35], [0.25, 0.75], [0.85, 0.15]])
    return probs, torch.tensor([0, 1, 1, 0])


def test_ece_one_example_per_bin_is_mean_gap() -> None:
    probs, y = _probs()
    expected = (0.05 + 0.65 + 0.25 + 0.15) / 4
    assert torchsso.expected_calibration_error(probs, y, bins=10) == pytest.approx(
        expected, abs=1e-6
    )


def test_ece_single_bin_is_accuracy_minus_mean_confidence() -> None:
    probs, y = _probs()
    expected = abs(0.75 - (0.95 + 0.65 + 0.75 + 0.85) / 4)
    assert torchsso.expected_calibration_error(probs, y, bins=1) == pytest.approx(
        expected, abs=1e-6
    )


def test_ece_bad_input() -> None:
    probs, y = _probs()
    with pytest.raises(ValueError, match="targets"):
        torchsso.expected_calibration_error(probs, y[:3])
    with pytest.raises(ValueError, match="bins"):
        torchsso.expected_calibration_error(probs, y, bins=0)
    with pytest.raises(ValueError, match="probs"):
        torchsso.expected_calibration_error(probs[0], y)
    bad = probs.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        torchsso.expected_calibration_error(bad, y)
