"""Dev study (issue #6): would TED's idea (Mo et al., S&P 2024, "Robust Backdoor Detection for Deep
Learning via Topological Evolution Dynamics") separate a backdoor that the consistency check lets
through? TED follows an input's class neighbourhood through the layers: a clean input's nearest
clean samples belong to its predicted class at every layer, while a triggered one starts among its
source class and joins the target class only late. This study measures that on the bare model (no
guard), on the dev half:

* features: each ReLU layer's channel means (global average pooling), L2-normalised;
* reference: the clean validation set (the guard's), its labels;
* per layer, the rank of the predicted class: the position of the first validation sample of the
  input's predicted class among its nearest neighbours (0: the nearest is of that class);
* score: the mean over layers of log(1 + rank); AUROC of clean against triggered inputs that the
  bare model answers with the target, per layer and combined.

    python scripts/ted_study.py --dataset cifar10 --attack wanet-noise --seed 0 --n 1000
    # writes results/dev/<dataset>/ted-<attack>-<seed>.json
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
from linkbreaker_ext import experiment, metrics  # noqa: E402

DEV = slice(0, 5000)


@torch.no_grad()
def layer_outputs(model, x, names, view, batch=500):
    """``({name: view(output)}, predicted labels)``: the named modules' outputs on ``x``, each
    reduced by ``view`` batch by batch, from one hooked forward per batch."""
    outs = {n: [] for n in names}
    preds = []
    mods = dict(model.named_modules())
    hooks = [mods[n].register_forward_hook(lambda mod, i, o, n=n: outs[n].append(view(o))) for n in names]
    try:
        for i in range(0, len(x), batch):
            preds.append(model(x[i:i + batch]).argmax(1))
    finally:
        for h in hooks:
            h.remove()
    return {n: torch.cat(v) for n, v in outs.items()}, torch.cat(preds)


def layer_features(model, x, batch=500):
    """``{relu name: [B, C]}`` channel means of every ReLU's output (L2-normalised) and the labels
    the model predicts."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.ReLU)]
    return layer_outputs(model, x, names, lambda o: nn.functional.normalize(
        o.flatten(2).mean(2) if o.dim() == 4 else o, dim=1), batch)


def class_rank(f, ref, ref_y, pred):
    """Per input: how many validation samples of other classes are nearer than the nearest one of
    its predicted class."""
    d = torch.cdist(f, ref)  # [B, R]
    order = d.argsort(1)
    same = ref_y[order] == pred[:, None]
    return same.float().argmax(1)  # index of the first same-class neighbour


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--dataset", default="cifar10")
    p.add_argument("--attack", default="wanet-noise")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    args = p.parse_args()
    torch.set_num_threads(1)
    work = ROOT / "runs" / args.dataset
    split = experiment.split_data(args.dataset, args.data, None, args.seed)
    model, meta = experiment.load_model(work / "models" / f"{args.attack}-{args.seed}.safetensors")
    model.eval()
    attack = experiment.attacks.Attack.from_dict(meta["attack"]) if meta["attack"] else None
    xc, yc, xt, yt, target = experiment.eval_sets(attack, split["x_test"], split["y_test"], args.n,
                                                  args.n, args.seed, DEV)
    fv, pv = layer_features(model, split["x_val"])
    fc, pc = layer_features(model, xc)
    ft, pt = layer_features(model, xt)
    hit = pt == target  # triggered inputs the backdoor works on
    ref_y = split["y_val"]
    rows, sc, st = {}, 0, 0
    for name in fv:
        rc = class_rank(fc[name], fv[name], ref_y, pc).float()
        rt = class_rank(ft[name], fv[name], ref_y, pt).float()[hit]
        sc, st = sc + rc.log1p(), st + rt.log1p()
        rows[name] = {"auroc": metrics.auroc(rc, rt), "clean_rank_median": rc.median().item(),
                      "triggered_rank_median": rt.median().item()}
        print(f"{name}: AUROC {rows[name]['auroc']:.3f}, median rank clean {rc.median():.0f} "
              f"triggered {rt.median():.0f}", flush=True)
    combined = metrics.auroc(sc, st)
    print(f"combined (mean log(1 + rank) over layers): AUROC {combined:.3f}; "
          f"{int(hit.sum())} of {len(xt)} triggered inputs answered with the target")
    out = ROOT / "results" / "dev" / args.dataset / f"ted-{args.attack}-{args.seed}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"dataset": args.dataset, "attack": args.attack, "seed": args.seed,
                               "split": "dev", "n": args.n, "layers": rows,
                               "combined_auroc": combined, "triggered_hit": int(hit.sum())}, indent=2))


if __name__ == "__main__":
    main()
