"""Run several recipes on one model and text and collect one comparable row per recipe.

Every row holds the perplexity (and its ratio to the unquantized model), bits per quantized weight (scales
included), the size a packed checkpoint of the model has, the calibration/quantization wall time, the process' peak
memory, a few greedy-decoded sample lines, and the recipe itself, so each number can be reproduced.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import platform
import resource
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from hadakit.devices import device_name
from hadakit.io.texts import TextWindows, calibration_windows
from hadakit.io.checkpoint import checkpoint_tensors
from hadakit.evaluation.metrics import generate_samples, perplexity
from hadakit.quantization.pipeline import quantize_model
from hadakit.quantization.recipes import QuantRecipe, get_recipe

DEFAULT_PROMPTS = ("To be, or not to be,", "My lord, the king")

# The README's default comparison: what a rotation buys at 4 bits, in under 10 minutes on a 2-core CPU
# (GPTQ there calibrates on QUICK_CALIB_WINDOWS windows; `--full` uses the recipes' 32).
QUICK_RECIPES = (
    "fp",
    "w8a8:none:rtn",
    "w4a16_g128:random:gptq",
    "w4a4:none:rtn",
    "w4a4:random:rtn",
    "w4a4:random:rtn:smooth=search,aclip=search",
    "nvfp4_w:none:rtn",
    "mxfp4:random:rtn",
)
QUICK_CALIB_WINDOWS = 8
# `--full`: every row of the peer table, GPTQ where the peer used it.
FULL_RECIPES = (
    "fp",
    "w8a8:none:rtn",
    "w8a8:none:gptq",
    "w8a8:random:rtn",
    "w4a16_g128:none:rtn",
    "w4a16_g128:random:rtn",
    "w4a16_g128:none:gptq",
    "w4a16_g128:block-128:gptq",
    "w4a16_g128:block-128:gptq:refit=2,store=bf16",
    "w4a16_g128:random:gptq",
    "w4a16:random:gptq",
    "w4a4:none:rtn",
    "w4a4:hadamard:rtn",
    "w4a4:random:rtn",
    "w4a4:random:rtn:fusevo",
    "w4a4:random:gptq",
    "w4a4kv4:random:gptq",
    "nvfp4_w:none:rtn",
    "nvfp4_w:none:gptq",
    "nvfp4_w:block-16:gptq",
    "nvfp4:none:rtn",
    "nvfp4:random:rtn",
    "mxfp4:none:rtn",
    "mxfp4:random:rtn",
    "mxfp4:random:gptq",
    "kv4:none:rtn",
)


# `--ablation`: the calibrated options of quantization/calibrate switched on one at a time on the 4-bit goal recipes, then
# together (each row's recipe says exactly what ran).
_W4A4 = "w4a4:random:gptq"
_ALL = "smooth=search,aclip=search,wclip"
ABLATION_RECIPES = (
    "fp",
    _W4A4,
    _W4A4 + ":aclip=search",
    _W4A4 + ":" + _ALL,
    "w4a4:random:rtn:smooth=search,aclip=search",
    "w4a4kv4:random:gptq",
    "w4a4kv4:random:gptq:" + _ALL + ",kvgroup=64,sinks=1,kvcenter",
    "kv4:none:rtn:kvgroup=64,sinks=1,kvcenter",
    "kv2:none:rtn:kvgroup=16,sinks=1,kvcenter",
    "w8a8:random:rtn",
    "w4a16_g128:block-128:gptq:smooth=search,wclip",
    "nvfp4_w:block-16:gptq:wclip",
    "nvfp4:none:gptq",
    "nvfp4:none:gptq:aclip=search",
    "mxfp4:random:gptq",
    "mxfp4:random:gptq:smooth=search,aclip=search",
)


class PeakMemory:
    """Peak resident memory (MB) of this process while the block runs, sampled every 20 ms from ``/proc`` (Linux);
    elsewhere the process' lifetime peak. On CUDA, use ``torch.cuda.max_memory_allocated`` instead."""

    def __init__(self, interval: float = 0.02):
        self.interval, self.peak_mb = interval, 0.0
        self._stop = threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

    def _rss_mb(self) -> float:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * self._page / 1e6
        except OSError:
            return peak_rss_mb()

    def _run(self):
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, self._rss_mb())
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakMemory":
        self.peak_mb = self._rss_mb()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, self._rss_mb())


