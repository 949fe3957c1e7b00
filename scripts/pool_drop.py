"""The CDA drop of a saved run over the *whole* clean pool of each half of the test split.

The tables measure the drop on a 2,000-input draw per run. A drop is a count of answers the guard
loses minus answers it gains (a few tens of inputs), so that draw carries about +-0.3 points of
sampling noise on its own; the whole pool (GTSRB: 5,000 dev and 7,630 held-out signs) shrinks it.
A measurement for reading the tables, not a design tool: nothing is chosen from it.

    python scripts/pool_drop.py --dataset gtsrb --run trojan-watermark-0 \
        --work runs/gtsrb-sgdbf16-e30-t2 --out results/gtsrb-sgdbf16-e30-retrain/pool-drop-trojan-watermark-0.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from linkbreaker_ext import experiment, metrics  # noqa: E402
from linkbreaker_ext.reproduce import SPLITS  # noqa: E402
from linkbreaker_ext.verdict import ALARM, OOD  # noqa: E402


def pool_drop(guard, model, x, y, batch: int = 512) -> dict:
    with torch.no_grad():
        bare = torch.cat([model(x[i:i + batch]).argmax(1) for i in range(0, len(x), batch)])
    r = guard(x)
    pairs = metrics.paired_drop(bare, r.labels, y)  # lost, gained, n and the drop's standard error
    return {"cda_bare": 100 * (bare == y).double().mean().item(),
            "cda_guard": 100 * (r.labels == y).double().mean().item(),
            "drop": 100 * (pairs["lost"] - pairs["gained"]) / pairs["n"], **pairs,
            "alarms": 100 * (r.verdict == ALARM).double().mean().item(),
            "ood": 100 * (r.verdict == OOD).double().mean().item()}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--dataset", default="gtsrb")
    p.add_argument("--run", default="trojan-watermark-0")
    p.add_argument("--work", required=True)
    p.add_argument("--data", default="../shared/data")
    p.add_argument("--out", required=True)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    split, model, _, guard, seed = experiment.saved_run(args.dataset, args.run, args.data, args.work)
    report = {"dataset": args.dataset, "run": args.run, "work": args.work, "seed": seed}
    for name, pool in SPLITS.items():
        report[name] = pool_drop(guard, model, split["x_test"][pool], split["y_test"][pool])
        print(name, json.dumps(report[name]), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
