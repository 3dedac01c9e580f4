"""Quantization recipes: what to quantize in a model, with which format, rotation and weight method.

A recipe is a frozen dataclass that serializes to JSON and is saved beside every result, so each number can be
reproduced from its file. Scheme names follow the peer pipelines' meanings so rows compare one to one:

====================  ==========================================================================================
preset                meaning
====================  ==========================================================================================
``fp``                nothing quantized (the reference)
``w8a8``              INT8 symmetric per-channel weights, INT8 symmetric per-token dynamic activations
``w4a16``             INT4 symmetric per-channel weights, activations in full precision
``w4a16_g128``        INT4 symmetric weights in groups of 128 (fp16 scales), activations in full precision
``w4a4``              INT4 symmetric weights g128, INT4 symmetric per-token dynamic activations
``w4a4kv4``           ``w4a4`` plus a 4-bit KV cache (asymmetric, per head per token, after a Hadamard on head_dim)
``mxfp4``             MXFP4 weights and activations (E2M1, blocks of 32, E8M0 scales, OCP floor rule)
``nvfp4_w``           NVFP4 weights only (E2M1, blocks of 16, E4M3 scales, fp32 tensor scale)
``nvfp4``             NVFP4 weights and activations (activations per token, dynamic)
``kv4``/``kv3``/``kv2`` only the KV cache, 4 / 3 / 2 bits
``e8p2``              QuIP#-style 2-bit weights: E8P12 lattice codes (16 bits per 8 weights), two-sided randomized
                      Hadamard incoherence, BlockLDLQ (:mod:`hadakit.quantization.quip`)
``e8p3``/``e8p4``     the same at 3 / 4 bits: residual VQ (E8P12 + a 1-bit E8 stage / + a second E8P12 stage)
====================  ==========================================================================================

The ``e8p*`` presets (:func:`list_vector_recipes`; ``list_recipes`` keeps the scalar ones) default to rotation
``random`` (the two-sided RHT ``W ← H·D_out·W·D_in·H``, with the Hessian transformed to match) and method ``gptq``
(BlockLDLQ: GPTQ's error feedback with 8-wide vector rounding); ``none`` turns the incoherence off and ``rtn``
rounds each 8-vector to its nearest codeword. Their one option, ``scalesearch``, tries 0.9 / 1.0 / 1.1 × the
per-matrix scale on the proxy loss (one BlockLDLQ run each). ``e8p2`` == ``e8p2:random:gptq``.

Rotation (``RotationConfig.kind``): ``none``; ``hadamard`` (an online ``H`` on the input of every quantized linear,
``y = Q(x·Hᵀ)·Q(W·Hᵀ)ᵀ``, exact before quantization since ``HᵀH = I``); ``random`` (``H·D`` with seeded signs, a
different seed per layer); ``block`` (block-diagonal ``H`` of ``block_size``).

Calibrated options (``quantization/calibrate``), written after the method in a spec, comma-separated
(``"w4a4:random:gptq:smooth=search,aclip=search,wclip,learn=affine"``):

==================  ===============================================================================================
option              meaning
==================  ===============================================================================================
``smooth=A``        per-channel smoothing before the rotation, migration strength ``A`` or ``search`` (per layer)
``aclip=R``         activation clip ratio ``R`` or ``search`` (one per layer, by output error)
``wclip``           MSE-optimal clip ratio per weight group (inside GPTQ's scale fit too)
``store=D``         the tensors left unquantized (embeddings, LM head, norms) rounded to ``D`` (``bf16``/``fp16``) and
                    stored in it: a smaller checkpoint, and the run measures exactly what it reloads
``fusevo``          the per-head part of ``o_proj``'s rotation is fused offline into ``v_proj`` (checked exact on a
                    probe); only a Hadamard across heads stays online (``quantization/fusion``)
``actorder``        GPTQ visits columns by decreasing Hessian diagonal (static groups: same packed layout)
``refit=N``         N rounds of least-squares group scales for GPTQ's codes, then GPTQ again under those scales
``seq``             true-sequential calibration: within a layer, each linear's inputs come from the layer with the
                    linears before it already quantized (q/k/v, then o, then gate/up, then down)
``fptarget=S``      GPTQ fits each linear to the full-precision model's outputs on the same tokens (the weight is
                    first replaced by its least-squares map from the quantized model's inputs), so the error of the
                    layers before is compensated too (GPTAQ's asymmetric calibration); ``S`` scales the
                    correction (default 0.5); implies ``seq``
``learn=M``         a learned Kronecker transform after the rotation: ``orthogonal`` (Cayley) or ``affine``
``steps=N``         optimization steps of ``learn`` per layer
``kvgroup=G``       KV quantized in groups of ``G`` along head_dim instead of one scale per head and token
``kvclip``          MSE-optimal clip ratio per KV group (searched at every forward, on the tensor being cached)
``kvcenter``        keys and values quantized around calibrated per-channel centers (``Q(x − μ) + μ``)
``sinks=K``         the first ``K`` positions of the KV cache stay in full precision (attention sinks)
==================  ===============================================================================================

Two forms of a recipe: the string ``NAME[:ROTATION[:METHOD[:OPTIONS]]]`` (``get_recipe``; ``QuantRecipe.spec()``
writes the canonical one, ``get_recipe(r.spec()) == r``) and the JSON of ``to_dict`` / ``from_dict`` (``save`` /
``load``), which is lossless: fields no string sets (``targets``, ``ignore``, ``calib_windows``, ``rotation.seed``, a custom scheme
dict, ...) make ``spec()`` raise, naming them. Both forms, and direct construction, are checked by the same rules
(``QuantRecipe._validate``), so each mistake gets one error naming the field.
"""

