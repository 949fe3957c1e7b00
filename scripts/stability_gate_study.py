"""Dev study (issue #6): should the stability test judge only heads whose neurons are near their bounds?

The neighbour stability test costs GTSRB 0.3-0.8 points of clean accuracy on the dev halves and
catches nothing there: noise flips the answers of some clean signs (dark, low-contrast ones) whatever
their neurons. The warp it is there for (WaNet) also moves the neurons: the target heads it turns
away sit at 0.65-0.99 of their consistency bounds, the clean heads it refuses at 0.3-0.7. A gate
lets the test judge only a head whose consistency ratio exceeds the q-quantile of the validation
pool's confident, consistent samples' ratios (the pool of today's bounds: the whole validation set,
the fit split out of fold). This script re-decides the cached dev forwards of
:mod:`calibration_size` (run it first: ``<work>/dev/<run>-calsize.safetensors``) with today's bounds,
stability test and alarm margin, at every gate quantile, through
:func:`linkbreaker_ext.verdict.gated` and :func:`linkbreaker_ext.verdict.decide` themselves, and
reports CDA (hint reading) and ASR per model and their means.

    python scripts/stability_gate_study.py --work runs/gtsrb-sgdbf16-e30 runs/cifar10-sgdbf16-e80 runs/cifar10 runs/mnist

The caches of session 33 were made by ``python scripts/calibration_size.py --dataset <d> --work <work>
--runs <run> ...`` for GTSRB's nine SGD models, the 80-epoch CIFAR-10 BadNets-0, clean-0 and
Trojan-square 0-2, the 15-epoch WaNet, noise-trained WaNet (seeds 0-2) and source-specific-0, and
MNIST's seed-0 models.

Writes ``results/dev/stability-gate/<work name>.json`` and ``summary.md`` beside them.
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
from linkbreaker_ext.config import GuardConfig  # noqa: E402
from linkbreaker_ext.verdict import combined_ratio, decide, gated  # noqa: E402

QUANTILES = (None, 0.5, 0.75, 0.9, 0.95)
OUT = ROOT / "results" / "dev" / "stability-gate"


def key(q) -> str:
    return "off" if q is None else f"{q:g}"


def study(path: Path) -> dict:
    """CDA / ASR (%) of one cached run at every gate quantile, and the gate's value."""
    s = Study(path)
    c, m = s.c, s.meta
    b = s.default_bounds()
    dev, y, keep = s.pool("cal", "fit out of fold")
    own = (dev / b)[torch.arange(len(y)), y].amax(-1)
    own = own[keep & (own <= 1)]
    margin = GuardConfig().alarm_margin
    target = int(c["target"])
    rows = {}
    for q in QUANTILES:
        gate = None if q is None else torch.quantile(own.float(), q)
        labels = {}
        for k in ("c", "t"):
            cons = (c[f"dev_{k}"] / b).amax(-1)
            ratio = combined_ratio(cons, gated(c[f"stab_{k}"], cons, gate))
            labels[k] = decide(c[f"conf_{k}"], c["thresholds"], ratio, m["inconsistent_verdict"],
                               m["ood_hint"], margin)[0]
        rows[key(q)] = {"gate": None if gate is None else round(gate.item(), 4),
                        "cda": round(100 * (labels["c"] == c["y_c"]).double().mean().item(), 3),
                        "asr": round(100 * (labels["t"] == target).double().mean().item(), 3)}
    return {"run": path.name.removesuffix("-calsize.safetensors"), "n_clean": len(c["y_c"]),
            "n_trigger": len(c["y_t"]), "quantiles": rows}


def summary(results: dict) -> str:
    keys = [key(q) for q in QUANTILES]
    lines = ["# Gating the stability test (dev halves)", "",
             "Made by `python scripts/stability_gate_study.py --work ...` from the cached dev forwards of "
             "`scripts/calibration_size.py`. CDA (hint reading) / ASR in %, with the stability test judging "
             "every head (*off*, the rule until session 33) or only heads whose consistency ratio exceeds the "
             "q-quantile of the validation pool's confident, consistent samples' ratios (the gate's value in "
             "brackets).", "",
             "| work | run | " + " | ".join(f"gate {k}" for k in keys) + " |", "| --- " * (2 + len(keys)) + "|"]
    for work, runs in results.items():
        for r in runs:
            cells = []
            for k in keys:
                row = r["quantiles"][k]
                cells.append(f"{row['cda']:.2f} / {row['asr']:.2f}"
                             + ("" if row["gate"] is None else f" ({row['gate']:.2f})"))
            lines.append(f"| {work} | {r['run']} | " + " | ".join(cells) + " |")
        mean = [f"{sum(r['quantiles'][k]['cda'] for r in runs) / len(runs):.3f} / "
                f"{sum(r['quantiles'][k]['asr'] for r in runs) / len(runs):.3f}" for k in keys]
        lines.append(f"| {work} | **mean of {len(runs)}** | " + " | ".join(mean) + " |")
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
            print(work.name, r["run"], {k: (v["cda"], v["asr"]) for k, v in r["quantiles"].items()})
    (OUT / "summary.md").write_text(summary(results))
    print(OUT / "summary.md")


if __name__ == "__main__":
    main()
