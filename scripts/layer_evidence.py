"""Dev study (issue #6): where a saved guard's consistency check sees a trigger, evidence by evidence.

For the **dev** half of the test split (indices 0-4999), ``--n`` clean and ``--n`` triggered inputs,
one batched forward of the N heads each. For every piece of evidence (a masked layer, one view of a
hidden conv layer, the late layer) and the head each input's verdict hinges on (clean: its true
class; triggered: the attack's target):

* ``auroc``: how well that evidence's deviation alone (relative to its calibrated bound) separates
  triggered from clean inputs;
* ``over_clean`` / ``over_trigger``: the share of inputs beyond that evidence's bound;
* ``over_clean_at_cal_max`` / ``over_trigger_at_cal_max``: the same against the largest ratio of
  the calibration split (the fit's own, never searched on) at that evidence: what an empirical bound
  would do where the 5-MAD one is loose;
* ``clean_q`` / ``trigger_q``: quantiles of the ratios;
* ``binding``: among the triggered inputs that pass the target head's confidence test and no
  evidence's bound (the ones that get through), the share whose largest ratio is at this evidence,
  and their median ratio there (how close to their bound they sit).

Writes ``results/dev/<dataset>/layers-<attack>-<seed>.json`` and prints a markdown table.

    python scripts/layer_evidence.py --dataset gtsrb --attack trojan-watermark --n 500
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
from linkbreaker_ext import experiment, metrics  # noqa: E402
from linkbreaker_ext.guard import LinkBreaker  # noqa: E402

DEV = slice(0, 5000)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--dataset", default="cifar10")
    p.add_argument("--attack", default="wanet")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", default="../shared/data")
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    work = ROOT / "runs" / args.dataset
    split = experiment.split_data(args.dataset, args.data, None, args.seed)
    model, meta = experiment.load_model(work / "models" / f"{args.attack}-{args.seed}.safetensors")
    attack = experiment.attacks.Attack.from_dict(meta["attack"]) if meta["attack"] else None
    guard = LinkBreaker.load(work / "guards" / f"{args.attack}-{args.seed}.safetensors", model)
    from linkbreaker_ext.data import stratified_split
    calib_idx, _ = stratified_split(split["y_val"], guard.config.calibration_fraction, seed=guard.config.seed)
    x_cal, y_cal = split["x_val"][calib_idx], split["y_val"][calib_idx]
    xc, yc, xt, _, target = experiment.eval_sets(attack, split["x_test"], split["y_test"], args.n,
                                                 args.n, args.seed, DEV)
    t0 = time.time()
    conf_c, dev_c = guard._heads_with_deviations(xc, by_layer=True)  # [n, K], [n, K, L] (ratio to bound)
    conf_t, dev_t = guard._heads_with_deviations(xt, by_layer=True)
    _, dev_cal = guard._heads_with_deviations(x_cal, by_layer=True)
    cal_max = dev_cal[torch.arange(len(y_cal)), y_cal].amax(0)  # [L]
    clean = dev_c[torch.arange(len(yc)), yc]  # [n, L] each clean input at its own class's head
    trig = dev_t[:, target]                   # [n, L] each triggered input at the target's head
    confident = conf_t[:, target] >= guard.thresholds[target]
    through = confident & (trig.amax(1) <= 1)
    names = guard._profile_layers()
    arg = trig[through].argmax(1)
    rows = []
    for i, name in enumerate(names):
        at = trig[through][arg == i, i]
        rows.append({
            "evidence": name,
            "auroc": metrics.auroc(clean[:, i], trig[:, i]),
            "over_clean": (clean[:, i] > 1).float().mean().item(),
            "over_trigger": (trig[:, i] > 1).float().mean().item(),
            "calibration_max_ratio": cal_max[i].item(),
            "over_clean_at_cal_max": (clean[:, i] > cal_max[i]).float().mean().item(),
            "over_trigger_at_cal_max": (trig[:, i] > cal_max[i]).float().mean().item(),
            "clean_q": {q: clean[:, i].quantile(q).item() for q in (0.5, 0.9, 0.99, 1.0)},
            "trigger_q": {q: trig[:, i].quantile(q).item() for q in (0.1, 0.5, 0.9)},
            "binding": (arg == i).float().mean().item() if len(arg) else 0.0,
            "binding_median_ratio": at.median().item() if len(at) else None,
        })
    out = {"dataset": args.dataset, "attack": args.attack, "seed": args.seed, "split": "dev",
           "n": args.n, "config": {"consistency_center": guard.config.consistency_center,
                                   "consistency_mad_k": guard.config.consistency_mad_k},
           "target_confident": confident.float().mean().item(), "through": through.float().mean().item(),
           "auroc_max": metrics.auroc(clean.amax(1), trig.amax(1)), "evidence": rows,
           # every evidence against its calibration maximum instead of its bound
           "empirical_bound": {
               "clean_alarm_share": (clean > cal_max).any(1).float().mean().item(),
               "trigger_through": (confident & ~(trig > cal_max).any(1)).float().mean().item()},
           "seconds": time.time() - t0}
    path = ROOT / "results" / "dev" / args.dataset / f"layers-{args.attack}-{args.seed}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2))
    print(f"{args.dataset} {args.attack}: {100 * out['target_confident']:.1f} % of triggered inputs "
          f"pass the target head's confidence test, {100 * out['through']:.1f} % every bound too; "
          f"AUROC of the max ratio {out['auroc_max']:.3f}; against each evidence's calibration "
          f"maximum instead: {100 * out['empirical_bound']['clean_alarm_share']:.1f} % of clean inputs "
          f"over some evidence, {100 * out['empirical_bound']['trigger_through']:.1f} % of triggered "
          f"inputs through\n")
    print("| evidence | AUROC | clean over bound | triggered over bound | binding for those through | "
          "their median ratio | calibration max ratio | clean / triggered over it |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        med = "-" if r["binding_median_ratio"] is None else f"{r['binding_median_ratio']:.2f}"
        print(f"| {r['evidence']} | {r['auroc']:.3f} | {100 * r['over_clean']:.1f} | "
              f"{100 * r['over_trigger']:.1f} | {100 * r['binding']:.1f} | {med} | "
              f"{r['calibration_max_ratio']:.2f} | {100 * r['over_clean_at_cal_max']:.1f} / "
              f"{100 * r['over_trigger_at_cal_max']:.1f} |")
    print(f"\nwrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