from __future__ import annotations

import dataclasses
import json
import numbers
from dataclasses import dataclass, field
from pathlib import Path

from hadakit.quantization.gptq import GPTQConfig
from hadakit.selection import check_patterns
from hadakit.transforms.spec import RotationSpec, parse_rotation

FP_TARGET_STRENGTH = 0.5  # fptarget's default share of the correction: best of 0.25, 0.5, 1 on Gemma W4A16 (32 windows)
_BLOCK_KINDS = ("block", "random-block")
ROTATIONS = ("none", "hadamard", "random", "block", "random-block")  # the grammar of hadakit.transforms.spec
METHODS = ("rtn", "gptq")
LEARNED = (None, "orthogonal", "affine")
STORE_DTYPES = (None, "bf16", "fp16")
LEARN_STEPS = 40  # learn_steps' default (option steps=)


def _is_number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _check_bool(fname: str, v) -> None:
    if not isinstance(v, bool):
        raise ValueError(f"recipe field {fname} must be true or false, got {v!r} ({type(v).__name__})")


def _check_int(fname: str, v, lo: int) -> None:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < lo:
        raise ValueError(f"recipe field {fname} must be a whole number >= {lo}, got {v!r} ({type(v).__name__})")


def _field_names(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


@dataclass(frozen=True)
class RotationConfig:
    kind: str = "none"
    block_size: int | None = None
    seed: int = 0
    # Sizes without a Hadamard matrix: "dct" / "random" orthogonal fallback (reported per layer), or None to refuse.
    fallback: str | None = "dct"

    def __post_init__(self):
        if not isinstance(self.kind, str) or self.kind not in ROTATIONS:
            raise ValueError(f"rotation must be one of {ROTATIONS}, got {self.kind!r}")
        if self.kind in _BLOCK_KINDS and not self.block_size:
            raise ValueError(f"rotation {self.kind!r} needs a block_size (e.g. 32 or 128)")
        if self.block_size is not None and (isinstance(self.block_size, bool) or not isinstance(self.block_size, int)
                                            or self.block_size < 1):
            raise ValueError(f"rotation block_size must be a positive integer (e.g. 32 or 128), got "
                             f"{self.block_size!r}")
        if self.block_size is not None and self.kind not in _BLOCK_KINDS:
            raise ValueError(f"rotation block_size={self.block_size} applies to kinds 'block' / 'random-block' only "
                             f"(block-N, random-block-N), not {self.kind!r}: set kind 'block' or block_size null")
        if isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral):
            raise ValueError(f"rotation seed must be a whole number (e.g. 0), got {self.seed!r}")
        from hadakit.transforms.plan import FALLBACKS

        if self.fallback is not None and (not isinstance(self.fallback, str) or self.fallback not in FALLBACKS):
            raise ValueError(f"rotation fallback must be one of {(None, *FALLBACKS)}, got {self.fallback!r}")

    @property
    def block(self) -> int | None:
        """The block size of a block-diagonal rotation, ``None`` for one over the whole dimension."""
        return self.block_size if self.kind in _BLOCK_KINDS else None

    @property
    def signs(self) -> str:
        """``"fixed"`` for the randomized kinds (``H·D``, seeded per layer), else ``"none"``."""
        return "fixed" if self.kind in ("random", "random-block") else "none"

    def label(self) -> str:
        """The name in the rotation grammar of :mod:`hadakit.transforms.spec`."""
        if self.kind == "none":
            return "none"
        return str(RotationSpec(self.block, self.signs))

    @classmethod
    def from_name(cls, name: str, **fields) -> "RotationConfig":
        """The config of a name of the rotation grammar (``random-block-128``); ``fields``: seed, fallback."""
        spec = parse_rotation(name)
        if spec is None:
            return cls("none", **fields)
        kind = ("random" if spec.signs == "fixed" else "hadamard") if spec.block_size is None else \
            ("random-block" if spec.signs == "fixed" else "block")
        return cls(kind, spec.block_size, **fields)


