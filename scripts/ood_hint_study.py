"""Dev study (issue #6): should an out-of-distribution verdict carry a label hint when none of the
heads is consistent with its class?

The OOD verdict carries the most confident head among those consistent with their class (the
paper's Fig. 9 hint, restricted); when no head is consistent it falls back to the most confident
head overall. On GTSRB every held-out ASR miss is such a fallback: triggered signs whose target head
fails its (per-class, few-sample) confidence threshold and every consistency bound, so the verdict
is OOD and the hint is the target. This study re-decides the saved guards' answers on the dev half
(no refit, one forward per input) with the fallback and without it (no hint: the input is refused),
and with the hint moved to the head nearest to consistency, and reports CDA and ASR under the hint
reading for each.

    python scripts/ood_hint_study.py --dataset gtsrb --runs badnets-0 none-0
    python scripts/ood_hint_study.py --dataset gtsrb --runs trojan-watermark-0 --work runs/gtsrb-sgdbf16-e30
    # writes results/dev/ood-hint/<dataset>-<run>.json and prints one line per run
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
from linkbreaker_ext import experiment, metrics  # noqa: E402
from linkbreaker_ext.verdict import OOD  # noqa: E402

DEV = slice(0, 5000)


def no_consistent_head(r) -> torch.Tensor:
    """``[B]``: an OOD verdict none of whose heads is consistent (the vote's fallback hint)."""
    return (r.verdict == OOD) & ~(r.credibility <= 1).any(1)


def without_fallback(r):
    """``r`` with the fallback hint removed (label -1: the input is refused outright)."""
    return dataclasses.replace(r, labels=r.labels.masked_fill(no_consistent_head(r), -1))


def fallback_detail(r, label):
    """Where the fallback hint (the most confident head) was ``label`` (the target on triggered
    inputs, the true class on clean ones): quantiles of that head's veto ratio and confidence."""
    sel = no_consistent_head(r)
    label = torch.as_tensor(label).expand(len(r.labels))
    sel = sel & (r.labels == label)
    rows = torch.nonzero(sel).flatten()
    q = torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0])
    if not len(rows):
        return {"n": 0}
    ratio = r.credibility[rows, label[rows]].float()
    conf = r.confidences[rows, label[rows]].float()
    return {"n": len(rows), "quantiles": q.tolist(), "ratio": ratio.quantile(q).tolist(),
            "confidence": conf.quantile(q).tolist()}


def with_hint(r, verdict, ood_hint):
    """``r`` decided again with the guard's own vetoes and verdict and ``ood_hint`` ("confident":
    the most confident head; "nearest": the head nearest to consistency, the smallest veto ratio)."""
    return experiment.redecided(r, r.credibility, verdict, ood_hint)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--dataset", default="gtsrb")
    p.add_argument("--runs", nargs="+", required=True, help="<attack>-<seed> under the work folder")
    p.add_argument("--guards", default="guards", help="folder of saved guards under the work folder")
    p.add_argument("--work", help="models and guards cache (default: runs/<dataset>); another one names "
                                  "the JSON after it")
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    args = p.parse_args()
    torch.set_num_threads(1)
    work = Path(args.work) if args.work else ROOT / "runs" / args.dataset
    suffix = ("" if args.guards == "guards" else "-" + args.guards) + (f"-{work.name}" if args.work else "")
    for run in args.runs:
        split, _, attack, guard, seed = experiment.saved_run(args.dataset, run, args.data, work, args.guards)
        xc, yc, xt, yt, target = experiment.eval_sets(attack, split["x_test"], split["y_test"], args.n,
                                                      args.n, seed, DEV)
        verdict = guard.config.inconsistent_verdict
        rc, rt = (with_hint(guard(x), verdict, "confident") for x in (xc, xt))  # the rule before the study
        confident = metrics.defended(rc, yc, rt, yt, target)
        without = metrics.defended(without_fallback(rc), yc, without_fallback(rt), yt, target)
        nearest = metrics.defended(with_hint(rc, verdict, "nearest"), yc, with_hint(rt, verdict, "nearest"), yt, target)
        out = {"dataset": args.dataset, "run": run, "guards": args.guards, "work": args.work, "split": "dev", "n": args.n,
               "fallback_hint": confident, "no_fallback": without, "nearest_consistent": nearest,
               "fallback": {"trigger": fallback_detail(rt, target), "clean_hint_right": fallback_detail(rc, yc)},
               "clean_ood_without_consistent_head": no_consistent_head(rc).float().mean().item(),
               "trigger_ood_without_consistent_head": no_consistent_head(rt).float().mean().item()}
        path = ROOT / "results" / "dev" / "ood-hint" / f"{args.dataset}-{run}{suffix}.json"
        path.write_text(json.dumps(out, indent=2))
        print(f"{args.dataset} {run} ({args.guards}): CDA {100 * confident['cda']:.2f} -> {100 * without['cda']:.2f}, "
              f"ASR {100 * confident['asr']:.2f} -> {100 * without['asr']:.2f}; nearest consistent instead: "
              f"CDA {100 * nearest['cda']:.2f}, ASR {100 * nearest['asr']:.2f}; OOD without a consistent head: "
              f"clean {100 * out['clean_ood_without_consistent_head']:.2f} %, triggered "
              f"{100 * out['trigger_ood_without_consistent_head']:.2f} %", flush=True)


if __name__ == "__main__":
    main()
