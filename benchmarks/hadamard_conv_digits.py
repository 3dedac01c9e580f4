"""A small CNN vs the same network with HadamardConv2d layers replacing its 3×3 convolutions, on scikit-learn's digits.

    OMP_NUM_THREADS=1 python benchmarks/hadamard_conv_digits.py --seeds 0,1,2 --keep-stem --paths 2 --lr 1e-2 \
        --out docs/results/hadamard_conv

Data: ``sklearn.datasets.load_digits()`` (1797 8×8 grey images, bundled with scikit-learn, no download), pixel values
/ 16, standardized with the training mean / std; fixed stratified splits: test ``train_test_split(test_size=0.3,
random_state=0)`` (540 images), then ``--val-fraction`` of the other 1257 held out for validation (``random_state=1``;
default 0.2: 1005 train / 252 validation). Choose settings on the validation accuracy only. ``--shift`` adds random
pixel-shift augmentation (both networks), ``--threshold-init`` sets HadamardConv2d's initial soft threshold. Each seed sets the initialization and the batch order
(``torch.Generator``), not the split.

Networks (same depth, same BN / ReLU / pooling / head):

* ``cnn``: conv3x3(1→16) BN ReLU · conv3x3(16→32) BN ReLU · maxpool 2 · conv3x3(32→32) BN ReLU · avgpool ·
  fc(32→10)
* ``hadamard``: the 3×3 convs replaced by ``HadamardConv2d(1→16, 8×8)``, ``(16→32, 8×8)``, ``(32→32, 4×4)``
  (``--paths`` paths, learned 1×1 channel mix, learned per-coefficient scale and soft threshold); with
  ``--keep-stem`` the first, 1-channel conv stays a 3×3 conv (as the paper keeps the ResNet stem) and only the
  other two are replaced.

The published results (docs/results/hadamard_conv) use ``--keep-stem --paths 2 --lr 1e-2`` for both networks;
replacing all three convs (``--paths 1``, lr 3e-3) reached only 92.5 ± 1.0 % (see the markdown there).

MACs are counted analytically per image for the conv / Hadamard layers and the classifier: a 3×3 conv (padding 1)
costs ``9·Cin·Cout·H·W``; a Hadamard layer ``Cin·H·W`` (scaling) + ``Cin·Cout·H·W`` (1×1 mix); the fast 2D WHT and
its inverse are counted separately as additions (``(Cin + Cout)·H·W·log2(H·W)``), not as MACs; soft thresholds are
counted separately too. BatchNorm (foldable at inference), ReLU and pooling are identical in both and not counted.

Writes ``digits_<device>.json`` (per seed: test accuracy, curves; mean ± std; MACs), ``digits_<device>.md`` and
``digits_<device>.png`` (training loss and test accuracy per epoch) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hadakit.training import HadamardConv2d
from hadakit.devices import cpu_name




def load_data(val_fraction: float = 0.2):
    """Fixed splits: test = train_test_split(test_size=0.3, random_state=0, stratify) as before (540 images); the
    remaining 1257 are split again (test_size=val_fraction, random_state=1, stratify) into train / validation.
    Standardized with the training part's mean / std. Settings are chosen on validation only."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)
    xtr, xte, ytr, yte = train_test_split(x, d.target, test_size=0.3, random_state=0, stratify=d.target)
    xtr, xva, ytr, yva = train_test_split(xtr, ytr, test_size=val_fraction, random_state=1, stratify=ytr)
    mu, sd = xtr.mean(), xtr.std()
    t = lambda a: torch.from_numpy((a - mu) / sd).unsqueeze(1)  # noqa: E731
    lab = lambda a: torch.from_numpy(a).long()  # noqa: E731
    return t(xtr), lab(ytr), t(xva), lab(yva), t(xte), lab(yte)


def random_shift(x: torch.Tensor, g: torch.Generator, max_shift: int) -> torch.Tensor:
    """Shift every image by a random integer offset in [-max_shift, max_shift]² (zero fill), drawn from g."""
    if max_shift == 0:
        return x
    n, _, h, w = x.shape
    k = max_shift
    xp = F.pad(x, (k, k, k, k))
    dy = torch.randint(0, 2 * k + 1, (n,), generator=g)
    dx = torch.randint(0, 2 * k + 1, (n,), generator=g)
    out = torch.empty_like(x)
    for a in range(2 * k + 1):
        for b in range(2 * k + 1):
            m = (dy == a) & (dx == b)
            if m.any():
                out[m] = xp[m, :, a:a + h, b:b + w]
    return out


# (Cin, Cout, H, W) of the three 3x3 layers
LAYERS = ((1, 16, 8, 8), (16, 32, 8, 8), (32, 32, 4, 4))