@dataclass(frozen=True)
class QuantRecipe:
    """What to quantize and how. ``None`` for a scheme leaves that tensor in full precision.

    Args:
        name: the preset's name (informational).
        weight: weight scheme preset of ``hadakit.formats`` (groups along the input dimension).
        act: activation scheme (per token, computed dynamically at every forward).
        kv: KV-cache scheme (applied per head and token, along head_dim, after a Hadamard on head_dim).
        method: weight quantizer: ``rtn`` (round to nearest) or ``gptq``.
        gptq: GPTQ settings.
        rotation: the online rotation of every quantized linear's input.
        kv_rotation: Hadamard on head_dim before the KV quantizer (keys after RoPE).
        targets / ignore: which linears the recipe quantizes, by the rule of :mod:`hadakit.selection` (shared with
            ``inspect`` and ``convert``): ``targets`` empty means every ``nn.Linear`` / ``Conv1D``; ``ignore``
            patterns are left in full precision (the LM head and embeddings by default). A ``recipe.json`` written
            before ``targets``/``ignore`` existed names the ignore list ``skip``; it still loads.
        calib_windows / calib_len: calibration data for GPTQ (windows of calib_len tokens from the calibration text).
    """

    name: str = "custom"
    weight: str | dict | None = None
    act: str | dict | None = None
    kv: str | dict | None = None
    method: str = "rtn"
    gptq: GPTQConfig = field(default_factory=GPTQConfig)
    rotation: RotationConfig = field(default_factory=RotationConfig)
    kv_rotation: bool = True
    targets: tuple[str, ...] = ()
    ignore: tuple[str, ...] = ("lm_head", "embed")
    calib_windows: int = 32
    calib_len: int = 512
    smooth: float | str | None = None
    act_clip: float | str | None = None
    weight_clip: bool = False
    learned: str | None = None
    learn_steps: int = LEARN_STEPS
    calib_rows: int = 1024
    kv_sink_tokens: int = 0
    kv_center: bool = False
    fuse_values: bool = False
    sequential: bool = False
    # GPTQ fits each linear's quantized output to the full-precision model's output on the same tokens, not to its
    # own weights on the (already perturbed) quantized model's inputs: GPTAQ's asymmetric calibration.
    # 0 = off; else how much of the least-squares correction is applied (see quantization.gptq.corrected_weight)
    fp_target: float = 0.0
    # "bf16"/"fp16": the tensors left unquantized (embeddings, LM head, norms) are rounded to this dtype, so the
    # checkpoint stores them at half the size and the simulated run is what the checkpoint reloads.
    store_dtype: str | None = None
    # E8P lattice weights (presets e8p2/e8p3/e8p4): 2 = E8P12, 3/4 = residual VQ; None for the scalar recipes.
    vector_bits: int | None = None
    # e8p: search the per-matrix scale over VECTOR_SCALE_SEARCH multipliers on the proxy loss (option scalesearch)
    vector_scale_search: bool = False

    def __post_init__(self):
        for fname in ("targets", "ignore"):
            try:
                object.__setattr__(self, fname, check_patterns(getattr(self, fname), f"recipe field {fname}"))
            except TypeError as e:
                raise ValueError(f"{e} (e.g. [\"lm_head\", \"embed\"], or [] for none)") from None
        self._validate()

    def _validate(self) -> None:
        """Every rule on the fields, in one place: a recipe string (``get_recipe``), a recipe JSON
        (``from_dict`` / ``load``), ``dataclasses.replace`` and direct construction all end here, so each gets the
        same error. Messages name the field (and, where one sets it, the string option)."""
        if not isinstance(self.name, str):
            raise ValueError(f"recipe field name must be a string, got {self.name!r}")
        if not isinstance(self.method, str) or self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if not isinstance(self.gptq, GPTQConfig):
            raise ValueError(f"recipe field gptq must be a GPTQConfig (in JSON an object with keys "
                             f"{_field_names(GPTQConfig)}), got {self.gptq!r}")
        if not isinstance(self.rotation, RotationConfig):
            raise ValueError(f"recipe field rotation must be a RotationConfig (in JSON an object with keys "
                             f"{_field_names(RotationConfig)}), got {self.rotation!r}")
        for fname in ("kv_rotation", "weight_clip", "kv_center", "fuse_values", "sequential", "vector_scale_search"):
            _check_bool(fname, getattr(self, fname))
        _check_bool("gptq.act_order", self.gptq.act_order)
        for fname, lo in (("calib_windows", 1), ("calib_len", 1), ("calib_rows", 1), ("learn_steps", 1),
                          ("kv_sink_tokens", 0)):
            _check_int(fname, getattr(self, fname), lo)
        _check_int("gptq.block_size", self.gptq.block_size, 1)
        _check_int("gptq.refit", self.gptq.refit, 0)
        if not _is_number(self.gptq.damp) or not 0.0 <= self.gptq.damp < float("inf"):
            raise ValueError(f"recipe field gptq.damp must be a number >= 0 (e.g. 0.01), got {self.gptq.damp!r}")
        for fname, lo in (("smooth", 0.0), ("act_clip", 1e-9)):
            v = getattr(self, fname)
            if v is not None and v != "search" and not (_is_number(v) and lo <= float(v) <= 1.0):
                raise ValueError(f"{fname} must be a number in [{lo:g}, 1] or 'search', got {v!r}")
        if self.learned not in LEARNED:
            raise ValueError(f"learned must be one of {LEARNED}, got {self.learned!r}")
        if not _is_number(self.fp_target) or not 0.0 <= float(self.fp_target) <= 1.0:
            raise ValueError(f"fp_target must be a strength in [0, 1] (0 = off), got {self.fp_target!r}")
        if self.store_dtype not in STORE_DTYPES:
            raise ValueError(f"store_dtype must be one of {STORE_DTYPES}, got {self.store_dtype!r}")
        from hadakit.formats import get_scheme  # validate scheme names early, with the formats layer's message

        for fname in ("weight", "act", "kv"):
            v = getattr(self, fname)
            if v is not None:
                try:
                    get_scheme(v)
                except (TypeError, ValueError) as exc:
                    raise ValueError(f"recipe field {fname}: {exc}") from None

        self._validate_vector()
        # Cross-field rules (what the string options imply or need).
        if (self.smooth is not None or self.act_clip == "search" or self.learned) and self.weight is None \
                and self.act is None:
            raise ValueError("smooth / act_clip search / learned transforms need quantized weights or activations")
        if self.weight_clip and self.weight is None:
            raise ValueError(f"weight_clip (option wclip) clips the weights: recipe {self.name!r} quantizes no "
                             f"weights; leave it out")
        if self.learn_steps != LEARN_STEPS and not self.learned:
            raise ValueError(f"learn_steps={self.learn_steps} (option steps=) sets the optimization steps of a "
                             f"learned transform: it does nothing without learned (option learn=, e.g. "
                             f"learn=affine,steps=40)")
        gptq_only = (("gptq.act_order=True", "actorder", self.gptq.act_order),
                     (f"gptq.refit={self.gptq.refit}", "refit", self.gptq.refit),
                     (f"fp_target={self.fp_target}", "fptarget", self.fp_target),
                     # true-sequential inputs for the options fitted per linear are used by RTN too
                     ("sequential=True", "seq", self.sequential and not self.fits_options))
        for what, opt, on in gptq_only:
            if not on:
                continue
            if self.method != "gptq":
                extra = ", fit an option per linear with it (smooth, aclip=search, learn)," if opt == "seq" else ""
                raise ValueError(f"{what} (option {opt}) changes how GPTQ quantizes the weights: it does nothing "
                                 f"with method {self.method!r}; use method gptq (NAME:ROTATION:gptq:{opt}){extra} "
                                 f"or leave it out")
            if self.weight is None:
                raise ValueError(f"{what} (option {opt}) changes how GPTQ quantizes the weights: recipe "
                                 f"{self.name!r} quantizes no weights; leave it out")
        if self.fp_target and not self.sequential:
            # Without true-sequential inputs, a linear would also correct drift that the (corrected) linears
            # before it in the same layer have already removed: measured worse than plain GPTQ on MiniLM.
            raise ValueError("fptarget corrects the weights GPTQ quantizes, against inputs from the already "
                             "quantized linears before it: it needs method 'gptq' and sequential=True (option seq)")
        if self.fuse_values and self.rotation.kind not in ("hadamard", "random"):
            raise ValueError(f"fusevo fuses part of a full rotation of o_proj's input into v_proj: it needs rotation "
                             f"'hadamard' or 'random', not {self.rotation.label()!r}")
        if self.kv is None and self.kv_center:
            raise ValueError(f"kv_center (option kvcenter): recipe {self.name!r} has no KV quantization")
        if self.kv is None and self.kv_sink_tokens:
            raise ValueError(f"kv_sink_tokens={self.kv_sink_tokens} (option sinks): recipe {self.name!r} has no KV "
                             f"quantization")

    def _validate_vector(self) -> None:
        """The rules of the E8P lattice recipes (``vector_bits``): what :mod:`hadakit.quantization.quip` runs."""
        if self.vector_bits is None:
            if self.vector_scale_search:
                raise ValueError("vector_scale_search (option scalesearch) searches the scale of E8P lattice "
                                 "weights: it needs an e8p recipe (e8p2 / e8p3 / e8p4)")
            return
        if isinstance(self.vector_bits, bool) or self.vector_bits not in VECTOR_BITS:
            raise ValueError(f"recipe field vector_bits must be one of {VECTOR_BITS} (E8P12 / RVQ bits per weight) "
                             f"or null, got {self.vector_bits!r}")
        if self.weight is not None or self.act is not None or self.kv is not None:
            raise ValueError(f"recipe field vector_bits={self.vector_bits}: E8P lattice weights replace the weight "
                             f"scheme and are not combined with activation or KV quantization here; set weight, act "
                             f"and kv to null (got weight={self.weight!r}, act={self.act!r}, kv={self.kv!r})")
        if self.rotation.kind not in ("random", "none"):
            raise ValueError(f"an e8p recipe takes rotation 'random' (the two-sided randomized Hadamard "
                             f"incoherence of QuIP#) or 'none', not {self.rotation.label()!r}")
        unsupported = (("smooth", "smooth", self.smooth is not None), ("act_clip", "aclip", self.act_clip is not None),
                       ("weight_clip", "wclip", self.weight_clip), ("learned", "learn", bool(self.learned)),
                       ("fuse_values", "fusevo", self.fuse_values), ("sequential", "seq", self.sequential),
                       ("fp_target", "fptarget", bool(self.fp_target)), ("gptq.act_order", "actorder",
                                                                         self.gptq.act_order),
                       ("gptq.refit", "refit", bool(self.gptq.refit)), ("store_dtype", "store",
                                                                        self.store_dtype is not None),
                       ("kv_center", "kvcenter", self.kv_center), ("kv_sink_tokens", "sinks",
                                                                   bool(self.kv_sink_tokens)))
        for fname, opt, on in unsupported:
            if on:
                raise ValueError(f"recipe field {fname} (option {opt}) is not supported by the e8p recipes (their "
                                 f"only option is scalesearch); leave it out")

    @property
    def needs_calibration(self) -> bool:
        """Whether quantizing needs calibration data (GPTQ, or a calibrated option)."""
        return self.linears_need_calibration or (self.kv_center and self.kv is not None)

    @property
    def linears_need_calibration(self) -> bool:
        """Whether the linears are fitted on calibration data (GPTQ, smoothing, clip search, learned transforms)."""
        return (self.method == "gptq" and (self.weight is not None or self.vector_bits is not None)) \
            or self.fits_options

    @property
    def fits_options(self) -> bool:
        """Whether a calibrated option is fitted per linear (smoothing, activation clip search, learned transform)."""
        return self.smooth is not None or self.act_clip == "search" or bool(self.learned)

    def weight_scheme(self):
        """The weight scheme with ``weight_clip`` applied (None for full-precision weights)."""
        from hadakit.formats import get_scheme

        if self.weight is None:
            return None
        s = get_scheme(self.weight)
        return s.replace(clip_search=True) if self.weight_clip else s

    def act_scheme(self):
        """The activation scheme with a fixed ``act_clip`` applied (a searched one is set per layer)."""
        from hadakit.formats import get_scheme

        if self.act is None:
            return None
        s = get_scheme(self.act)
        return s.replace(clip_ratio=float(self.act_clip)) if isinstance(self.act_clip, (int, float)) else s

    def option_labels(self) -> list[str]:
        """The options shown in :meth:`label` (the canonical ones of :meth:`spec`, with ``seq`` also shown beside
        ``fptarget``, which implies it)."""
        return self._spec_options(display=True)

    @property
    def quantizes_linears(self) -> bool:
        """Whether linears are replaced (a rotation alone replaces them too: the exactness check)."""
        return (self.weight is not None or self.act is not None or self.rotation.kind != "none"
                or self.vector_bits is not None)

    def label(self) -> str:
        """Short row label, e.g. ``w4a4 random gptq``."""
        if not self.quantizes_linears and self.kv is None:
            return self.name
        parts = [self.name, self.rotation.label()]
        if self.weight is not None or self.vector_bits is not None:
            parts.append(self.method)
        opts = self.option_labels()
        return " ".join(parts) + (" +" + ",".join(opts) if opts else "")

    def with_options(self, *, rotation: str | None = None, block_size: int | None = None, method: str | None = None,
                     seed: int | None = None) -> "QuantRecipe":
        rot = self.rotation
        if rotation is not None or block_size is not None or seed is not None:
            kind = rotation or rot.kind
            # a block size belongs to a block rotation: another kind drops the old one (a new one is refused)
            size = block_size if block_size is not None else rot.block_size if kind in _BLOCK_KINDS else None
            rot = dataclasses.replace(rot, kind=kind, block_size=size, seed=rot.seed if seed is None else seed)
        return dataclasses.replace(self, rotation=rot, method=method or self.method)

    # --- string form ------------------------------------------------------------------------------------------

    def spec(self) -> str:
        """The canonical recipe string, ``NAME:ROTATION:METHOD[:OPTIONS]``: ``get_recipe(r.spec()) == r``.

        ``ROTATION`` is ``none`` / ``hadamard`` / ``random`` / ``block-N``; ``OPTIONS`` are those of the module
        docstring, comma-separated, in one order (``smooth, aclip, wclip, actorder, refit, seq, fptarget, fusevo,
        store, learn, steps, kvgroup, kvclip, kvcenter, sinks``), each only when it differs from the default, valued
        ones always with their value (``refit=1``, ``fptarget=0.5``, ``learn=affine``), numbers in Python's
        shortest round-trip form (``smooth=0.5``, ``aclip=1``); ``seq`` is left out next to ``fptarget``, which
        implies it. Spellings that parse to the same recipe give the same spec.

        Raises ``ValueError`` naming the field(s) when no string expresses the recipe (a name that is no preset,
        schemes other than the preset's, ``gptq.damp`` / ``gptq.block_size``, ``rotation.seed`` /
        ``rotation.fallback``, ``kv_rotation``, ``targets``, ``ignore``, ``calib_windows`` / ``calib_len`` / ``calib_rows`` away
        from their defaults, a block size without a Hadamard matrix): the JSON of :meth:`to_dict` / :meth:`save`
        is then the lossless form. Nothing is dropped silently: the string is parsed back and compared.
        """
        lossless = "JSON (QuantRecipe.to_dict / save) is this recipe's lossless form"
        if self.name not in _ALL_PRESETS:
            raise ValueError(f"recipe field name={self.name!r} has no string form: a recipe string starts with a "
                             f"preset ({', '.join(_ALL_PRESETS)}); {lossless}")
        preset = _ALL_PRESETS[self.name]
        for fname in ("weight", "act", "vector_bits"):
            if getattr(self, fname) != preset.get(fname):
                raise ValueError(f"recipe field {fname}={getattr(self, fname)!r} has no string form: preset "
                                 f"{self.name!r} sets {preset.get(fname)!r}; {lossless}")
        if (self.kv is None) != (preset.get("kv") is None):
            raise ValueError(f"recipe field kv={self.kv!r} has no string form: preset {self.name!r} sets "
                             f"{preset.get('kv')!r} (options change only its group size and clipping); {lossless}")
        rot = self.rotation
        if rot.block is not None:
            from hadakit.transforms.plan import supported

            if not supported(rot.block_size):
                raise ValueError(f"recipe field rotation.block_size={rot.block_size} has no string form: block-N "
                                 f"takes a size with a Hadamard matrix; {lossless}")
        opts = self._spec_options()
        text = f"{self.name}:{rot.label()}:{self.method}" + (":" + ",".join(opts) if opts else "")
        try:
            back = get_recipe(text)
        except ValueError as exc:  # not expected: every rule the parser applies is one of _validate's
            raise ValueError(f"recipe has no string form: {text!r} does not parse back ({exc}); {lossless}") from None
        diff = _field_diff(self, back)
        if diff:
            shown = ", ".join(f"{k}={mine!r} (the string form gives {theirs!r})" for k, mine, theirs in diff)
            raise ValueError(f"recipe field{'s' if len(diff) > 1 else ''} {shown} "
                             f"{'have' if len(diff) > 1 else 'has'} no string form; {lossless}")
        return text

    def __str__(self) -> str:
        """:meth:`spec` where a string expresses the recipe, else the full ``repr`` (``str()`` never raises)."""
        try:
            return self.spec()
        except ValueError:
            return repr(self)

    def _spec_options(self, *, display: bool = False) -> list[str]:
        """The options of :meth:`spec`, canonical order, defaults left out (``display``: for :meth:`label`)."""
        out = []
        if self.smooth is not None:
            out.append(f"smooth={_number_text(self.smooth)}")
        if self.act_clip is not None:
            out.append(f"aclip={_number_text(self.act_clip)}")
        if self.weight_clip:
            out.append("wclip")
        if self.gptq.act_order:
            out.append("actorder")
        if self.gptq.refit:
            out.append(f"refit={self.gptq.refit}")
        if self.sequential and (display or not self.fp_target):  # fptarget implies seq
            out.append("seq")
        if self.fp_target:
            out.append(f"fptarget={_number_text(self.fp_target)}")
        if self.fuse_values:
            out.append("fusevo")
        if self.store_dtype:
            out.append(f"store={self.store_dtype}")
        if self.learned:
            out.append(f"learn={self.learned}")
        if self.learn_steps != LEARN_STEPS:
            out.append(f"steps={self.learn_steps}")
        base = _PRESETS.get(self.name, {}).get("kv")
        if self.kv is not None and base is not None:
            from hadakit.formats import get_scheme

            kv, ref = get_scheme(self.kv), get_scheme(base)
            if kv.granularity == "group" and (ref.granularity != "group" or kv.group_size != ref.group_size):
                out.append(f"kvgroup={kv.group_size}")
            if kv.clip_search and not ref.clip_search:
                out.append("kvclip")
        if self.kv_center:
            out.append("kvcenter")
        if self.kv_sink_tokens:
            out.append(f"sinks={self.kv_sink_tokens}")
        if self.vector_scale_search:
            out.append("scalesearch")
        return out

    # --- JSON form --------------------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        """Every field (``gptq`` and ``rotation`` as nested objects): ``from_dict(json.loads(json.dumps(d)))``
        gives the recipe back, equal."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "QuantRecipe":
        """The recipe of a :meth:`to_dict` (a ``recipe.json``). A missing key takes the field's default; an unknown
        key (top level, in ``gptq`` or in ``rotation``), a value of the wrong type or out of range, and settings
        that contradict each other raise ``ValueError`` naming the key and what it accepts."""
        known = _field_names(cls)
        if isinstance(d, dict) and "skip" in d:  # recipe.json before targets/ignore
            if "ignore" in d:
                raise ValueError("a recipe has both 'skip' (the old name) and 'ignore': keep only 'ignore'")
            d = {("ignore" if k == "skip" else k): v for k, v in d.items()}
        if not isinstance(d, dict):
            raise ValueError(f"a recipe must be a JSON object with keys from {known}, got {type(d).__name__}")
        unknown = sorted(set(d) - set(known), key=str)
        if unknown:
            raise ValueError(f"unknown recipe fields {unknown}; known: {sorted(known)}")
        d = dict(d)
        for key, sub in (("gptq", GPTQConfig), ("rotation", RotationConfig)):
            if key not in d:
                continue
            v, names = d[key], _field_names(sub)
            if not isinstance(v, dict):
                raise ValueError(f"recipe field {key} must be an object with keys from {names}, got {v!r}")
            bad = sorted(set(v) - set(names), key=str)
            if bad:
                raise ValueError(f"unknown recipe {key} fields {bad}; known: {sorted(names)}")
            d[key] = sub(**v)
        return cls(**d)

    def to_json(self) -> str:
        """The recipe file's text (what :meth:`save` writes; :meth:`load` reads it back)."""
        return json.dumps(self.to_dict(), indent=1) + "\n"

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> "QuantRecipe":
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"recipe file {p} does not exist")
        return cls.from_dict(json.loads(p.read_text()))


