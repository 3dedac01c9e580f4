"""Packed checkpoints of quantized models: save, and load back as an ordinary transformers model.

A checkpoint directory holds ``config.json`` and the tokenizer (transformers' own files), ``recipe.json`` (the
``QuantRecipe``), ``hadakit.json`` (format version, model class, and per quantized linear its rotation) and
``model.safetensors``: for each quantized linear the packed weight (payload, scales, zero points, tensor scale, as
``QuantizedTensor.state_dict`` lays them out), its bias and rotation signs; every other tensor as it is in the model
(parameters that bfloat16 or float16 holds exactly, e.g. after ``store=bf16``, in that dtype).
E8P lattice linears (:class:`~hadakit.quantization.quip.E8PLinear`, recipes ``e8p2``/``e8p3``/``e8p4``) are stored as
their buffers under ``NAME.e8p.`` (``codes``, ``codes2``, ``scales``, ``signs_out``, ``signs_in``: the packed int16 /
uint8 codes, float32 stage scales, bit-packed incoherence signs) and ``NAME.bias``; their ``hadakit.json`` entry has
``kind: "e8p"`` and ``bits``, and loading rebuilds the same module bit for bit.
The size on disk is the real compressed size. Writing goes to a temporary sibling directory that is renamed into
place at the end, so an interrupted save leaves nothing half-written; an existing directory is only replaced with
``force=True`` and only when it is a hadakit checkpoint (see :mod:`hadakit.outdir`).

Loading never runs code from the checkpoint (``trust_remote_code=False``; the model class named in ``hadakit.json``
must be one of transformers' own model classes) and verifies it: ``recipe.json`` must be the file that was saved
(its SHA-256 is in ``hadakit.json``) and must agree with the stored tensors' own formats.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hadakit.formats import QuantizedTensor, get_scheme
from hadakit.quantization.qlinear import RotatedQuantLinear
from hadakit.quantization.quip import E8PLinear
from hadakit.quantization.recipes import QuantRecipe
from hadakit.outdir import check_output_dir, write_dir_atomically
from hadakit.transforms.kronecker import KroneckerTransform
from hadakit.transforms.rotations import HeadMixRotation

FORMAT_VERSION = 1
_WEIGHTS = "model.safetensors"
_META = "hadakit.json"
_RECIPE = "recipe.json"


def _rotation_meta(rot) -> dict | None:
    if rot is None:
        return None
    if isinstance(rot, HeadMixRotation):  # what fusevo left online of o_proj's rotation
        return dict(kind="head_mix", heads=rot.heads, head_dim=rot.head_dim, signs=rot.sign_mode,
                    seed=rot.mix.seed, fallback=rot.mix.fallback)
    return dict(n=rot.n, block_size=rot.block_size, signs=rot.sign_mode, seed=rot.seed, fallback=rot.fallback,
                fallback_seed=rot.fallback_seed)


def _prepare_config(model: nn.Module):
    cfg = model.config
    # A GGUF-loaded model carries its file's quantization settings; the checkpoint holds dequantized tensors.
    for attr in ("quantization_config",):
        if hasattr(cfg, attr):
            try:
                delattr(cfg, attr)
            except AttributeError:
                pass
    return cfg


def checkpoint_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, dict], dict[str, str]]:
    """What a checkpoint of ``model`` stores: ``(tensors, linears, tied)`` — the tensors of ``model.safetensors``
    (packed weights of the quantized linears, everything else as it is, tied tensors once), the per-linear
    metadata, and the tied keys (key -> the key stored in its place)."""
    tensors: dict[str, torch.Tensor] = {}
    linears: dict[str, dict] = {}
    qnames = set()
    for name, mod in model.named_modules():
        if isinstance(mod, E8PLinear):
            qnames.add(name)
            linears[name] = dict(kind="e8p", bits=mod.bits, in_features=mod.in_features,
                                 out_features=mod.out_features, rotation=None, act_scheme=None, packed=True)
            for k in _E8P_BUFFERS:
                tensors[f"{name}.e8p.{k}"] = getattr(mod, k).detach().cpu().contiguous()
            if mod.bias is not None:
                tensors[f"{name}.bias"] = mod.bias.detach().cpu().contiguous()
            continue
        if isinstance(mod, RotatedQuantLinear):
            qnames.add(name)
            linears[name] = dict(in_features=mod.in_features, out_features=mod.out_features,
                                 rotation=_rotation_meta(mod.rotation),
                                 act_scheme=mod.act_scheme.to_dict() if mod.act_scheme is not None else None,
                                 packed=mod.packed is not None,
                                 smooth=mod.smooth is not None,
                                 transform=mod.transform.mode if mod.transform is not None else None)
            if mod.packed is not None:
                tensors.update(mod.packed.cpu().state_dict(f"{name}.qweight."))
            else:
                tensors[f"{name}.weight"] = mod.weight.detach().cpu().contiguous()
            if mod.bias is not None:
                tensors[f"{name}.bias"] = mod.bias.detach().cpu().contiguous()
            if mod.rotation is not None and mod.rotation.signs is not None:
                tensors[f"{name}.rotation.signs"] = mod.rotation.signs.detach().cpu().contiguous()
            if mod.smooth is not None:
                tensors[f"{name}.smooth"] = mod.smooth.detach().cpu().contiguous()
            if mod.transform is not None:
                tensors[f"{name}.transform.a"] = mod.transform.a.detach().cpu().contiguous()
                tensors[f"{name}.transform.b"] = mod.transform.b.detach().cpu().contiguous()
    seen: dict[int, str] = {}
    tied: dict[str, str] = {}
    params = {k for k, _ in model.named_parameters(remove_duplicate=False)}
    for key, t in model.state_dict().items():
        owner = key.rsplit(".", 1)[0]
        if any(key.startswith(q + ".") for q in qnames) or owner in qnames:
            continue
        ptr = t.data_ptr()
        if ptr in seen and t.numel() > 0:  # tied weights (e.g. lm_head = embed_tokens): store once
            tied[key] = seen[ptr]
            continue
        seen[ptr] = key
        t = t.detach().cpu().contiguous()
        tensors[key] = _compact(t) if key in params else t
    return tensors, linears, tied


_E8P_BUFFERS = ("codes", "codes2", "scales", "signs_out", "signs_in")


def _load_e8p(root: Path, name: str, lm: dict, state: dict, recipe: QuantRecipe, cache_weights: bool) -> E8PLinear:
    """The :class:`E8PLinear` ``name`` of a checkpoint, its buffers popped from ``state`` (checked against the
    recipe's ``vector_bits`` and the module's shapes)."""
    bits = lm.get("bits")
    if recipe.vector_bits != bits:
        raise ValueError(f"{root}: {_RECIPE} says vector_bits={recipe.vector_bits!r}, but {name} was saved as "
                         f"{bits!r}-bit E8P codes: the recipe file was edited or belongs to another checkpoint")
    bias = state.pop(f"{name}.bias", None)
    mod = E8PLinear(lm["in_features"], lm["out_features"], bits, bias=bias is not None,
                    dtype=bias.dtype if bias is not None else torch.float32)
    with torch.no_grad():
        for k in _E8P_BUFFERS:
            key = f"{name}.e8p.{k}"
            if key not in state:
                raise ValueError(f"{root / _WEIGHTS} lacks {key}: the checkpoint is corrupt")
            src = state.pop(key)
            dst = getattr(mod, k)
            if src.dtype != dst.dtype or tuple(src.shape) != tuple(dst.shape):
                raise ValueError(f"{root / _WEIGHTS}: {key} is {src.dtype} {tuple(src.shape)}, expected {dst.dtype} "
                                 f"{tuple(dst.shape)} for a {lm['out_features']}×{lm['in_features']} {bits}-bit "
                                 f"E8P linear: the checkpoint is corrupt")
            dst.copy_(src)
        if bias is not None:
            mod.bias.copy_(bias)
    if cache_weights:
        mod.cache_weight()
    return mod


def _compact(t: torch.Tensor) -> torch.Tensor:
    """``t`` in bfloat16 or float16 when that holds it exactly (after ``store=bf16``/``fp16``, or a model loaded in
    half precision), else as it is: loading copies it back into the model's own dtype unchanged."""
    if t.dtype not in (torch.float32, torch.float64):
        return t
    flat, step = t.reshape(-1), 1 << 22  # compared in chunks: no second full-size copy of a large embedding
    for half in (torch.bfloat16, torch.float16):
        h = t.to(half)
        hf = h.reshape(-1)
        if all(torch.equal(hf[a:a + step].to(t.dtype), flat[a:a + step]) for a in range(0, flat.numel(), step)):
            return h
    return t


