"""Dev screen (issue #6, the paper's Fig. 12): does TED's class neighbourhood catch the faint trigger
that today's guard accepts?

A Trojan square blended at 30-50 % transparency passes today's guard on a third of CIFAR-10's
triggered inputs (docs/results.md, "Trigger transparency"): each of its neurons sits inside its bound.
``scripts/ted_study.py`` asked whether TED's neighbourhood ranks separate WaNet on their own (they
did worse than the guard's own evidence). This screen asks the question that matters for a second
check: among the inputs the guard *accepts*, do the ranks separate the faint trigger from clean
inputs? A triggered horse should sit among horses at the middle layers and join the target only at
the end; a clean input the guard accepts sits among its answer's class throughout.

* features: each ReLU's output of the bare model, as channel means (``--view mean``), or channel
  maxima (``max``), L2-normalised;
* rank: how many validation samples of other classes are nearer than the nearest one of the
  answered class (the guard's label); for a validation sample, itself left out;
* score: the mean of log(1 + rank) over the layers ``--layers`` names;
* bound: the ``--quantile`` of the scores of the validation samples the model answers rightly
  (leave one out; no test input sets it);
* on clean dev inputs (test indices 0-4999) the guard answers rightly and accepts: the share the
  bound would refuse (an upper estimate of the CDA it would cost);
* on triggered dev inputs at each transparency: today's ASR after the guard and the share of the
  triggered inputs accepted as the target that the bound would refuse.

The saved guards are used as they are, no refit. Writes
``results/dev/faint-trigger/neighbourhood-<work>-<attack>.json`` and prints a table.

    python scripts/faint_trigger_neighbourhood.py --work runs/cifar10-sgdbf16-e80 --seeds 0 1 2
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from linkbreaker_ext import LinkBreaker, experiment, metrics  # noqa: E402
from linkbreaker_ext.reproduce import SPLITS  # noqa: E402
from linkbreaker_ext.verdict import ACCEPT  # noqa: E402
from ted_study import layer_outputs  # noqa: E402

OUT = ROOT / "results" / "dev" / "faint-trigger"
VIEWS = {"mean": lambda o: o.flatten(2).mean(2), "max": lambda o: o.flatten(2).amax(2)}


def features(model, x, view):
    """``{relu: [n, C]}`` L2-normalised channel views of every ReLU's output on ``x``."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.ReLU)]
    return layer_outputs(model, x, names, lambda o: nn.functional.normalize(VIEWS[view](o), dim=1))[0]


def ranks(f, ref, ref_y, label, leave_out=False):
    """Per input: how many references of other classes are nearer than the nearest one of class
    ``label``; ``leave_out``: ``f`` is ``ref`` and each sample's own entry does not count."""
    d = torch.cdist(f, ref)
    if leave_out:
        d.fill_diagonal_(float("inf"))
    order = d.argsort(1)
    return (ref_y[order] == label[:, None]).float().argmax(1).float()


def scores(f, ref, ref_y, label, layers, leave_out=False):
    """``{layer: [n] log(1 + rank)}`` for every layer and ``"mean"`` over ``layers``."""
    out = {n: ranks(f[n], ref[n], ref_y, label, leave_out).log1p() for n in f}
    out["mean"] = torch.stack([out[n] for n in layers]).mean(0)
    return out