def _kv_scheme(bits: int) -> dict:
    # Per head and token (one scale + zero point over head_dim), asymmetric, fp16 scales: the QuaRot KV layout.
    return dict(element=f"int{bits}", granularity="per_row", symmetric=False, scale_format="fp16")


_PRESETS: dict[str, dict] = {
    "fp": {},
    "w8a8": dict(weight="int8", act="int8"),
    "w4a16": dict(weight="int4"),
    "w4a16_g128": dict(weight="int4_g128"),
    "w4a4": dict(weight="int4_g128", act="int4"),
    "w4a4kv4": dict(weight="int4_g128", act="int4", kv=_kv_scheme(4)),
    "mxfp4": dict(weight="mxfp4", act="mxfp4"),
    "nvfp4_w": dict(weight="nvfp4"),
    "nvfp4": dict(weight="nvfp4", act="nvfp4"),
    "kv4": dict(kv=_kv_scheme(4)),
    "kv3": dict(kv=_kv_scheme(3)),
    "kv2": dict(kv=_kv_scheme(2)),
}


#: bits per weight of the E8P lattice recipes (2: E8P12; 3, 4: residual VQ)
VECTOR_BITS = (2, 3, 4)
#: the per-matrix scale multipliers of option scalesearch
VECTOR_SCALE_SEARCH = (0.9, 1.0, 1.1)
# E8P lattice presets: QuIP#'s defaults (two-sided RHT, BlockLDLQ); kept apart from _PRESETS so list_recipes() and
# what iterates it (every scalar preset with every rotation) are unchanged.
_VECTOR_PRESETS: dict[str, dict] = {
    f"e8p{b}": dict(vector_bits=b, rotation=RotationConfig("random"), method="gptq") for b in VECTOR_BITS
}
_ALL_PRESETS: dict[str, dict] = {**_PRESETS, **_VECTOR_PRESETS}