def _is_checkpoint_meta(path: Path) -> bool:
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and "format_version" in meta and "linears" in meta


def check_checkpoint_dir(out_dir: str | Path, *, force: bool = False) -> Path:
    """Raise before any work when ``out_dir`` cannot take a checkpoint: it is a file, the working directory or a
    parent of it, an existing directory without ``force``, an existing directory that is not a hadakit checkpoint
    (``force`` never replaces those), or its parent is not writable. Returns it as a ``Path``."""
    return check_output_dir(out_dir, force=force, marker=_META, is_ours=_is_checkpoint_meta, what="checkpoint")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def save_quantized_model(model: nn.Module, tokenizer: Any, recipe: QuantRecipe, out_dir: str | Path, *,
                         force: bool = False, extra: dict | None = None) -> Path:
    """Write ``model`` (after ``quantize_model``) to ``out_dir``; see the module docstring."""
    from safetensors.torch import save_file

    recipe_bytes = recipe.to_json().encode("utf-8")

    def write(tmp: Path) -> None:
        tensors, linears, tied = checkpoint_tensors(model)
        save_file(tensors, str(tmp / _WEIGHTS))
        _prepare_config(model).save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / _RECIPE).write_bytes(recipe_bytes)
        meta = dict(format_version=FORMAT_VERSION, model_class=type(model).__name__, linears=linears, tied=tied,
                    recipe_sha256=_sha256(recipe_bytes), **(extra or {}))
        (tmp / _META).write_text(json.dumps(meta, indent=1) + "\n")

    return write_dir_atomically(out_dir, write, force=force, marker=_META, is_ours=_is_checkpoint_meta,
                                what="checkpoint")


