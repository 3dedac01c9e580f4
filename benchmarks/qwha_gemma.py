"""QWHA adapters vs peft's LoRA (zero init, SVD-of-the-quantization-error init) and FourierFT on a GPTQ-W4 Gemma 3 270M.

Stages (one thread per process; the machine is shared):

    OMP_NUM_THREADS=1 python benchmarks/qwha_gemma.py prepare --work /tmp/qwha            # GPTQ W4 g128, ~5-10 min
    OMP_NUM_THREADS=1 python benchmarks/qwha_gemma.py run --work /tmp/qwha --methods fp,w4,qwha,fourierft --tag a
    OMP_NUM_THREADS=1 python benchmarks/qwha_gemma.py run --work /tmp/qwha --methods lora_svd,lora --tag b
    python benchmarks/qwha_gemma.py report --out docs/results/qwha /tmp/qwha/run-*.json

``prepare`` quantizes the model with ``hadakit.quantize(model, "w4a16_g128:block-128:gptq", King Lear)`` and stores,
for every quantized linear, its dense effective weight ``W_q`` (read off the packed, rotated module as
``m(I) − m(0)``, exact for a weight-only recipe) and nothing else. ``run`` loads the float model, puts ``W_q`` into
its ``nn.Linear`` modules (so the base every method sees is the same frozen W4 function, and peft can wrap it),
attaches one method's adapters to the same subset of linears (all q/k/v/o/gate/up/down projections of all 18
layers) with the same trainable-parameter count per layer (LoRA rank r: ``r·(in + out)``; QWHA budget and FourierFT
``n_frequency`` set to that number per layer), evaluates at init, trains for ``--steps`` steps on Shakespeare plays
other than Hamlet, Macbeth and King Lear, and evaluates again. Evaluation: Hamlet, Macbeth and Python
standard-library source (held out; never the calibration text).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import sysconfig
import time
from pathlib import Path

import torch
from torch import nn
from hadakit.devices import cpu_name

RECIPE = "w4a16_g128:block-128:gptq"
TRAIN_PLAYS = ("othello", "julius_caesar", "romeo_and_juliet", "tempest", "twelfth_night", "antony_and_cleopatra",
               "coriolanus", "winters_tale")
EVAL_TEXTS = ("hamlet", "macbeth", "python_stdlib")
STDLIB_MODULES = ("argparse.py", "inspect.py", "typing.py", "subprocess.py", "pathlib.py", "dataclasses.py")
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LABEL = {"fp": "FP (GGUF dequantized, float32)", "w4": "W4 GPTQ g128 (frozen base, no adapter)",
         "qwha": "QWHA (AdaAlloc + refined error init)", "qwha_norefine_initonly": "QWHA init only (AdaAlloc, weight-error values, no refine)",
         "qwha_initonly": "QWHA init only", 
         "lora": "LoRA (peft, zero init)", "lora_svd": "LoRA (peft, SVD-of-quantization-error init)",
         "fourierft": "FourierFT (peft)"}




def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------------------------------------------
def prepare(args) -> None:
    import hadakit
    from hadakit.io.loading import load_model
    from hadakit.io.texts import read_text

    torch.set_num_threads(1)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model, tok = load_model()
    t1 = time.perf_counter()
    hadakit.quantize(model, RECIPE, read_text("lear"), tokenizer=tok, seed=0, progress=lambda s: log(s))
    qt = time.perf_counter() - t1
    eff = {}
    with torch.no_grad():
        for n, m in model.named_modules():
            if type(m).__name__ == "RotatedQuantLinear":
                m = m.double()
                eye = torch.eye(m.in_features, dtype=torch.float64)
                zero = torch.zeros(1, m.in_features, dtype=torch.float64)
                eff[n] = (m(eye) - m(zero)).T.float().contiguous()
    torch.save(dict(eff=eff, recipe=RECIPE, quantize_s=qt), work / "w4_eff.pt")
    log(f"saved {len(eff)} effective weights, quantize {qt:.0f}s")


# ----------------------------------------------------------------------------------------------------------------
def stdlib_text() -> str:
    lib = sysconfig.get_paths()["stdlib"]
    return "\n\n".join(open(os.path.join(lib, m), encoding="utf-8").read() for m in STDLIB_MODULES)


def eval_sets(tok, args) -> dict[str, torch.Tensor]:
    from hadakit.io.texts import make_windows, read_text

    texts = {"hamlet": read_text("hamlet"), "macbeth": read_text("macbeth"), "python_stdlib": stdlib_text()}
    nw = {"hamlet": args.eval_windows, "macbeth": args.eval_windows, "python_stdlib": args.stdlib_windows}
    return {k: make_windows(tok, texts[k], window=args.seq, n_windows=nw[k], add_bos=True) for k in EVAL_TEXTS
            if nw[k] > 0}


def train_batches(tok, args) -> torch.Tensor:
    from hadakit.io.texts import read_text, tokenize_text

    ids: list[int] = []
    for play in TRAIN_PLAYS:
        ids += tokenize_text(tok, read_text(play))
    ids_t = torch.tensor(ids, dtype=torch.long)
    g = torch.Generator().manual_seed(args.seed)
    n = args.steps * args.batch
    starts = torch.randint(0, ids_t.numel() - args.seq, (n,), generator=g)
    bos = tok.bos_token_id
    rows = [torch.cat([torch.tensor([bos]), ids_t[s:s + args.seq - 1]]) for s in starts.tolist()]
    return torch.stack(rows).view(args.steps, args.batch, args.seq)


def ppl_all(model, evals) -> tuple[dict[str, float], float]:
    from hadakit.evaluation.metrics import perplexity

    t = time.perf_counter()
    with torch.no_grad():
        out = {k: perplexity(model, w, progress=False) for k, w in evals.items()}
    return out, time.perf_counter() - t


def target_linears(model) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.split(".")[-1] in TARGETS]


def covariances(model, names: list[str], windows: torch.Tensor) -> dict[str, torch.Tensor]:
    """E[xᵀx] of each named linear's input on the W4 model (decoder only, no LM head)."""
    acc: dict[str, torch.Tensor] = {}
    cnt: dict[str, int] = {}
    hooks = []

    def hook(name):
        def f(mod, inp):
            x = inp[0].detach().reshape(-1, inp[0].shape[-1]).float()
            acc[name] = acc.get(name, 0) + x.T @ x
            cnt[name] = cnt.get(name, 0) + x.shape[0]
        return f
    for n in names:
        hooks.append(model.get_submodule(n).register_forward_pre_hook(hook(n)))
    try:
        with torch.no_grad():
            for w in windows:
                model.model(input_ids=w[None])
    finally:
        for h in hooks:
            h.remove()
    return {n: acc[n] / cnt[n] for n in names}


