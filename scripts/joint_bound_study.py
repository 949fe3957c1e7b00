"""Dev study (issue #6): a bound on the evidences together, beside each evidence's own bound.

The triggered GTSRB watermark signs that today's guard accepts outright (seed 0, SGD recipe: 2.0 % of
the dev half) pass every evidence's bound, but sit high on several at once: their mean ratio over
the ten evidences is 0.44-0.54 (10th-90th percentile), where the clean signs the guard accepts
rightly stay under 0.33 at their 99th percentile. This script asks whether one more bound, on the
mean of a head's per-evidence ratios, catches them without refusing clean inputs elsewhere. The
joint bound is a quantile (``--quantiles``; 1 = the largest) of that mean over the validation
pool's confident samples that pass every evidence (the whole validation set, the fit split out of
fold: the pool of today's per-evidence bounds), and a head is then consistent only when both hold.
It re-decides the cached dev forwards of :mod:`calibration_size` (run it first) through
:func:`linkbreaker_ext.verdict.decide` with today's bounds, stability test and alarm margin.

    python scripts/joint_bound_study.py --work runs/gtsrb-sgdbf16-e30 runs/cifar10-sgdbf16-e80 runs/cifar10 runs/mnist

Writes ``results/dev/joint-bound/summary.json`` and ``summary.md``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
from calibration_size import Study, cached_forwards  # noqa: E402
from linkbreaker_ext.config import GuardConfig  # noqa: E402
from linkbreaker_ext.verdict import combined_ratio, decide  # noqa: E402

OUT = ROOT / "results" / "dev" / "joint-bound"


def study(path: Path, quantiles) -> dict:
    s = Study(path)
    c, m = s.c, s.meta
    dev, y, keep = s.pool("cal", "fit out of fold")
    b = s.default_bounds()
    own = (dev / b)[torch.arange(len(y)), y]  # [n, L] the pool's own-class ratios
    passing = own[keep & (own.amax(-1) <= 1)].mean(-1)
    margin = GuardConfig().alarm_margin
    rows = {}
    for q in (None, *quantiles):
        joint = None if q is None else passing.quantile(q)
        labels = {}
        for k in ("c", "t"):
            r = c[f"dev_{k}"] / b
            veto = r.amax(-1) if joint is None else torch.maximum(r.amax(-1), r.mean(-1) / joint)
            labels[k] = decide(c[f"conf_{k}"], c["thresholds"], combined_ratio(veto, c[f"stab_{k}"]),
                               m["inconsistent_verdict"], m["ood_hint"], margin)[0]
        rows["none" if q is None else f"{q:g}"] = {
            "joint_bound": None if joint is None else round(joint.item(), 4),
            "cda": round(100 * (labels["c"] == c["y_c"]).double().mean().item(), 3),
            "asr": round(100 * (labels["t"] == int(c["target"])).double().mean().item(), 3)}
    return {"run": path.name.removesuffix("-calsize.safetensors"), "rows": rows}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", nargs="+", required=True)
    ap.add_argument("--quantiles", nargs="+", type=float, default=[0.995, 0.999, 1.0])
    args = ap.parse_args()
    results = {}
    for work in map(Path, args.work):
        results[str(work)] = [study(p, args.quantiles) for p in cached_forwards(work)]
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "summary.json").write_text(json.dumps({"command": "python scripts/joint_bound_study.py --work "
                                                  + " ".join(args.work), "results": results}, indent=1) + "\n")
    keys = ["none"] + [f"{q:g}" for q in args.quantiles]
    lines = ["# A joint bound on the mean of the per-evidence ratios (dev halves)", "",
             "Made by `python scripts/joint_bound_study.py --work " + " ".join(args.work) + "`. CDA (hint "
             "reading) / ASR in %, today's default without (*none*) and with a joint bound at each quantile "
             "of the passing pool's mean ratio.", "",
             "| work | run | " + " | ".join(keys) + " |", "| --- " * (2 + len(keys)) + "|"]
    for work, runs in results.items():
        for r in runs:
            lines.append(f"| {work} | {r['run']} | " + " | ".join(
                f"{r['rows'][k]['cda']:.2f} / {r['rows'][k]['asr']:.2f}" for k in keys) + " |")
        lines.append(f"| {work} | **mean of {len(runs)}** | " + " | ".join(
            f"{sum(r['rows'][k]['cda'] for r in runs) / len(runs):.3f} / "
            f"{sum(r['rows'][k]['asr'] for r in runs) / len(runs):.3f}" for k in keys) + " |")
    (OUT / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