def checkpoint_size_bytes(path: str | Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def _build_rotation(meta: dict | None, signs: torch.Tensor | None):
    if meta is None:
        return None
    from hadakit.transforms import HadamardRotation

    if meta.get("kind") == "head_mix":
        rot = HeadMixRotation(meta["heads"], meta["head_dim"], signs=meta["signs"], seed=meta["seed"],
                              fallback=meta["fallback"])
        if signs is not None:
            rot.signs.copy_(signs)
        return rot
    rot = HadamardRotation(meta["n"], block_size=meta["block_size"], signs=meta["signs"], seed=meta["seed"],
                           fallback=meta["fallback"], fallback_seed=meta.get("fallback_seed", 0))
    if signs is not None:
        rot.signs.copy_(signs)
    return rot


_FORMAT_FIELDS = ("element", "granularity", "group_size", "scale_format", "symmetric", "int_range", "tensor_scale")


def _format_of(scheme) -> dict:
    d = scheme.to_dict()
    return {k: d.get(k) for k in _FORMAT_FIELDS}


def _check_format(root: Path, name: str, kind: str, stored, expected) -> None:
    """The format ``name``'s ``kind`` ("weights" / "activations") was saved in must be the recipe's (a
    ``recipe.json`` edited to claim another format is an error, not a checkpoint that evaluates as something it is
    not). ``stored`` / ``expected``: the saved and the recipe's ``QuantScheme``, ``None`` for full precision."""
    if (stored is None) != (expected is None):
        said = f"quantized as {expected.describe()}" if expected is not None else "not quantized"
        raise ValueError(f"{root}: {_RECIPE} says the {kind} are {said}, but {name} was saved with "
                         f"{stored.describe() if stored is not None else 'none'}: the recipe file was edited or "
                         f"belongs to another checkpoint")
    if stored is None:
        return
    a, b = _format_of(stored), _format_of(expected)
    if a != b:
        diff = ", ".join(f"{k} {a[k]!r} stored vs {b[k]!r} in {_RECIPE}" for k in _FORMAT_FIELDS if a[k] != b[k])
        raise ValueError(f"{root}: {_RECIPE} does not match the stored {kind} of {name} ({diff}): the recipe file "
                         f"was edited or belongs to another checkpoint")


def read_checkpoint_meta(root: str | Path) -> tuple[dict, QuantRecipe]:
    """``(hadakit.json as a dict, the recipe)`` of checkpoint directory ``root``, verified: every file present,
    both JSON files readable, the recipe file unchanged since the save (its SHA-256 is in ``hadakit.json``).
    Raises ``FileNotFoundError`` / ``NotADirectoryError`` / ``ValueError`` naming the file and the problem."""
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise NotADirectoryError(f"{root} is a file, not a checkpoint directory (pass the directory written by "
                                 f"`hadakit quantize ... --out DIR`)")
    if not root.is_dir():
        raise FileNotFoundError(f"checkpoint directory {root} does not exist")
    for f in (_META, _RECIPE, _WEIGHTS, "config.json"):
        if not (root / f).is_file():
            raise ValueError(f"{root} is not a hadakit checkpoint: {f} is missing (write one with "
                             f"`hadakit quantize ... --out DIR`)")
    meta_path = root / _META
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{meta_path} is not readable JSON ({exc}): the checkpoint is corrupt") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{meta_path} does not hold a JSON object: the checkpoint is corrupt")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{meta_path}: checkpoint format {meta.get('format_version')!r} is not supported "
                         f"(this hadakit reads format {FORMAT_VERSION})")
    linears = meta.get("linears")
    needed = ("in_features", "out_features", "rotation", "act_scheme", "packed")
    if not isinstance(linears, dict) or not isinstance(meta.get("model_class"), str) or any(
            not isinstance(v, dict) or any(k not in v for k in needed) for v in linears.values()):
        raise ValueError(f"{meta_path} lacks model_class or a complete 'linears' table: the checkpoint is corrupt")
    recipe_path = root / _RECIPE
    data = recipe_path.read_bytes()
    stored_hash = meta.get("recipe_sha256")
    if stored_hash is not None and _sha256(data) != stored_hash:
        raise ValueError(f"{recipe_path} was changed after the checkpoint was saved (its SHA-256 is not the one in "
                         f"{_META}): restore the original file; the recipe must describe the stored tensors")
    try:
        recipe = QuantRecipe.from_dict(json.loads(data.decode("utf-8")))
    except (ValueError, TypeError, KeyError, UnicodeDecodeError) as exc:
        raise ValueError(f"{recipe_path} is not a valid hadakit recipe ({exc}): the checkpoint is corrupt") from None
    return meta, recipe


