"""hadakit.training — low-precision training: linear layers whose forward and backward products run in
FP4 / INT4 / INT8 / FP8 / ternary with Hadamard rotations and stochastic rounding.

    >>> import torch
    >>> from torch import nn
    >>> from hadakit.training import QuantLinear, convert, get_training_recipe
    >>> layer = QuantLinear(128, 64, recipe="mxfp4")          # drop-in nn.Linear; state_dict keys weight / bias
    >>> y = layer(torch.randn(4, 32, 128)); y.sum().backward()  # forward MXFP4; backward MXFP4 + RHT + SR
    >>> model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))
    >>> report = convert(model, "nvfp4", skip=["2"], verbose=False)
    >>> [name for name, *_ in report.swapped]
    ['0']

Model-agnostic: this package never imports ``hadakit.models``. See docs/training.md for the recipes.
"""

from .functional import fake_quantize_operand, lowp_matmul, quant_linear, quantized_product
from .hadamard_conv import HadamardConv2d
from .int4 import int4_xi_linear
from .layers import ConvertReport, QuantLinear, convert
from .lbp_wht import LbpWhtConfig, LbpWhtLinear, lbp_wht_flops, lbp_wht_linear
from .qwha import (QWHAConfig, QWHALinear, QWHAReport, add_qwha, allocate_budget, effective_weight, merge_qwha,
                   qwha_init, qwha_layers)
from .recipe import (
    BACKENDS,
    SIGN_MODES,
    Int4XiRecipe,
    LbpWhtRecipe,
    OperandConfig,
    ProductConfig,
    TrainingRecipe,
    get_training_recipe,
    list_training_recipes,
)

__all__ = [
    "BACKENDS",
    "ConvertReport",
    "HadamardConv2d",
    "Int4XiRecipe",
    "LbpWhtConfig",
    "LbpWhtLinear",
    "LbpWhtRecipe",
    "OperandConfig",
    "ProductConfig",
    "QWHAConfig",
    "QWHALinear",
    "QWHAReport",
    "QuantLinear",
    "SIGN_MODES",
    "TrainingRecipe",
    "add_qwha",
    "allocate_budget",
    "convert",
    "effective_weight",
    "fake_quantize_operand",
    "get_training_recipe",
    "int4_xi_linear",
    "lbp_wht_flops",
    "lbp_wht_linear",
    "list_training_recipes",
    "lowp_matmul",
    "merge_qwha",
    "quant_linear",
    "quantized_product",
    "qwha_init",
    "qwha_layers",
]
