"""Dev study (issue #6): would a noisy neighbour of the input expose the triggers the consistency check
lets through (WaNet), and at what clean cost? Run before the stability test existed, to choose it.

For the **dev** half of the test split (indices 0-4999), ``--n`` clean and ``--n`` triggered inputs,
the saved guard's answers (hint reading) without the stability test, then a veto on top: the answer's log-odds
under the bare model must not fall from the input to its neighbour (the input plus one fixed
Gaussian pattern of std ``sigma``) by more than a bound set on the guard's own calibration split
(the samples the model labels correctly). Bounds: the calibration split's largest fall (``max``),
that plus ``m`` MADs (``max+m``), the median plus ``k`` MADs (``madk``), and the consistency
bounds' ``tail`` rule (the lower of ``mad4.25`` and ``max+0.75``). Reported: CDA and ASR after the
veto, the share of clean inputs vetoed, and of clean inputs the guard had right.

Writes ``results/dev/<dataset>/stability-<attack>-<seed>.json`` and prints one line per bound.

    python scripts/stability_study.py --attack wanet --seed 2
    python scripts/stability_study.py --table   # markdown summary of every saved study
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from linkbreaker_ext import experiment  # noqa: E402
from linkbreaker_ext.data import stratified_split  # noqa: E402
from linkbreaker_ext.guard import LinkBreaker  # noqa: E402
from linkbreaker_ext.verdict import log_odds  # noqa: E402

DEV = slice(0, 5000)


@torch.no_grad()
def class_log_odds(model, x, rows=500):
    p = torch.cat([model(x[i:i + rows]).softmax(1) for i in range(0, len(x), rows)])
    return log_odds(p)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--dataset", default="cifar10")
    p.add_argument("--attack", default="wanet")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", default="../shared/data")
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--sigmas", type=float, nargs="+", default=[0.01, 0.015, 0.02, 0.03])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--table", action="store_true", help="print a summary of the saved studies and stop")
    p.add_argument("--rules", nargs="+", default=["max", "max+1.5", "mad4.25", "tail"])
    args = p.parse_args()
    if args.table:
        print(table(ROOT / "results" / "dev" / args.dataset, args.rules))
        return
    torch.set_num_threads(args.threads)
    work = ROOT / "runs" / args.dataset
    split = experiment.split_data(args.dataset, args.data, None, args.seed)
    model, meta = experiment.load_model(work / "models" / f"{args.attack}-{args.seed}.safetensors")
    model.eval()
    attack = experiment.attacks.Attack.from_dict(meta["attack"]) if meta["attack"] else None
    guard = LinkBreaker.load(work / "guards" / f"{args.attack}-{args.seed}.safetensors", model)
    # the guard's answers without the stability test (a guard saved since has it: turned off here)
    guard.config = dataclasses.replace(guard.config, stability_noise=0.0)
    cal, _ = stratified_split(split["y_val"], guard.config.calibration_fraction, seed=guard.config.seed)
    x_cal, y_cal = split["x_val"][cal], split["y_val"][cal]
    xc, yc, xt, _, target = experiment.eval_sets(attack, split["x_test"], split["y_test"], args.n,
                                                 args.n, args.seed, DEV)
    answer_c, answer_t = guard(xc).labels, guard(xt).labels
    out = {"dataset": args.dataset, "attack": args.attack, "seed": args.seed, "n": args.n,
           "guard_config": {k: getattr(guard.config, k) for k in ("consistency_mad_k", "consistency_bound")},
           "cda_guard": (answer_c == yc).float().mean().item(),
           "asr_guard": (answer_t == target).float().mean().item(), "rows": []}
    print(json.dumps({k: out[k] for k in ("attack", "seed", "cda_guard", "asr_guard")}), flush=True)
    base = {"cal": class_log_odds(model, x_cal), "c": class_log_odds(model, xc), "t": class_log_odds(model, xt)}
    for sigma in args.sigmas:
        noise = torch.randn(xc.shape[1:], generator=torch.Generator().manual_seed(0)) * sigma
        near = {k: class_log_odds(model, (x + noise).clamp(0, 1))
                for k, x in (("cal", x_cal), ("c", xc), ("t", xt))}

        def fall(k, labels):
            i, labels = torch.arange(len(labels)), labels.clamp(min=0)
            return base[k][i, labels] - near[k][i, labels]

        right_cal = base["cal"].argmax(1) == y_cal
        d_cal = fall("cal", y_cal)[right_cal]
        d_c, d_t = fall("c", answer_c), fall("t", answer_t)
        med = d_cal.median()
        mad = 1.4826 * (d_cal - med).abs().median()
        top = d_cal.max()
        bounds = {"max": top, **{f"max+{m}": top + m * mad for m in (0.75, 1.5, 3)},
                  **{f"mad{k}": med + k * mad for k in (4.25, 6, 8)},
                  "tail": torch.minimum(med + 4.25 * mad, top + 0.75 * mad)}
        for rule, bound in bounds.items():
            veto_c = (answer_c >= 0) & (d_c > bound)
            veto_t = (answer_t >= 0) & (d_t > bound)
            row = {"sigma": sigma, "rule": rule, "bound": bound.item(),
                   "cda": (torch.where(veto_c, -1, answer_c) == yc).float().mean().item(),
                   "asr": (torch.where(veto_t, -1, answer_t) == target).float().mean().item(),
                   "clean_vetoed": veto_c.float().mean().item(),
                   "right_vetoed": (veto_c & (answer_c == yc)).float().mean().item()}
            out["rows"].append(row)
            print(json.dumps(row), flush=True)
    dest = ROOT / "results" / "dev" / args.dataset / f"stability-{args.attack}-{args.seed}.json"
    dest.write_text(json.dumps(out, indent=1) + "\n")
    print("wrote", dest)


def table(folder: Path, rules) -> str:
    """One row per saved study and noise level: CDA drop (points) / ASR (%) after the veto, per bound."""
    head = "| model | sigma | guard CDA / ASR | " + " | ".join(rules) + " |"
    lines = [head, "|" + " --- |" * (3 + len(rules))]
    for path in sorted(folder.glob("stability-*.json")):
        d = json.loads(path.read_text())
        for sigma in sorted({r["sigma"] for r in d["rows"]}):
            cells = []
            for rule in rules:
                r = next(r for r in d["rows"] if r["sigma"] == sigma and r["rule"] == rule)
                cells.append(f"{100 * (d['cda_guard'] - r['cda']):.2f} / {100 * r['asr']:.2f}")
            lines.append(f"| {d['attack']}-{d['seed']} | {sigma} | {100 * d['cda_guard']:.2f} / "
                         f"{100 * d['asr_guard']:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
