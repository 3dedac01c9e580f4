"""Quantization methods (the method, no files): typed recipes, the post-training pipeline (online rotations,
RTN / GPTQ, calibrated smoothing and clipping searches), quantized linears with their packed state registered,
KV-cache quantization and the exact offline fusion.

Layering: ``quantization`` imports ``transforms`` / ``formats`` and nothing above it; ``io`` (files),
``evaluation`` (texts, perplexity, the comparison harness) and the verbs in :mod:`hadakit.api` build on it.

    >>> from hadakit.quantization import get_recipe
    >>> str(get_recipe("w4a4:random:gptq"))
    'w4a4:random:gptq'
"""

from hadakit.quantization.pipeline import QuantizationReport, quantize_model
from hadakit.quantization.qlinear import RotatedQuantLinear
from hadakit.quantization.recipes import GPTQConfig, QuantRecipe, RotationConfig, get_recipe

__all__ = ["GPTQConfig", "QuantRecipe", "QuantizationReport", "RotatedQuantLinear", "RotationConfig", "get_recipe",
           "quantize_model"]