def list_recipes() -> list[str]:
    """The scalar presets (formats of :mod:`hadakit.formats`); :func:`list_vector_recipes` has the E8P ones."""
    return list(_PRESETS)


def list_vector_recipes() -> list[str]:
    """The E8P lattice presets (``e8p2``, ``e8p3``, ``e8p4``; see the module docstring)."""
    return list(_VECTOR_PRESETS)


def get_recipe(spec: str | QuantRecipe, **overrides) -> QuantRecipe:
    """A preset by name, optionally as ``name:rotation[:method[:options]]`` (e.g. ``"w4a4:random:gptq"``,
    ``"w4a16_g128:block-128:gptq:refit=2,store=bf16"``), or a recipe JSON file path; ``overrides`` replace
    fields. An empty rotation or method keeps the preset's (``none`` / ``rtn``). :meth:`QuantRecipe.spec` is the
    canonical string of a recipe: ``get_recipe(r.spec()) == r``."""
    if isinstance(spec, QuantRecipe):
        return dataclasses.replace(spec, **overrides) if overrides else spec
    if spec.endswith(".json"):
        return dataclasses.replace(QuantRecipe.load(spec), **overrides)
    name, *opts = spec.split(":")
    if name not in _ALL_PRESETS:
        raise ValueError(f"unknown recipe {name!r}; presets: {', '.join(_ALL_PRESETS)} (or a recipe .json file)")
    if len(opts) > 3:
        raise ValueError(f"recipe spec {spec!r}: expected name[:rotation[:method[:options]]]")
    recipe = QuantRecipe(name=name, **_ALL_PRESETS[name])
    if opts:
        kind = block = None
        if opts[0]:  # an empty field keeps the preset's rotation
            rot = RotationConfig.from_name(opts[0])
            if rot.block is not None:
                _check_block_size(opts[0], rot.block)
            kind, block = rot.kind, rot.block_size
        recipe = recipe.with_options(rotation=kind, block_size=block, method=opts[1] if len(opts) > 1 else None)
        if len(opts) > 2:
            recipe = apply_options(recipe, opts[2])
    return dataclasses.replace(recipe, **overrides) if overrides else recipe


