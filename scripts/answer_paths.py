"""Dev study (issue #6): where do a guard's clean cost and its attack successes come from?

For the clean dev-half inputs that the bare model labels right and the guard (hint reading) does not,
this counts the path of the wrong answer (accepted as another class, an alarm from several credible
heads, an alarm from a confident but vetoed head, an OOD verdict whose hint is wrong) and which of
the true head's tests failed: its confidence threshold, its consistency bound, its stability bound.
It also counts the opposite, inputs the guard gets right and the model does not, and for the
triggered dev inputs answered with the target, the path and which of the target head's tests
failed. No refit: the saved guards, one guarded forward per input.

    python scripts/answer_paths.py --dataset gtsrb --runs badnets-0 none-0 trojan-watermark-0
    python scripts/answer_paths.py --dataset gtsrb --runs badnets-1 --work runs/gtsrb-sgdbf16-e30
    # writes results/dev/answer-paths/<dataset>-<run>.json and prints one line per run
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from linkbreaker_ext import experiment, training  # noqa: E402
from linkbreaker_ext.verdict import ACCEPT, ALARM  # noqa: E402

DEV = slice(0, 5000)


def head_tests(r, y) -> list[str]:
    """Per input, which of head ``y``'s tests failed: "c" confidence, "n" consistency (neurons),
    "s" stability; "" when it passed all three."""
    idx = torch.arange(len(y))
    conf = r.confidences[idx, y] < r.thresholds[y]
    cons = (r.consistency[idx, y] > 1) if r.consistency is not None else torch.zeros_like(conf)
    stab = (r.stability[idx, y] > 1) if r.stability is not None else torch.zeros_like(conf)
    return ["".join(t for t, f in zip("cns", flags) if f) for flags in zip(conf.tolist(), cons.tolist(), stab.tolist())]


def paths(r, y) -> list[str]:
    """Per input, how the guard answered: accepted, alarm (several credible heads or a vetoed
    confident one), or OOD."""
    credible = (r.confidences >= r.thresholds)
    if r.credibility is not None:
        credible &= r.credibility <= 1
    several = credible.sum(1) >= 2
    out = []
    for v, s in zip(r.verdict.tolist(), several.tolist()):
        out.append("accept" if v == ACCEPT else ("alarm:several" if s else "alarm:vetoed") if v == ALARM else "ood")
    return out


def breakdown(r, y, model_right) -> dict:
    """Counts (share of all inputs) of the guard's losses and gains against the bare model."""
    guard_right = (r.labels.cpu() == y).tolist()
    tests, how = head_tests(r, y), paths(r, y)
    n = len(y)
    lost = Counter(f"{p} [{t or 'all pass'}]" for p, t, m, g in zip(how, tests, model_right, guard_right) if m and not g)
    won = Counter(f"{p} [{t or 'all pass'}]" for p, t, m, g in zip(how, tests, model_right, guard_right) if g and not m)
    failed = Counter(t or "all pass" for t, m in zip(tests, model_right) if m)
    as_pct = lambda c: {k: round(100 * v / n, 2) for k, v in c.most_common()}  # noqa: E731
    return {"lost": as_pct(lost), "won": as_pct(won), "lost_total": round(100 * sum(lost.values()) / n, 2),
            "won_total": round(100 * sum(won.values()) / n, 2),
            "true_head_tests_failed_when_model_right": as_pct(failed)}


def successes(r, target) -> dict:
    """Share of triggered inputs answered with ``target``, by path and the target head's failed tests."""
    t = torch.full((len(r.labels),), target, dtype=torch.long)
    hit = (r.labels.cpu() == target).tolist()
    c = Counter(f"{p} [{x or 'all pass'}]" for p, x, h in zip(paths(r, t), head_tests(r, t), hit) if h)
    return {k: round(100 * v / len(t), 2) for k, v in c.most_common()}


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
    out_dir = ROOT / "results" / "dev" / "answer-paths"
    out_dir.mkdir(parents=True, exist_ok=True)
    for run in args.runs:
        split, model, attack, guard, seed = experiment.saved_run(args.dataset, run, args.data, work,
                                                                 args.guards)
        xc, yc, xt, _, target = experiment.eval_sets(attack, split["x_test"], split["y_test"], args.n,
                                                     args.n, seed, DEV)
        model_right = (training.predict_logits(model, xc).argmax(1) == yc).tolist()
        out = {"dataset": args.dataset, "run": run, "guards": args.guards, "work": args.work, "split": "dev", "n": args.n,
               "model_cda": round(100 * sum(model_right) / len(yc), 2),
               **breakdown(guard(xc), yc, model_right), "attack_successes": successes(guard(xt), target)}
        (out_dir / f"{args.dataset}-{run}{'-' + work.name if args.work else ''}.json").write_text(json.dumps(out, indent=2))
        print(f"{args.dataset} {run}: lost {out['lost_total']} won {out['won_total']} "
              f"(model {out['model_cda']}); lost: {out['lost']}; attack successes: {out['attack_successes']}", flush=True)


if __name__ == "__main__":
    main()
