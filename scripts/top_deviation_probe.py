"""Dev probe (issue #6): would a consistency statistic that listens to the few most deviant neurons
catch what today's guard lets through on GTSRB's Trojan watermark?

Today's check reads, per evidence, the *mean* robust z-score over class k's salient neurons. The
watermark's escapes on seed 0 sit at 0.90-0.99 of their bounds: a trigger that drives a handful
of channels far from the target class's profile is diluted by the many channels it leaves alone.
For a saved guard and the **dev** half of the test split, this recomputes each evidence's z-scores
in the view of the head that matters (clean: the true class; triggered: the target) and compares
three aggregations over the salient neurons: ``mean`` (today's statistic), ``top`` (the mean of the
largest 10 %) and ``max``. Each is taken relative to its class's median on the calibration split
and bounded at the pooled 0.995 quantile of the calibration samples' ratios (a probe's bound, not
the library's tail rule). Reported: the share of the guard's escapes (triggered inputs answered
with the target, accepted or as an OOD hint) that some evidence's bound would catch, and the share
of clean inputs the guard answers correctly that it would flag. ``max_gated``: the largest z-score
judged only where the head's mean readings already exceed the calibration split's median of their
largest ratio (the stability test's gate, applied to the peak).

    python scripts/top_deviation_probe.py --dataset gtsrb --attack trojan-watermark --seed 0 \
        --work runs/gtsrb-sgdbf16-e30 --n 1000
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from linkbreaker_ext import experiment  # noqa: E402
from linkbreaker_ext.data import stratified_split  # noqa: E402
from linkbreaker_ext.verdict import ACCEPT  # noqa: E402

DEV = slice(0, 5000)
AGGREGATIONS = ("mean", "top", "max")
TOP_SHARE = 0.1
QUANTILE = 0.995


def statistics(guard, x, heads):
    """``{aggregation: [B, L]}``: each evidence's robust z-scores over the salient neurons of the
    head ``heads`` ``[B]`` names, in that head's own view, aggregated three ways."""
    _, _, _, units = guard.head_confidences(x, with_units=True)
    rows = torch.arange(len(x))
    out = {a: [] for a in AGGREGATIONS}
    for layer in guard._profile_layers():
        u = units[layer][rows, heads].float()                    # [B, D]
        center = guard.profile[f"center.{layer}"][heads]
        scale = guard.profile[f"scale.{layer}"][heads]
        salient = guard.profile[f"weight.{layer}"][heads] > 0
        z = ((u - center).abs() / scale).masked_fill(~salient, float("nan"))
        count = salient.sum(1).clamp_min(1)
        out["mean"].append(z.nan_to_num(0).sum(1) / count)
        out["max"].append(z.nan_to_num(-1).amax(1))
        k = (count.float() * TOP_SHARE).ceil().long().clamp_min(1)
        ranked = z.nan_to_num(-1).sort(1, descending=True).values
        keep = torch.arange(ranked.shape[1])[None] < k[:, None]
        out["top"].append((ranked * keep).sum(1) / k)
    return {a: torch.stack(v, 1) for a, v in out.items()}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--dataset", default="gtsrb")
    p.add_argument("--attack", default="trojan-watermark")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default="runs/gtsrb-sgdbf16-e30")
    p.add_argument("--data", default="../shared/data")
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    work = Path(args.work)
    split, _, attack, guard, _ = experiment.saved_run(args.dataset, f"{args.attack}-{args.seed}",
                                                      args.data, work)
    cal, _ = stratified_split(split["y_val"], guard.config.calibration_fraction, seed=guard.config.seed)
    x_cal, y_cal = split["x_val"][cal], split["y_val"][cal]
    xc, yc, xt, _, target = experiment.eval_sets(attack, split["x_test"], split["y_test"], args.n,
                                                 args.n, args.seed, DEV)
    rc, rt = guard(xc), guard(xt)
    kept = rc.labels == yc                                  # clean answers the guard gets right
    escaped = rt.labels == target                           # hint reading
    accepted = escaped & (rt.verdict == ACCEPT)
    heads_t = torch.full((len(xt),), target)
    s_cal, s_c, s_t = (statistics(guard, x_cal, y_cal), statistics(guard, xc, yc),
                       statistics(guard, xt, heads_t))
    names = guard._profile_layers()
    result = {"dataset": args.dataset, "attack": args.attack, "seed": args.seed, "split": "dev",
              "work": str(work), "n": args.n, "quantile": QUANTILE, "top_share": TOP_SHARE,
              "escaped": int(escaped.sum()), "accepted": int(accepted.sum()),
              "clean_kept": int(kept.sum()), "evidence": names, "aggregations": {}}
    for a in AGGREGATIONS:
        # each class's median on the calibration split, then one pooled bound per evidence
        med = torch.stack([s_cal[a][y_cal == k].median(0).values if (y_cal == k).any()
                           else torch.ones(len(names)) for k in range(guard.num_heads)]).clamp_min(1e-6)
        r_cal = s_cal[a] / med[y_cal]
        bound = r_cal.quantile(QUANTILE, dim=0)              # [L]
        r_c, r_t = s_c[a] / med[yc], s_t[a] / med[target]
        over_c, over_t = r_c > bound, r_t > bound
        result["aggregations"][a] = {
            "bound": bound.tolist(),
            "clean_flagged_any": over_c[kept].any(1).float().mean().item(),
            "escapes_caught_any": over_t[escaped].any(1).float().mean().item() if escaped.any() else None,
            "accepted_caught_any": over_t[accepted].any(1).float().mean().item() if accepted.any() else None,
            "triggered_caught_any": over_t.any(1).float().mean().item(),
            "per_evidence": {n: {"clean_flagged": over_c[kept, i].float().mean().item(),
                                 "escapes_caught": over_t[escaped, i].float().mean().item()
                                 if escaped.any() else None,
                                 "escapes_median_ratio": (r_t[escaped, i] / bound[i]).median().item()
                                 if escaped.any() else None}
                             for i, n in enumerate(names)},
        }
    # the peak judged only where the head's mean readings already lean out: the largest of its
    # mean ratios over their bounds above the calibration split's median of the same (the stability
    # test's gate, applied to the peak)
    ratios = {}
    for a in ("mean", "max"):
        med = torch.stack([s_cal[a][y_cal == k].median(0).values if (y_cal == k).any()
                           else torch.ones(len(names)) for k in range(guard.num_heads)]).clamp_min(1e-6)
        bound = (s_cal[a] / med[y_cal]).quantile(QUANTILE, dim=0)
        ratios[a] = [s_cal[a] / med[y_cal] / bound, s_c[a] / med[yc] / bound, s_t[a] / med[target] / bound]
    gate = ratios["mean"][0].amax(1).median()
    over_c = (ratios["max"][1] > 1).any(1) & (ratios["mean"][1].amax(1) > gate)
    over_t = (ratios["max"][2] > 1).any(1) & (ratios["mean"][2].amax(1) > gate)
    result["aggregations"]["max_gated"] = {
        "gate": gate.item(), "clean_flagged_any": over_c[kept].float().mean().item(),
        "escapes_caught_any": over_t[escaped].float().mean().item() if escaped.any() else None,
        "accepted_caught_any": over_t[accepted].float().mean().item() if accepted.any() else None,
        "triggered_caught_any": over_t.float().mean().item()}
    result["seconds"] = time.time() - t0
    out = ROOT / "results" / "dev" / args.dataset / f"top-deviation-{args.attack}-{args.seed}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"{args.attack} seed {args.seed}: {result['escaped']} escapes ({result['accepted']} accepted) "
          f"of {len(xt)} triggered; {result['clean_kept']} clean answers kept")
    for a, r in result["aggregations"].items():
        print(f"{a:>5}: escapes caught {r['escapes_caught_any']}, accepted caught "
              f"{r['accepted_caught_any']}, clean flagged {r['clean_flagged_any']:.4f}")
        for n, e in r.get("per_evidence", {}).items():
            print(f"       {n:<24} clean {e['clean_flagged']:.4f}  escapes {e['escapes_caught']}  "
                  f"median ratio {e['escapes_median_ratio']}")
    print(f"wrote {out.relative_to(ROOT)} ({result['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