def check_recipe_for_model(recipe: QuantRecipe, model, *, vector_routed: bool = False) -> None:
    """Raise ``ValueError`` before any work if ``recipe``'s rotation cannot be built for a linear of ``model`` it
    would quantize: a ``block-N`` size that does not divide the linear's input size, or (with ``fallback=None``) an
    input size without a Hadamard matrix. The linears are those :func:`hadakit.quantization.pipeline.find_linears` picks
    (every ``nn.Linear`` / ``Conv1D`` selected by ``recipe.targets`` / ``recipe.ignore``), and only when the recipe replaces linears at all;
    returns ``None`` when every one is fine. Builds nothing: only the transform plans are looked up.

    E8P lattice recipes (``vector_bits``): every selected linear needs an input size divisible by 8 and, with the
    ``random`` rotation, Hadamard sizes on both sides. ``vector_routed`` says the caller runs them through
    :func:`hadakit.quantization.quip.quantize_model_recipe`; without it they are refused (a caller that would hand
    them to the scalar pipeline would only rotate the linears, silently)."""
    from math import gcd

    from hadakit.quantization.structure import find_linears, linear_weight
    from hadakit.transforms import transform_plan
    from hadakit.transforms.plan import largest_supported_divisor

    if recipe.vector_bits is not None:
        if not vector_routed:
            raise ValueError(f"recipe {recipe.label()!r} (E8P lattice weights) runs through "
                             f"hadakit.quantization.quip.quantize_model_recipe(model, recipe, calib=token_ids); this "
                             f"caller does not route e8p recipes")
        from hadakit.transforms.plan import supported

        for name, mod in find_linears(model, recipe)[0].items():
            m, n = linear_weight(mod).shape
            if n % 8:
                raise ValueError(f"recipe {recipe.label()!r}, layer {name}: in_features {n} is not a multiple of 8 "
                                 f"(E8 vectors); leave it out with ignore=")
            if recipe.rotation.kind == "random" and not (supported(m) and supported(n)):
                raise ValueError(f"recipe {recipe.label()!r}, layer {name}: no Hadamard matrix for its shape "
                                 f"{m}×{n} (the two-sided incoherence needs both); use rotation none or ignore=")
        return
    rot = recipe.rotation
    if not recipe.quantizes_linears or rot.kind == "none":
        return
    sizes = {name: linear_weight(mod).shape[1] for name, mod in find_linears(model, recipe)[0].items()}
    if rot.block is not None:
        bad = {name: n for name, n in sizes.items() if n % rot.block_size}
        if bad:
            g = 0
            for n in sizes.values():
                g = gcd(g, n)
            shown = ", ".join(f"{name}: {n}" for name, n in list(bad.items())[:3]) + \
                (f", and {len(bad) - 3} more" if len(bad) > 3 else "")
            raise ValueError(f"recipe {recipe.label()!r}: block size {rot.block_size} does not divide the input size "
                             f"of {len(bad)} linear(s) it would quantize ({shown}); use a block size that divides "
                             f"them all, e.g. block-{largest_supported_divisor(g)}")
    block = rot.block
    checked: set[int] = set()
    for name, n in sizes.items():  # the same plan make_rotation looks up for each layer
        if n in checked:
            continue
        checked.add(n)
        try:
            transform_plan(n, block_size=block, fallback=rot.fallback)
        except ValueError as exc:
            raise ValueError(f"recipe {recipe.label()!r}, layer {name}: {exc}") from None