class Net(nn.Module):
    def __init__(self, kind: str, paths: int = 1, keep_stem: bool = False, threshold_init: float = 0.0):
        super().__init__()
        self.kind = kind
        convs = []
        for i, (cin, cout, h, w) in enumerate(LAYERS):
            if kind == "cnn" or (keep_stem and i == 0):
                convs.append(nn.Conv2d(cin, cout, 3, padding=1, bias=False))
            else:
                convs.append(HadamardConv2d(cin, h, w, out_channels=cout, paths=paths,
                                            threshold_init=threshold_init))
        self.convs = nn.ModuleList(convs)
        self.bns = nn.ModuleList(nn.BatchNorm2d(c[1]) for c in LAYERS)
        self.fc = nn.Linear(LAYERS[-1][1], 10)

    def forward(self, x):
        for i, (conv, bn) in enumerate(zip(self.convs, self.bns)):
            x = F.relu(bn(conv(x)))
            if i == 1:
                x = F.max_pool2d(x, 2)
        return self.fc(x.mean((2, 3)))


def count_cost(kind: str, paths: int = 1, keep_stem: bool = False) -> dict:
    macs, adds, thr = 0, 0, 0
    for i, (cin, cout, h, w) in enumerate(LAYERS):
        if kind == "cnn" or (keep_stem and i == 0):
            macs += 9 * cin * cout * h * w
        else:
            m = HadamardConv2d(cin, h, w, out_channels=cout, paths=paths).macs()
            macs, adds, thr = macs + m["macs"], adds + m["additions"], thr + m["thresholds"]
    macs += LAYERS[-1][1] * 10
    return {"macs": macs, "wht_additions": adds, "soft_thresholds": thr}