def floor_step(model, batch) -> float:
    """One forward + backward of the frozen W4 model with the embedding output requiring grad (no adapter)."""
    emb = model.get_input_embeddings()
    h = emb.register_forward_hook(lambda m, i, o: o.requires_grad_(True))
    try:
        t = time.perf_counter()
        out = model(input_ids=batch, labels=batch)
        out.loss.backward()
        return time.perf_counter() - t
    finally:
        h.remove()


def run(args) -> None:
    from hadakit.io.loading import load_model
    from hadakit.training.qwha import QWHAConfig, QWHALinear, add_qwha

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    work = Path(args.work)
    path = work / f"run-{args.tag}.json"
    t0 = time.perf_counter()
    model, tok = load_model()
    model.config.use_cache = False
    for p in model.parameters():
        p.requires_grad_(False)
    log(f"loaded in {time.perf_counter() - t0:.0f}s")
    names = target_linears(model)
    methods = args.methods.split(",")
    # the float weights are kept only when a method needs them (QWHA / SVD init, or FP evaluated after W4)
    need_fp = any(m.startswith("qwha") or m == "lora_svd" for m in methods) or ("fp" in methods[1:])
    fpw = {n: model.get_submodule(n).weight.detach().clone() for n in names} if need_fp else {}
    saved = torch.load(work / "w4_eff.pt", mmap=True)  # file-backed: keeps the resident set small
    eff = saved["eff"]
    evals = eval_sets(tok, args)
    batches = train_batches(tok, args)
    meta = dict(device=cpu_name(), threads=torch.get_num_threads(), recipe=saved["recipe"],
                gptq_quantize_s=saved["quantize_s"], seq=args.seq, batch=args.batch, steps=args.steps,
                rank=args.rank, lr=dict(lora=args.lr, qwha=args.lr, fourierft=args.lr_fourierft),
                fourierft_scaling=args.fourierft_scaling, train_plays=list(TRAIN_PLAYS),
                eval={k: dict(n_windows=int(v.shape[0]), window=int(v.shape[1]), bos=True) for k, v in evals.items()},
                stdlib_modules=list(STDLIB_MODULES), targets=list(TARGETS), n_target_linears=len(names),
                load_avg_start=os.getloadavg(), rows=[])
    if path.exists():
        meta["rows"] = json.loads(path.read_text())["rows"]
    done = {r["method"] for r in meta["rows"]}

    def save():
        path.write_text(json.dumps(meta, indent=1))

    def set_w4():
        with torch.no_grad():
            for n in names:
                model.get_submodule(n).weight.copy_(eff[n])

    for method in methods:
        if method in done:
            continue
        log(f"== {method}")
        row = dict(method=method, label=LABEL[method], load_avg=os.getloadavg())
        if method == "fp":
            with torch.no_grad():
                for n in fpw:
                    model.get_submodule(n).weight.copy_(fpw[n])
            row["ppl"], row["eval_s"] = ppl_all(model, evals)
            log(f"fp ppl {row['ppl']}")
            meta["rows"].append(row)
            save()
            continue
        set_w4()
        if method == "w4":
            row["ppl"], row["eval_s"] = ppl_all(model, evals)
            fl = [floor_step(model, batches[i % args.steps]) for i in range(3)]
            row["floor_step_s"] = fl
            log(f"w4 ppl {row['ppl']}; floor step {fl}")
            meta["rows"].append(row)
            save()
            continue
        t_init = time.perf_counter()
        budgets = {n: args.rank * (eff[n].shape[0] + eff[n].shape[1]) for n in names}
        if method.startswith("qwha"):
            cfg = QWHAConfig(rank_equivalent=args.rank, allocation="adaptive", init="error",
                             refine_damp=args.refine_damp, targets=tuple(f"*.{t}" for t in TARGETS), ignore=())
            covs = None
            if method in ("qwha", "qwha_initonly"):
                from hadakit.io.texts import calibration_windows

                calib = calibration_windows(tok, "lear", n_windows=args.calib_windows, window=args.seq, seed=0)
                covs = covariances(model, names, calib)
            rep = add_qwha(model, cfg, full_weights=fpw, base_weights=eff, covariances=covs)
            net = model
            row["qwha_config"] = cfg.to_dict()
            row["weight_error_ratio_mean"] = statistics.mean(r["weight_error_ratio"] for r in rep.layers)
            row["forward_modes"] = sorted({r["forward"] for r in rep.layers})
            del covs
        else:
            import peft

            if method.startswith("lora"):
                conf = peft.LoraConfig(r=args.rank, lora_alpha=args.rank, lora_dropout=0.0,
                                       target_modules=list(TARGETS), bias="none")
            elif method == "fourierft":
                pattern = {n: budgets[n] for n in names}
                conf = peft.FourierFTConfig(n_frequency=args.rank * 1000, n_frequency_pattern=pattern,
                                            scaling=args.fourierft_scaling, target_modules=list(TARGETS),
                                            init_weights=True, random_loc_seed=args.seed)
            else:
                raise SystemExit(f"unknown method {method}")
            net = peft.get_peft_model(model, conf)
            if method == "lora_svd":
                with torch.no_grad():
                    for n in names:
                        lay = net.base_model.model.get_submodule(n)
                        E = fpw[n] - eff[n]  # float32 SVD: ample for a rank-r fit
                        U, S, Vh = torch.linalg.svd(E, full_matrices=False)
                        r = args.rank
                        sq = S[:r].sqrt()
                        scale = lay.scaling["default"]
                        lay.lora_B["default"].weight.copy_((U[:, :r] * sq / math.sqrt(scale)).float())
                        lay.lora_A["default"].weight.copy_((sq[:, None] * Vh[:r] / math.sqrt(scale)).float())
        row["init_s"] = time.perf_counter() - t_init
        params = [p for p in net.parameters() if p.requires_grad]
        row["trainable"] = sum(p.numel() for p in params)
        row["budget_total"] = sum(budgets.values())
        log(f"{method}: {row['trainable']} trainable (budget {row['budget_total']}), init {row['init_s']:.0f}s")
        if method in ("lora", "fourierft"):
            row["ppl_init"], row["eval_init_s"] = None, 0.0  # ΔW = 0 at init: the W4 model (see the W4 row)
        else:
            row["ppl_init"], row["eval_init_s"] = ppl_all(net, evals)
            log(f"{method} init ppl {row['ppl_init']}")
        if method.endswith("_initonly"):  # init ablation: no training
            meta["rows"].append(row)
            save()
            for n in names:
                lay = model.get_submodule(n)
                if isinstance(lay, QWHALinear):
                    parent, _, child = n.rpartition(".")
                    setattr(model.get_submodule(parent), child, lay.base)
            continue
        lr = args.lr_fourierft if method == "fourierft" else args.lr
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min(1.0, (s + 1) / max(1, args.warmup)) * (0.5 * (1 + math.cos(math.pi * s / args.steps))))
        net.train()
        losses, times = [], []
        for step in range(args.steps):
            b = batches[step]
            t = time.perf_counter()
            out = net(input_ids=b, labels=b)
            out.loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t)
            losses.append(float(out.loss.detach()))
            if step % 5 == 0 or step == args.steps - 1:
                log(f"{method} step {step + 1}/{args.steps} loss {losses[-1]:.3f} ({times[-1]:.1f}s/step)")
        net.eval()
        row.update(losses=losses, step_s=times, step_s_median=statistics.median(times[1:] or times), lr=lr)
        row["ppl"], row["eval_s"] = ppl_all(net, evals)
        log(f"{method} final ppl {row['ppl']}")
        if method.startswith("qwha"):
            # merge exactness on the trained adapters (float nn.Linear bases): logits before vs after merge
            probe = evals["hamlet"][:1]
            with torch.no_grad():
                before = model(input_ids=probe).logits
                for n in names:
                    lay = model.get_submodule(n)
                    if isinstance(lay, QWHALinear):
                        parent, _, child = n.rpartition(".")
                        setattr(model.get_submodule(parent), child, lay.merge())
                after = model(input_ids=probe).logits
            row["merge_max_abs_logit_diff"] = float((before - after).abs().max())
        else:
            model = net.unload()
        for p in model.parameters():
            p.requires_grad_(False)
        meta["rows"].append(row)
        save()
        del net, opt, params
    meta["load_avg_end"] = os.getloadavg()
    save()
    log("done")