def load_quantized_model(path: str | Path, *, device: str | torch.device = "cpu", cache_weights: bool = False
                         ) -> tuple[nn.Module, Any]:
    """Load a checkpoint written by ``save_quantized_model``: an ordinary transformers model (same ``forward``,
    returns logits) whose quantized linears are ``RotatedQuantLinear`` modules, and its tokenizer.

    The quantized weights stay packed in memory (registered buffers: ``.to()`` and ``state_dict()`` see them) and are
    dequantized at each forward; ``cache_weights=True`` keeps one dequantized copy per linear instead (faster
    forwards, fp32-sized memory). Both give the same float32 logits bit for bit."""
    from safetensors.torch import load_file

    from hadakit.quantization.kv_cache import K_CENTER, V_CENTER, install_kv_quantization
    from hadakit.io.loading import load_config, model_class_by_name

    root = Path(path)
    meta, recipe = read_checkpoint_meta(root)
    config = load_config(root)
    cls = model_class_by_name(meta["model_class"], f"{str(root / _META)!r} (model_class)")
    if cls is None:
        import transformers

        raise ValueError(f"{root / _META} names the model class {meta['model_class']!r}, but transformers "
                         f"{transformers.__version__} has no model class of that name")
    from transformers.initialization import no_init_weights

    with no_init_weights():  # every tensor is overwritten from the checkpoint: skip the random init
        model = cls._from_config(config, dtype=torch.float32)
    try:
        state = load_file(str(root / _WEIGHTS))
    except Exception as exc:
        raise ValueError(f"{root / _WEIGHTS} could not be read ({exc}); the checkpoint is corrupt") from None

    for name, lm in meta["linears"].items():
        if lm.get("kind") == "e8p":
            new = _load_e8p(root, name, lm, state, recipe, cache_weights)
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
            continue
        prefix = f"{name}.qweight."
        if lm["packed"]:
            packed = QuantizedTensor.from_state_dict(state, prefix)
            _check_format(root, name, "weights", packed.scheme, recipe.weight_scheme())
            for k in [k for k in state if k.startswith(prefix)]:
                del state[k]
            weight = None  # packed-only: the forward dequantizes (RotatedQuantLinear)
        else:
            packed, weight = None, state.pop(f"{name}.weight")
        bias = state.pop(f"{name}.bias", None)
        rotation = _build_rotation(lm["rotation"], state.pop(f"{name}.rotation.signs", None))
        act = get_scheme(lm["act_scheme"]) if lm["act_scheme"] is not None else None
        _check_format(root, name, "activations", act, recipe.act_scheme())
        smooth = state.pop(f"{name}.smooth") if lm.get("smooth") else None
        transform = None
        if lm.get("transform"):
            transform = KroneckerTransform.from_factors(state.pop(f"{name}.transform.a"),
                                                        state.pop(f"{name}.transform.b"), lm["transform"])
        new = RotatedQuantLinear(lm["in_features"], lm["out_features"], weight=weight, bias=bias, packed=packed,
                                 rotation=rotation, act_scheme=act, smooth=smooth, transform=transform,
                                 cache_dequantized=cache_weights and packed is not None)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new)
    for key, src in meta.get("tied", {}).items():
        state[key] = state[src]
    centers = {k: state.pop(k) for k in [k for k in state if k.rsplit(".", 1)[-1] in (K_CENTER, V_CENTER)]}
    missing, unexpected = model.load_state_dict(state, strict=False)
    # The quantized linears were built complete above; their own keys are not in `state`.
    missing = [k for k in missing if not any(k.startswith(n + ".") for n in meta["linears"])]
    if missing or unexpected:
        raise ValueError(f"{root}: checkpoint does not match the model (missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]})")
    model.eval().to(device)
    if recipe.kv is not None:
        install_kv_quantization(model, recipe.kv, rotate=recipe.kv_rotation, sink_tokens=recipe.kv_sink_tokens)
        for key, center in centers.items():
            owner, _, buf = key.rpartition(".")
            model.get_submodule(owner).register_buffer(buf, center.to(device))
    from hadakit.io.loading import load_tokenizer, tokenizer_files

    # a checkpoint saved without a tokenizer still loads (tokenizer None)
    tokenizer = load_tokenizer(root) if tokenizer_files(root) else None
    return model, tokenizer
