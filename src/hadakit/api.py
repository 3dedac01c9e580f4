"""The public library verbs: what ``hadakit quantize`` does, on a model object the user already has.

``quantize(model, recipe, calibration, tokenizer=...)`` rotates and quantizes any transformers model in place (the
pipeline of :mod:`hadakit.quantization.pipeline`) and returns its :class:`~hadakit.quantization.pipeline.QuantizationReport`.
Library code never prints: progress goes to the ``hadakit`` logger (see :func:`quantize`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from hadakit.io.texts import document_windows, read_text, text_calibration_windows
from hadakit.quantization.pipeline import QuantizationReport, _vocab_size, prepare_calibration, quantize_model
from hadakit.quantization.recipes import QuantRecipe, get_recipe

__all__ = ["quantize", "quantize_streamed"]

logger = logging.getLogger("hadakit")

_KINDS = ("a text str, a pathlib.Path to a text file, a list of str (documents), a [n, L] torch.long tensor of "
          "token ids, a dict with 'input_ids' (and 'attention_mask'), or a tuple (input_ids, attention_mask)")


def quantize(
    model: nn.Module,
    recipe: str | QuantRecipe,
    calibration: Any = None,
    *,
    tokenizer: Any = None,
    calib_windows: int | None = None,
    calib_len: int | None = None,
    seed: int = 0,
    add_bos: bool | None = None,
    progress: bool | Callable[[str], None] = True,
    device: str | torch.device | None = None,
    keep_dense: bool = True,
) -> QuantizationReport:
    """Rotate and quantize ``model`` (any transformers model object) in place; returns what was done.

    Every ``nn.Linear`` (and GPT-2's ``Conv1D``) selected by the recipe's ``targets`` / ``ignore`` lists (the embeddings and LM head by
    default) becomes a rotated quantized linear; GPTQ and the calibrated options calibrate one layer at a time on
    ``calibration``. The model keeps its ``forward`` (logits out), so any evaluation code runs on it unchanged.

    Args:
        model: a transformers model (``AutoModelForCausalLM``, ``AutoModel`` for encoders, ...), changed in place.
        recipe: a recipe string ``NAME[:ROTATION[:METHOD[:OPTIONS]]]`` (e.g. ``"w4a16_g128:block-128:gptq"``,
            ``"w4a4:random:gptq:smooth=search,aclip=search"``, or a recipe ``.json`` path) or a
            :class:`~hadakit.quantization.recipes.QuantRecipe`.
        calibration: the calibration data; ``None`` only for recipes that need none (RTN without calibrated
            options): there is no built-in default, since a user's model deserves text of its own domain (pass
            ``hadakit.io.texts.read_text("lear")`` to use the CLI's King Lear). One of

            * a ``str``: the text itself (a ``str`` that is one line naming an existing file is read as that file);
              ``calib_windows`` windows of ``calib_len`` tokens at seeded random offsets (``seed``), as
              ``hadakit quantize --calib-text`` cuts them;
            * a ``pathlib.Path`` (or any ``os.PathLike``) to a text file: read with
              :func:`~hadakit.io.texts.read_text` (Project Gutenberg headers stripped), then windowed as a text;
            * a ``list`` of ``str`` (documents): one window per document, its first ``calib_len`` tokens (the first
              ``calib_windows`` documents when that is given, else all), right-padded to the longest with a mask;
            * token ids: a ``[n, L]`` ``torch.long`` tensor, a dict with ``"input_ids"`` and optionally
              ``"attention_mask"`` (a tokenizer's padded batch: ``tok(texts, padding=True, return_tensors="pt")``),
              or a tuple ``(input_ids, attention_mask)``; used as given.

            Text needs ``tokenizer``; text windows start with BOS when ``add_bos`` (default: when the tokenizer has a
            BOS token). Padding never counts: a padded window is cut to its real tokens (padding at the start or
            the end), so the model sees it exactly as unpadded, and a window with holes in its mask runs with the
            mask and its masked positions are left out of every statistic.
        tokenizer: the model's tokenizer (required for text, files and documents).
        calib_windows / calib_len: windows and tokens per window for text (default: the recipe's,
            ``recipe.calib_windows`` = 32 and ``recipe.calib_len`` = 512, the ``hadakit quantize`` defaults; a
            window then holds ``calib_len + 1`` tokens with BOS). Not for token ids, which are used as given.
        seed: the seed of the text windows' offsets.
        add_bos: prepend the tokenizer's BOS to every text window (None: when it has one).
        progress: ``True`` sends progress messages (one per calibrated layer, and a summary) to the
            ``logging.getLogger("hadakit")`` logger at INFO; to see them, configure logging (e.g.
            ``logging.basicConfig(level=logging.INFO)``). ``False``: no messages. A callable receives each message.
        device: move the model there first (it stays there) and calibrate there; ``None``: where the model is.
        keep_dense: ``True`` keeps a dequantized fp32 copy of each quantized weight beside its packed codes (fastest
            forwards); ``False`` keeps the codes only (each forward dequantizes; same logits bit for bit in float32,
            ~400 MB less for Gemma 3 270M).

    Returns:
        The :class:`~hadakit.quantization.pipeline.QuantizationReport`: linears quantized and skipped, bits per weight,
        seconds, fitted options, and the calibration that ran (``calib_source`` ``"text"`` / ``"file"`` /
        ``"documents"`` / ``"tokens"``, ``calib_windows``, ``calib_len``, ``calib_tokens`` real tokens,
        ``calib_padded``, ``calib_path``; ``calibration_info()`` gives them as a dict for a recipe.json).

    Raises:
        TypeError: ``model``, ``recipe`` or ``calibration`` of a kind not listed above.
        ValueError: an unknown recipe, a recipe that needs calibration without it, text without a tokenizer,
            malformed token ids or mask, a text too short for one window — all before the model is changed.

    Example, on a model of your own (a local Hugging Face directory)::

        from transformers import AutoModelForCausalLM, AutoTokenizer
        from hadakit.api import quantize

        model = AutoModelForCausalLM.from_pretrained("path/to/model")
        tok = AutoTokenizer.from_pretrained("path/to/model")
        report = quantize(model, "w4a16_g128:block-128:gptq", calibration=open("calib.txt").read(), tokenizer=tok)
        print(report.summary())            # the model is quantized in place: evaluate or generate with it as before

    Without calibration, on token ids of a tiny model built here:

    >>> import torch, transformers
    >>> from hadakit.api import quantize
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    ...                                num_attention_heads=4, num_key_value_heads=2)
    >>> model = transformers.LlamaForCausalLM(cfg)
    >>> report = quantize(model, "w4a16:random:rtn", progress=False)
    >>> len(report.quantized), round(report.weight_bits, 3)
    (14, 4.444)
    >>> report = quantize(transformers.LlamaForCausalLM(cfg), "w4a16:none:gptq", torch.randint(0, 64, (4, 32)))
    >>> report.calibration_info()
    {'source': 'tokens', 'path': None, 'n_windows': 4, 'window': 32, 'tokens': 128, 'padded': 0}
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (a transformers model), got {type(model).__name__}")
    recipe = _resolve_recipe(recipe)
    say = _progress_sink(progress)
    for name, v in (("calib_windows", calib_windows), ("calib_len", calib_len)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    target = _resolve_device(device)
    from hadakit.quantization.recipes import check_recipe_for_model

    check_recipe_for_model(recipe, model, vector_routed=True)  # layer sizes against the recipe, before any work
    _check_schemes(recipe, model)
    kind, path, data = _classify(calibration)
    if kind is None:
        if recipe.needs_calibration:
            raise ValueError(
                f"recipe {recipe.label()!r} uses method {recipe.method!r}"
                f"{' with calibrated options' if recipe.fits_options else ''}"
                f"{' and kvcenter' if recipe.kv_center and recipe.kv is not None else ''}, which needs calibration "
                f"data: pass calibration= a text str (with tokenizer=), a pathlib.Path to a text file, a list of "
                f"documents, or [n, L] token ids — e.g. calibration=hadakit.io.texts.read_text('lear') for the "
                f"built-in King Lear — or use a recipe that needs none (method 'rtn', e.g. "
                f"{recipe.name}:{recipe.rotation.label()}:rtn)")
        calib, mask = None, None
    else:
        if kind == "tokens" and (calib_windows is not None or calib_len is not None):
            raise ValueError("calib_windows / calib_len cut text into windows; token ids are used as given "
                             "(slice them yourself)")
        if kind in ("text", "file", "documents") and tokenizer is None:
            raise ValueError(f"calibration given as {_describe(kind)} needs the model's tokenizer: pass "
                             f"tokenizer= (e.g. transformers.AutoTokenizer.from_pretrained(model_dir)), or pass "
                             f"token ids instead")
        if not recipe.needs_calibration:
            warnings.warn(f"recipe {recipe.label()!r} needs no calibration (method {recipe.method!r}, no "
                          f"calibrated options): the calibration given is not used", stacklevel=2)
            if kind == "tokens":  # still checked, as quantize_model checks it
                prepare_calibration(data[0], data[1], vocab_size=_vocab_size(model))
            calib, mask = None, None
        else:
            calib, mask = _tokens(kind, data, recipe, tokenizer, calib_windows, calib_len, seed, add_bos)
            # the whole check (shapes, dtypes, mask, vocabulary) before the model changes; quantize_model repeats it
            prepare_calibration(calib, mask, vocab_size=_vocab_size(model))
    if target is not None:
        model.to(target)
    if calib is not None:
        dev = _input_device(model)
        calib = calib.to(dev)
        mask = mask.to(dev) if mask is not None else None
        say(f"calibration: {calib.shape[0]} windows of {calib.shape[1]} tokens ({_describe(kind)})")
    t0 = time.perf_counter()
    report = quantize_model(model, recipe, calib=calib, attention_mask=mask, progress=say if progress else None,
                            keep_dense=keep_dense)
    if report.calib_windows:
        report.calib_source, report.calib_path = kind, path
    say(f"{recipe.label()}: {len(report.quantized)} linears quantized in {time.perf_counter() - t0:.1f} s "
        f"({report.weight_bits:.3f} bits/weight)")
    # What hadakit.save writes: the recipe with the window counts that were asked for, and the calibration that ran
    # (windows, tokens, padding, source) as measured by the pipeline.
    sizes = {k: v for k, v in (("calib_windows", calib_windows), ("calib_len", calib_len)) if v is not None}
    model.hadakit_recipe = dataclasses.replace(report.recipe, **sizes) if sizes else report.recipe
    model.hadakit_calibration = report.calibration_info()
    return report


def _resolve_recipe(recipe) -> QuantRecipe:
    if isinstance(recipe, QuantRecipe):
        return recipe
    if isinstance(recipe, str):
        return get_recipe(recipe)
    raise TypeError(f"recipe must be a recipe string (NAME[:ROTATION[:METHOD[:OPTIONS]]], e.g. "
                    f"'w4a16_g128:block-128:gptq', or a recipe .json path) or a hadakit QuantRecipe, got "
                    f"{type(recipe).__name__}")


def _check_schemes(recipe: QuantRecipe, model: nn.Module) -> None:
    """The weight and activation groups fit every linear the recipe quantizes (checked before any is replaced)."""
    from hadakit.quantization.structure import find_linears, linear_weight

    if not recipe.quantizes_linears:
        return
    w_scheme, a_scheme = recipe.weight_scheme(), recipe.act_scheme()
    seen: set[tuple[int, int]] = set()
    for name, mod in find_linears(model, recipe)[0].items():
        shape = tuple(linear_weight(mod).shape)
        if shape in seen:
            continue
        seen.add(shape)
        for what, scheme, s in (("weight", w_scheme, shape), ("activation", a_scheme, (1, shape[1]))):
            if scheme is None:
                continue
            try:
                scheme.layout(s)
            except ValueError as exc:
                raise ValueError(f"recipe {recipe.label()!r}, layer {name} ({what}s): {exc}") from None


def _progress_sink(progress) -> Callable[[str], None]:
    if progress is True:
        return logger.info
    if progress is False or progress is None:
        return lambda msg: None
    if callable(progress):
        return progress
    raise TypeError(f"progress must be True, False or a callable taking one str, got {type(progress).__name__}")


def _resolve_device(device) -> torch.device | None:
    if device is None:
        return None
    if not isinstance(device, (str, torch.device)):
        raise TypeError(f"device must be a str such as 'cpu' or 'cuda', a torch.device or None, got "
                        f"{type(device).__name__}")
    try:
        return torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"device {device!r} is not a device torch knows ({exc}); use e.g. 'cpu' or 'cuda'") from None


def _input_device(model: nn.Module) -> torch.device:
    get = getattr(model, "get_input_embeddings", None)
    try:
        emb = get() if callable(get) else None
    except (NotImplementedError, AttributeError):
        emb = None
    weight = getattr(emb, "weight", None)
    if isinstance(weight, torch.Tensor):
        return weight.device
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _describe(kind: str) -> str:
    return {"text": "a text str", "file": "a text file", "documents": "a list of documents",
            "tokens": "token ids"}[kind]


def _names_file(text: str) -> bool:
    """A one-line str of a plausible path length that names an existing file."""
    if "\n" in text or not text.strip() or len(text) > 1024:
        return False
    try:
        return os.path.isfile(os.path.expanduser(text))
    except (OSError, ValueError):
        return False


def _classify(calibration) -> tuple[str | None, str | None, Any]:
    """``(kind, path, data)``; checks the calibration's form (not yet its tokens), raising TypeError/ValueError."""
    if calibration is None:
        return None, None, None
    if isinstance(calibration, str):
        if _names_file(calibration):
            return "file", str(Path(calibration).expanduser()), Path(calibration).expanduser()
        if not calibration.strip():
            raise ValueError("calibration is an empty str: pass the calibration text itself")
        return "text", None, calibration
    if isinstance(calibration, os.PathLike):
        path = Path(calibration).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"calibration file {str(path)!r} does not exist")
        if path.is_dir():
            raise IsADirectoryError(f"calibration {str(path)!r} is a directory; pass the path of a text file")
        return "file", str(path), path
    if isinstance(calibration, torch.Tensor):
        return "tokens", None, (calibration, None)
    if isinstance(calibration, Mapping):
        return "tokens", None, _from_mapping(calibration)
    if isinstance(calibration, tuple):
        if len(calibration) == 2 and all(isinstance(t, torch.Tensor) for t in calibration):
            return "tokens", None, (calibration[0], calibration[1])
        raise TypeError(f"a tuple calibration must be (input_ids, attention_mask), two tensors; got a tuple of "
                        f"{len(calibration)} ({', '.join(type(t).__name__ for t in calibration[:4])})")
    if isinstance(calibration, list):
        if not calibration:
            raise ValueError("calibration is an empty list: pass at least one document (a str)")
        bad = [i for i, d in enumerate(calibration) if not isinstance(d, str)]
        if bad:
            raise TypeError(f"a list calibration is a list of documents (str); item {bad[0]} is a "
                            f"{type(calibration[bad[0]]).__name__}")
        return "documents", None, calibration
    raise TypeError(f"calibration must be None, {_KINDS}; got {type(calibration).__name__}")


