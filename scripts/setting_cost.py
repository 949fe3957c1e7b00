"""What a last-stage setting costs a guarded call: the saved guards of ``reproduce`` against the
same guards recalibrated with ``--against`` settings, on one CPU thread, the median of
``--repeats`` calls on ``--batch`` held-out inputs each, the two guards' calls interleaved so that
a load on the machine weighs on both alike.

    python scripts/setting_cost.py --runs runs/cifar10-sgdbf16-e80:badnets-0 --against neighbourhood_quantile=None \\
        --out results/rank-test-cost.json

(the rank test's cost, session 35: then ``scripts/rank_test_cost.py``, the same measurement taken
one guard after the other), and ``--against stability_noise=0.05 stability_jitter=0.0`` for the
jittered neighbour against the noise (session 36, ``results/jitter-cost.json``).
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
from linkbreaker_ext.reproduce import parse_settings  # noqa: E402


def ms_per_input(guards, x, repeats: int) -> list[float]:
    """Each guard's median milliseconds per input, their calls interleaved."""
    times = [[] for _ in guards]
    for _ in range(repeats):
        for t, guard in zip(times, guards):
            start = time.perf_counter()
            guard(x)
            t.append(time.perf_counter() - start)
    return [1000 * statistics.median(t) / len(x) for t in times]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", nargs="+", required=True, help="<work>:<attack>-<seed>")
    ap.add_argument("--against", nargs="+", required=True, metavar="FIELD=VALUE",
                    help="the recalibrated guard's settings (last-stage fields)")
    ap.add_argument("--out", required=True, help="the JSON to write")
    ap.add_argument("--batch", type=int, nargs="+", default=[512], help="one or more batch sizes")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    args = ap.parse_args()
    against = parse_settings(args.against)
    torch.set_num_threads(1)
    rows = []
    for item in args.runs:
        work, run = item.split(":")
        model, meta = experiment.load_model(Path(work) / "models" / f"{run}.safetensors")
        saved = LinkBreaker.load(Path(work) / "guards" / f"{run}.safetensors", model)
        split = experiment.split_data(meta["dataset"], args.data, None, int(run.rsplit("-", 1)[1]))
        other = saved.recalibrate(split["x_val"], split["y_val"], **against)
        for batch in args.batch:
            x = split["x_test"][5000:5000 + batch]  # held-out half
            ms_saved, ms_other = ms_per_input([saved, other], x, args.repeats)
            rows.append({"dataset": meta["dataset"], "work": work, "run": run, "batch": len(x),
                         "ms_per_input_saved": round(ms_saved, 3), "ms_per_input_against": round(ms_other, 3),
                         "ratio": round(ms_saved / ms_other, 3)})
            print(json.dumps(rows[-1]), flush=True)
    out = {"device": f"cpu, 1 thread ({platform.processor() or platform.machine()})",
           "saved": "each run's saved guard (reproduce's default when it was measured)", "against": against,
           "command": "python scripts/setting_cost.py --runs " + " ".join(args.runs) + " --against "
           + " ".join(args.against) + f" --out {args.out} --batch {' '.join(map(str, args.batch))} --repeats {args.repeats}",
           "rows": rows}
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
