"""Shared rows change nothing but time: re-evaluate saved CIFAR-10 guards whose reports were made
before heads shared rows (N forwards per input) and compare the verdict metrics.

    python scripts/shared_rows_check.py --attacks badnets none --seed 1

Needs the cached models, guards and reports of ``linkbreaker reproduce`` under ``runs/cifar10``.
Writes ``results/shared-rows-check.json``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from linkbreaker_ext import experiment  # noqa: E402
from linkbreaker_ext.guard import LinkBreaker  # noqa: E402
from linkbreaker_ext.reproduce import SPLITS  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--attacks", nargs="+", default=["badnets", "none"])
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--data", default="../shared/data")
    p.add_argument("--work", default="runs/cifar10")
    p.add_argument("--out", default="results/shared-rows-check.json")
    args = p.parse_args()
    d = experiment.split_data("cifar10", args.data, None, args.seed)
    out = {"threads": torch.get_num_threads(), "runs": {}}
    for a in args.attacks:
        model, attack = experiment.model_for("cifar10", a, args.seed, d, args.work, progress=False)
        guard = LinkBreaker.load(Path(args.work) / "guards" / f"{a}-{args.seed}.safetensors", model)
        rep, _ = experiment.evaluate(model, guard, attack, d["x_test"], d["y_test"], 2000, 2000,
                                     args.seed, SPLITS["heldout"])
        old = json.loads((Path(args.work) / "reports" / f"heldout-{a}-{args.seed}.json").read_text())
        out["runs"][a] = {"rows_per_input": int(guard._hidden_masks()[1][0].numel()), "heads": guard.num_heads,
                          "after_identical": rep["after"] == old["after"],
                          "auroc_now": rep["auroc"], "auroc_before": old["auroc"],
                          "online_ms_per_sample_now": rep["timing"]["online_ms_per_sample"],
                          "online_ms_per_sample_before": old["timing"]["online_ms_per_sample"]}
        print(a, out["runs"][a])
    Path(args.out).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
