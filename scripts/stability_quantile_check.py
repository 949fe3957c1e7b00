"""Does the stability bound's quantile floor (``GuardConfig.stability_quantile``) change a saved
guard's bound? Recalibrates every saved guard of a data set with the given quantile and prints the
old and new bound, so that tables measured with the MAD rule alone are known to stand (or not)
without re-running them.

    python scripts/stability_quantile_check.py --dataset cifar10 --quantile 0.99
    # writes results/dev/stability-quantile-check-<dataset>.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from linkbreaker_ext import experiment  # noqa: E402
from linkbreaker_ext.guard import LinkBreaker  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--dataset", default="cifar10", choices=["mnist", "cifar10", "gtsrb"])
    p.add_argument("--quantile", type=float, default=0.99)
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    args = p.parse_args()
    torch.set_num_threads(1)
    work = ROOT / "runs" / args.dataset
    rows, splits = [], {}
    for path in sorted((work / "guards").glob("*-[0-9].safetensors")):
        name, seed = path.stem.rsplit("-", 1)
        model_path = work / "models" / f"{name}-{seed}.safetensors"
        if not model_path.is_file():
            continue
        model, _ = experiment.load_model(model_path)
        guard = LinkBreaker.load(path, model)
        if guard.stability is None:
            continue
        if seed not in splits:
            splits[seed] = experiment.split_data(args.dataset, args.data, None, int(seed))
        s = splits[seed]
        new = guard.recalibrate(s["x_val"], s["y_val"], stability_quantile=args.quantile)
        old_b, new_b = float(guard.stability["bound"]), float(new.stability["bound"])
        rows.append({"guard": path.stem, "mad_rule_bound": old_b, "bound": new_b,
                     "changed": abs(new_b - old_b) > 1e-6,
                     "old_quantile": guard.config.stability_quantile})
        print(f"{path.stem}: bound {old_b:.4f} -> {new_b:.4f}", flush=True)
    out = ROOT / "results" / "dev" / f"stability-quantile-check-{args.dataset}.json"
    out.write_text(json.dumps({"dataset": args.dataset, "quantile": args.quantile, "guards": rows},
                              indent=2))


if __name__ == "__main__":
    main()