def _check_block_size(rotation: str, n: int) -> None:
    """A ``block-N`` rotation's size must have a Hadamard matrix: checked here, before any model is loaded or layer
    is quantized."""
    from hadakit.transforms.plan import nearest_supported, supported

    if not supported(n):
        near = ", ".join(str(c) for c in nearest_supported(n) if c is not None)
        raise ValueError(f"rotation {rotation!r}: no Hadamard matrix of size {n} is known to hadakit (sizes are "
                         f"m·2^k with a known order m); nearest supported block sizes: {near}")


def _whole_number(key: str, value: str | None, lo: int, example: str) -> int:
    try:
        n = int(value)
    except (TypeError, ValueError):
        n = None
    if n is None or n < lo:
        raise ValueError(f"recipe option {key}= needs a whole number >= {lo} (e.g. {key}={example}), got "
                         f"{value!r}")
    return n


_FLAGS = ("wclip", "fusevo", "actorder", "seq", "kvclip", "kvcenter", "scalesearch")  # options that take no value


def _check_option_use(recipe: QuantRecipe, changes: dict, given: list[str]) -> None:
    """Refuse options (keys ``given``) that would do nothing for ``recipe`` with ``changes`` applied where the
    recipe itself cannot tell: a value equal to the default (``steps=40`` without ``learn``, ``sinks=0`` without a
    KV scheme). Every rule on the resulting fields is ``QuantRecipe._validate``'s."""
    for key in given:
        if key == "steps" and not changes.get("learned", recipe.learned):
            raise ValueError("recipe option steps= sets the optimization steps of a learned transform: it does "
                             "nothing without learn= (e.g. learn=affine,steps=40)")
        if key == "sinks" and recipe.kv is None:
            raise ValueError(f"recipe option sinks: recipe {recipe.name!r} has no KV quantization")


