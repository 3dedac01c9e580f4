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

Number formats (``hadakit.formats``), model quantization (``hadakit.quantization``; files in ``hadakit.io``, metrics in ``hadakit.evaluation``), low-precision training
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


def quantize(model, recipe, calibration=None, *, tokenizer=None, progress=True, **options):
    """Rotate and quantize ``model`` (any transformers model object) in place; returns a ``QuantizationReport``.

    ``recipe`` is a recipe string ``NAME[:ROTATION[:METHOD[:OPTIONS]]]`` (``"w4a16_g128:block-128:gptq"``,
    ``"w4a4:random:gptq:smooth=search,aclip=search"``) or a ``hadakit.quantization.recipes.QuantRecipe``. ``calibration``: a
    text, a path to a text file, a list of documents (with ``tokenizer=``), or token ids (a ``[n, L]`` long tensor, or
    ``input_ids`` with an ``attention_mask`` for padded windows); ``None`` for recipes that need none (RTN).
    ``progress=True`` logs to ``logging.getLogger("hadakit")``. Other options (``calib_windows``, ``calib_len``,
    ``seed``, ``add_bos``, ``device``): see :func:`hadakit.api.quantize`. The recipe that ran (with the
    calibration it used) travels with the model, so :func:`save` needs nothing else. Needs ``hadakit[models]``::

        import hadakit
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained("path/to/my-model")
        tok = AutoTokenizer.from_pretrained("path/to/my-model")
        report = hadakit.quantize(model, "w4a16_g128:block-128:gptq", open("calib.txt").read(), tokenizer=tok)
        hadakit.save(model, "my-model-w4", tok)       # packed checkpoint, ~4.1 bits per quantized weight
        model = hadakit.load("my-model-w4")           # an ordinary transformers model, weights packed in memory
        hadakit.export("my-model-w4", "my-model-w4-ct")   # compressed-tensors, the format vLLM serves
    """
    from hadakit.api import quantize as _quantize

    return _quantize(model, recipe, calibration, tokenizer=tokenizer, progress=progress, **options)


def save(model, out_dir, tokenizer=None, *, force=False, extra=None):
    """Write a model quantized by :func:`quantize` to ``out_dir`` as a packed hadakit checkpoint (``config.json``,
    tokenizer, ``recipe.json``, ``hadakit.json``, ``model.safetensors``) and return its path.

    Quantized weights are stored packed (codes + scales); the other tensors as the model holds them (in bf16/fp16
    when that holds them exactly, e.g. after the recipe option ``store=bf16``). ``out_dir`` is written atomically and
    an existing one is replaced only with ``force=True`` and only when it is a hadakit checkpoint. ``extra``: more
    JSON-ready entries for ``hadakit.json``."""
    from hadakit.io.checkpoint import save_quantized_model

    recipe = getattr(model, "hadakit_recipe", None)
    if recipe is None:
        raise ValueError("this model was not quantized by hadakit.quantize (it carries no hadakit recipe): call "
                         "hadakit.quantize(model, recipe, ...) first")
    extra = dict(extra or {})
    extra.setdefault("calibration", getattr(model, "hadakit_calibration", None))
    return save_quantized_model(model, tokenizer, recipe, out_dir, force=force, extra=extra)


def load(path, *, device="cpu", cache_weights=False):
    """Load a packed checkpoint written by :func:`save` or ``hadakit quantize --out DIR``: an ordinary transformers
    model (same ``forward``, returns logits) whose quantized linears keep their weights packed in memory and
    dequantize per forward (``cache_weights=True`` keeps one dequantized copy: faster, fp32-sized). Its tokenizer
    loads with ``transformers.AutoTokenizer.from_pretrained(DIR)``. Nothing in the directory is executed, and the
    checkpoint is verified (see docs/safety.md). Needs ``hadakit[models]``."""
    from hadakit.io.checkpoint import load_quantized_model

    return load_quantized_model(path, device=device, cache_weights=cache_weights)[0]


def export(checkpoint_dir, out_dir, *, format="compressed-tensors", force=False, calib=None):
    """Write the hadakit checkpoint ``checkpoint_dir`` in a format a serving engine reads; returns the path.

    ``format="compressed-tensors"`` (the only one so far): the format vLLM serves, with the online rotations as its
    ``transform_config`` (docs/export.md). ``calib``: token ids for NVFP4 activations' static input scale. Needs
    ``hadakit[export]``."""
    if format != "compressed-tensors":
        raise ValueError(f"unknown export format {format!r}: the formats are 'compressed-tensors'")
    from hadakit.io.compressed_tensors import export_compressed_tensors

    return export_compressed_tensors(checkpoint_dir, out_dir, force=force, calib=calib)


def inspect(model, windows, **options):
    """Outlier statistics of every linear's input and weight, and what each rotation does to them (an
    ``InspectReport``; see :func:`hadakit.analysis.inspect_model` for the options and ``hadakit inspect`` for the
    HTML report)."""
    from hadakit.analysis import inspect_model

    return inspect_model(model, windows, **options)


__all__ = [
    "HadamardRotation",
    "QuantLinear",
    "StructuredRotation",
    "TransformPlan",
    "base_order",
    "block_hadamard_transform",
    "construction",
    "convert",
    "export",
    "covered_orders",
    "get_training_recipe",
    "hadamard_matrix",
    "hadamard_transform",
    "inspect",
    "inverse_hadamard_transform",
    "list_training_recipes",
    "load",
    "quantize",
    "nearest_supported",
    "random_signs",
    "randomized_hadamard_transform",
    "save",
    "structured_rotation",
    "supported",
    "transform_plan",
]