def _from_mapping(d: Mapping) -> tuple[torch.Tensor, torch.Tensor | None]:
    if "input_ids" not in d:
        raise ValueError(f"a dict calibration needs 'input_ids' (and 'attention_mask' for padded windows); got keys "
                         f"{sorted(map(str, d))}")
    unknown = set(d) - {"input_ids", "attention_mask", "token_type_ids"}
    if unknown:
        raise ValueError(f"a dict calibration holds 'input_ids' and 'attention_mask' only; unknown keys "
                         f"{sorted(map(str, unknown))}")
    tt = d.get("token_type_ids")
    if tt is not None and (not isinstance(tt, torch.Tensor) or bool((tt != 0).any())):
        raise ValueError("token_type_ids other than all 0 (one segment) are not used by calibration: drop them or "
                         "calibrate on single segments")
    ids, mask = d["input_ids"], d.get("attention_mask")
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"calibration['input_ids'] must be a tensor (tokenize with return_tensors='pt'), got "
                        f"{type(ids).__name__}")
    if mask is not None and not isinstance(mask, torch.Tensor):
        raise TypeError(f"calibration['attention_mask'] must be a tensor, got {type(mask).__name__}")
    return ids, mask


def _tokens(kind, data, recipe: QuantRecipe, tokenizer, calib_windows, calib_len, seed, add_bos
            ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The token windows (and mask) of the calibration ``data`` of ``kind``."""
    if kind == "tokens":
        return data
    if add_bos is None:
        add_bos = getattr(tokenizer, "bos_token_id", None) is not None
    window = calib_len or recipe.calib_len
    if kind == "documents":
        docs = data if calib_windows is None else data[:calib_windows]
        out = document_windows(tokenizer, docs, window=window, add_bos=add_bos)
        return out["input_ids"], out["attention_mask"]
    text = read_text(data) if kind == "file" else data
    label = f"the calibration file {str(data)!r}" if kind == "file" else "the calibration text"
    ids = text_calibration_windows(tokenizer, text, n_windows=calib_windows or recipe.calib_windows,
                                   window=window, seed=seed, add_bos=add_bos, label=label)
    return ids, None


def quantize_streamed(
    model_dir: str | os.PathLike,
    recipe: str | QuantRecipe,
    calibration: Any,
    out_dir: str | os.PathLike,
    *,
    tokenizer: Any = None,
    max_memory: int | str | None = None,
    device: str | torch.device = "cpu",
    progress: bool | Callable[[str], None] = True,
    calib_windows: int | None = None,
    calib_len: int | None = None,
    seed: int = 0,
    add_bos: bool | None = None,
    force: bool = False,
) -> QuantizationReport:
    """Quantize the safetensors model directory ``model_dir`` one decoder layer at a time from disk and write its
    packed checkpoint to ``out_dir`` (read it back with ``hadakit.load``); the whole model is never in memory.

    The result is bit for bit what :func:`quantize` on the model loaded in float32 followed by ``hadakit.save``
    writes (see :mod:`hadakit.io.streaming`, which also states the memory budget). ``calibration``,
    ``calib_windows``, ``calib_len``, ``seed``, ``add_bos`` and ``progress`` are those of :func:`quantize`
    (``None`` only for recipes that need no calibration); ``tokenizer``: for text calibration, and saved with the
    checkpoint (default: the model directory's own tokenizer). ``device``: where each layer is computed (it is
    moved there when loaded, its checkpoint tensors back to the CPU when written). ``max_memory``: bytes or a size
    such as ``"4GB"``; raise before any work when the estimated budget exceeds it. ``force``: replace an existing
    hadakit checkpoint at ``out_dir``.

    Supported: RTN and GPTQ with any rotation, ``seq``, ``fptarget``, the calibrated options and ``store=``;
    refused with :class:`hadakit.io.streaming.StreamingUnsupported` (a ``ValueError``): ``kv``/``kvcenter`` and
    ``fusevo``.

    Example::

        from hadakit.api import quantize_streamed
        report = quantize_streamed("path/to/model", "w4a16_g128:block-128:gptq",
                                   hadakit.io.texts.read_text("lear"), "out/ckpt", max_memory="8GB")
    """
    from hadakit.io.streaming import check_streamable, stream_quantize
    from hadakit.io.synthetic import parse_size

    recipe = _resolve_recipe(recipe)
    check_streamable(recipe)
    say = _progress_sink(progress)
    for name, v in (("calib_windows", calib_windows), ("calib_len", calib_len)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    target = _resolve_device(device)
    limit = parse_size(max_memory, "max_memory") if max_memory is not None else None
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir} is not a Hugging Face model directory (no config.json)")
    kind, path, data = _classify(calibration)
    calib = mask = None
    if kind is None:
        if recipe.linears_need_calibration:
            raise ValueError(f"recipe {recipe.label()!r} needs calibration data (GPTQ or calibrated options): pass "
                             f"calibration= text, a text file, documents or [n, L] token ids, or use an RTN recipe")
    elif recipe.linears_need_calibration:
        if kind in ("text", "file", "documents") and tokenizer is None:
            from hadakit.io.loading import load_tokenizer, tokenizer_files

            if not tokenizer_files(model_dir):
                raise ValueError(f"calibration given as {_describe(kind)} needs a tokenizer and {model_dir} has "
                                 f"none: pass tokenizer= or token ids")
            tokenizer = load_tokenizer(model_dir)
        calib, mask = _tokens(kind, data, recipe, tokenizer, calib_windows, calib_len, seed, add_bos)
        say(f"calibration: {calib.shape[0]} windows of {calib.shape[1]} tokens ({_describe(kind)})")
    else:
        warnings.warn(f"recipe {recipe.label()!r} needs no calibration: the calibration given is not used",
                      stacklevel=2)
    sizes = {k: v for k, v in (("calib_windows", calib_windows), ("calib_len", calib_len)) if v is not None}
    saved_recipe = dataclasses.replace(recipe, **sizes) if sizes else recipe
    report = stream_quantize(model_dir, saved_recipe, out_dir, calib=calib, attention_mask=mask,
                             tokenizer=tokenizer, device=target or "cpu", force=force, max_memory=limit,
                             progress=say if progress else None, calib_source=kind, calib_path=path)
    say(f"{recipe.label()}: {len(report.quantized)} linears quantized and streamed to {out_dir} in "
        f"{report.seconds:.1f} s ({report.weight_bits:.3f} bits/weight)")
    return report
