"""Merge the rows of several `hadakit quantize --compare` runs (compare.json, or the .partial.jsonl a run keeps while
it goes) into one table, JSON and pair of plots.

A long comparison can be split into runs on separate cores or machines; every row carries its recipe, so the merged
table still says exactly what produced each number. Runs must share the model and evaluation windows (checked).

    python tools/merge_compare.py OUT_DIR run1/compare.json run2/compare.partial.jsonl ...
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from hadakit.evaluation.compare import CompareResult, CompareRow, save_plot, save_tradeoff_plot


def _rows(path: Path) -> tuple[dict | None, list[dict]]:
    if path.suffix == ".jsonl":
        return None, [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    data = json.loads(path.read_text())
    return data, data["rows"]


def main(argv: list[str]) -> int:
    if len(argv) < 3:
        print(__doc__)
        return 2
    out, sources = Path(argv[1]), [Path(p) for p in argv[2:]]
    head, rows, seen = None, [], set()
    for src in sources:
        data, src_rows = _rows(src)
        if data is not None:
            if head is None:
                head = data
            elif (data["model"], data["eval"]) != (head["model"], head["eval"]):
                raise SystemExit(f"{src}: another model or evaluation than {sources[0]}")
        for r in src_rows:
            if r["label"] not in seen:  # the FP row of every run: keep the first
                seen.add(r["label"])
                rows.append(r)
    if head is None:
        raise SystemExit("at least one source must be a compare.json (it names the model and the evaluation)")
    fp = [r for r in rows if r["label"] == "fp"]
    rows = fp + [r for r in rows if r["label"] != "fp"]
    result = CompareResult(head["model"], head["eval"], head["calibration"], head["device"],
                           [CompareRow(**r) for r in rows], head.get("extra_eval", []))
    out.mkdir(parents=True, exist_ok=True)
    (out / "ablation.json").write_text(json.dumps(result.to_dict(), indent=1) + "\n")
    (out / "ablation.md").write_text(result.markdown() + "\n")
    save_plot(result, out / "ablation.png")
    save_tradeoff_plot(result, out / "ablation-time.png")
    print(result.table())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
