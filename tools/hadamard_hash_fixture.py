"""Write tests/data/hadamard_hashes.json: SHA-256 of every constructible Hadamard matrix in a fixed list, with its
base order, so that tests/test_hadamard_orders.py can check that adding orders never changes an existing one.

The fixture records the matrices hadakit built *before* the orders of issue #22 were added (it was generated
from the code at that time; rerunning it now would only re-record the current matrices).  The hashed bytes are
``hadamard_matrix(n, dtype=torch.int8).numpy().tobytes()`` (row-major int8, identical to
``hadamard_matrix(n).to(torch.int8)``).

Usage::

    OMP_NUM_THREADS=1 python tools/hadamard_hash_fixture.py --out tests/data/hadamard_hashes.json [--limit 4096]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import time
from pathlib import Path

import torch

from hadakit.transforms.matrices import _hadamard_int8, base_order, covered_orders, is_constructible

# Large orders named in issue #22 (model widths and powers of two times 640).
EXTRA = [640 * 2**j for j in range(6)] + [1280, 2048, 2560, 3072, 4096, 5120, 6144, 8192, 10240, 12288, 14336,
                                           20480, 28672]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--limit", type=int, default=4096, help="hash every constructible order up to this")
    parser.add_argument("--max-order", type=int, default=32768, help="skip extra orders above this")
    args = parser.parse_args()
    orders = sorted(set(covered_orders(args.limit)) | {n for n in EXTRA if n <= args.max_order and is_constructible(n)})
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    entries = {}
    start = time.monotonic()
    for n in orders:
        h = _hadamard_int8(n)
        digest = hashlib.sha256(torch.from_numpy(h.copy()).numpy().tobytes()).hexdigest()
        entries[str(n)] = {"base_order": base_order(n), "sha256": digest}
        if n > 4096:
            _hadamard_int8.cache_clear()
            print(f"n={n}: {time.monotonic() - start:.1f} s", flush=True)
    out = {
        "about": "SHA-256 of hadamard_matrix(n, dtype=torch.int8).numpy().tobytes() and base_order(n), recorded "
                 "before the orders of issue #22 were added; these matrices must never change.",
        "generated_from_commit": commit,
        "covered_upto_1024_at_generation": len(covered_orders(1024)),
        "orders": entries,
    }
    args.out.write_text(json.dumps(out, indent=0, sort_keys=False) + "\n")
    print(f"{len(entries)} orders hashed in {time.monotonic() - start:.1f} s; wrote {args.out}")


if __name__ == "__main__":
    main()
