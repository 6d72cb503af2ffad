"""Layer-wise curvature: recording, per-layer math, and the Kron / Diag / Full / Unit blocks."""

from .attention import AttentionKron
from .capture import Capture, Record, output_vectors
from .factory import SHAPES, build_blocks
from .layers import kron_input, kron_output, per_example_grads
from .shapes import Diag, Full, Kron, LayerCurvature, Unit

__all__ = [
    "SHAPES",
    "AttentionKron",
    "Capture",
    "Diag",
    "Full",
    "Kron",
    "LayerCurvature",
    "Record",
    "Unit",
    "build_blocks",
    "kron_input",
    "kron_output",
    "output_vectors",
    "per_example_grads",
]
