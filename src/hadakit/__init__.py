"""hadakit — Hadamard transforms as the fast, exact building block of low-bit deep learning.

Transforms (any batch; sizes 2^k and m·2^k such as 640 = 20·32; exact and orthogonal; autograd; torch.compile)::

    >>> import torch, hadakit
    >>> x = torch.randn(8, 640)
    >>> y = hadakit.hadamard_transform(x)                          # orthonormal H along the last dim
    >>> torch.allclose(hadakit.inverse_hadamard_transform(y), x, atol=1e-5)
    True
    >>> y = hadakit.hadamard_transform(x, signs=hadakit.random_signs(640, seed=0))   # randomized H·D
    >>> y = hadakit.hadamard_transform(x, block_size=32)           # block-diagonal (MX groups)
    >>> hadakit.hadamard_matrix(12).shape
    torch.Size([12, 12])
    >>> rot = hadakit.HadamardRotation(640, signs="fixed", seed=0)  # nn.Module; signs live in state_dict

Number formats (``hadakit.formats``), model quantization (``hadakit.models``), low-precision training
(``hadakit.QuantLinear`` / ``hadakit.convert``) and analysis (``hadakit.analysis``)::

    >>> from hadakit.formats import quantize
    >>> quantize(torch.randn(4, 256), "mxfp4").bits_per_element
    4.25
    >>> layer = hadakit.QuantLinear(640, 256, recipe="mxfp4")     # forward and backward products in MXFP4

See docs/ARCHITECTURE.md for the layering and README.md for the command line.
"""

from hadakit.transforms import (
    HadamardRotation,
    StructuredRotation,
    TransformPlan,
    base_order,
    block_hadamard_transform,
    construction,
    covered_orders,
    hadamard_matrix,
    hadamard_transform,
    inverse_hadamard_transform,
    nearest_supported,
    random_signs,
    randomized_hadamard_transform,
    structured_rotation,
    supported,
    transform_plan,
)

from hadakit.training import QuantLinear, convert, get_training_recipe, list_training_recipes

__version__ = "0.1.0"


def load(path, *, device="cpu"):
    """Load a packed checkpoint written by ``hadakit quantize --out DIR``: an ordinary transformers model (same
    ``forward``, returns logits) whose linears are rotated/quantized; its tokenizer loads with
    ``transformers.AutoTokenizer.from_pretrained(DIR)``. Needs ``hadakit[models]``."""
    from hadakit.models.checkpoint import load_quantized_model

    return load_quantized_model(path, device=device)[0]

__all__ = [
    "HadamardRotation",
    "QuantLinear",
    "StructuredRotation",
    "TransformPlan",
    "base_order",
    "block_hadamard_transform",
    "construction",
    "convert",
    "covered_orders",
    "get_training_recipe",
    "hadamard_matrix",
    "hadamard_transform",
    "inverse_hadamard_transform",
    "list_training_recipes",
    "load",
    "nearest_supported",
    "random_signs",
    "randomized_hadamard_transform",
    "structured_rotation",
    "supported",
    "transform_plan",
]
