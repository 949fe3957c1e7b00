"""Issue #9's scale check: one ``guard(x)`` call on 100,000 MNIST inputs on the CPU, and the peak
memory it adds over the inputs themselves, against a call on 10,000 (bounded: the heads run in
chunks of ``GuardConfig.batch_rows`` rows).

    python scripts/memory_scale.py          # writes results/memory-scale.json

The model and guard are the held-out run's (``runs/mnist/models/badnets-0.safetensors``,
``runs/mnist/guards/badnets-0.safetensors``). Memory is the process's resident set size, sampled
every 5 ms by a thread during the call; "added" is its peak minus its value just before the call
(the input tensor already allocated).
"""
from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from linkbreaker_ext import LinkBreaker, experiment  # noqa: E402


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def peak_during(fn):
    """``(result, peak RSS added during fn, seconds)``."""
    base, peak, done = rss_bytes(), [0], threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], rss_bytes())
            time.sleep(0.005)
    t = threading.Thread(target=watch, daemon=True)
    t.start()
    start = time.perf_counter()
    out = fn()
    wall = time.perf_counter() - start
    done.set()
    t.join()
    return out, max(peak[0], rss_bytes()) - base, wall


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default="../shared/data")
    p.add_argument("--work", default="runs/mnist")
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    p.add_argument("--out", default="results/memory-scale.json")
    args = p.parse_args()
    torch.set_num_threads(1)
    work = Path(args.work)
    model, _ = experiment.load_model(work / "models" / "badnets-0.safetensors")
    guard = LinkBreaker.load(work / "guards" / "badnets-0.safetensors", model)
    d = experiment.split_data("mnist", args.data, None, 0)
    pool = torch.cat([d["x_train"], d["x_test"]])
    rows = []
    for n in args.sizes:
        x = pool.repeat((n + len(pool) - 1) // len(pool), 1, 1, 1)[:n].contiguous()
        r, added, wall = peak_during(lambda: guard(x))
        rows.append({"inputs": n, "input_mib": x.numel() * 4 / 2**20, "peak_added_mib": added / 2**20,
                     "wall_s": wall, "accepted": float((r.verdict == 0).float().mean()),
                     "batch_rows": guard._batch_rows()})
        print(f"{n:>7} inputs ({rows[-1]['input_mib']:.0f} MiB): peak added {rows[-1]['peak_added_mib']:.1f} MiB, "
              f"{wall:.1f} s", flush=True)
        del x, r
    Path(args.out).write_text(json.dumps({"command": "python scripts/memory_scale.py", "device": "cpu",
                                          "threads": 1, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
