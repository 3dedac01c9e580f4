"""Training recipes: how each of the three products of a linear layer is quantized.

A linear layer ``y = x·Wᵀ + b`` runs three matrix products per training step (``T`` tokens, ``x`` [T, in],
``W`` [out, in], ``dy`` [T, out]):

=============== ======================== ============================== ====================
product          formula                  operands ``a``, ``b``          inner (reduction) dim
=============== ======================== ============================== ====================
``forward``      ``y  = x · Wᵀ``          ``a = x``  [T, in],  ``b = W``  [out, in]   ``in``
``grad_input``   ``dx = dy · W``          ``a = dy`` [T, out], ``b = Wᵀ`` [in, out]   ``out``
``grad_weight``  ``dW = dyᵀ · x``         ``a = dyᵀ`` [out, T], ``b = xᵀ`` [in, T]    ``T`` (tokens)
=============== ======================== ============================== ====================

Every product is computed as ``a · bᵀ`` with both operands laid out ``[rows, inner]``, so that quantization groups
(which always run along the last dim in :mod:`hadakit.formats`) run along the inner dimension, as low-precision GEMM
hardware requires. A :class:`ProductConfig` says how one product is computed: an :class:`OperandConfig` per operand
(format, stochastic rounding, 2D weight tiles, SR headroom, or "reuse the forward's quantized operand") and a
rotation along the inner dim, applied to *both* operands (``(a·R)(b·R)ᵀ = a·bᵀ`` for orthogonal ``R``, so the
product is unchanged before quantization). The rotation is a property of the product, not of an operand: rotating
only one operand would change the result.

A :class:`TrainingRecipe` holds the three product configs and the backend switch. Named recipes:
:func:`get_training_recipe`, :func:`list_training_recipes`; their exact definitions are in ``docs/training.md``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field

from hadakit.formats import QuantScheme, get_scheme
from hadakit.transforms import nearest_supported, supported
from hadakit.transforms.spec import parse_rotation

from .lbp_wht import LbpWhtConfig

__all__ = [
    "BACKENDS",
    "Int4XiRecipe",
    "LbpWhtRecipe",
    "OperandConfig",
    "ProductConfig",
    "SIGN_MODES",
    "TrainingRecipe",
    "get_training_recipe",
    "list_training_recipes",
]

BACKENDS = ("auto", "emulate")
SIGN_MODES = ("none", "fixed", "per_step")
PRODUCTS = ("forward", "grad_input", "grad_weight")
# Operand names per product (a, b), for messages and describe().
OPERAND_NAMES = {"forward": ("x", "W"), "grad_input": ("dy", "W"), "grad_weight": ("dy", "x")}


def _check_bool(value, what: str) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{what} must be True or False, got {value!r}")


def _unknown_keys(d: dict, cls) -> None:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - known
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields {sorted(unknown)}; known: {sorted(known)}")


@dataclass(frozen=True)
class OperandConfig:
    """How one operand of one product is quantized (all defaults: high precision, unchanged).

    Args:
        scheme: a :class:`~hadakit.formats.QuantScheme`, a preset name (``"mxfp4"``, ``"nvfp4"``, ``"int8"``,
            ``"ternary"``, ``"fp8_e4m3"``, ...) or its dict; ``None`` keeps the operand in high precision. Groups /
            rows of the scheme run along the product's inner dimension.
        stochastic_rounding: round the elements stochastically (unbiased; for gradients). Overrides the scheme's
            ``rounding``.
        scale_2d: weights only: one scale per square tile of ``group_size × group_size`` elements of ``W`` (the
            NVFP4 recipe's 16×16 blocks), so ``W`` and ``Wᵀ`` quantize to the same values. Needs a group scheme.
        headroom: quantize ``headroom · v`` with the scales computed from ``v`` and divide the product by the
            headroom afterwards (Tseng et al.'s 3/4: with the OCP MX floor rule, ``|v| / s < 8``, so ``3/4 · |v| / s
            < 6`` and nothing clips, which keeps stochastic rounding unbiased). 1.0 = off.
        reuse_forward: backward products only (``W`` in ``grad_input``, ``x`` in ``grad_weight``): use the forward
            product's quantized operand (rotated back), as a straight-through estimator (QAT, BitNet) does, instead
            of the high-precision tensor. ``scheme`` must then be ``None``.
    """

    scheme: QuantScheme | str | dict | None = None
    stochastic_rounding: bool = False
    scale_2d: bool = False
    headroom: float = 1.0
    reuse_forward: bool = False

    def __post_init__(self):
        scheme = self.scheme
        if scheme is not None:
            scheme = get_scheme(scheme)  # raises naming the presets for a bad name
        object.__setattr__(self, "scheme", scheme)
        _check_bool(self.stochastic_rounding, "OperandConfig.stochastic_rounding")
        _check_bool(self.scale_2d, "OperandConfig.scale_2d")
        _check_bool(self.reuse_forward, "OperandConfig.reuse_forward")
        if isinstance(self.headroom, bool) or not isinstance(self.headroom, (int, float)) or not (
                0.0 < float(self.headroom) <= 1.0):
            raise ValueError(f"OperandConfig.headroom must be a number in (0, 1] (1.0 = off), got {self.headroom!r}")
        object.__setattr__(self, "headroom", float(self.headroom))
        if scheme is None:
            needs = [n for n, v in (("stochastic_rounding", self.stochastic_rounding), ("scale_2d", self.scale_2d),
                                    ("headroom", self.headroom != 1.0)) if v]
            if needs:
                raise ValueError(f"OperandConfig: {', '.join(needs)} need a scheme (got scheme=None, i.e. high "
                                 f"precision); set scheme, e.g. 'mxfp4'")
        else:
            if self.reuse_forward:
                raise ValueError("OperandConfig: reuse_forward=True reuses the forward's quantized operand as is; "
                                 "it takes no scheme (set scheme=None)")
            if self.scale_2d and scheme.granularity != "group":
                raise ValueError(f"OperandConfig: scale_2d needs a group scheme (tiles of group_size × group_size); "
                                 f"{scheme.describe()!r} is {scheme.granularity}")
            if self.scale_2d and scheme.scale_rule == "absmean":
                raise ValueError("OperandConfig: scale_2d is for amax-type scale rules, not absmean")
            if self.headroom != 1.0 and (scheme.clip_search or not scheme.symmetric):
                raise ValueError("OperandConfig: headroom needs a symmetric scheme without clip_search")
        # The serialized form the quantization op receives (a string, so torch.compile sees a constant).
        spec = None
        if self.scheme is not None:
            spec = json.dumps({"scheme": self.effective_scheme.to_dict(),
                               "tile": self.scheme.group_size if self.scale_2d else 0,
                               "headroom": self.headroom}, sort_keys=True)
        object.__setattr__(self, "_spec", spec)

    @property
    def effective_scheme(self) -> QuantScheme | None:
        """The scheme actually applied (``rounding="stochastic"`` when ``stochastic_rounding`` is set)."""
        if self.scheme is None:
            return None
        if self.stochastic_rounding and self.scheme.rounding != "stochastic":
            return self.scheme.replace(rounding="stochastic", name=self.scheme.name)
        return self.scheme

    @property
    def spec(self) -> str | None:
        return self._spec

    @property
    def quantized(self) -> bool:
        return self.scheme is not None

    def describe(self) -> str:
        if self.reuse_forward:
            return "forward's quantized operand (STE)"
        if self.scheme is None:
            return "high precision"
        s = self.scheme.describe()
        if self.stochastic_rounding:
            s += ", stochastic rounding"
        if self.scale_2d:
            g = self.scheme.group_size
            s += f", 2D {g}x{g} tiles"
        if self.headroom != 1.0:
            s += f", headroom {self.headroom:g}"
        return s

    def to_dict(self) -> dict:
        return {"scheme": None if self.scheme is None else self.scheme.to_dict(),
                "stochastic_rounding": self.stochastic_rounding, "scale_2d": self.scale_2d,
                "headroom": self.headroom, "reuse_forward": self.reuse_forward}

    @classmethod
    def from_dict(cls, d: dict) -> "OperandConfig":
        if not isinstance(d, dict):
            raise TypeError(f"OperandConfig.from_dict expects a dict, got {type(d).__name__}")
        _unknown_keys(d, cls)
        return cls(**d)


def _operand(value, what: str) -> OperandConfig:
    if isinstance(value, OperandConfig):
        return value
    if isinstance(value, dict):
        return OperandConfig.from_dict(value)
    if value is None or isinstance(value, (str, QuantScheme)):
        return OperandConfig(value)
    raise TypeError(f"{what} must be an OperandConfig, a dict, a scheme / preset name or None; "
                    f"got {type(value).__name__}")


@dataclass(frozen=True)
class ProductConfig:
    """One product ``a · bᵀ`` (operands ``[rows, inner]``): how each operand is quantized and the shared rotation.

    Args:
        a, b: :class:`OperandConfig` (or a scheme / preset name / dict / None) of the two operands; see the
            module docstring for which tensor is ``a`` and ``b`` in each product.
        rotation: ``None`` / ``"none"``; ``"full"`` (one Hadamard transform over the whole inner dim, padded with
            zeros to a supported size when needed); or a block size (``16``, ``32``, ``64``, ...: block-diagonal
            Hadamard). Applied to both operands along the inner dim. A name of the rotation grammar that quantize
            recipes use (:mod:`hadakit.transforms.spec`: ``hadamard``, ``random``, ``block-32``,
            ``random-block-32``) is accepted too and stored in this form (``random…`` sets ``signs="fixed"``).
        signs: random ±1 diagonal ``D`` of the rotation ``R = H·D``: ``"none"``; ``"fixed"``
            (``hadakit.random_signs(n, seed)``, the same every step); ``"per_step"`` (new signs drawn from torch's
            global RNG each time the product runs, i.e. every step).
        seed: the seed of ``"fixed"`` signs.
    """

    a: OperandConfig = field(default_factory=OperandConfig)
    b: OperandConfig = field(default_factory=OperandConfig)
    rotation: str | int | None = None
    signs: str = "none"
    seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "a", _operand(self.a, "ProductConfig.a"))
        object.__setattr__(self, "b", _operand(self.b, "ProductConfig.b"))
        rot = self.rotation
        if isinstance(rot, str) and rot not in ("none", "full"):
            # a name of hadakit's one rotation grammar (hadakit.transforms.spec), as quantize recipes write it
            try:
                spec = parse_rotation(rot)
            except ValueError as e:
                raise ValueError(f"ProductConfig.rotation must be None, 'none', 'full' or a block size (int), or a "
                                 f"rotation name: {e}") from None
            rot = "full" if spec.block_size is None else spec.block_size
            if spec.signs == "fixed":
                if self.signs not in ("none", "fixed"):
                    raise ValueError(f"ProductConfig: rotation {self.rotation!r} means fixed random signs, but "
                                     f"signs={self.signs!r}: name the rotation without 'random' to use those signs")
                object.__setattr__(self, "signs", "fixed")
        if rot in (None, "none", 0):
            rot = None
        elif rot == "full":
            pass
        elif isinstance(rot, int) and not isinstance(rot, bool):
            if rot < 2:
                raise ValueError(f"ProductConfig.rotation block size must be >= 2, got {rot}")
            if not supported(rot):
                below, above = nearest_supported(rot)
                raise ValueError(f"ProductConfig.rotation: no Hadamard matrix of order {rot}; nearest supported "
                                 f"block sizes: {below}, {above} (powers of two always work)")
        else:
            raise ValueError(f"ProductConfig.rotation must be None, 'none', 'full' or a block size (int), "
                             f"got {rot!r}")
        object.__setattr__(self, "rotation", rot)
        if self.signs not in SIGN_MODES:
            raise ValueError(f"ProductConfig.signs must be one of {SIGN_MODES}, got {self.signs!r}")
        if self.signs != "none" and rot is None:
            raise ValueError(f"ProductConfig: signs={self.signs!r} randomizes a rotation, but rotation is None; "
                             f"set rotation ('full' or a block size) or signs='none'")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TypeError(f"ProductConfig.seed must be an int, got {self.seed!r}")
        # Multiple of which the inner dim is padded: every group / tile size and the rotation block.
        mult = 1
        for op in (self.a, self.b):
            if op.scheme is not None and op.scheme.granularity == "group":
                mult = math.lcm(mult, op.scheme.group_size)
        if isinstance(rot, int):
            mult = math.lcm(mult, rot)
        object.__setattr__(self, "_multiple", mult)

    @property
    def multiple(self) -> int:
        """The inner dim is zero-padded to a multiple of this (lcm of group sizes and rotation block)."""
        return self._multiple

    @property
    def quantized(self) -> bool:
        return self.a.quantized or self.b.quantized

    @property
    def plain(self) -> bool:
        """No quantization, rotation or reuse: the product runs in the input dtype, exactly as nn.Linear's."""
        return not self.quantized and self.rotation is None and not (self.a.reuse_forward or self.b.reuse_forward)

    def describe(self, names=("a", "b")) -> str:
        if self.plain:
            return "unquantized, input dtype"
        rot = "no rotation"
        if self.rotation is not None:
            kind = "full Hadamard" if self.rotation == "full" else f"block-{self.rotation} Hadamard"
            rot = kind + {"none": "", "fixed": f", fixed signs (seed {self.seed})",
                          "per_step": ", new random signs every step"}[self.signs]
        return f"{names[0]}: {self.a.describe()}; {names[1]}: {self.b.describe()}; {rot}"

    def to_dict(self) -> dict:
        return {"a": self.a.to_dict(), "b": self.b.to_dict(), "rotation": self.rotation, "signs": self.signs,
                "seed": self.seed}

    @classmethod
    def from_dict(cls, d: dict) -> "ProductConfig":
        if not isinstance(d, dict):
            raise TypeError(f"ProductConfig.from_dict expects a dict, got {type(d).__name__}")
        _unknown_keys(d, cls)
        return cls(**d)


def _product(value, what: str) -> ProductConfig:
    if isinstance(value, ProductConfig):
        return value
    if isinstance(value, dict):
        return ProductConfig.from_dict(value)
    if value is None:
        return ProductConfig()
    raise TypeError(f"{what} must be a ProductConfig, a dict or None, got {type(value).__name__}")


@dataclass(frozen=True)
class TrainingRecipe:
    """How a :class:`~hadakit.training.QuantLinear` computes its three products (see the module docstring).

    Args:
        forward: ``y = x·Wᵀ`` (operands ``a = x``, ``b = W``; inner dim ``in_features``).
        grad_input: ``dx = dy·W`` (``a = dy``, ``b = Wᵀ``; inner dim ``out_features``).
        grad_weight: ``dW = dyᵀ·x`` (``a = dyᵀ``, ``b = xᵀ``; inner dim tokens).
        backend: ``"auto"``: real low-precision GEMMs where the hardware has them (CUDA: ``torch._scaled_mm`` for
            FP8 operands, ``torch._int_mm`` for INT8), emulation elsewhere; ``"emulate"``: always quantize-dequantize
            and multiply in float32.
        name, description: informational.
    """

    forward: ProductConfig = field(default_factory=ProductConfig)
    grad_input: ProductConfig = field(default_factory=ProductConfig)
    grad_weight: ProductConfig = field(default_factory=ProductConfig)
    backend: str = "auto"
    name: str | None = None
    description: str = ""

    def __post_init__(self):
        for p in PRODUCTS:
            object.__setattr__(self, p, _product(getattr(self, p), f"TrainingRecipe.{p}"))
        if self.backend not in BACKENDS:
            raise ValueError(f"TrainingRecipe.backend must be one of {BACKENDS}, got {self.backend!r}")
        where = {"forward": "forward (x, W)", "grad_input": "grad_input (dy, W)", "grad_weight": "grad_weight (dy, x)"}
        for p in PRODUCTS:
            prod = getattr(self, p)
            for side, op in (("a", prod.a), ("b", prod.b)):
                name = OPERAND_NAMES[p][0 if side == "a" else 1]
                if op.scale_2d and name != "W":
                    raise ValueError(f"TrainingRecipe: scale_2d is for the weight operand W; {where[p]} operand "
                                     f"{side} is {name}")
                if op.reuse_forward and not (p != "forward" and side == "b"):
                    raise ValueError(f"TrainingRecipe: reuse_forward is for the W / x operands of the backward "
                                     f"products (grad_input.b, grad_weight.b); not {p}.{side} ({name})")

    @property
    def products(self) -> dict[str, ProductConfig]:
        return {p: getattr(self, p) for p in PRODUCTS}

    @property
    def plain(self) -> bool:
        """True when no product is quantized or rotated (the layer is exactly nn.Linear)."""
        return all(getattr(self, p).plain for p in PRODUCTS)

    def replace(self, **changes) -> "TrainingRecipe":
        """A copy with ``changes`` applied (``name`` becomes ``None`` unless given)."""
        changes.setdefault("name", None)
        return dataclasses.replace(self, **changes)

    def describe(self) -> str:
        lines = [f"recipe {self.name or '(custom)'} (backend={self.backend})"]
        if self.description:
            lines.append(f"  {self.description}")
        for p in PRODUCTS:
            lines.append(f"  {p:<11} {getattr(self, p).describe(OPERAND_NAMES[p])}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        d = {p: getattr(self, p).to_dict() for p in PRODUCTS}
        d.update(backend=self.backend, name=self.name, description=self.description)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainingRecipe":
        if not isinstance(d, dict):
            raise TypeError(f"TrainingRecipe.from_dict expects a dict, got {type(d).__name__}")
        if d.get("kind") == Int4XiRecipe.KIND and cls is TrainingRecipe:
            return Int4XiRecipe.from_dict(d)
        if d.get("kind") == LbpWhtRecipe.KIND and cls is TrainingRecipe:
            return LbpWhtRecipe.from_dict(d)
        _unknown_keys(d, cls)
        return cls(**d)


# ------------------------------------------------------------------------------------------------------------------
# INT4 training of Xi et al. (its own autograd function, hadakit.training.int4)
# ------------------------------------------------------------------------------------------------------------------

# INT4 with the symmetric range [-7, 7] and one fp32 amax scale per row (amax / 7): nothing clips, so stochastic
# rounding with it is unbiased.
INT4_ROW = "int4_restricted"


def _int4_xi_products(block_size: int) -> dict[str, ProductConfig]:
    """The product configs an :class:`Int4XiRecipe` carries. ``forward`` is exactly the Hadamard quantizer; the
    backward entries are what the generic ``quant_linear`` path would run (INT4 stochastic rounding of ``dy`` on the
    forward's quantized operands), since bit splitting and leverage-score sampling are not ProductConfig options."""
    O, P = OperandConfig, ProductConfig
    sr = O(INT4_ROW, stochastic_rounding=True)
    reuse = O(reuse_forward=True)
    return {"forward": P(O(INT4_ROW), O(INT4_ROW), rotation=block_size), "grad_input": P(sr, reuse),
            "grad_weight": P(sr, reuse)}


def _from_kind_dict(cls, d: dict):
    """``cls(**d)`` for a recipe class with its own ``KIND`` (``Int4XiRecipe``, ``LbpWhtRecipe``): ``d`` must be a
    dict whose optional ``"kind"`` is ``cls.KIND`` and whose other keys are ``cls``'s fields."""
    if not isinstance(d, dict):
        raise TypeError(f"{cls.__name__}.from_dict expects a dict, got {type(d).__name__}")
    d = dict(d)
    kind = d.pop("kind", cls.KIND)
    if kind != cls.KIND:
        raise ValueError(f"{cls.__name__}.from_dict: kind must be {cls.KIND!r}, got {kind!r}")
    _unknown_keys(d, cls)
    return cls(**d)


@dataclass(frozen=True)
class Int4XiRecipe(TrainingRecipe):
    """INT4 training of Xi, Li, Chen & Zhu, "Training Transformers with 4-bit Integers" (NeurIPS 2023,
    arXiv 2306.11987), run by :class:`~hadakit.training.QuantLinear` with the autograd function of
    :mod:`hadakit.training.int4` (see there for the exact estimators).

    * forward: Hadamard quantizer (HQ): block-``block_size`` Hadamard transform of ``x`` and ``W`` along
      ``in_features``, then INT4 per token (``x``) / per output channel (``W``);
    * output gradient ``dy``: bit splitting (BS) into two INT4 matrices, a nearest-rounded high part and a
      stochastically rounded low part of the residual (unbiased, ~8 bits of precision in 2 × 4-bit codes);
    * weight gradient: leverage-score sampling (LSS) over the 2·T rows of the split ``dy`` (and the forward's INT4
      ``x``): row ``i`` kept with probability ``p_i ∝ ‖dy_i‖·‖x_i‖`` (capped at 1, ``Σ p_i = keep_fraction·2T``)
      and scaled by ``1 / p_i`` (unbiased); with ``keep_fraction=0.5`` the product costs one INT4 GEMM over T rows;
    * input gradient: BS (both INT4 parts against the forward's INT4 ``W``), with LSS over the split rows too
      when ``lss_grad_input`` (``p_i ∝ ‖dy_i‖``).

    Args:
        block_size: the Hadamard block of HQ (a supported Hadamard order; ``in_features`` is zero-padded to a
            multiple of it).
        keep_fraction: expected fraction of the ``2T`` split rows LSS keeps, in ``(0, 1]`` (1: no sampling).
        lss_grad_weight, lss_grad_input: apply LSS to the weight / input gradient.

    The ``forward`` / ``grad_input`` / ``grad_weight`` fields are derived from these (do not pass them):
    ``forward`` is the HQ product; the backward fields only describe the operand formats (plain INT4 stochastic
    rounding of ``dy``): :func:`~hadakit.training.quant_linear` (so ``QuantLinear``) sends this recipe to
    :func:`hadakit.training.int4.int4_xi_linear`, which runs the real estimators.
    """

    KIND = "int4_xi"
    block_size: int = 32
    keep_fraction: float = 0.5
    lss_grad_weight: bool = True
    lss_grad_input: bool = False

    def __post_init__(self):
        b = self.block_size
        if isinstance(b, bool) or not isinstance(b, int) or b < 2:
            raise ValueError(f"Int4XiRecipe.block_size must be an int >= 2 (a Hadamard order, e.g. 32), got {b!r}")
        if not supported(b):
            below, above = nearest_supported(b)
            raise ValueError(f"Int4XiRecipe.block_size: no Hadamard matrix of order {b}; nearest supported: "
                             f"{below}, {above}")
        k = self.keep_fraction
        if isinstance(k, bool) or not isinstance(k, (int, float)) or not (0.0 < float(k) <= 1.0):
            raise ValueError(f"Int4XiRecipe.keep_fraction must be a number in (0, 1] (0.5: the paper's cost of one "
                             f"INT4 GEMM; 1: no sampling), got {k!r}")
        object.__setattr__(self, "keep_fraction", float(k))
        _check_bool(self.lss_grad_weight, "Int4XiRecipe.lss_grad_weight")
        _check_bool(self.lss_grad_input, "Int4XiRecipe.lss_grad_input")
        derived = _int4_xi_products(b)
        for p in PRODUCTS:
            given = _product(getattr(self, p), f"Int4XiRecipe.{p}")
            if given != derived[p] and given != ProductConfig():
                raise ValueError(f"Int4XiRecipe.{p} is derived from block_size; do not pass it (use "
                                 f"TrainingRecipe for custom products)")
            object.__setattr__(self, p, derived[p])
        super().__post_init__()

    def describe(self) -> str:
        lines = [f"recipe {self.name or '(custom)'} (Xi et al. 2023 INT4; own autograd function)"]
        if self.description:
            lines.append(f"  {self.description}")
        lines.append(f"  forward     HQ: block-{self.block_size} Hadamard along in_features; x INT4 per token, "
                     f"W INT4 per output channel ([-7, 7], amax scales)")
        lss = f"LSS over the 2T split rows (keep {self.keep_fraction:g}, p ~ |dy_i|"
        lines.append("  grad_input  dy: bit split (INT4 nearest + INT4 SR residual)"
                     + (f", {lss})" if self.lss_grad_input else "") + "; W: forward's INT4 operand")
        lines.append("  grad_weight dy: bit split" + (f", {lss}·|x_i|)" if self.lss_grad_weight else "")
                     + "; x: forward's INT4 operand")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        d = super().to_dict()
        d.update(kind=self.KIND, block_size=self.block_size, keep_fraction=self.keep_fraction,
                 lss_grad_weight=self.lss_grad_weight, lss_grad_input=self.lss_grad_input)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Int4XiRecipe":
        return _from_kind_dict(cls, d)


# ------------------------------------------------------------------------------------------------------------------
# LBP-WHT: low-rank backpropagation with the Walsh-Hadamard transform (hadakit.training.lbp_wht)
# ------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LbpWhtRecipe(TrainingRecipe):
    """Low-rank backpropagation with the WHT (Yang et al., NeurIPS 2023; :mod:`hadakit.training.lbp_wht`): exact
    forward, backward products projected onto ``rank`` Walsh-Hadamard basis vectors along the token axis.
    :func:`~hadakit.training.convert` swaps the targeted linears for
    :class:`~hadakit.training.LbpWhtLinear` with :attr:`config`.

    Args: ``rank``, ``selection``, ``project``, ``padding``: see :class:`~hadakit.training.LbpWhtConfig`.
    The product fields stay plain (no quantization); do not pass them.
    """

    KIND = "lbp_wht"
    rank: int | float = 0.25
    selection: str = "low_pass"
    project: str = "both"
    padding: str = "pow2"

    def __post_init__(self):
        for p in PRODUCTS:
            if _product(getattr(self, p), f"LbpWhtRecipe.{p}") != ProductConfig():
                raise ValueError(f"LbpWhtRecipe.{p}: LBP-WHT runs plain (unquantized) products; do not pass {p}")
        object.__setattr__(self, "_config", LbpWhtConfig(rank=self.rank, selection=self.selection,
                                                         project=self.project, padding=self.padding))
        super().__post_init__()

    @property
    def config(self) -> LbpWhtConfig:
        """The layer config (:class:`~hadakit.training.LbpWhtConfig`)."""
        return self._config

    @property
    def plain(self) -> bool:
        return False

    def describe(self) -> str:
        r = f"{self.rank} basis vectors" if isinstance(self.rank, int) else f"{self.rank:g} of the tokens"
        grads = "weight and input gradients" if self.project == "both" else "weight gradient (input gradient exact)"
        lines = [f"recipe {self.name or '(custom)'} (LBP-WHT, Yang et al. 2023; own autograd function)"]
        if self.description:
            lines.append(f"  {self.description}")
        lines.append("  forward     exact (nn.Linear)")
        lines.append(f"  backward    {grads} projected on {r} ({self.selection} WHT basis along tokens, "
                     f"padding {self.padding})")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"kind": self.KIND, "rank": self.rank, "selection": self.selection, "project": self.project,
                "padding": self.padding, "backend": self.backend, "name": self.name,
                "description": self.description}

    @classmethod
    def from_dict(cls, d: dict) -> "LbpWhtRecipe":
        return _from_kind_dict(cls, d)


# ------------------------------------------------------------------------------------------------------------------
# Named recipes
# ------------------------------------------------------------------------------------------------------------------


def _build_recipes() -> dict[str, TrainingRecipe]:
    O, P, R = OperandConfig, ProductConfig, TrainingRecipe
    hp = O()
    # Tseng et al. 2025: MXFP4 with stochastic rounding of every backward operand, 3/4 headroom so the OCP floor
    # scale never clips (unbiased SR), blockwise random Hadamard (block 64, their default HBS=64) with new signs
    # per backward call.
    mx_sr = O("mxfp4", stochastic_rounding=True, headroom=0.75)
    mx_bwd = P(mx_sr, mx_sr, rotation=64, signs="per_step")
    mx = O("mxfp4")
    nv = O("nvfp4")
    nv_w = O("nvfp4", scale_2d=True)
    nv_sr = O("nvfp4", stochastic_rounding=True)
    i8 = O("int8")
    reuse = O(reuse_forward=True)
    i4t = O(QuantScheme(element="int4", granularity="per_tensor", scale_format="fp32", name="int4_per_tensor"))
    recipes = [
        R(name="bf16", description="reference: no quantization; every product runs in the input dtype "
                                   "(nn.Linear exactly)"),
        R(P(mx, mx), mx_bwd, mx_bwd, name="mxfp4",
          description="Tseng et al. 2025 backward (MXFP4, block-64 RHT with new signs per step, SR with 3/4 "
                      "headroom) + MXFP4 forward (nearest)"),
        R(P(), mx_bwd, mx_bwd, name="mxfp4_bwd",
          description="Tseng et al. 2025 as published: high-precision forward, MXFP4 backward with block-64 RHT "
                      "and SR (3/4 headroom)"),
        R(P(mx, mx), P(mx, mx), P(mx, mx), name="mxfp4_no_rht_sr",
          description="ablation: MXFP4 operands in all three products, no rotation, nearest rounding"),
        R(P(nv, nv_w), P(nv_sr, nv_w), P(nv_sr, nv, rotation=16, signs="fixed", seed=0), name="nvfp4",
          description="NVIDIA NVFP4 pretraining recipe: NVFP4 everywhere (fp32 tensor scales), 16x16 2D weight "
                      "scales, 16-point random Hadamard on the weight-gradient operands, SR on gradients"),
        R(P(i8, i8, rotation="full"), P(i8, i8, rotation="full"), P(i8, i8, rotation="full"), name="int8_hadamard",
          description="HALO-style: INT8 per-row operands in all three products, full Hadamard along every inner "
                      "dim"),
        R(P("fp8_e4m3", "fp8_e4m3"), P("fp8_e5m2", "fp8_e4m3"), P("fp8_e5m2", "fp8_e4m3"), name="fp8",
          description="FP8 with per-tensor current scaling: E4M3 activations and weights, E5M2 gradients "
                      "(torch._scaled_mm on CUDA)"),
        R(P("int8", "ternary"), P(hp, reuse), P(hp, reuse), name="bitnet_b158",
          description="BitNet b1.58: ternary absmean weights (per tensor), INT8 absmax activations (per token); "
                      "gradients in high precision through the quantized operands (STE)"),
        R(P("int4", "ternary", rotation="full"), P(hp, reuse), P(hp, reuse), name="bitnet_v2",
          description="BitNet v2 H-BitLinear: Hadamard along in_features, ternary weights, INT4 absmax "
                      "activations (per token); gradients in high precision (STE)"),
        # Added with hadakit.training.int4 (issue #23 item 3).
        Int4XiRecipe(name="int4_xi",
                     description="Xi et al. 2023 INT4 training: Hadamard quantizer forward (block-32 HT, INT4 per "
                                 "token / channel), bit-split output gradient, leverage-score sampled weight "
                                 "gradient"),
        # Added with hadakit.training.lbp_wht (issue #23 item 2); "lbp_wht:8" / "lbp_wht:0.5" set the rank.
        LbpWhtRecipe(name="lbp_wht",
                     description="Yang et al. 2023 LBP-WHT: exact forward; weight and input gradients projected on "
                                 "the lowest-sequency quarter of the WHT basis along the tokens"),
        R(P(i4t, i4t), P(i4t, i4t), P(i4t, i4t), name="int4_naive",
          description="negative control: INT4 with one per-tensor amax scale in all three products, nearest "
                      "rounding, no rotation"),
    ]
    return {r.name: r for r in recipes}


_RECIPES = _build_recipes()


def list_training_recipes() -> list[str]:
    """Names of the built-in training recipes."""
    return list(_RECIPES)


def get_training_recipe(name, /, **changes) -> TrainingRecipe:
    """A named recipe (``"bf16"``, ``"mxfp4"``, ``"nvfp4"``, ...), or a TrainingRecipe / its dict passed through;
    ``changes`` replace fields (``get_training_recipe("int8_hadamard", backend="emulate")``)."""
    if isinstance(name, TrainingRecipe):
        recipe = name
    elif isinstance(name, dict):
        recipe = TrainingRecipe.from_dict(name)
    elif isinstance(name, str):
        key = name.strip().lower().replace("-", "_")
        if key.startswith(LbpWhtRecipe.KIND + ":"):  # "lbp_wht:8" (basis vectors) or "lbp_wht:0.25" (fraction)
            arg = key.split(":", 1)[1]
            try:
                rank = int(arg) if arg.isdigit() else float(arg)
            except ValueError:
                raise ValueError(f"training recipe {name!r}: the rank after 'lbp_wht:' must be an int (basis "
                                 f"vectors, e.g. 'lbp_wht:8') or a fraction (e.g. 'lbp_wht:0.25')") from None
            recipe = _RECIPES[LbpWhtRecipe.KIND].replace(
                rank=rank, name=name.strip(),
                description=f"Yang et al. 2023 LBP-WHT: exact forward; weight and input gradients projected on "
                            f"{rank} lowest-sequency WHT basis vectors along the tokens")
            return recipe.replace(**changes) if changes else recipe
        if key not in _RECIPES:
            raise ValueError(f"unknown training recipe {name!r}; available: {', '.join(_RECIPES)} "
                             f"(or build a TrainingRecipe)")
        recipe = _RECIPES[key]
    else:
        raise TypeError(f"recipe must be a name, a TrainingRecipe or a dict, got {type(name).__name__}")
    if changes:
        keep_name = set(changes) <= {"backend", "description"}
        if keep_name:
            changes.setdefault("name", recipe.name)
        recipe = recipe.replace(**changes)
    return recipe
