"""Run several recipes on one model and text and collect one comparable row per recipe.

Every row holds the perplexity (and its ratio to the unquantized model), bits per quantized weight (scales
included), the size a packed checkpoint of the model has, the calibration/quantization wall time, the process' peak
memory, a few greedy-decoded sample lines, and the recipe itself, so each number can be reproduced.
"""

from __future__ import annotations

import copy
import dataclasses
import platform
import resource
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from hadakit.devices import device_name
from hadakit.models.data import TextWindows, calibration_windows
from hadakit.models.checkpoint import checkpoint_tensors
from hadakit.models.evaluate import generate_samples, perplexity
from hadakit.models.pipeline import quantize_model
from hadakit.models.recipes import QuantRecipe, get_recipe

DEFAULT_PROMPTS = ("To be, or not to be,", "My lord, the king")

# The README's default comparison: what a rotation buys at 4 bits, in under 10 minutes on a 2-core CPU
# (GPTQ there calibrates on QUICK_CALIB_WINDOWS windows; `--full` uses the recipes' 32).
QUICK_RECIPES = (
    "fp",
    "w8a8:none:rtn",
    "w4a16_g128:none:rtn",
    "w4a16_g128:random:gptq",
    "w4a4:none:rtn",
    "w4a4:random:rtn",
    "nvfp4_w:none:rtn",
    "mxfp4:random:rtn",
)
QUICK_CALIB_WINDOWS = 8
# `--full`: every row of the peer table, GPTQ where the peer used it.
FULL_RECIPES = (
    "fp",
    "w8a8:none:rtn",
    "w8a8:none:gptq",
    "w4a16_g128:none:rtn",
    "w4a16_g128:random:rtn",
    "w4a16_g128:none:gptq",
    "w4a16_g128:block-128:gptq",
    "w4a16_g128:random:gptq",
    "w4a16:random:gptq",
    "w4a4:none:rtn",
    "w4a4:hadamard:rtn",
    "w4a4:random:rtn",
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

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class CompareResult:
    model: str
    eval: dict
    calibration: dict
    device: str
    rows: list[CompareRow] = field(default_factory=list)
    last_model: Any = None  # the last recipe's quantized model, when asked to keep it (for saving)

    def to_dict(self) -> dict:
        return dict(model=self.model, eval=self.eval, calibration=self.calibration, device=self.device,
                    rows=[r.to_dict() for r in self.rows])

    @classmethod
    def from_dict(cls, d: dict) -> "CompareResult":
        return cls(d["model"], d["eval"], d["calibration"], d["device"], [CompareRow(**r) for r in d["rows"]])

    def markdown(self) -> str:
        lines = [
            f"Model: `{self.model}` · eval: {self.eval['n_windows']}×{self.eval['window']} tokens of "
            f"`{self.eval['text']}` · calibration: {self.calibration['n_windows']}×{self.calibration['window']} of "
            f"`{self.calibration['text']}` · device: {self.device}",
            "",
            "| recipe | PPL | × FP | bits/weight | packed MB | quantize s | eval s | peak RSS MB |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in self.rows:
            bits = f"{r.weight_bits:.3f}" if r.weight_bits else "—"
            lines.append(f"| {r.label} | {r.ppl:.2f} | {r.ppl_ratio:.3f} | {bits} | {r.packed_mb:.1f} | "
                         f"{r.quantize_s:.1f} | {r.eval_s:.1f} | {r.peak_rss_mb:.0f} |")
        return "\n".join(lines)

    def table(self) -> str:
        head = f"{'recipe':<28} {'PPL':>10} {'x FP':>7} {'bits/w':>7} {'MB':>8} {'quant s':>8} {'eval s':>7}"
        out = [head, "-" * len(head)]
        for r in self.rows:
            bits = f"{r.weight_bits:.3f}" if r.weight_bits else "-"
            out.append(f"{r.label:<28} {r.ppl:>10.2f} {r.ppl_ratio:>7.3f} {bits:>7} {r.packed_mb:>8.1f} "
                       f"{r.quantize_s:>8.1f} {r.eval_s:>7.1f}")
        return "\n".join(out)


def save_plot(result: CompareResult, path) -> object | None:
    """Perplexity ratio to the unquantized model per recipe, as horizontal bars on a log axis (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = result.rows[1:]
    fig, ax = plt.subplots(figsize=(8, 0.32 * len(rows) + 1.4))
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
    keep_last: bool = False,
) -> CompareResult:
    """Quantize a copy of ``model`` with each recipe and evaluate it (see the module docstring)."""
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
    first_gptq = next((r for r in resolved if r.method == "gptq" and r.weight is not None), None)
    result = CompareResult(model_name, eval_windows.to_dict(),
                           dict(text=calib_text, n_windows=first_gptq.calib_windows if first_gptq else 0,
                                window=first_gptq.calib_len if first_gptq else 0),
                           device_name(device))
    fp_ppl = None
    for recipe in resolved:
        label = recipe.label()
        progress(f"[{label}] quantizing")
        m = copy.deepcopy(model)
        calib = None
        if recipe.method == "gptq" and recipe.weight is not None:
            key = (recipe.calib_windows, recipe.calib_len)
            if key not in calib_cache:
                calib_cache[key] = calibration_windows(tokenizer, calib_text, n_windows=key[0], window=key[1]
                                                       ).to(device)
            calib = calib_cache[key]
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        report = quantize_model(m, recipe, calib=calib, progress=lambda s: progress(f"[{label}] {s}"))
        progress(f"[{label}] evaluating perplexity")
        t0 = time.perf_counter()
        ppl = perplexity(m, windows, progress=False)
        eval_s = time.perf_counter() - t0
        if fp_ppl is None:
            fp_ppl = ppl
        samples = generate_samples(m, tokenizer, list(prompts), max_new_tokens=sample_tokens) if prompts else []
        peak = torch.cuda.max_memory_allocated(device) / 1e6 if device.type == "cuda" else peak_rss_mb()
        row = CompareRow(label, ppl, ppl / fp_ppl if fp_ppl else float("nan"), report.weight_bits,
                         packed_size_mb(m), report.seconds, eval_s, peak, samples, dict(report.fallbacks),
                         recipe.to_dict())
        result.rows.append(row)
        if on_row:
            on_row(row)
        if keep_last and recipe is resolved[-1]:
            result.last_model = m
        del m
    return result
