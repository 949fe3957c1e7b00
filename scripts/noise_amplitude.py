"""The paper's Fig. 10 (Sec. VI-A): CDA and ASR after the guard as the fill noise amplitude grows.

    python scripts/noise_amplitude.py --dataset mnist --attack badnets --seed 0 --amplitudes 0 0.5 1 2 4
    python scripts/noise_amplitude.py --dataset cifar10 --attack badnets --amplitudes 0 0.5 1 2 \
        --work runs/cifar10-sgdbf16-e80 --epochs 80 --recipe sgd-bf16 --results results/cifar10-sgdbf16-e80

Each amplitude is one held-out run of ``linkbreaker reproduce`` with ``--set noise_amplitude=A
--tag noise<A>`` (amplitude 0 is the default guard, untagged), so the per-run JSONs are the
reproduction's and are cached the same way (``<work>/reports``, copied to ``<results>/runs/``). The
figure and a JSON summary go to ``results/figures/<dataset>-<attack>-<seed>-noise[-<work>].{png,json}``
(the work folder's name is added when ``--work`` names one: another model's curve).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from linkbreaker_ext import plots, reproduce  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", default="mnist")
    p.add_argument("--attack", default="badnets")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--amplitudes", type=float, nargs="+", default=[0.0, 0.5, 1.0, 2.0, 4.0])
    p.add_argument("--data", default="../shared/data")
    p.add_argument("--work", default=None, help="models and guards cache (default: runs/<dataset>)")
    p.add_argument("--epochs", type=int, default=None, help="as for reproduce: the cached models' epochs")
    p.add_argument("--recipe", default="adam", help="as for reproduce: the cached models' training recipe")
    p.add_argument("--results", default="results", help="the per-run JSONs go to <results>/runs/<dataset>/")
    p.add_argument("--out", default="results/figures")
    args = p.parse_args()
    if any(a < 0 for a in args.amplitudes):
        p.error("--amplitudes must be >= 0")
    work = Path(args.work or f"runs/{args.dataset}")
    rows = []
    for amp in args.amplitudes:
        tag = None if amp == 0 else f"noise{amp:g}"
        settings = {} if amp == 0 else {"noise_amplitude": amp}
        rep = reproduce.run_one(args.dataset, args.attack, args.seed, data_source=args.data, work=work,
                                settings=settings, tag=tag, epochs=args.epochs, recipe=args.recipe)
        name = reproduce.report_name("heldout", args.attack, args.seed, tag)
        runs = Path(args.results) / "runs" / args.dataset
        runs.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(work / "reports" / f"{name}.json", runs / f"{name}.json")
        a = rep["after"]
        rows.append({"amplitude": amp, "report": str(runs / f"{name}.json"),
                     "cda_before": rep["before"]["cda"], "asr_before": rep["before"]["asr"],
                     "cda": a["cda"], "asr": a["asr"], "cda_strict": a["cda_strict"],
                     "asr_strict": a["asr_strict"]})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{args.dataset}-{args.attack}-{args.seed}-noise{'-' + work.name if args.work else ''}"
    cmd = (f"python scripts/noise_amplitude.py --dataset {args.dataset} --attack {args.attack} "
           f"--seed {args.seed} --amplitudes {' '.join(f'{a:g}' for a in args.amplitudes)}")
    if args.work:
        cmd += (f" --work {args.work}" + (f" --epochs {args.epochs}" if args.epochs else "")
                + f" --recipe {args.recipe} --results {args.results}")
    stem.with_name(stem.name + ".json").write_text(json.dumps({"command": cmd, "rows": rows}, indent=2))
    plots.percent_curves(rows, "amplitude", [("cda", "CDA after (hint)"),
                                             ("cda_strict", "CDA after (accepted only)"),
                                             ("asr", "ASR after (hint)"), ("asr_strict", "ASR after (accepted only)")],
                         "fill noise amplitude (x class-pooled std)",
                         f"{args.dataset} {args.attack}, seed {args.seed}", stem.with_name(stem.name + ".png"))
    print(f"`{cmd}`\n")
    print("| noise amplitude | CDA after (hint / accepted only) | ASR after (hint / accepted only) |")
    print("| --- | --- | --- |")
    for r in rows:
        print(f"| {r['amplitude']:g} | {100 * r['cda']:.2f} / {100 * r['cda_strict']:.2f} | "
              f"{100 * r['asr']:.2f} / {100 * r['asr_strict']:.2f} |")


if __name__ == "__main__":
    main()