@dataclass
class CompareRow:
    label: str
    ppl: float
    ppl_ratio: float
    weight_bits: float
    packed_mb: float
    quantize_s: float
    eval_s: float
    peak_rss_mb: float
    samples: list[str]
    fallbacks: dict[str, str]
    recipe: dict
    extra_ppl: dict[str, float] = field(default_factory=dict)  # held-out texts beyond the main evaluation
    extra_ratio: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class CompareResult:
    model: str
    eval: dict
    calibration: dict
    device: str
    rows: list[CompareRow] = field(default_factory=list)
    extra_eval: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return dict(model=self.model, eval=self.eval, calibration=self.calibration, device=self.device,
                    rows=[r.to_dict() for r in self.rows], extra_eval=self.extra_eval)

    @classmethod
    def from_dict(cls, d: dict) -> "CompareResult":
        return cls(d["model"], d["eval"], d["calibration"], d["device"], [CompareRow(**r) for r in d["rows"]],
                   d.get("extra_eval", []))

    def _extra_names(self) -> list[str]:
        return [e["text"] for e in self.extra_eval]

    def markdown(self) -> str:
        lines = [
            f"Model: `{self.model}` · eval: {self.eval['n_windows']}×{self.eval['window']} tokens of "
            f"`{self.eval['text']}` · calibration: {self.calibration['n_windows']}×{self.calibration['window']} of "
            f"`{self.calibration['text']}` · device: {self.device}",
            "",
        ]
        extra = self._extra_names()
        if extra:
            lines[0] += " · also evaluated on: " + ", ".join(
                f"{e['n_windows']}×{e['window']} of `{e['text']}`" for e in self.extra_eval)
        lines += [
            "| recipe | PPL | × FP | " + "".join(f"PPL {t} | × FP | " for t in extra)
            + "bits/weight | packed MB | quantize s | eval s | peak MB |",
            "|---|---:|---:|" + "---:|---:|" * len(extra) + "---:|---:|---:|---:|---:|",
        ]
        for r in self.rows:
            bits = f"{r.weight_bits:.3f}" if r.weight_bits else "—"
            cols = "".join(f"{r.extra_ppl.get(t, float('nan')):.2f} | {r.extra_ratio.get(t, float('nan')):.3f} | "
                           for t in extra)
            lines.append(f"| {r.label} | {r.ppl:.2f} | {r.ppl_ratio:.3f} | {cols}{bits} | {r.packed_mb:.1f} | "
                         f"{r.quantize_s:.1f} | {r.eval_s:.1f} | {r.peak_rss_mb:.0f} |")
        return "\n".join(lines)

    def table(self) -> str:
        extra = self._extra_names()
        width = max([28] + [len(r.label) for r in self.rows])
        head = (f"{'recipe':<{width}} {'PPL':>10} {'x FP':>7} " + "".join(f"{t[:9]:>10} {'x FP':>7} " for t in extra)
                + f"{'bits/w':>7} {'MB':>8} {'quant s':>8} {'eval s':>7}")
        out = [head, "-" * len(head)]
        for r in self.rows:
            bits = f"{r.weight_bits:.3f}" if r.weight_bits else "-"
            cols = "".join(f"{r.extra_ppl.get(t, float('nan')):>10.2f} {r.extra_ratio.get(t, float('nan')):>7.3f} "
                           for t in extra)
            out.append(f"{r.label:<{width}} {r.ppl:>10.2f} {r.ppl_ratio:>7.3f} {cols}{bits:>7} {r.packed_mb:>8.1f} "
                       f"{r.quantize_s:>8.1f} {r.eval_s:>7.1f}")
        return "\n".join(out)