def screen(work: Path, attack_name: str, seed: int, transparencies, n_clean, n_trigger, q, view,
           layers) -> dict:
    model, meta = experiment.load_model(work / "models" / f"{attack_name}-{seed}.safetensors")
    model.eval()
    attack = experiment.attacks.Attack.from_dict(meta["attack"])
    guard = LinkBreaker.load(work / "guards" / f"{attack_name}-{seed}.safetensors", model)
    split = experiment.split_data(meta["dataset"], "../shared/data", None, seed)
    xc, yc, xt, _, target = experiment.eval_sets(attack, split["x_test"], split["y_test"], n_clean,
                                                 n_trigger, seed, SPLITS["dev"])
    x0 = experiment.triggered_originals(attack, split["x_test"], split["y_test"], n_clean, n_trigger,
                                        seed, SPLITS["dev"])
    assert torch.equal(attack.apply(x0), xt), "draw out of step with experiment.eval_sets"
    xv, yv = split["x_val"], split["y_val"]
    with torch.no_grad():
        right_v = model(xv).argmax(1) == yv
    fv = features(model, xv, view)
    names = list(fv)
    layers = layers or names
    sv = scores(fv, fv, yv, yv, layers, leave_out=True)
    bound = {n: torch.quantile(s[right_v], q).item() for n, s in sv.items()}
    rc = guard(xc)
    right = ((rc.labels == yc) & (rc.verdict == ACCEPT)).cpu()
    sc = scores(features(model, xc, view), fv, yv, rc.labels.cpu(), layers)
    row = {"seed": seed, "target": target, "bound": {n: round(b, 3) for n, b in bound.items()},
           "clean_right_accepted": round(100 * right.double().mean().item(), 3),
           "clean_right_refused": {n: round(100 * ((s > bound[n]) & right).double().mean().item(), 3)
                                   for n, s in sc.items()},
           "triggered": {}}
    for t in transparencies:
        x = x0 + (1 - t) * (xt - x0)
        r = guard(x)
        through = ((r.labels == target) & (r.verdict == ACCEPT)).cpu()
        st = scores(features(model, x, view), fv, yv, torch.full((len(x),), target), layers)
        row["triggered"][f"{t:g}"] = {
            "asr_after": round(100 * (r.labels.cpu() == target).double().mean().item(), 3),
            "accepted_target": round(100 * through.double().mean().item(), 3),
            "caught_of_all": {n: round(100 * ((s > bound[n]) & through).double().mean().item(), 3)
                              for n, s in st.items()},
            "auroc_accepted": {n: round(metrics.auroc(sc[n][right], s[through]), 4)
                               if through.any() else None for n, s in st.items()}}
    print(json.dumps(row), flush=True)
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="runs/cifar10-sgdbf16-e80")
    ap.add_argument("--attack", default="trojan-square")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--transparency", type=float, nargs="+", default=[0.0, 0.3, 0.5])
    ap.add_argument("--n-clean", type=int, default=1000)
    ap.add_argument("--n-trigger", type=int, default=500)
    ap.add_argument("--quantile", type=float, default=0.99)
    ap.add_argument("--view", choices=sorted(VIEWS), default="mean")
    ap.add_argument("--layers", nargs="*", default=None, help="the layers the mean score reads (default: all)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    work = Path(args.work)
    runs = [screen(work, args.attack, s, args.transparency, args.n_clean, args.n_trigger, args.quantile,
                   args.view, args.layers) for s in args.seeds]
    cmd = ("python scripts/faint_trigger_neighbourhood.py --work " + args.work + " --attack " + args.attack
           + " --seeds " + " ".join(map(str, args.seeds))
           + " --transparency " + " ".join(f"{t:g}" for t in args.transparency)
           + f" --n-clean {args.n_clean} --n-trigger {args.n_trigger} --quantile {args.quantile:g}"
           + f" --view {args.view}" + (" --layers " + " ".join(args.layers) if args.layers else ""))
    OUT.mkdir(parents=True, exist_ok=True)
    tag = f"{args.view}" + ("-" + "-".join(args.layers) if args.layers else "")
    path = OUT / f"neighbourhood-{work.name}-{args.attack}-{tag}.json"
    path.write_text(json.dumps({"command": cmd, "runs": runs}, indent=1) + "\n")
    print(f"\n`{cmd}`\n")
    ts = [f"{t:g}" for t in args.transparency]
    names = list(runs[0]["bound"])
    print("| seed | score | clean right answers refused (%) | "
          + " | ".join(f"t={t}: accepted / caught (AUROC)" for t in ts) + " |")
    print("| --- " * (3 + len(ts)) + "|")
    for r in runs:
        for n in names:
            cells = [f"{r['triggered'][t]['accepted_target']:.2f} / {r['triggered'][t]['caught_of_all'][n]:.2f} "
                     f"({r['triggered'][t]['auroc_accepted'][n]})" for t in ts]
            print(f"| {r['seed']} | {n} | {r['clean_right_refused'][n]:.2f} | " + " | ".join(cells) + " |")
    print(path)


if __name__ == "__main__":
    main()
