"""What the neighbourhood rank test costs a guarded call: the saved guards of ``reproduce`` (which
carry the test since session 35) against the same guards recalibrated without it, on one CPU
thread, the median of ``--repeats`` calls on ``--batch`` held-out inputs each.

    python scripts/rank_test_cost.py --runs runs/cifar10-sgdbf16-e80:badnets-0 runs/gtsrb-sgdbf16-e30:badnets-0

Writes ``results/rank-test-cost.json``.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from linkbreaker_ext import LinkBreaker, experiment  # noqa: E402


def ms_per_input(guard, x, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        guard(x)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times) / len(x)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", nargs="+", required=True, help="<work>:<attack>-<seed>")
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    for item in args.runs:
        work, run = item.split(":")
        model, meta = experiment.load_model(Path(work) / "models" / f"{run}.safetensors")
        ranked = LinkBreaker.load(Path(work) / "guards" / f"{run}.safetensors", model)
        if ranked.neighbourhood is None:
            raise SystemExit(f"{item}: the saved guard has no rank test (measure it with today's reproduce first)")
        split = experiment.split_data(meta["dataset"], args.data, None, int(run.rsplit("-", 1)[1]))
        plain = ranked.recalibrate(split["x_val"], split["y_val"], neighbourhood_quantile=None)
        x = split["x_test"][5000:5000 + args.batch]  # held-out half
        ms_plain, ms_ranked = ms_per_input(plain, x, args.repeats), ms_per_input(ranked, x, args.repeats)
        rows.append({"dataset": meta["dataset"], "work": work, "run": run, "batch": len(x),
                     "references": int(ranked.neighbourhood["references"].shape[1]),
                     "ms_per_input_without": round(ms_plain, 3), "ms_per_input_with": round(ms_ranked, 3),
                     "ratio": round(ms_ranked / ms_plain, 3)})
        print(json.dumps(rows[-1]), flush=True)
    out = {"device": f"cpu, 1 thread ({platform.processor() or platform.machine()})",
           "command": "python scripts/rank_test_cost.py --runs " + " ".join(args.runs)
           + f" --batch {args.batch} --repeats {args.repeats}", "rows": rows}
    (ROOT / "results" / "rank-test-cost.json").write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
