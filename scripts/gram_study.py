"""Dev study (issue #6): would Beatrix's Gram features (Ma et al., NDSS 2023, "Beatrix the
Robber") separate a backdoor that the consistency check lets through, where per-channel statistics
do not?

The consistency check profiles each channel of a hidden layer on its own (its spatial mean and
maximum). Beatrix profiles how channels *co-activate*: for a layer's feature map F ([C, H*W]) and
order p, the Gram matrix ``(F^p F^p^T)^(1/p) / (H*W)^(1/p)``, upper triangle, per class median and
MAD over the clean validation set. A warp moves content without adding a patch, so each channel's
marginal can stay in range while their correlations shift. This study measures that on the bare
model (no guard), on the dev half, against the marginal (channel means) under the same scoring:

* per layer and feature set, the score of an input at its predicted class is the mean over features
  of the robust z-score ``|g - median_c| / (1.4826 MAD_c)``, divided by the median of that score over
  the validation samples of class c (so layers and classes are comparable);
* AUROC of clean inputs against triggered inputs that the bare model answers with the target, per
  layer and feature set, and for the maximum over layers.

    python scripts/gram_study.py --dataset cifar10 --attack wanet-noise --seed 0 --n 1000
    # writes results/dev/<dataset>/gram-<attack>-<seed>.json
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
from ted_study import layer_outputs  # noqa: E402  (scripts/, the script's own folder)

DEV = slice(0, 5000)


def gram_features(f, order):
    """Upper triangle of the order-p Gram matrix of ``f`` ([B, C, S], non-negative)."""
    fp = f.double() ** order
    g = (fp @ fp.transpose(1, 2)) / f.shape[2]
    g = g.clamp_min(0) ** (1.0 / order)
    i, j = torch.triu_indices(f.shape[1], f.shape[1])
    return g[:, i, j].float()


def feature_sets(f, orders):
    sets = {"channel_mean": f.mean(2), "channel_max": f.amax(2)}
    for p in orders:
        sets[f"gram{p}"] = gram_features(f, p)
    return sets


def robust_scores(ref, ref_y, x, pred, k):
    """Mean robust z of ``x`` at its predicted class, over the class's profile from ``ref``; and
    the same for the reference samples at their own class (for normalisation)."""
    med = torch.stack([ref[ref_y == c].median(0).values for c in range(k)])
    mad = torch.stack([(ref[ref_y == c] - med[c]).abs().median(0).values for c in range(k)])
    scale = 1.4826 * mad
    scale = scale.clamp_min(0.1 * scale.median().clamp_min(1e-12))
    z_x = ((x - med[pred]).abs() / scale[pred]).mean(1)
    z_ref = ((ref - med[ref_y]).abs() / scale[ref_y]).mean(1)
    norm = torch.stack([z_ref[ref_y == c].median() for c in range(k)])
    return z_x / norm[pred], z_ref / norm[ref_y]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--dataset", default="cifar10")
    p.add_argument("--attack", default="wanet-noise")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--orders", type=int, nargs="+", default=[1, 2])
    p.add_argument("--layers", nargs="+", default=None, help="module names (default: every ReLU)")
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    args = p.parse_args()
    torch.set_num_threads(1)
    work = ROOT / "runs" / args.dataset
    split = experiment.split_data(args.dataset, args.data, None, args.seed)
    model, meta = experiment.load_model(work / "models" / f"{args.attack}-{args.seed}.safetensors")
    model.eval()
    k = meta["num_classes"]
    attack = experiment.attacks.Attack.from_dict(meta["attack"]) if meta["attack"] else None
    xc, yc, xt, yt, target = experiment.eval_sets(attack, split["x_test"], split["y_test"], args.n,
                                                  args.n, args.seed, DEV)
    names = args.layers or [n for n, m in model.named_modules() if isinstance(m, nn.ReLU)]
    maps = lambda x: layer_outputs(model, x, names, lambda o: o.flatten(2), batch=250)  # noqa: E731
    (fv, pv), (fc, pc), (ft, pt) = maps(split["x_val"]), maps(xc), maps(xt)
    hit = pt == target
    ref_y = split["y_val"]
    rows, best = {}, {}
    for name in names:
        if fv[name].dim() != 3:
            continue
        sv, sc, st = (feature_sets(f[name], args.orders) for f in (fv, fc, ft))
        rows[name] = {}
        for kind in sv:
            zc, zv = robust_scores(sv[kind], ref_y, sc[kind], pc, k)
            zt, _ = robust_scores(sv[kind], ref_y, st[kind], pt, k)
            zt = zt[hit]
            best.setdefault(kind, []).append((zc, zt))
            auc = metrics.auroc(zc, zt)
            # the share of triggered inputs beyond the validation split's 99th percentile
            q = zv.quantile(0.99).item()
            rows[name][kind] = {"auroc": auc, "clean_over_val_q99": (zc > q).float().mean().item(),
                                "trigger_over_val_q99": (zt > q).float().mean().item()}
            print(f"{name} {kind}: AUROC {auc:.3f}, over the validation q99: clean "
                  f"{100 * rows[name][kind]['clean_over_val_q99']:.1f} %, triggered "
                  f"{100 * rows[name][kind]['trigger_over_val_q99']:.1f} %", flush=True)
        del sv, sc, st
    combined = {kind: metrics.auroc(torch.stack([c for c, _ in v]).amax(0),
                                    torch.stack([t for _, t in v]).amax(0))
                for kind, v in best.items()}
    print("max over layers:", {k_: round(v, 3) for k_, v in combined.items()},
          f"({int(hit.sum())} of {len(xt)} triggered inputs answered with the target)")
    out = ROOT / "results" / "dev" / args.dataset / f"gram-{args.attack}-{args.seed}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"dataset": args.dataset, "attack": args.attack, "seed": args.seed,
                               "split": "dev", "n": args.n, "orders": args.orders, "layers": rows,
                               "max_over_layers_auroc": combined, "triggered_hit": int(hit.sum())},
                              indent=2))


if __name__ == "__main__":
    main()