def _pyplot():
    """matplotlib's pyplot on the file-only Agg backend, or None without matplotlib (the plots are optional)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def save_plot(result: CompareResult, path) -> object | None:
    """Perplexity ratio to the unquantized model per recipe, as horizontal bars on a log axis (needs matplotlib)."""
    plt = _pyplot()
    if plt is None:
        return None
    rows = result.rows[1:]
    width = 8 + 0.07 * max([0] + [len(r.label) for r in rows])  # room for long option labels
    fig, ax = plt.subplots(figsize=(width, 0.32 * len(rows) + 1.4))
    labels = [r.label for r in rows][::-1]
    ratios = [r.ppl_ratio for r in rows][::-1]
    colors = ["#3a7" if "random" in lab or "hadamard" in lab or "block" in lab else "#c54" for lab in labels]
    ax.barh(labels, ratios, color=colors)
    ax.set_xscale("log")
    ax.axvline(1.0, color="k", lw=0.8)
    for y, v in enumerate(ratios):
        ax.text(v, y, f" {v:.3g}×", va="center", fontsize=7)
    ax.set_xlabel("perplexity / unquantized perplexity (log scale; green: with a rotation)")
    ax.set_title(f"{result.model}: {result.eval['n_windows']}×{result.eval['window']} tokens of "
                 f"{result.eval['text']}, FP PPL {result.rows[0].ppl:.2f}", fontsize=9)
    ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def save_tradeoff_plot(result: CompareResult, path) -> object | None:
    """Perplexity ratio against calibration + quantization time, one labelled point per recipe (needs matplotlib)."""
    plt = _pyplot()
    if plt is None:
        return None
    rows = [r for r in result.rows[1:] if r.ppl_ratio == r.ppl_ratio]
    fig, ax = plt.subplots(figsize=(9, 6))
    for r in rows:
        point = (max(r.quantize_s, 0.1), r.ppl_ratio)  # a log axis: RTN rows take ~0 s
        ax.scatter(*point, s=18, color="#3a7" if "+" in r.label else "#457")
        ax.annotate(r.label, point, fontsize=6, xytext=(3, 2), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(f"calibration + quantization time, s ({result.device})")
    ax.set_ylabel("perplexity / unquantized perplexity (log)")
    ax.set_title(f"{result.model}: accuracy against calibration time (green: calibrated options)", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def packed_size_mb(model: torch.nn.Module) -> float:
    """MB of tensors a packed checkpoint of ``model`` holds: exactly what ``save_quantized_model`` writes (quantized
    weights packed, everything else as stored, tied tensors once), without the small JSON and tokenizer files."""
    tensors, _, _ = checkpoint_tensors(model)
    return sum(t.numel() * t.element_size() for t in tensors.values()) / 1e6


def peak_rss_mb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 if platform.system() != "Darwin" else kb / 2**20


def run_comparison(
    model: torch.nn.Module,
    tokenizer: Any,
    recipes: list[str | QuantRecipe],
    *,
    model_name: str,
    eval_windows: TextWindows = TextWindows(),
    calib_text: str = "lear",
    calib_windows: int | None = None,
    calib_len: int | None = None,
    prompts: tuple[str, ...] = DEFAULT_PROMPTS,
    sample_tokens: int = 16,
    progress: Callable[[str], None] = print,
    on_row: Callable[[CompareRow], None] | None = None,
    extra_eval: tuple[TextWindows, ...] = (),
) -> CompareResult:
    """Quantize a copy of ``model`` with each recipe and evaluate it (see the module docstring); ``extra_eval``
    adds held-out texts whose perplexity is reported beside the main one (never used for calibration)."""
    for e in extra_eval:
        if e.text == calib_text:
            raise ValueError(f"held-out text {e.text!r} is the calibration text; pick another play")
    resolved = [get_recipe(r) for r in recipes]
    if not resolved or resolved[0].quantizes_linears or resolved[0].kv is not None:
        resolved.insert(0, get_recipe("fp"))  # ratios are to the unquantized model, measured in the same run
    if calib_windows is not None or calib_len is not None:
        resolved = [dataclasses.replace(r, calib_windows=calib_windows or r.calib_windows,
                                        calib_len=calib_len or r.calib_len) for r in resolved]
    windows = eval_windows.build(tokenizer)
    device = next(model.parameters()).device
    windows = windows.to(device)
    calib_cache: dict[tuple[int, int], torch.Tensor] = {}
    first_gptq = next((r for r in resolved if r.needs_calibration), None)
    result = CompareResult(model_name, eval_windows.to_dict(),
                           dict(text=calib_text, n_windows=first_gptq.calib_windows if first_gptq else 0,
                                window=first_gptq.calib_len if first_gptq else 0),
                           device_name(device), extra_eval=[e.to_dict() for e in extra_eval])
    extra_windows = {e.text: e.build(tokenizer).to(device) for e in extra_eval}
    fp_ppl = None
    fp_extra: dict[str, float] = {}
    for recipe in resolved:
        label = recipe.label()
        progress(f"[{label}] quantizing")
        m = copy.deepcopy(model)
        calib = None
        if recipe.needs_calibration:
            key = (recipe.calib_windows, recipe.calib_len)
            if key not in calib_cache:
                calib_cache[key] = calibration_windows(tokenizer, calib_text, n_windows=key[0], window=key[1]
                                                       ).to(device)
            calib = calib_cache[key]
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        with PeakMemory() as mem:
            report = quantize_model(m, recipe, calib=calib, progress=lambda s: progress(f"[{label}] {s}"))
        progress(f"[{label}] evaluating perplexity")
        t0 = time.perf_counter()
        ppl = perplexity(m, windows, progress=False)
        eval_s = time.perf_counter() - t0
        extra = {t: perplexity(m, w, progress=False) for t, w in extra_windows.items()}
        if fp_ppl is None:
            fp_ppl, fp_extra = ppl, dict(extra)
        samples = generate_samples(m, tokenizer, list(prompts), max_new_tokens=sample_tokens) if prompts else []
        peak = torch.cuda.max_memory_allocated(device) / 1e6 if device.type == "cuda" else mem.peak_mb
        row = CompareRow(label, ppl, ppl / fp_ppl if fp_ppl else float("nan"), report.weight_bits,
                         packed_size_mb(m), report.seconds, eval_s, peak, samples, dict(report.fallbacks),
                         recipe.to_dict(), extra_ppl=extra,
                         extra_ratio={t: v / fp_extra[t] for t, v in extra.items() if fp_extra.get(t)})
        result.rows.append(row)
        if on_row:
            on_row(row)
        del m
    return result


# `--cosine` on an encoder: what the rotation and the calibrated options buy at W4A4.
ENCODER_RECIPES = (
    "w4a4:none:rtn",
    "w4a4:hadamard:rtn",
    "w4a4:random:rtn",
    "w4a4:random:gptq",
    "w4a4:random:gptq:smooth=search,aclip=search,wclip",
)


def run_embedding_comparison(
    model: torch.nn.Module,
    tokenizer: Any,
    recipes: list[str | QuantRecipe],
    *,
    model_name: str,
    text: str = "twelfth_night",
    n_sentences: int = 128,
    calib_text: str = "lear",
    calib_windows: int = 16,
    calib_len: int = 128,
    progress: Callable[[str], None] = print,
) -> dict:
    """For encoders (all-MiniLM-L6-v2, BERT): each recipe's mean cosine similarity of sentence embeddings to the
    unquantized model on ``n_sentences`` held-out sentences of ``text``; calibration windows (no BOS) come from
    ``calib_text``. Returns a JSON-ready dict with one row per recipe."""
    from hadakit.io.texts import sentences as held_out
    from hadakit.evaluation.metrics import sentence_embeddings

    if text == calib_text:
        raise ValueError(f"held-out text {text!r} is the calibration text; pick another play")
    sents = held_out(text, n_sentences)
    ref = sentence_embeddings(model, tokenizer, sents)
    calib = calibration_windows(tokenizer, calib_text, n_windows=calib_windows, window=calib_len, add_bos=False)
    rows = []
    for spec in recipes:
        recipe = dataclasses.replace(get_recipe(spec), calib_windows=calib_windows, calib_len=calib_len)
        progress(f"[{recipe.label()}] quantizing")
        m = copy.deepcopy(model)
        report = quantize_model(m, recipe, calib=calib if recipe.needs_calibration else None)
        emb = sentence_embeddings(m, tokenizer, sents)
        cos = (emb * ref).sum(-1)
        rows.append(dict(label=recipe.label(), cosine=float(cos.mean()), cosine_min=float(cos.min()),
                         quantize_s=report.seconds, recipe=recipe.to_dict()))
        del m
    return dict(model=model_name, text=text, n_sentences=len(sents), device=device_name(next(model.parameters()).device),
                calibration=dict(text=calib_text, n_windows=calib_windows, window=calib_len), rows=rows)


def embedding_markdown(result: dict) -> str:
    lines = [f"Model: `{result['model']}` · {result['n_sentences']} held-out sentences of `{result['text']}` · "
             f"calibration: {result['calibration']['n_windows']}×{result['calibration']['window']} tokens of "
             f"`{result['calibration']['text']}` · device: {result['device']}", "",
             "| recipe | mean cosine to FP | min cosine | quantize s |", "|---|---:|---:|---:|"]
    lines += [f"| {r['label']} | {r['cosine']:.4f} | {r['cosine_min']:.4f} | {r['quantize_s']:.1f} |"
              for r in result["rows"]]
    return "\n".join(lines)
