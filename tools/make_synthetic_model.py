"""Write a seeded synthetic Llama-, Qwen2- or Gemma-3-shaped HF model directory of a chosen size (random weights).

For memory, time and exactness tests of hadakit on models larger than memory; random weights say nothing about
accuracy. The model is written tensor by tensor, so a 12 GB model needs a few hundred MB of memory.

    python tools/make_synthetic_model.py /tmp/llama-12g --arch llama --size 12GB --seed 0
    python tools/make_synthetic_model.py /tmp/qwen-tiny --arch qwen2 --hidden 256 --intermediate 768 --layers 2 \\
        --heads 4 --kv-heads 1 --vocab 32000 --tokenizer
"""

from __future__ import annotations

import argparse
import resource
import sys
import time

from hadakit.io.synthetic import SyntheticDims, SyntheticProgress, parse_size, write_synthetic_model

_DIMS = ("hidden", "intermediate", "layers", "heads", "kv_heads", "vocab")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="the model directory to create (a new path, or a previous synthetic model with --force)")
    p.add_argument("--arch", choices=("llama", "qwen2", "gemma3"), default="llama")
    p.add_argument("--sliding-window", type=int, default=None, help="gemma3: the sliding layers' window (default 512)")
    p.add_argument("--size", default=None, help="target size, e.g. 300MB, 12GB, 1.5GiB (default 300MB)")
    dims = p.add_argument_group("explicit dims instead of --size (all but --vocab required; vocab default 32000)")
    for d in _DIMS:
        dims.add_argument(f"--{d.replace('_', '-')}", type=int, default=None)
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shard-size", default="2GB", help="most tensor bytes per safetensors shard (default 2GB)")
    p.add_argument("--tokenizer", action="store_true", help="also write a tokenizer that works offline")
    tie = p.add_mutually_exclusive_group()
    tie.add_argument("--tie-embeddings", dest="tie", action="store_true", default=None)
    tie.add_argument("--untie-embeddings", dest="tie", action="store_false")
    p.add_argument("--force", action="store_true", help="replace OUT if it is a previous synthetic model")
    args = p.parse_args(argv)

    given = {d: getattr(args, d) for d in _DIMS if getattr(args, d) is not None}
    if given:
        if args.size is not None:
            p.error("give either --size or explicit dims (--hidden ... --kv-heads), not both")
        missing = [f"--{d.replace('_', '-')}" for d in _DIMS[:-1] if d not in given]
        if missing:
            p.error(f"explicit dims need {', '.join(missing)} too")
        try:
            size: object = SyntheticDims(**given)
        except (TypeError, ValueError) as e:
            p.error(str(e))
    else:
        size = args.size or "300MB"
    try:
        parse_size(args.shard_size, "--shard-size")
    except ValueError as e:
        p.error(str(e))

    start = time.perf_counter()
    last = [-1.0]

    def progress(ev: SyntheticProgress) -> None:
        pct = 100.0 * ev.bytes_done / ev.bytes_total
        if pct - last[0] >= 5.0 or ev.tensors_done == ev.tensors_total:
            last[0] = pct
            print(f"  {pct:5.1f}%  shard {ev.shard}/{ev.shard_count}  {ev.bytes_done / 1e9:7.2f} GB  "
                  f"{time.perf_counter() - start:7.1f} s  {ev.tensor}", flush=True)

    try:
        info = write_synthetic_model(args.out, arch=args.arch, size=size, dtype=args.dtype, seed=args.seed,
                                     shard_size=args.shard_size, tokenizer=args.tokenizer, tie_embeddings=args.tie,
                                     force=args.force, progress=progress,
                                     sliding_window=args.sliding_window)
    except (ValueError, TypeError, FileExistsError, PermissionError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    wall = time.perf_counter() - start
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    d = info.dims
    print(f"wrote {info.path}: synthetic {info.arch} (RANDOM weights: not for accuracy), hidden {d.hidden}, "
          f"intermediate {d.intermediate}, layers {d.layers}, heads {d.heads}/{d.kv_heads} kv, vocab {d.vocab}, "
          f"tied {info.tie_embeddings}")
    print(f"{info.parameter_count:,} parameters, {info.tensor_bytes:,} tensor bytes ({info.dtype}), "
          f"{info.bytes_written:,} bytes on disk in {info.shard_count} shard(s); {wall:.1f} s, "
          f"{info.bytes_written / wall / 1e6:.0f} MB/s, peak RSS {rss:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