def train(kind: str, seed: int, data, epochs: int, batch: int, lr: float, paths: int = 1,
          keep_stem: bool = False, threshold_init: float = 0.0, shift: int = 0) -> dict:
    xtr, ytr, xva, yva, xte, yte = data
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():  # module init draws from the global RNG: seed it locally, restore it afterwards
        torch.manual_seed(seed)
        model = Net(kind, paths, keep_stem, threshold_init)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    losses, vaccs, accs = [], [], []
    t0 = time.perf_counter()
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(xtr), generator=g)
        tot = 0.0
        for i in range(0, len(xtr), batch):
            idx = perm[i:i + batch]
            loss = F.cross_entropy(model(random_shift(xtr[idx], g, shift)), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            tot += loss.item() * len(idx)
        sched.step()
        losses.append(tot / len(xtr))
        model.eval()
        with torch.no_grad():
            vaccs.append(100.0 * (model(xva).argmax(1) == yva).float().mean().item())
            accs.append(100.0 * (model(xte).argmax(1) == yte).float().mean().item())
    return {"val_accuracy": vaccs[-1], "test_accuracy": accs[-1], "train_loss": losses,
            "val_accuracy_curve": vaccs, "test_accuracy_curve": accs,
            "train_seconds": time.perf_counter() - t0,
            "parameters": sum(p.numel() for p in model.parameters())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--paths", type=int, default=1, help="paths of every HadamardConv2d")
    ap.add_argument("--kinds", default="cnn,hadamard")
    ap.add_argument("--keep-stem", action="store_true", help="keep the first (1-channel) 3x3 conv in the Hadamard net")
    ap.add_argument("--threshold-init", type=float, default=0.0, help="initial soft threshold of HadamardConv2d")
    ap.add_argument("--shift", type=int, default=0, help="training augmentation: random shifts up to this many "
                                                          "pixels (both networks)")
    ap.add_argument("--val-fraction", type=float, default=0.2, help="part of the 1257 training images held out for "
                                                                     "validation (model selection)")
    ap.add_argument("--stem", default="digits_cpu", help="output file stem")
    ap.add_argument("--out", default="docs/results/hadamard_conv")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    data = load_data(args.val_fraction)
    res = {}
    for kind in args.kinds.split(","):
        res[kind] = {}
        for s in seeds:
            r = train(kind, s, data, args.epochs, args.batch, args.lr, args.paths, args.keep_stem,
                      args.threshold_init, args.shift)
            print(f"{kind:<9} seed {s}: val accuracy {r['val_accuracy']:.2f}%  test accuracy "
                  f"{r['test_accuracy']:.2f}%  ({r['train_seconds']:.1f}s)", flush=True)
            res[kind][str(s)] = r
    summary = {}
    for kind in res:
        accs = [res[kind][str(s)]["test_accuracy"] for s in seeds]
        vaccs = [res[kind][str(s)]["val_accuracy"] for s in seeds]
        summary[kind] = {"val_accuracy": vaccs, "val_mean": statistics.fmean(vaccs), "accuracy": accs, "mean": statistics.fmean(accs),
                         "std": statistics.stdev(accs) if len(accs) > 1 else 0.0, "min": min(accs), "max": max(accs),
                         "parameters": res[kind][str(seeds[0])]["parameters"],
                         **count_cost(kind, args.paths, args.keep_stem),
                         "train_seconds_mean": statistics.fmean(res[kind][str(s)]["train_seconds"] for s in seeds)}
    if set(summary) != {"cnn", "hadamard"}:
        print(json.dumps(summary, indent=1))
        return 0
    gap = summary["hadamard"]["mean"] - summary["cnn"]["mean"]
    cpu = cpu_name()
    cmd = "OMP_NUM_THREADS=1 python benchmarks/hadamard_conv_digits.py " + " ".join(argv or sys.argv[1:])
    result = {"device": f"cpu ({cpu})", "torch": torch.__version__, "threads": args.threads, "command": cmd,
              "seeds": seeds, "epochs": args.epochs, "batch": args.batch, "lr": args.lr,
              "split": f"test: train_test_split(test_size=0.3, random_state=0, stratify=y) = 540; the other 1257 "
                       f"split (test_size={args.val_fraction}, random_state=1, stratify) into {len(data[1])} train / "
                       f"{len(data[3])} validation",
              "threshold_init": args.threshold_init, "shift": args.shift, "paths": args.paths,
              "keep_stem": args.keep_stem,
              "mac_rule": "3x3 conv: 9*Cin*Cout*H*W; Hadamard layer: Cin*H*W (scale) + Cin*Cout*H*W (1x1 mix); fast "
                          "2D WHT + inverse counted separately as additions; soft thresholds separately; fc "
                          "32*10 in both; BN/ReLU/pooling not counted (identical)",
              "summary": summary, "accuracy_gap_points": gap, "runs": res,
              "note": "shared 2-core machine; train_seconds are noisy and not a speed claim"}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = args.stem
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    c, h = summary["cnn"], summary["hadamard"]
    lines = [f"# HadamardConv2d vs 3×3 conv on scikit-learn digits — {cpu}, {args.threads} thread", "",
             f"Command: `{cmd}`. {args.epochs} epochs, batch {args.batch}, AdamW lr {args.lr} (cosine), fixed "
             f"split {result['split']}; seeds {seeds} set init and batch order.", "",
             "| network | val accuracy mean (%) | test accuracy per seed (%) | mean ± std | params | MACs / image | "
             "WHT additions | soft thresholds |", "|---|---:|---|---:|---:|---:|---:|---:|"]
    for name, s in (("cnn (3×3 convs)", c), ("hadamard (HadamardConv2d)", h)):
        lines.append(f"| {name} | {s['val_mean']:.2f} | {', '.join(f'{a:.2f}' for a in s['accuracy'])} | "
                     f"{s['mean']:.2f} ± {s['std']:.2f} "
                     f"| {s['parameters']:,} | {s['macs']:,} | {s['wht_additions']:,} | {s['soft_thresholds']:,} |")
    lines += ["", f"Accuracy gap (hadamard − cnn): {gap:+.2f} points; MACs ratio hadamard / cnn: "
              f"{h['macs'] / c['macs']:.3f} ({c['macs'] / h['macs']:.1f}× fewer).", "",
              f"MAC rule: {result['mac_rule']}.", ""]
    (out / f"{stem}.md").write_text("\n".join(lines))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
        for i, kind in enumerate(res):
            for j, s in enumerate(seeds):
                r = res[kind][str(s)]
                lab = f"{kind}: {summary[kind]['mean']:.2f} ± {summary[kind]['std']:.2f}%" if j == 0 else None
                ep = range(1, args.epochs + 1)
                a1.plot(ep, r["train_loss"], color=f"C{i}", alpha=0.8, lw=1, label=lab)
                a2.plot(ep, r["test_accuracy_curve"], color=f"C{i}", alpha=0.8, lw=1, label=lab)
        a1.set(xlabel="epoch", ylabel="training loss", yscale="log", title="training loss")
        a2.set(xlabel="epoch", ylabel="test accuracy (%)", ylim=(90, 100), title="test accuracy (legend: final)")
        for a in (a1, a2):
            a.grid(alpha=0.3)
            a.legend(fontsize=8)
        fig.suptitle(f"digits 8x8: 3x3-conv CNN ({c['macs']:,} MACs) vs HadamardConv2d ({h['macs']:,} MACs), "
                     f"seeds {seeds} — {cpu}", fontsize=10)
        fig.tight_layout()
        fig.savefig(out / f"{stem}.png", dpi=110)
        plt.close(fig)
    except ImportError:  # pragma: no cover
        pass
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