# ----------------------------------------------------------------------------------------------------------------
SHAPES = {"q_proj": (640, 1024), "k_proj": (640, 256), "o_proj": (1024, 640), "gate_proj": (640, 2048),
          "down_proj": (2048, 640)}


def layer_time(args) -> None:
    """Forward + backward of one frozen Gemma-shaped linear with each adapter (same budget), interleaved repeats."""
    import peft

    from hadakit.training.qwha import QWHAConfig, QWHALinear, qwha_init

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    res = dict(device=cpu_name(), threads=1, tokens=args.tokens, rank=args.rank, repeats=args.repeats,
               load_avg_start=os.getloadavg(), layers={})
    for name, (i, o) in SHAPES.items():
        W = torch.randn(o, i, generator=g) * 0.03
        Wq = W + torch.randn(o, i, generator=g) * 0.003
        budget = args.rank * (i + o)

        def base():
            lin = nn.Linear(i, o, bias=False)
            with torch.no_grad():
                lin.weight.copy_(Wq)
            lin.weight.requires_grad_(False)
            return lin
        mods = {"floor (frozen linear)": base()}
        wrap = nn.Sequential()
        wrap.add_module(name, base())
        mods["lora"] = peft.get_peft_model(wrap, peft.LoraConfig(r=args.rank, lora_alpha=args.rank,
                                                                 target_modules=[name]))
        wrap2 = nn.Sequential()
        wrap2.add_module(name, base())
        mods["fourierft"] = peft.get_peft_model(wrap2, peft.FourierFTConfig(
            n_frequency=budget, target_modules=[name], init_weights=False))
        cfg = QWHAConfig(rank_equivalent=args.rank)
        r, c, v = qwha_init(W, Wq, budget, cfg)
        for mode in ("sparse", "dense"):
            mods[f"qwha ({mode})"] = QWHALinear(base(), i, o, r, c, v, forward_mode=mode)
        x = torch.randn(args.tokens, i, generator=g)
        times = {k: [] for k in mods}
        for rep in range(args.repeats + 1):
            for k, m in mods.items():
                xx = x.clone().requires_grad_(True)
                t = time.perf_counter()
                m(xx).square().mean().backward()
                dt = time.perf_counter() - t
                if rep:
                    times[k].append(dt)
                for p in m.parameters():
                    p.grad = None
        fl = statistics.median(times["floor (frozen linear)"])
        res["layers"][name] = {k: dict(median_ms=1e3 * statistics.median(t), ratio_to_floor=statistics.median(t) / fl)
                               for k, t in times.items()}
        res["layers"][name]["budget"] = budget
        log(f"{name} ({i}->{o}, budget {budget}): " + ", ".join(
            f"{k} {1e3 * statistics.median(t):.2f} ms ({statistics.median(t) / fl:.2f}x)" for k, t in times.items()))
    res["load_avg_end"] = os.getloadavg()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))