def _number_text(v) -> str:
    """A number (or ``'search'``) as a spec writes it: the shortest text that reads back to the same float."""
    if isinstance(v, str):
        return v
    text = repr(float(v))
    return text[:-2] if text.endswith(".0") else text


def _field_diff(a, b, prefix: str = "") -> list[tuple[str, object, object]]:
    """``(field, a's value, b's value)`` for every field where two recipes (or sub-configs) differ."""
    out = []
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if dataclasses.is_dataclass(x) and type(x) is type(y):
            out += _field_diff(x, y, f"{prefix}{f.name}.")
        elif x != y:
            out.append((prefix + f.name, x, y))
    return out


def _number_or_search(key: str, value: str | None):
    if value == "search":
        return "search"
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"recipe option {key}= needs a number or 'search', got {value!r}") from None


def apply_options(recipe: QuantRecipe, options: str) -> QuantRecipe:
    """Apply a comma-separated option string (see the module docstring) to ``recipe``."""
    changes: dict = {}
    given: list[str] = []
    for item in filter(None, (o.strip() for o in options.split(","))):
        key, _, value = item.partition("=")
        value = value or None
        given.append(key)
        if key in _FLAGS and value is not None:
            raise ValueError(f"recipe option {key} takes no value (write {key!r} to turn it on, or leave it out), "
                             f"got {item!r}")
        if key == "smooth":
            changes["smooth"] = _number_or_search(key, value)
        elif key == "aclip":
            changes["act_clip"] = _number_or_search(key, value)
        elif key == "wclip":
            changes["weight_clip"] = True
        elif key == "learn":
            changes["learned"] = value or "affine"
        elif key == "steps":
            changes["learn_steps"] = _whole_number(key, value, 1, "40")
        elif key == "fusevo":
            changes["fuse_values"] = True
        elif key == "actorder":
            changes["gptq"] = dataclasses.replace(changes.get("gptq", recipe.gptq), act_order=True)
        elif key == "refit":
            refit = 1 if value is None else _whole_number(key, value, 1, "2")
            changes["gptq"] = dataclasses.replace(changes.get("gptq", recipe.gptq), refit=refit)
        elif key == "seq":
            changes["sequential"] = True
        elif key == "fptarget":
            try:
                strength = FP_TARGET_STRENGTH if value is None else float(value)
            except ValueError:
                strength = None
            if strength is None or not 0.0 < strength <= 1.0:
                raise ValueError(f"recipe option fptarget= needs a strength in (0, 1] (or no value: "
                                 f"{FP_TARGET_STRENGTH:g}), got {value!r}")
            changes["fp_target"] = strength
            changes["sequential"] = True
        elif key == "store":
            if value is None:
                raise ValueError("recipe option store= needs the dtype of the unquantized tensors: store=bf16 or "
                                 "store=fp16")
            changes["store_dtype"] = value
        elif key == "sinks":
            changes["kv_sink_tokens"] = _whole_number(key, value, 0, "4")
        elif key == "kvcenter":
            changes["kv_center"] = True
        elif key == "scalesearch":
            changes["vector_scale_search"] = True
        elif key in ("kvgroup", "kvclip"):
            if recipe.kv is None:
                raise ValueError(f"recipe option {key}: recipe {recipe.name!r} has no KV quantization")
            from hadakit.formats import get_scheme

            kv = get_scheme(changes.get("kv", recipe.kv))
            kv = kv.replace(granularity="group", group_size=_whole_number(key, value, 1, "64")) \
                if key == "kvgroup" else kv.replace(clip_search=True)
            changes["kv"] = kv.to_dict()
        else:
            raise ValueError(f"unknown recipe option {key!r}; known: smooth, aclip, wclip, actorder, refit, seq, "
                             f"fptarget, store, fusevo, learn, steps, sinks, kvgroup, kvclip, kvcenter, "
                             f"scalesearch (e8p recipes)")
    _check_option_use(recipe, changes, given)
    return dataclasses.replace(recipe, **changes)
