"""``hadakit quantize`` and ``hadakit eval``: the model pipeline from the shell."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (0 and negatives are refused, never replaced by a default)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer (>= 1), got {value}")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="local Hugging Face model directory or .gguf file (default: the built-in Gemma 3 270M)")
    p.add_argument("--recipe", action="append", default=None,
                   help="recipe NAME[:ROTATION[:METHOD]] (e.g. w4a4:random:gptq, w4a16_g128:block-128:gptq) or a "
                        "recipe .json file; repeat with --compare")
    p.add_argument("--compare", action="store_true", help="run several recipes and print one table")
    p.add_argument("--full", action="store_true", help="with --compare: every row of the peer table (slower)")
    p.add_argument("--ablation", action="store_true",
                   help="with --compare: the calibrated options (smoothing, clipping, learned transforms, KV) on "
                        "and off on the 4-bit recipes (slow: about 1.5 h on a 2-core CPU)")
    p.add_argument("--text", default="hamlet", help="evaluation text: built-in play name or a text file")
    p.add_argument("--windows", type=positive_int, default=8, help="evaluation windows")
    p.add_argument("--window-len", type=positive_int, default=512, help="tokens per evaluation window (BOS added)")
    p.add_argument("--also-eval", action="append", default=None, metavar="TEXT",
                   help="a second held-out text (play name or file) scored with the same windows; repeatable")
    p.add_argument("--calib-text", default="lear", help="calibration text (never the evaluation text)")
    p.add_argument("--calib-windows", type=positive_int, default=None, help="calibration windows for GPTQ")
    p.add_argument("--calib-len", type=positive_int, default=None, help="tokens per calibration window")
    p.add_argument("--out", default=None, help="write the quantized model as a packed checkpoint here")
    p.add_argument("--force", action="store_true",
                   help="replace an existing --out directory (only ever a previous hadakit checkpoint or export)")
    from hadakit.cli.export import add_format_argument

    add_format_argument(p, default=None)
    p.add_argument("--results", default="hadakit-results", help="folder for the comparison JSON and Markdown")
    p.add_argument("--no-samples", action="store_true", help="skip the greedy-decoded sample lines")
    p.add_argument("--samples", action="store_true",
                   help="with --out: also print greedy-decoded sample lines of the quantized model")
    p.add_argument("--eval-fp", action="store_true",
                   help="with --out: also evaluate the unquantized model first (off by default: --out runs only "
                        "the quantization, one evaluation of the result and the save)")
    p.add_argument("--no-eval", action="store_true",
                   help="with --out: skip the evaluation of the quantized model (then `hadakit eval DIR` has no "
                        "saved perplexity to reproduce)")
    p.add_argument("--store", default=None, choices=("source", "bf16", "fp16", "fp32"),
                   help="with --out: dtype of the tensors left unquantized (embeddings, LM head, norms): the source "
                        "model's (default; bf16 for the built-in Gemma, whose GGUF is not fp32) or the one named; "
                        "the evaluation runs on exactly what is stored")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--stream", action="store_true",
                   help="with --model DIR (safetensors) and --out: quantize one decoder layer at a time from disk, "
                        "never holding the whole model (RTN/GPTQ; not kv or fusevo); the checkpoint is the one "
                        "the in-memory run writes, bit for bit")
    p.add_argument("--max-memory", default=None, metavar="SIZE",
                   help="with --stream: refuse to start when the estimated memory budget exceeds SIZE (e.g. 4GB)")
    p.add_argument("--cosine", action="store_true",
                   help="for encoder models (e.g. all-MiniLM-L6-v2): score each recipe by the cosine of its sentence "
                        "embeddings to the unquantized model's on held-out sentences (--text, default twelfth_night)")


def _log(msg: str) -> None:
    print(f"  … {msg}", file=sys.stderr, flush=True)


def run_quantize(args: argparse.Namespace) -> int:
    from hadakit.devices import resolve_device
    from hadakit.io.texts import TextWindows
    from hadakit.io.loading import load_model
    from hadakit.io.checkpoint import check_checkpoint_dir
    from hadakit.evaluation.compare import (ABLATION_RECIPES, FULL_RECIPES, QUICK_CALIB_WINDOWS, QUICK_RECIPES,
                                        run_comparison)
    from hadakit.io.texts import read_text
    from hadakit.quantization.recipes import check_recipe_for_model, get_recipe

    if args.out and args.compare:
        raise ValueError("--out saves one quantized model: use it with a single --recipe, not --compare")
    if getattr(args, "stream", False):
        return _run_stream(args)
    if getattr(args, "max_memory", None) is not None:
        raise ValueError("--max-memory goes with --stream")
    if not args.out:
        for flag in ("samples", "eval_fp", "no_eval", "store", "format"):
            if getattr(args, flag) not in (None, False):
                raise ValueError(f"--{flag.replace('_', '-')} goes with --out DIR (a single quantization run)")
    if args.full and args.ablation:
        raise ValueError("--full and --ablation are two different recipe lists: pick one")
    default_list = ABLATION_RECIPES if args.ablation else FULL_RECIPES if args.full else QUICK_RECIPES
    recipes = args.recipe or (list(default_list) if args.compare else ["w4a4:random:gptq"])
    if not args.compare and len(recipes) > 1:
        raise ValueError("several --recipe values need --compare")
    if args.out and recipes[0] == "fp":
        raise ValueError("--out saves a quantized model: pass a quantizing --recipe, not fp")
    # Every argument is checked before anything is loaded: a typo must not cost a model load or an FP evaluation.
    parsed = {r: get_recipe(r) for r in recipes if r != "fp"}
    device = resolve_device(args.device)
    if args.out:
        if args.format:
            from hadakit.io.compressed_tensors import check_export_dir

            check_export_dir(args.out, force=args.force)
        else:
            check_checkpoint_dir(args.out, force=args.force)
    _check_results_dir(args.results)
    calib_windows = args.calib_windows
    if calib_windows is None and args.compare and not (args.full or args.ablation) and not args.recipe:
        calib_windows = QUICK_CALIB_WINDOWS
    if args.cosine:
        return _run_cosine(args, device)
    for text in (args.text, args.calib_text, *(args.also_eval or ())):
        read_text(text)  # a missing or empty text file fails now, with the file's name
    eval_windows = TextWindows(text=args.text, window=args.window_len, n_windows=args.windows)
    extra_eval = tuple(TextWindows(text=t, window=args.window_len, n_windows=args.windows)
                       for t in (args.also_eval or ()))
    t0 = time.perf_counter()
    _log(f"loading {args.model or 'the built-in Gemma 3 270M (GGUF)'}")
    # materialize: the weights in ordinary memory, so replaced linears are freed (not pinned by the file mapping)
    model, tokenizer = load_model(args.model, device=device, materialize=True)
    model_name = str(args.model or "gemma-3-270m (Q4_K_M GGUF, dequantized to fp32)")
    _log(f"loaded in {time.perf_counter() - t0:.0f} s")
    if tokenizer is None:
        raise ValueError(f"no tokenizer files in {args.model}: the evaluation and calibration texts cannot be "
                         f"tokenized; copy the model's tokenizer files (tokenizer.json, tokenizer_config.json, ...) "
                         f"into it")
    for recipe in parsed.values():
        check_recipe_for_model(recipe, model, vector_routed=True)

    if args.out:
        return _run_single(args, parsed[recipes[0]], model, tokenizer, model_name, eval_windows, extra_eval, t0)

    from hadakit.evaluation.compare import CompareResult, save_plot, save_tradeoff_plot

    out_dir = Path(args.results)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = ("ablation" if args.ablation else "compare") if args.compare else "quantize"
    partial = out_dir / f"{stamp}.partial.jsonl"  # one line per finished row: a long run that dies keeps them
    partial.unlink(missing_ok=True)

    def show(row):
        with partial.open("a") as f:
            f.write(json.dumps(row.to_dict()) + "\n")
        print(f"{row.label:<28} PPL {row.ppl:>10.2f}  x{row.ppl_ratio:.3f}  bits/w {row.weight_bits:.3f}  "
              f"quantize {row.quantize_s:.1f}s  eval {row.eval_s:.1f}s", flush=True)
        for s in row.samples:
            print(f"    {s!r}", flush=True)

    result: CompareResult = run_comparison(
        model, tokenizer, recipes if args.compare else ["fp", recipes[0]], model_name=model_name,
        eval_windows=eval_windows, calib_text=args.calib_text, calib_windows=calib_windows,
        calib_len=args.calib_len, prompts=() if args.no_samples else ("To be, or not to be,", "My lord, the king"),
        progress=_log, on_row=show, extra_eval=extra_eval)
    print()
    print(result.table())
    (out_dir / f"{stamp}.json").write_text(json.dumps(result.to_dict(), indent=1) + "\n")
    (out_dir / f"{stamp}.md").write_text(result.markdown() + "\n")
    partial.unlink(missing_ok=True)
    plot = save_plot(result, out_dir / f"{stamp}.png")
    if args.compare and len(result.rows) > 2:
        save_tradeoff_plot(result, out_dir / f"{stamp}-time.png")
    print(f"\nwrote {out_dir / (stamp + '.json')}, {out_dir / (stamp + '.md')}" + (f" and {plot}" if plot else "")
          + f" (total {time.perf_counter() - t0:.0f} s)")
    return 0


def _run_stream(args: argparse.Namespace) -> int:
    """``--stream``: quantize ``--model DIR`` layer by layer from disk into ``--out`` (no evaluation)."""
    import dataclasses

    from hadakit.api import quantize_streamed
    from hadakit.io.checkpoint import check_checkpoint_dir
    from hadakit.io.loading import load_tokenizer, tokenizer_files
    from hadakit.io.texts import read_text
    from hadakit.quantization.recipes import get_recipe

    if not args.model or not Path(args.model).is_dir():
        raise ValueError("--stream reads a Hugging Face safetensors model directory: pass --model DIR")
    if not args.out:
        raise ValueError("--stream writes a checkpoint: pass --out DIR")
    if args.compare or (args.recipe and len(args.recipe) > 1):
        raise ValueError("--stream quantizes with one --recipe (no --compare)")
    for flag in ("samples", "eval_fp", "format", "cosine"):
        if getattr(args, flag) not in (None, False):
            raise ValueError(f"--{flag.replace('_', '-')} does not go with --stream (it only quantizes and saves; "
                             f"evaluate the result with `hadakit eval DIR`)")
    recipe = get_recipe((args.recipe or ["w4a4:random:gptq"])[0])
    recipe = dataclasses.replace(recipe, store_dtype=_store_dtype(args, recipe))
    check_checkpoint_dir(args.out, force=args.force)
    model_dir = Path(args.model)
    tokenizer = load_tokenizer(model_dir) if tokenizer_files(model_dir) else None
    calibration = None
    if recipe.linears_need_calibration:
        if tokenizer is None:
            raise ValueError(f"{model_dir} has no tokenizer files, so --calib-text cannot be tokenized: copy the "
                             f"tokenizer into it, or use an RTN recipe (which needs no calibration)")
        calibration = read_text(args.calib_text)
    import os

    import torch.distributed as dist

    started = False  # under torchrun (WORLD_SIZE > 1): data-parallel calibration, rank 0 writes the checkpoint
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        device = args.device or "cpu"
        dist.init_process_group(backend="gloo" if device == "cpu" else "nccl")
        started = True
        if device.startswith("cuda") and ":" not in device:
            args.device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    rank = dist.get_rank() if dist.is_initialized() else 0
    t0 = time.perf_counter()
    try:
        report = quantize_streamed(model_dir, recipe, calibration, args.out, tokenizer=tokenizer,
                                   max_memory=args.max_memory, device=args.device or "cpu",
                                   progress=_log if rank == 0 else False, calib_windows=args.calib_windows,
                                   calib_len=args.calib_len, force=args.force)
    finally:
        if started:
            dist.destroy_process_group()
    if rank == 0:
        print(report.summary())
        print(f"wrote {args.out} (streamed, {time.perf_counter() - t0:.1f} s)")
    return 0


def _store_dtype(args: argparse.Namespace, recipe) -> str | None:
    """The recipe's store dtype for an --out run: --store, else the recipe's own store= option, else the source
    model's dtype (bf16 for a GGUF, whose weights are not fp32; a Hugging Face directory's config dtype)."""
    from hadakit.io.loading import source_dtype

    choice = args.store
    if choice is None and recipe.store_dtype is not None:
        return recipe.store_dtype
    if choice in (None, "source"):
        choice = {"bfloat16": "bf16", "float16": "fp16"}.get(source_dtype(args.model), "fp32")
    return None if choice == "fp32" else choice


def _run_single(args, recipe, model, tokenizer, model_name, eval_windows, extra_eval, t0) -> int:
    """``--out DIR``: quantize once, evaluate the result (unless --no-eval) and save it; no FP evaluation, copy or
    sampling unless asked."""
    import dataclasses

    import hadakit
    from hadakit.evaluation.metrics import perplexity
    from hadakit.evaluation.compare import PeakMemory, peak_rss_mb
    from hadakit.io.texts import calibration_windows
    from hadakit.evaluation.metrics import generate_samples

    device = next(model.parameters()).device
    recipe = dataclasses.replace(recipe, calib_windows=args.calib_windows or recipe.calib_windows,
                                 calib_len=args.calib_len or recipe.calib_len,
                                 store_dtype=_store_dtype(args, recipe))
    label = recipe.label()
    eval_tokens = eval_windows.build(tokenizer).to(device)
    fp_ppl = None
    if args.eval_fp:
        _log("evaluating the unquantized model")
        fp_ppl = perplexity(model, eval_tokens, progress=False)
        print(f"{'fp':<28} PPL {fp_ppl:>10.2f}", flush=True)
    calib = None
    if recipe.needs_calibration:
        calib = calibration_windows(tokenizer, args.calib_text, n_windows=recipe.calib_windows,
                                    window=recipe.calib_len).to(device)
    _log(f"[{label}] quantizing")
    with PeakMemory() as mem:
        report = hadakit.quantize(model, recipe, calib, progress=lambda s: _log(f"[{label}] {s}"), keep_dense=False)
    ppl = extra = None
    if not args.no_eval:
        _log(f"[{label}] evaluating perplexity")
        ppl = perplexity(model, eval_tokens, progress=False)
        extra = {w.text: perplexity(model, w.build(tokenizer).to(device), progress=False) for w in extra_eval}
        print(f"{label:<28} PPL {ppl:>10.2f}" + (f"  x{ppl / fp_ppl:.3f}" if fp_ppl else "")
              + "".join(f"  {t} {v:.2f}" for t, v in extra.items())
              + f"  bits/w {report.weight_bits:.3f}  quantize {report.seconds:.1f}s", flush=True)
    if args.samples:
        for line in generate_samples(model, tokenizer, ["To be, or not to be,", "My lord, the king"],
                                     max_new_tokens=16):
            print(f"    {line!r}", flush=True)
    calibration = report.calibration_info()
    if calibration is not None:
        calibration["text"] = args.calib_text  # the token windows were cut from it (calibration_windows)
    extra_meta = dict(ppl=ppl, fp_ppl=fp_ppl, extra_ppl=extra, source=model_name, calibration=calibration,
                      quantize_s=report.seconds, peak_rss_gb_quantize=round(mem.peak_mb / 1e3, 3))
    if ppl is not None:
        extra_meta["eval"] = eval_record(eval_windows)
    if args.format:  # the hadakit checkpoint is written beside --out, exported, then removed
        import tempfile

        path = Path(args.out)
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=f".{path.name}.ckpt-", dir=path.parent) as tmp:
            ckpt = hadakit.save(model, Path(tmp) / "ckpt", tokenizer, extra=extra_meta)
            hadakit.export(ckpt, path, format=args.format, force=args.force)
        reproduce = ""
    else:
        path = hadakit.save(model, args.out, tokenizer, force=args.force, extra=extra_meta)
        reproduce = f"; reproduce with: hadakit eval {path}" if ppl is not None else ""
    from hadakit.io.checkpoint import checkpoint_size_bytes

    print(f"saved {path} ({checkpoint_size_bytes(path) / 1e6:.1f} MB, unquantized tensors in "
          f"{recipe.store_dtype or 'fp32'}){reproduce}")
    # peak_rss_mb() is getrusage's maximum in MiB; printed in GB (10^9 bytes) as `time -v`'s kB figure * 1.024e-6
    print(f"peak memory (RSS) {peak_rss_mb() * 2**20 / 1e9:.2f} GB; total {time.perf_counter() - t0:.0f} s")
    return 0


def _check_results_dir(path: str) -> None:
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ValueError(f"--results {path} is a file, not a folder: pass a folder for the comparison JSON and PNG")


def _file_sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def eval_record(windows) -> dict:
    """What ``hadakit eval`` needs to rebuild ``windows`` from any directory: a built-in text by its name, a file by
    its absolute path and the SHA-256 of its content."""
    from hadakit.io.texts import _resolve, builtin_texts

    record = windows.to_dict()
    path = _resolve(windows.text)
    if path not in builtin_texts().values():
        record["text"] = str(path.resolve())
        record["text_sha256"] = _file_sha256(path)
    return record


def eval_windows_from_record(record: dict, checkpoint: Path):
    """Inverse of :func:`eval_record`, with a named error when the text file is gone or changed."""
    from hadakit.io.texts import TextWindows

    record = dict(record)
    digest = record.pop("text_sha256", None)
    if digest is not None:
        path = Path(record["text"])
        if not path.is_file():
            raise FileNotFoundError(f"{checkpoint} was evaluated on the text file {path}, which no longer exists: "
                                    f"restore it, or pass --text to evaluate on another text")
        if _file_sha256(path) != digest:
            raise ValueError(f"{checkpoint} was evaluated on the text file {path}, which has changed since (its "
                             f"SHA-256 differs): restore it, or pass --text to evaluate on another text")
    elif Path(record["text"]).suffix and not Path(record["text"]).is_absolute():
        # a checkpoint from an older hadakit, which stored the path as the user typed it
        path = Path(record["text"])
        if not path.is_file():
            raise FileNotFoundError(f"{checkpoint} was evaluated on the text file {record['text']!r} (a relative "
                                    f"path, saved by an older hadakit), which is not found from {Path.cwd()}: run "
                                    f"from the directory it was saved in, or pass --text")
    return TextWindows(**record)


def _run_cosine(args: argparse.Namespace, device) -> int:
    from hadakit.io.loading import load_model
    from hadakit.evaluation.compare import ENCODER_RECIPES, embedding_markdown, run_embedding_comparison

    if args.model is None:
        raise ValueError("--cosine scores an encoder: pass --model DIR (e.g. the all-MiniLM-L6-v2 directory)")
    recipes = args.recipe or list(ENCODER_RECIPES)
    model, tokenizer = load_model(args.model, device=device)
    result = run_embedding_comparison(model, tokenizer, recipes, model_name=str(args.model),
                                      text="twelfth_night" if args.text == "hamlet" else args.text,
                                      calib_text=args.calib_text, calib_windows=args.calib_windows or 16,
                                      calib_len=args.calib_len or 128, progress=_log)
    md = embedding_markdown(result)
    print(md)
    out_dir = Path(args.results)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "cosine.json").write_text(json.dumps(result, indent=1) + "\n")
    (out_dir / "cosine.md").write_text(md + "\n")
    print(f"\nwrote {out_dir / 'cosine.json'} and {out_dir / 'cosine.md'}")
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from hadakit.devices import resolve_device
    from hadakit.io.texts import TextWindows
    from hadakit.evaluation.metrics import perplexity
    from hadakit.io.checkpoint import load_quantized_model, read_checkpoint_meta

    device = resolve_device(args.device)
    path = Path(args.checkpoint)
    meta, _ = read_checkpoint_meta(path)  # a file, a missing or an edited checkpoint fails before the load
    saved = meta.get("eval")
    if saved and args.text is None:
        windows = eval_windows_from_record(saved, path)
    else:
        windows = TextWindows(text=args.text or "hamlet")
    model, tokenizer = load_quantized_model(path, device=device)
    if tokenizer is None:
        raise ValueError(f"no tokenizer files in {path}: cannot build evaluation windows (copy the model's tokenizer "
                         f"files into the checkpoint)")
    ppl = perplexity(model, windows.build(tokenizer).to(device), progress=True)
    print(f"{path}: PPL {ppl:.4f} on {windows.n_windows}×{windows.window} tokens of {windows.text}")
    if saved and args.text is None and meta.get("ppl") is not None:
        same = ppl == meta["ppl"]
        print(f"saved run: PPL {meta['ppl']:.4f} — {'identical' if same else 'DIFFERENT'}")
        return 0 if same else 1
    return 0
