"""Out-of-distribution inputs (issue #7): images of another data set shown to a model, and how often
LinkBreaker and the input-level detectors flag them.

    python scripts/ood_cross.py --model-dataset cifar10 --ood-dataset gtsrb --attack badnets --seed 0

The model is ``<work>/models/<attack>-<seed>.safetensors`` (as ``linkbreaker reproduce`` caches it)
and the guard ``<work>/guards/<attack>-<seed>.safetensors`` when that file exists (the held-out run's
fitted guard), else a fresh fit with the defaults. Every detector fits on the same clean validation
split. In-distribution: ``--n`` clean inputs of the model's held-out test half (indices 5000-); OOD:
``--n`` test images of ``--ood-dataset`` (same image size and channels). Reported per method:

* the share of OOD inputs flagged at the method's own operating point (LinkBreaker: any verdict but
  accept; detectors: threshold at 1 % false rejection on held-out validation data), beside its clean
  flag rate there;
* the share flagged **at the clean flag rate** of LinkBreaker: each detector's threshold moved to
  flag the same share of the clean inputs as the guard does, so the rows compare at one false-alarm
  rate (a threshold read off the clean test inputs: a comparison, not an operating point);
* the AUROC of the continuous score, OOD against clean.

Writes ``results/baselines/ood-<model>-<ood>-<attack>-<seed>.json`` and prints a markdown table.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from linkbreaker_ext import LinkBreaker, data, experiment, metrics  # noqa: E402
from linkbreaker_ext.baselines import make_defense  # noqa: E402
from linkbreaker_ext.verdict import ACCEPT, ALARM, OOD, score_from_result  # noqa: E402

HELDOUT = slice(5000, None)


def rate(flags: torch.Tensor) -> float:
    return flags.float().mean().item() if len(flags) else float("nan")


def at_clean_rate(clean: torch.Tensor, other: torch.Tensor, clean_rate: float) -> float:
    """Share of ``other`` scoring above the threshold that flags ``clean_rate`` of ``clean``."""
    th = torch.quantile(clean.double(), 1.0 - clean_rate) if clean_rate > 0 else clean.max().double()
    return rate(other.double() > th)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model-dataset", default="cifar10")
    p.add_argument("--ood-dataset", default="gtsrb")
    p.add_argument("--attack", default="badnets")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", default="../shared/data")
    p.add_argument("--work", default=None)
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--detectors", nargs="*", default=["strip", "scale-up", "ibd-psc"])
    p.add_argument("--out", default="results/baselines")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.work or f"runs/{args.model_dataset}")
    num_classes = data.spec(args.model_dataset).num_classes

    split = experiment.split_data(args.model_dataset, args.data, None, args.seed)
    model, _ = experiment.load_model(work / "models" / f"{args.attack}-{args.seed}.safetensors")
    g = torch.Generator().manual_seed(20_000 + args.seed)
    x_in = split["x_test"][HELDOUT]
    x_in = x_in[torch.randperm(len(x_in), generator=g)[:args.n]]
    x_ood, _ = data.load_split(args.ood_dataset, "test", args.data)
    if x_ood.shape[1:] != x_in.shape[1:]:
        raise SystemExit(f"{args.ood_dataset} images are {tuple(x_ood.shape[1:])}, the model takes "
                         f"{tuple(x_in.shape[1:])}")
    x_ood = x_ood[torch.randperm(len(x_ood), generator=g)[:args.n]]

    guard_path = work / "guards" / f"{args.attack}-{args.seed}.safetensors"
    if guard_path.is_file():
        guard, guard_from = LinkBreaker.load(guard_path, model), str(guard_path)
    else:
        guard = LinkBreaker.fit(model, split["x_val"], split["y_val"], num_classes, progress=False,
                                seed=args.seed)
        guard_from = "fresh fit (defaults)"
    rc, ro = guard(x_in), guard(x_ood)
    lb_clean_rate = rate(rc.verdict != ACCEPT)
    rows = {"linkbreaker": {
        "clean_flagged": lb_clean_rate, "ood_flagged": rate(ro.verdict != ACCEPT),
        "ood_verdict_ood": rate(ro.verdict == OOD), "ood_verdict_alarm": rate(ro.verdict == ALARM),
        "clean_verdict_ood": rate(rc.verdict == OOD), "clean_verdict_alarm": rate(rc.verdict == ALARM),
        "ood_flagged_at_lb_clean_rate": rate(ro.verdict != ACCEPT),
        "auroc": metrics.auroc(score_from_result(rc), score_from_result(ro))}}
    for name in args.detectors:
        d = make_defense(name, seed=args.seed).fit(model, split["x_val"], split["y_val"], num_classes)
        sc, so = d.score(x_in).cpu(), d.score(x_ood).cpu()
        rows[name] = {"clean_flagged": rate(sc > d.threshold), "ood_flagged": rate(so > d.threshold),
                      "ood_flagged_at_lb_clean_rate": at_clean_rate(sc, so, lb_clean_rate),
                      "auroc": metrics.auroc(sc, so), "threshold": d.threshold}
    report = {"model_dataset": args.model_dataset, "ood_dataset": args.ood_dataset,
              "attack": args.attack, "seed": args.seed, "n_clean": len(x_in), "n_ood": len(x_ood),
              "guard": guard_from, "guard_config": {k: v for k, v in vars(guard.config).items()
                                                    if isinstance(v, (int, float, str, bool))},
              "methods": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"ood-{args.model_dataset}-{args.ood_dataset}-{args.attack}-{args.seed}.json"
    path.write_text(json.dumps(report, indent=2))
    print(f"{args.ood_dataset} test images shown to the {args.model_dataset} {args.attack} model "
          f"(seed {args.seed}): {len(x_ood)} OOD, {len(x_in)} clean held-out inputs. "
          f"`python scripts/ood_cross.py --model-dataset {args.model_dataset} --ood-dataset "
          f"{args.ood_dataset} --attack {args.attack} --seed {args.seed}`\n")
    print("| method | clean flagged | OOD flagged | OOD flagged at LinkBreaker's clean flag rate | AUROC |")
    print("| --- | --- | --- | --- | --- |")
    for name, r in rows.items():
        print(f"| {name} | {100 * r['clean_flagged']:.2f} | {100 * r['ood_flagged']:.2f} | "
              f"{100 * r['ood_flagged_at_lb_clean_rate']:.2f} | {r['auroc']:.4f} |")
    print(f"\n(wrote {path})")


if __name__ == "__main__":
    main()
