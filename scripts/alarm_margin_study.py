"""Dev study (issue #6): should a nearly confident head that nothing supports raise the alarm?

On GTSRB's watermark model (seed 0, SGD recipe) more than half of the triggered dev signs that got
through did so as an OOD verdict whose hint was the target: no head consistent with its class, the
target head a fraction of a log-odds under its class's confidence threshold (which the paper's MAD
rule sets from 3-4 calibration signs of that class), and the hint falling back to the head nearest
its bounds, the target. ``alarm_margin`` turns such an input into the trigger alarm when a head
comes within that many log-odds of its threshold. This script re-decides the cached dev forwards of
:mod:`calibration_size` (run it first: ``<work>/dev/<run>-calsize.safetensors``) with today's bounds
and every margin, through :func:`linkbreaker_ext.verdict.decide` itself, and reports CDA (hint
reading) and ASR per model and their means.

    python scripts/alarm_margin_study.py --work runs/gtsrb-sgdbf16-e30 runs/cifar10-sgdbf16-e80 runs/mnist

Writes ``results/dev/alarm-margin/<work name>.json`` and ``summary.md`` beside them.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
from calibration_size import Study, cached_forwards, studies_by_work  # noqa: E402
from linkbreaker_ext.verdict import combined_ratio, decide  # noqa: E402

MARGINS = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 5.0)
OUT = ROOT / "results" / "dev" / "alarm-margin"


def study(path: Path) -> dict:
    """CDA / ASR (%) of one cached run at every margin, with the default bounds (whole validation
    set, out of fold, quantile floor) and the stability test."""
    s = Study(path)
    c, m = s.c, s.meta
    b = s.default_bounds()
    ratio = {k: combined_ratio((c[f"dev_{k}"] / b).amax(-1), c[f"stab_{k}"]) for k in ("c", "t")}
    target = int(c["target"])
    rows = {}
    for margin in MARGINS:
        labels = {k: decide(c[f"conf_{k}"], c["thresholds"], ratio[k], m["inconsistent_verdict"],
                            m["ood_hint"], margin)[0] for k in ("c", "t")}
        rows[f"{margin:g}"] = {"cda": round(100 * (labels["c"] == c["y_c"]).double().mean().item(), 3),
                               "asr": round(100 * (labels["t"] == target).double().mean().item(), 3)}
    no_consistent = {k: int((~(ratio[k] <= 1).any(1)).sum()) for k in ("c", "t")}
    return {"run": path.name.removesuffix("-calsize.safetensors"), "n_clean": len(c["y_c"]),
            "n_trigger": len(c["y_t"]), "no_consistent_head": no_consistent, "margins": rows}


def summary(results: dict) -> str:
    lines = ["# A nearly confident head that nothing supports: the alarm margin (dev halves)", "",
             "Made by `python scripts/alarm_margin_study.py --work ...` from the cached dev forwards of "
             "`scripts/calibration_size.py`. CDA (hint reading) / ASR in %, per margin in log-odds "
             "(0: only a confident head raises the alarm, the rule until session 32). *no consistent "
             "head*: clean / triggered dev inputs whose every head fails its bounds or the stability test, "
             "the only inputs a margin can move.", "",
             "| work | run | no consistent head | " + " | ".join(f"margin {mg:g}" for mg in MARGINS) + " |",
             "| --- " * (3 + len(MARGINS)) + "|"]
    for work, runs in results.items():
        for r in runs:
            cells = [f"{r['margins'][f'{mg:g}']['cda']:.2f} / {r['margins'][f'{mg:g}']['asr']:.2f}" for mg in MARGINS]
            nc = r["no_consistent_head"]
            lines.append(f"| {work} | {r['run']} | {nc['c']} / {nc['t']} | " + " | ".join(cells) + " |")
        mean = [f"{sum(r['margins'][f'{mg:g}']['cda'] for r in runs) / len(runs):.3f} / "
                f"{sum(r['margins'][f'{mg:g}']['asr'] for r in runs) / len(runs):.3f}" for mg in MARGINS]
        lines.append(f"| {work} | **mean of {len(runs)}** | | " + " | ".join(mean) + " |")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", nargs="+", required=True, help="work folders with dev/*-calsize.safetensors")
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    for work in map(Path, args.work):
        runs = [study(p) for p in cached_forwards(work)]
        results = studies_by_work(OUT, work, runs)
        for r in runs:
            print(work.name, r["run"], r["margins"]["0"], "->", r["margins"]["1.5"])
    (OUT / "summary.md").write_text(summary(results))
    print(OUT / "summary.md")


if __name__ == "__main__":
    main()
