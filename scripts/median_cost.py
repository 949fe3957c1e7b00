"""Online cost of the filtered neighbour (``stability_median=3``): the same saved guard with and
without it, timed on the same inputs.

The option adds one forward per input and head mask (the median-filtered copy) to the stability
test's neighbours, so a default with it pays that on every call. The two guards are timed in
alternation (one repeat of each, in turn) so that load on the machine falls on both alike.

    python scripts/median_cost.py --work runs/cifar10-sgdbf16-e80 --run trojan-square-0 --batches 1 64 256

Writes ``results/dev/filtered-neighbour/online-cost-<dataset>-<run>.json``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from linkbreaker_ext import LinkBreaker, experiment  # noqa: E402

OUT = ROOT / "results" / "dev" / "filtered-neighbour"


def timed(fn, x) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        fn(x)
    return 1e3 * (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default="runs/cifar10-sgdbf16-e80")
    ap.add_argument("--run", default="trojan-square-0")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64, 256])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    work, seed = Path(args.work), int(args.run.rsplit("-", 1)[1])
    model, meta = experiment.load_model(work / "models" / f"{args.run}.safetensors")
    guard = LinkBreaker.load(work / "guards" / f"{args.run}.safetensors", model)
    split = experiment.split_data(meta["dataset"], args.data, None, seed)
    median = guard.recalibrate(split["x_val"], split["y_val"], stability_median=3)
    ways = {"plain model": model, "default guard": guard.as_module(), "with stability_median=3": median.as_module()}
    copies = {name: fn.rows * fn._copies() for name, fn in ways.items() if name != "plain model"}
    rows = []
    for b in args.batches:
        x = split["x_test"][:b]
        for fn in ways.values():  # warm-up
            timed(fn, x)
        times = {name: [] for name in ways}
        for _ in range(args.repeats):
            for name, fn in ways.items():
                times[name].append(timed(fn, x))
        ms = {name: statistics.median(t) for name, t in times.items()}
        rows.append({"batch": b, "ms_per_batch": {k: round(v, 3) for k, v in ms.items()},
                     "median_vs_default": round(ms["with stability_median=3"] / ms["default guard"], 3),
                     "default_vs_plain": round(ms["default guard"] / ms["plain model"], 3)})
        print(json.dumps(rows[-1]), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cmd = "python scripts/median_cost.py " + " ".join(sys.argv[1:])
    path = out / f"online-cost-{meta['dataset']}-{args.run}.json"
    path.write_text(json.dumps({"command": cmd, "threads": args.threads, "repeats": args.repeats,
                                "forwards_per_input": copies,
                                "rows": rows}, indent=1) + "\n")
    print("wrote", path)


if __name__ == "__main__":
    main()
