"""The dev-half table behind the consistency bound's default (``consistency_mad_k``) and verdict
(``inconsistent_verdict``): one row per (data set, attack, k, verdict) from the JSONs that

    python scripts/dev_sweep.py --dataset D --attack A --seed 0 --guard runs/D/guards-k3-ood/A-0.safetensors \\
        --sweep-k 3 4 5 6 8 10 12 16 --n 2000 --tag ksweep

wrote to ``runs/D/dev/A-0-ksweep.json``. Copies those JSONs to ``results/dev/D/`` and writes
``results/dev/consistency-bound.md``.

    python scripts/bound_table.py

``--operating-points``: the CDA drop / ASR of every dev model at bounds k = 4 ... 5 (pooled center),
from the JSONs of ``dev_sweep.py ... --sweep-k 4 4.25 4.5 4.75 5 --bound-centers pooled --n 1000
--tag kfine`` (``runs/D/dev/A-0-kfine.json``); writes ``results/dev/k-operating-points.md``.

``--centers``: the table behind ``consistency_center`` and the threshold spread from the JSONs of

    python scripts/dev_sweep.py --dataset D --attack A --seed 0 --guard runs/D/guards/A-0.safetensors \
        --sweep-k 4 5 6 --bound-centers class pooled shrunk --threshold-spreads --n 1000 --tag bounds

(``runs/D/dev/A-0-bounds.json``), copied to ``results/dev/D/``; writes ``results/dev/bound-centers.md``.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def pct(x: float) -> str:
    return f"{100 * x:.2f}"


def collect(dataset: str, path: Path) -> dict:
    """A dev-sweep JSON, copied to ``results/dev/<dataset>/`` (the committed record behind a table)."""
    dest = ROOT / "results" / "dev" / dataset / path.name
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(path, dest)
    return json.loads(path.read_text())


def centers():
    lines = ["# Where the per-layer bounds sit: each class's median or the pooled one (dev half, seed 0)", "",
             "Each row: a saved guard (the default settings) on 1,000 clean and 1,000 triggered inputs of the "
             "**dev** half of the test split, its per-layer consistency bounds recalibrated from the "
             "calibration split's deviations at `median + k * 1.4826 * MAD` (MAD pooled over classes, "
             "as fitted) with the median taken per class (`class`, the fit's default), over all classes "
             "(`pooled`) or per class shrunk towards the pooled one by 10 pseudo-samples (`shrunk`). "
             "The deviations are first divided by each class's typical fit-split deviation, which the "
             "fitted bounds had folded in. Verdict: alarm (the default). *thresholds pooled*: the "
             "paper's confidence thresholds with the MAD of the log-odds pooled over classes, bounds as "
             "fitted. *CDA drop*: undefended minus guarded CDA (hint reading), points. Made by "
             "`python scripts/bound_table.py --centers`.", "",
             "| data set | attack | rule | k | CDA drop | ASR | ASR, accepted only | clean alarms | clean OOD |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for dataset in ("mnist", "cifar10", "gtsrb"):
        for path in sorted((ROOT / "runs" / dataset / "dev").glob("*-0-bounds.json")):
            rep = collect(dataset, path)
            attack = path.name.split("-0-bounds")[0]
            base = rep["before"]["cda"]

            def row(rule, k, a):
                return (f"| {dataset} | {attack} | {rule} | {k} | {100 * (base - a['cda']):.2f} | "
                        f"{pct(a['asr'])} | {pct(a['asr_strict'])} | {pct(a['alarm_rate_clean'])} | "
                        f"{pct(a['ood_rate_clean'])} |")
            for key, verdicts in rep["sweep_k"].items():
                k, _, rule = key.partition("-")
                lines.append(row(rule or "class", f"{float(k):g}", verdicts["alarm"]))
            for spread, a in rep.get("threshold_spreads", {}).items():
                if spread == "pooled":
                    lines.append(row("thresholds pooled", "5", a))
            lines.append(row("no check", "-", rep["after_without_consistency"]))
    out = ROOT / "results" / "dev" / "bound-centers.md"
    out.write_text("\n".join(lines) + "\n")
    print(out.read_text())


def main():
    lines = ["# Choosing the consistency bound (dev half, seed 0)", "",
             "Each row: a fitted guard (k enters only its bounds, so the k it was fitted with does not "
             "matter), measured on 2,000 clean and 2,000 "
             "triggered inputs of the **dev** half of the test split (indices 0-4999), with the bound "
             "moved to `median + k * 1.4826 * MAD` of the calibration split's log deviations and both "
             "verdicts for a confident but inconsistent top head. A bound changes only a comparison, so "
             "all rows of one model come from the same forward passes (`scripts/dev_sweep.py --sweep-k`). "
             "*CDA drop*: undefended minus guarded CDA on the same clean inputs (hint reading), in points. "
             "*no check*: the paper's confidence test alone. The trojan-square rows were measured "
             "after the choice, so they did not inform it. Rows with *reduce = mean* judge "
             "the same guards with the layers' deviations averaged instead of their maximum "
             "(`dev_sweep.py --reduce mean`, files `*-ksweep-mean.json`).", "",
             "| data set | attack | reduce | k | verdict | CDA drop | ASR | ASR, accepted only | clean alarms | "
             "trigger alarms | trigger OOD |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for dataset in ("cifar10", "mnist"):
        paths = [(p, "max") for p in sorted((ROOT / "runs" / dataset / "dev").glob("*-0-ksweep.json"))]
        paths += [(p, "mean") for p in sorted((ROOT / "runs" / dataset / "dev").glob("*-0-ksweep-mean.json"))]
        for path, reduce in paths:
            rep = collect(dataset, path)
            attack = path.name.split("-0-ksweep")[0]
            base = rep["before"]["cda"]

            def row(k, verdict, a):
                return (f"| {dataset} | {attack} | {reduce} | {k} | {verdict} | {100 * (base - a['cda']):.2f} | "
                        f"{pct(a['asr'])} | {pct(a['asr_strict'])} | {pct(a['alarm_rate_clean'])} | "
                        f"{pct(a['alarm_rate_trigger'])} | {pct(a['ood_rate_trigger'])} |")
            for k, verdicts in rep["sweep_k"].items():
                for verdict in ("alarm", "ood"):
                    lines.append(row(f"{float(k):g}", verdict, verdicts[verdict]))
            lines.append(row("-", "no check", rep["after_without_consistency"]))
    out = ROOT / "results" / "dev" / "consistency-bound.md"
    out.write_text("\n".join(lines) + "\n")
    print(out.read_text())


def operating_points():
    from linkbreaker_ext.reproduce import TARGETS

    ks = None
    body = []
    for dataset in ("mnist", "cifar10", "gtsrb"):
        for path in sorted((ROOT / "runs" / dataset / "dev").glob("*-0-kfine.json")):
            rep = collect(dataset, path)
            attack = path.name.split("-0-kfine")[0]
            base = rep["before"]["cda"]
            sweep = {float(k.split("-")[0]): v["alarm"] for k, v in rep["sweep_k"].items()}
            ks = ks or sorted(sweep)
            drop, asr = TARGETS.get((dataset, attack), (None, None))
            target = "-" if drop is None else f"drop <= {drop:g}" + ("" if asr is None else f", ASR <= {asr:g}")
            cells = [f"{100 * (base - sweep[k]['cda']):.2f} / {pct(sweep[k]['asr'])}" for k in ks]
            body.append(f"| {dataset} | {attack} | {target} | " + " | ".join(cells) + " |")
    lines = ["# Operating points of the consistency bound (dev half, seed 0)", "",
             "Each cell: CDA drop (points, hint reading) / ASR (%) of a saved guard on 1,000 clean and "
             "1,000 triggered inputs of the **dev** half of the test split, its per-layer bounds "
             "recalibrated at `median + k * 1.4826 * MAD` (pooled center, the default) from the "
             "calibration split; every column of a row comes from the same forward passes. k = 5 was "
             "the default of this rule (docs/method.md, \"Choosing the bound\"; the default is now the "
             "`tail` rule, `results/dev/bound-rules.md`); `guard.recalibrate(x_val, y_val, "
             "consistency_bound='mad', consistency_mad_k=k)` moves a fitted guard to another column. Made by "
             "`python scripts/bound_table.py --operating-points`.", "",
             "| data set | attack | target (issue #6) | " + " | ".join(f"k = {k:g}" for k in ks or []) + " |",
             "| --- | --- | --- | " + " | ".join("---" for _ in ks or []) + " |", *body]
    out = ROOT / "results" / "dev" / "k-operating-points.md"
    out.write_text("\n".join(lines) + "\n")
    print(out.read_text())


if __name__ == "__main__":
    import sys
    sys.path.insert(0, str(ROOT))
    if "--centers" in sys.argv[1:]:
        centers()
    elif "--operating-points" in sys.argv[1:]:
        operating_points()
    else:
        main()
