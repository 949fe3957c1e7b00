"""Dev screen (issue #6, the paper's Fig. 12): does a dimmed neighbour catch a faint trigger?

A Trojan square blended at 30-50 % transparency passes today's guard on a third of CIFAR-10's
triggered inputs (docs/results.md, "Trigger transparency"): its neurons sit inside every bound. Such a trigger
fires the backdoor only just, so a copy of the input with its contrast reduced (``m + alpha * (x -
m)``, m the image's mean, alpha < 1) should lose it, while a clean input keeps its class. This screen
measures the fall of a head's own-class log-odds (capped as the stability test's) from the input to
that copy:

* the bound: the ``--quantile`` of the falls of the validation set's samples whose own head is
  confident (what a guard could calibrate on; no test input sets it);
* on clean dev inputs (test indices 0-4999): the share of those today's guard answers rightly and
  accepts that the bound would refuse (an upper estimate of the CDA it would cost);
* on triggered dev inputs at each transparency: the ASR after today's guard, and the share of the
  triggered inputs accepted as the target that the bound would refuse (what it would catch).

alpha > 1 raises the contrast instead (a faint trigger made stronger). The saved guards are used as
they are, no refit. Writes ``results/dev/faint-trigger/<work>-<attack>.json`` and prints a table.

    python scripts/faint_trigger_screen.py --work runs/cifar10-sgdbf16-e80 --seeds 0 1 2
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from linkbreaker_ext import LinkBreaker, experiment  # noqa: E402
from linkbreaker_ext.reproduce import SPLITS  # noqa: E402
from linkbreaker_ext.verdict import ACCEPT, STABILITY_EPS, log_odds  # noqa: E402

OUT = ROOT / "results" / "dev" / "faint-trigger"


def dimmed(x: torch.Tensor, alpha: float, value_range) -> torch.Tensor:
    """Each image's contrast scaled by ``alpha`` around its own mean, inside the value range."""
    m = x.mean(dim=tuple(range(1, x.dim())), keepdim=True)
    return (m + alpha * (x - m)).clamp(*value_range)


def falls(guard, x: torch.Tensor, heads: torch.Tensor, alpha: float):
    """``([n] fall, [n] confident)``: head ``heads[i]``'s own-class log-odds fall from ``x[i]`` to its
    dimmed copy, and whether that head is confident on ``x[i]``."""
    i = torch.arange(len(x))
    c0 = guard.head_confidences(x)[0][i, heads].cpu()
    c1 = guard.head_confidences(dimmed(x, alpha, guard.input_range))[0][i, heads].cpu()
    return log_odds(c0, STABILITY_EPS) - log_odds(c1, STABILITY_EPS), c0 >= guard.thresholds.cpu()[heads]


def dev_draw(work: Path, attack_name: str, seed: int, n_clean: int, n_trigger: int, transparencies):
    """What the faint-trigger screens share: the saved model and guard, the data split, the dev half's
    clean draw (``right``: those the guard answers rightly and accepts) and the triggered draw blended
    at each transparency, with the guard's results on it. A clean model is probed with BadNets."""
    model, meta = experiment.load_model(work / "models" / f"{attack_name}-{seed}.safetensors")
    attack = experiment.attacks.Attack.from_dict(meta["attack"]) if meta["attack"] else None
    guard = LinkBreaker.load(work / "guards" / f"{attack_name}-{seed}.safetensors", model)
    split = experiment.split_data(meta["dataset"], "../shared/data", None, seed)
    xc, yc, xt, _, target = experiment.eval_sets(attack, split["x_test"], split["y_test"], n_clean,
                                                 n_trigger, seed, SPLITS["dev"])
    x0 = experiment.triggered_originals(attack, split["x_test"], split["y_test"], n_clean, n_trigger, seed,
                                        SPLITS["dev"])  # the triggered draw's clean images
    if attack is not None:
        assert torch.equal(attack.apply(x0), xt), "draw out of step with experiment.eval_sets"
    rc = guard(xc)
    trig = {t: x0 + (1 - t) * (xt - x0) for t in transparencies}
    return SimpleNamespace(model=model, guard=guard, split=split, xc=xc, yc=yc, target=target,
                           right=((rc.labels == yc) & (rc.verdict == ACCEPT)).cpu(), trig=trig,
                           res={t: guard(x) for t, x in trig.items()})