# ----------------------------------------------------------------------------------------------------------------
def _from_log(path: Path) -> dict[str, dict]:
    """Per method, what a run's log says even when the run did not finish: init PPL and the logged losses."""
    import ast
    import re

    out: dict[str, dict] = {}
    for line in path.read_text(errors="replace").splitlines():
        m = re.search(r"\] (\w+) init ppl (\{.*\})", line)
        if m:
            out.setdefault(m.group(1), {})["ppl_init"] = ast.literal_eval(m.group(2))
        m = re.search(r"\] (\w+) step (\d+)/(\d+) loss ([\d.]+) \(([\d.]+)s/step\)", line)
        if m:
            d = out.setdefault(m.group(1), {})
            d.setdefault("logged_steps", []).append([int(m.group(2)), float(m.group(4)), float(m.group(5))])
            d["steps_planned"] = int(m.group(3))
    return out


def report(args) -> None:
    """Tables (markdown), JSON and the loss / step-time plot from the run JSONs (and their logs, for partial runs)."""
    runs = []
    for p in args.inputs:
        if Path(p).exists():
            d = json.loads(Path(p).read_text())
        else:  # a run killed before its first row: its log only; settings as the first run's (same arguments)
            if not runs:
                sys.exit(f"report: {p} does not exist (list a finished run first)")
            d = {k: v for k, v in runs[0].items() if k not in ("rows", "run", "from_log", "load_avg_end")}
            d.update(rows=[], meta_from=runs[0]["run"])
        d["run"] = Path(p).stem
        log_path = Path(p).with_suffix(".log")
        d["from_log"] = _from_log(log_path) if log_path.exists() else {}
        runs.append(d)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res = dict(device=runs[0]["device"], recipe=runs[0]["recipe"], gptq_quantize_s=runs[0]["gptq_quantize_s"],
               runs=[{k: v for k, v in d.items()} for d in runs])
    if args.layer_time and Path(args.layer_time).exists():
        res["layer_time"] = json.loads(Path(args.layer_time).read_text())
    (out / "qwha_gemma.json").write_text(json.dumps(res, indent=1))

    lines = ["# QWHA vs LoRA / FourierFT on a GPTQ-W4 Gemma 3 270M (CPU) — partial, see README.md\n",
             f"Device: {res['device']}, one thread per process, **shared and heavily loaded machine**. Base: "
             f"`{res['recipe']}` (GPTQ {res['gptq_quantize_s']:.0f} s, King Lear calibration).\n"]
    for d in runs:
        ev = ", ".join(f"{k} {v['n_windows']}×{v['window']}" for k, v in d["eval"].items())
        la = d.get("load_avg_start", [float("nan")])[0]
        lines.append(f"## run `{d['run']}`: steps {d['steps']} × batch {d['batch']} × {d['seq']} tokens, eval {ev}; "
                     f"load average {la:.0f} at the start\n")
        lines.append("| method | trainable | PPL at init (" + " / ".join(d["eval"]) + ") | PPL after "
                     f"{d['steps']} steps | median step s | state |")
        lines.append("|---|---:|---|---|---:|---|")
        done = {r["method"]: r for r in d["rows"]}
        methods = list(done) + [m for m in d["from_log"] if m not in done]
        for m in methods:
            r = done.get(m, {})
            lg = d["from_log"].get(m, {})
            ppl_init = r.get("ppl_init", lg.get("ppl_init"))
            if m in ("lora", "fourierft") and ppl_init is None:
                init_s = "= W4 (ΔW = 0)"
            elif m in ("fp", "w4"):
                init_s = " / ".join(f"{v:.2f}" for v in r["ppl"].values())
            else:
                init_s = " / ".join(f"{v:.2f}" for v in ppl_init.values()) if ppl_init else "–"
            fin = " / ".join(f"{v:.2f}" for v in r["ppl"].values()) if ("ppl" in r and m not in ("fp", "w4")) else "–"
            st = r.get("step_s_median")
            if st is None and lg.get("logged_steps"):
                st = statistics.median(x[2] for x in lg["logged_steps"])
            if m == "w4" and r.get("floor_step_s"):
                st = statistics.median(r["floor_step_s"])
            state = "done" if m in done else (f"stopped at step {lg['logged_steps'][-1][0]}/{lg['steps_planned']}"
                                              if lg.get("logged_steps") else "stopped during init / training")
            if m == "w4":
                state += " (step s = floor: frozen model fwd+bwd, no adapter)"
            lines.append(f"| {LABEL.get(m, m)} | {r.get('trainable', '–')} | {init_s} | {fin} | "
                         + (f"{st:.1f}" if st else "–") + f" | {state} |")
        lines.append("")
    if "layer_time" in res:
        lt = res["layer_time"]
        kinds = [k for k in next(iter(lt["layers"].values())) if k != "budget"]
        lines.append(f"## one frozen Gemma-shaped linear: forward + backward ({lt['tokens']} tokens, gradient to the "
                     f"input and the adapter), median of {lt['repeats']} interleaved repeats, ms (× the frozen linear "
                     f"alone = the floor); load average {lt['load_avg_start'][0]:.0f} at the start\n")
        lines.append("| layer (in→out, budget) | " + " | ".join(kinds) + " |")
        lines.append("|---|" + "---|" * len(kinds))
        for name, dd in lt["layers"].items():
            i, o = SHAPES[name]
            lines.append(f"| {name} ({i}→{o}, {dd['budget']}) | " + " | ".join(
                f"{dd[k]['median_ms']:.1f} ({dd[k]['ratio_to_floor']:.2f}×)" for k in kinds) + " |")
    (out / "qwha_gemma.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    ax = axes[0]
    for d in runs:
        done = {r["method"]: r for r in d["rows"]}
        for m in set(done) | set(d["from_log"]):
            r = done.get(m, {})
            if "losses" in r:
                ax.plot(range(1, len(r["losses"]) + 1), r["losses"], marker="o", label=f"{LABEL.get(m, m)} ({d['run']})")
            elif d["from_log"].get(m, {}).get("logged_steps"):
                xs = d["from_log"][m]["logged_steps"]
                ax.plot([x[0] for x in xs], [x[1] for x in xs], marker="x", ls="--",
                        label=f"{LABEL.get(m, m)} ({d['run']}, partial, logged steps)")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (one 128-token window per step)")
    ax.set_title("training loss")
    ax.legend(fontsize=6)
    ax.grid(alpha=0.3)
    ax = axes[1]
    if "layer_time" in res:
        lt = res["layer_time"]
        kinds = [k for k in next(iter(lt["layers"].values())) if k != "budget"]
        names = list(lt["layers"])
        w = 0.8 / len(kinds)
        for j, k in enumerate(kinds):
            ax.bar([i + j * w for i in range(len(names))], [lt["layers"][n][k]["ratio_to_floor"] for n in names],
                   width=w, label=k)
        ax.set_xticks([i + 0.4 - w / 2 for i in range(len(names))], names, fontsize=8)
        ax.set_ylabel("fwd+bwd time / frozen linear alone")
        ax.set_title("per-layer step time (loaded CPU)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "qwha_gemma.png", dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--work", default="/tmp/qwha")
    r = sub.add_parser("run")
    r.add_argument("--work", default="/tmp/qwha")
    r.add_argument("--methods", default="fp,w4,qwha,lora_svd,lora,fourierft")
    r.add_argument("--tag", default="a")
    r.add_argument("--steps", type=int, default=40)
    r.add_argument("--batch", type=int, default=1)
    r.add_argument("--seq", type=int, default=128)
    r.add_argument("--rank", type=int, default=8)
    r.add_argument("--lr", type=float, default=1e-3)
    r.add_argument("--lr-fourierft", type=float, default=5e-3)
    r.add_argument("--fourierft-scaling", type=float, default=150.0)
    r.add_argument("--warmup", type=int, default=3)
    r.add_argument("--eval-windows", type=int, default=4)
    r.add_argument("--stdlib-windows", type=int, default=2)
    r.add_argument("--calib-windows", type=int, default=24)
    r.add_argument("--refine-damp", type=float, default=0.05)
    r.add_argument("--seed", type=int, default=0)
    lt = sub.add_parser("layer-time")
    lt.add_argument("--tokens", type=int, default=128)
    lt.add_argument("--rank", type=int, default=8)
    lt.add_argument("--repeats", type=int, default=7)
    lt.add_argument("--out", default="/tmp/qwha/layer_time.json")
    q = sub.add_parser("report")
    q.add_argument("--out", default="docs/results/qwha")
    q.add_argument("--layer-time", default="/tmp/qwha/layer_time.json")
    q.add_argument("inputs", nargs="+")
    a = ap.parse_args()
    {"prepare": prepare, "run": run, "layer-time": layer_time, "report": report}[a.cmd](a)


if __name__ == "__main__":
    main()
