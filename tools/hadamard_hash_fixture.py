"""Write tests/data/hadamard_hashes.json: SHA-256 of every constructible Hadamard matrix in a fixed list, with its
base order, so that tests/test_hadamard_orders.py can check that adding orders never changes an existing one.

The fixture records the matrices hadakit built *before* the orders of issue #22 were added (it was generated
from the code at that time; rerunning it now would only re-record the current matrices).  The hashed bytes are
``hadamard_matrix(n, dtype=torch.int8).numpy().tobytes()`` (row-major int8, identical to
``hadamard_matrix(n).to(torch.int8)``).

Orders added since (issue #22) are pinned in a second section, ``"added"``, written with ``--add-new``: it reads the
existing fixture, keeps ``"orders"`` (the legacy section) byte for byte, keeps every entry already in ``"added"``
(and stops with an error if the current code builds a different matrix or base order for one of them: an added
order must never change either), and appends entries for constructible orders up to ``--limit`` found in neither
section, each tagged with the round that added it (``--tag``).

Usage::

    OMP_NUM_THREADS=1 python tools/hadamard_hash_fixture.py --out tests/data/hadamard_hashes.json [--limit 4096]
    git show 014a7bd:src/hadakit/transforms/matrices.py > /tmp/matrices_round1.py      # round 1, as committed
    OMP_NUM_THREADS=1 python tools/hadamard_hash_fixture.py --add-new tests/data/hadamard_hashes.json --limit 4096 \
        --module /tmp/matrices_round1.py --tag "issue 22, round 1 (code of commit 014a7bd)"
    OMP_NUM_THREADS=1 python tools/hadamard_hash_fixture.py --add-new tests/data/hadamard_hashes.json --limit 4096 \
        --tag "issue 22, round 2"
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import subprocess
import time
from pathlib import Path

import torch

from hadakit.transforms import matrices
from hadakit.transforms.matrices import _hadamard_int8, base_order, covered_orders, is_constructible

# Large orders named in issue #22 (model widths and powers of two times 640).
EXTRA = [640 * 2**j for j in range(6)] + [1280, 2048, 2560, 3072, 4096, 5120, 6144, 8192, 10240, 12288, 14336,
                                           20480, 28672]


def _load_module(path: Path):
    """A copy of hadakit/transforms/matrices.py from another revision (``git show REV:src/... > FILE``), reading the
    data files of this checkout: used once to pin the orders of an earlier round with the code of that round."""
    spec = importlib.util.spec_from_file_location("hadakit_matrices_at_revision", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module._DATA_DIR = Path(matrices.__file__).with_name("data")
    return module


def _digest(module, n: int) -> str:
    return hashlib.sha256(module._hadamard_int8(n).tobytes()).hexdigest()


def add_new(path: Path, limit: int, tag: str, module=matrices) -> None:
    """Append ``"added"`` entries for orders <= limit that ``module`` constructs and the fixture lacks; verify the
    entries already pinned (with the current code)."""
    fixture = json.loads(path.read_text())
    legacy, added = fixture["orders"], fixture.setdefault("added", {})
    for key, entry in added.items():
        n = int(key)
        if base_order(n) != entry["base_order"] or _digest(matrices, n) != entry["sha256"]:
            raise SystemExit(f"order {n} (added in {entry['added_in']}) changed; an added order must never change")
        matrices._hadamard_int8.cache_clear()
    new = [n for n in module.covered_orders(limit) if str(n) not in legacy and str(n) not in added]
    for n in new:
        added[str(n)] = {"base_order": module.base_order(n), "sha256": _digest(module, n), "added_in": tag}
        module._hadamard_int8.cache_clear()
    fixture["added"] = dict(sorted(added.items(), key=lambda kv: int(kv[0])))
    fixture["about_added"] = ("Orders added since (issue #22), pinned the same way when they were added "
                              "(tools/hadamard_hash_fixture.py --add-new); these must never change either.")
    path.write_text(json.dumps(fixture, indent=0, sort_keys=False) + "\n")
    print(f"{len(new)} orders added ({', '.join(map(str, new))}); {len(added)} in 'added'; wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="write a fresh legacy fixture (see the docstring)")
    parser.add_argument("--add-new", type=Path, default=None, help="append the new orders to this fixture")
    parser.add_argument("--tag", default="issue 22", help="--add-new: which round added the orders")
    parser.add_argument("--module", type=Path, default=None,
                        help="--add-new: build the orders with this copy of matrices.py (an earlier revision)")
    parser.add_argument("--limit", type=int, default=4096, help="hash every constructible order up to this")
    parser.add_argument("--max-order", type=int, default=32768, help="skip extra orders above this")
    args = parser.parse_args()
    if args.add_new is not None:
        add_new(args.add_new, args.limit, args.tag, _load_module(args.module) if args.module else matrices)
        return
    if args.out is None:
        parser.error("give --out (fresh legacy fixture) or --add-new FIXTURE")
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