def bounded_row(draw, score, q: float, digits: int = 3, median_key: str | None = None) -> dict:
    """One candidate test: ``score(x, heads)`` gives ``([n] value, [n] head confident)``; its bound is
    the ``q`` quantile of the validation set's values where the own head is confident (no test input
    sets it). Returns the bound, the clean right answers it would refuse and, per transparency, the
    triggered inputs the guard accepts as the target and those of them it would catch (in %);
    ``median_key``: also the triggered inputs' median value, under that name."""
    val, ok = score(draw.split["x_val"], draw.split["y_val"])
    bound = val[ok].quantile(q).item()
    clean, _ = score(draw.xc, draw.yc)
    tgt = torch.full((len(next(iter(draw.trig.values()))),), draw.target)
    row = {"bound": round(bound, 3),
           "clean_right_refused": round(100 * ((clean > bound) & draw.right).double().mean().item(), digits),
           "triggered": {}}
    for t, x in draw.trig.items():
        r = draw.res[t]
        through = ((r.labels == draw.target) & (r.verdict == ACCEPT)).cpu()
        trig, _ = score(x, tgt)
        row["triggered"][f"{t:g}"] = {
            "accepted_target": round(100 * through.double().mean().item(), digits),
            "caught_of_accepted": round(100 * ((trig > bound) & through).double().mean().item(), digits)}
        if median_key:
            row["triggered"][f"{t:g}"][median_key] = round(trig.median().item(), 3)
    return row


def screen(work: Path, attack_name: str, seed: int, alphas, transparencies, n_clean, n_trigger, q) -> dict:
    draw = dev_draw(work, attack_name, seed, n_clean, n_trigger, transparencies)
    rows = []
    for alpha in alphas:
        row = {"alpha": alpha, **bounded_row(draw, lambda x, h: falls(draw.guard, x, h, alpha), q)}
        for t, cell in row["triggered"].items():  # the guard's ASR after, hint reading
            labels = draw.res[float(t)].labels.cpu()
            cell["asr_after"] = round(100 * (labels == draw.target).double().mean().item(), 3)
        rows.append(row)
        print(seed, json.dumps(row))
    return {"seed": seed, "target": draw.target, "n_clean": n_clean, "n_trigger": n_trigger,
            "clean_right_accepted": round(100 * draw.right.double().mean().item(), 3), "rows": rows}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="runs/cifar10-sgdbf16-e80")
    ap.add_argument("--attack", default="trojan-square")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--alphas", type=float, nargs="+", default=[0.8, 0.6])
    ap.add_argument("--transparency", type=float, nargs="+", default=[0.0, 0.3, 0.5])
    ap.add_argument("--n-clean", type=int, default=1000)
    ap.add_argument("--n-trigger", type=int, default=500)
    ap.add_argument("--quantile", type=float, default=0.995)
    args = ap.parse_args()
    torch.set_num_threads(1)
    work = Path(args.work)
    runs = [screen(work, args.attack, s, args.alphas, args.transparency, args.n_clean, args.n_trigger,
                   args.quantile) for s in args.seeds]
    cmd = ("python scripts/faint_trigger_screen.py --work " + args.work + " --attack " + args.attack
           + " --seeds " + " ".join(map(str, args.seeds)) + " --alphas " + " ".join(f"{a:g}" for a in args.alphas)
           + " --transparency " + " ".join(f"{t:g}" for t in args.transparency)
           + f" --n-clean {args.n_clean} --n-trigger {args.n_trigger} --quantile {args.quantile:g}")
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"{work.name}-{args.attack}.json"
    path.write_text(json.dumps({"command": cmd, "runs": runs}, indent=1) + "\n")
    print(f"\n`{cmd}`\n")
    ts = [f"{t:g}" for t in args.transparency]
    print("| seed | alpha | bound | clean right answers refused (%) | "
          + " | ".join(f"t={t}: ASR after / caught" for t in ts) + " |")
    print("| --- " * (4 + len(ts)) + "|")
    for r in runs:
        for row in r["rows"]:
            cells = [f"{row['triggered'][t]['asr_after']:.2f} / {row['triggered'][t]['caught_of_accepted']:.2f}" for t in ts]
            print(f"| {r['seed']} | {row['alpha']:g} | {row['bound']:.2f} | {row['clean_right_refused']:.2f} | "
                  + " | ".join(cells) + " |")
    print(path)


if __name__ == "__main__":
    main()
