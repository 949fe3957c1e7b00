"""Design sweeps on the **dev** half of a test split (indices 0-4999): fit the guard with settings
overridden, measure it, write one JSON per setting. Design decisions for natural images were made
with this script; the reported tables come from ``linkbreaker reproduce`` on the held-out half.

    python scripts/dev_sweep.py --dataset cifar10 --attack badnets --seed 0 \
        --set consistency=False --set tolerance_in=0.05 --n 1000
"""
from __future__ import annotations

import argparse
import ast
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from linkbreaker_ext import data, experiment, models  # noqa: E402
from linkbreaker_ext.guard import LinkBreaker  # noqa: E402


def load(dataset, attack_name, seed, work):
    """The cached model, or the latest per-epoch checkpoint of one still training."""
    path = Path(work) / "models" / f"{attack_name}-{seed}.safetensors"
    if path.is_file():
        model, meta = experiment.load_model(path)
        return model, experiment.attacks.Attack.from_dict(meta["attack"]) if meta["attack"] else None, "final"
    state = torch.load(path.with_suffix(".ckpt"), weights_only=True)
    model = models.build_model(dataset, data.spec(dataset).num_classes)
    model.load_state_dict(state["model"])
    return model.eval(), experiment.make_attack(attack_name, 0, seed, dataset), f"epoch {state['epoch']}"


def head_diagnostics(rc, yc, rt, yt, target):
    """Which test passes where: the true head on clean inputs, the target and the source head on
    triggered inputs (confidence test, consistency test)."""
    def rates(r, k):
        idx = torch.arange(len(k))
        conf_ok = (r.confidences[idx, k] >= r.thresholds[k]).float().mean().item()
        cons_ok = (r.consistency[idx, k] <= 1).float().mean().item() if r.consistency is not None else 1.0
        return round(conf_ok, 3), round(cons_ok, 3)
    t = torch.full_like(yt, target)
    return {"clean_true(conf,cons)": rates(rc, yc), "trig_target": rates(rt, t), "trig_source": rates(rt, yt)}


def calibration_deviations(guard, split):
    """The calibration split's deviations, as the fit measured them (recomputed for a loaded guard:
    the split is the fit's own seeded stratified split of the validation set)."""
    dev = guard.diagnostics.get("calibration_deviations")
    y_val = split["y_val"]
    calib_idx, _ = data.stratified_split(y_val, guard.config.calibration_fraction, seed=guard.config.seed)
    if dev is None:
        dev = guard.deviations(split["x_val"][calib_idx].to(guard.device)).cpu()
    return dev, y_val[calib_idx]


def sweep_bounds(guard, split, ks, rc, yc, rt, yt, target, xc=None, xt=None, centers=("class",)):
    """The guard's decisions with the consistency bound at ``median + k * MAD`` for each k, from the
    same forward passes (a bound changes only the comparison), under both verdicts. With per-layer
    bounds (``consistency_reduce="per_layer"``) every layer's deviations are needed: one more
    forward of the heads over ``xc``, ``xt`` and the calibration split."""
    from linkbreaker_ext import calibrate, metrics
    per_layer = guard.config.consistency_reduce == "per_layer"
    if per_layer:
        y_val = split["y_val"]
        calib_idx, _ = data.stratified_split(y_val, guard.config.calibration_fraction,
                                             seed=guard.config.seed)
        # relative to the fitted per-layer bounds; the log-MAD rule is invariant to that scale
        cal = guard.deviations(split["x_val"][calib_idx].to(guard.device), by_layer=True).cpu()
        y_cal = y_val[calib_idx]
        layers_c = guard.deviations(xc.to(guard.device), by_layer=True).cpu()
        layers_t = guard.deviations(xt.to(guard.device), by_layer=True).cpu()
        if any(c != "class" for c in centers):
            # Cross-class centers need the deviations before the fitted per-class bounds: those were
            # folded into the norms, and the fit split's own-class median deviation per class and
            # layer is exactly 1 / that bound (the norm is that median before folding). Dividing by
            # it gives back the deviations relative to each class's typical one.
            fit_idx = data.stratified_split(y_val, guard.config.calibration_fraction,
                                            seed=guard.config.seed)[1]
            fit = guard.deviations(split["x_val"][fit_idx].to(guard.device), by_layer=True).cpu()
            y_fit = y_val[fit_idx]
            K = fit.shape[1]
            med = torch.stack([fit[y_fit == k, k].median(0).values for k in range(K)])  # [K, L]
            cal, layers_c, layers_t = (d / med for d in (cal, layers_c, layers_t))
    else:
        dev, y_cal = calibration_deviations(guard, split)
        fitted = guard.profile["bounds"]
    out = {}
    for k, center in ((k, c) for c in centers for k in ks):
        if per_layer:
            b = calibrate.layer_bounds(cal, y_cal, k, center=center)  # [K, L]
            ratios = [(d / b).amax(-1).to(r.confidences.device) for d, r in ((layers_c, rc), (layers_t, rt))]
        else:
            rescale = fitted / calibrate.consistency_bounds(dev, y_cal, k).to(fitted.device)
            ratios = [r.consistency * rescale for r in (rc, rt)]
        res = {}
        for verdict in ("ood", "alarm"):
            rs = [experiment.redecided(r, q, verdict) for r, q in zip((rc, rt), ratios)]
            res[verdict] = metrics.defended(rs[0], yc, rs[1], yt, target)
        out[str(k) if center == "class" else f"{k}-{center}"] = res
    return out


def sweep_thresholds(guard, split, rc, yc, rt, yt, target):
    """The guard's decisions with the paper's confidence thresholds recalibrated with each class's own
    MAD (``class``, the fit's rule) or with the MAD pooled over classes (``pooled``), the fitted
    consistency ratios kept: one more forward of the heads over the calibration split."""
    from linkbreaker_ext import calibrate, metrics
    from linkbreaker_ext.verdict import GuardResult, decide
    cfg = guard.config
    y_val = split["y_val"]
    calib_idx, _ = data.stratified_split(y_val, cfg.calibration_fraction, seed=cfg.seed)
    half = torch.full((guard.num_heads,), 0.5, device=guard.device)
    conf = guard.head_confidences(split["x_val"][calib_idx].to(guard.device), thresholds=half)[0].cpu()
    out = {}
    for spread in ("class", "pooled"):
        th = calibrate.confidence_thresholds(conf, y_val[calib_idx], cfg.mad_k, cfg.out_quantile,
                                             cfg.threshold_floor, pooled_spread=spread == "pooled")
        rs = []
        for r in (rc, rt):
            t = th.to(r.confidences.device)
            labels, verdict = decide(r.confidences, t, r.consistency, cfg.inconsistent_verdict)
            rs.append(GuardResult(labels, verdict, r.confidences, t, r.consistency))
        out[spread] = metrics.defended(rs[0], yc, rs[1], yt, target)
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--dataset", default="cifar10")
    p.add_argument("--attack", default="badnets")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", default="../shared/data")
    p.add_argument("--work", default=None)
    p.add_argument("--n", type=int, default=1000, help="clean and triggered dev inputs each")
    p.add_argument("--set", action="append", default=[], help="GuardConfig field=value (repeatable)")
    p.add_argument("--layers", nargs="*", default=None)
    p.add_argument("--tag", default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--guard", default=None,
                   help="a guard saved for this model (e.g. runs/cifar10/guards/badnets-0.safetensors) "
                        "instead of a fresh fit")
    p.add_argument("--reduce", choices=["per_layer", "max", "mean"], default=None,
                   help="with --guard: judge the saved guard with this consistency_reduce (bounds are "
                        "recalibrated from the calibration split by --sweep-k)")
    p.add_argument("--sweep-k", nargs="*", type=float, default=[],
                   help="consistency_mad_k values to measure from the same forward passes")
    p.add_argument("--bound-centers", nargs="*", default=["class"], choices=["class", "pooled", "shrunk"],
                   help="with --sweep-k and per-layer bounds: the bound's center rule(s) "
                        "(calibrate.consistency_bounds); keys other than 'class' get a suffix")
    p.add_argument("--threshold-spreads", action="store_true",
                   help="also measure the confidence thresholds with the MAD pooled over classes")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    work = args.work or f"runs/{args.dataset}"
    overrides = {k: ast.literal_eval(v) for k, v in (s.split("=", 1) for s in args.set)}
    split = experiment.split_data(args.dataset, args.data, None, args.seed)
    model, attack, stage = load(args.dataset, args.attack, args.seed, work)
    t = time.perf_counter()
    if args.guard:
        if overrides or args.layers:
            p.error("--guard measures a saved guard as it is: drop --set/--layers")
        guard = LinkBreaker.load(args.guard, model)
        if args.reduce:
            import dataclasses
            guard.config = dataclasses.replace(guard.config, consistency_reduce=args.reduce)
    else:
        guard = LinkBreaker.fit(model, split["x_val"], split["y_val"], data.spec(args.dataset).num_classes,
                                layers=args.layers, progress=False, seed=args.seed, **overrides)
    fit_s = time.perf_counter() - t
    report, (rc, yc, rt, yt) = experiment.evaluate(model, guard, attack, split["x_test"], split["y_test"], args.n,
                                    args.n, args.seed, slice(0, 5000))
    report.update(settings=overrides, layers=guard.layers, model_stage=stage, fit_s=fit_s,
                  kept={k: m.mean().item() for k, m in guard.masks.items()})
    report["heads"] = head_diagnostics(rc, yc, rt, yt, attack.target if attack else 0)
    if args.sweep_k and rc.consistency is not None:
        xc, _, xt, _, _ = experiment.eval_sets(attack, split["x_test"], split["y_test"], args.n, args.n,
                                               args.seed, slice(0, 5000))
        report["sweep_k"] = sweep_bounds(guard, split, args.sweep_k, rc, yc, rt, yt,
                                         attack.target if attack else 0, xc, xt,
                                         centers=args.bound_centers)
    if args.threshold_spreads:
        report["threshold_spreads"] = sweep_thresholds(guard, split, rc, yc, rt, yt,
                                                       attack.target if attack else 0)
    tag = args.tag or "-".join(f"{k}={v}" for k, v in overrides.items()) or "default"
    out = Path(work) / "dev" / f"{args.attack}-{args.seed}-{tag}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    a, b = report["after"], report["before"]
    print(f"[{tag}] {stage} fit {fit_s:.0f}s kept {report['kept']}\n  before cda {b['cda']:.3f} asr "
          f"{b['asr']:.3f} | after cda {a['cda']:.3f} asr {a['asr']:.3f} strict {a['cda_strict']:.3f}/{a['asr_strict']:.3f} r_acc {a['r_acc']:.3f} "
          f"alarm c/t {a['alarm_rate_clean']:.3f}/{a['alarm_rate_trigger']:.3f} "
          f"ood c/t {a['ood_rate_clean']:.3f}/{a['ood_rate_trigger']:.3f}\n  heads {report['heads']}",
          flush=True)
    for k, verdicts in report.get("sweep_k", {}).items():
        for verdict, a in verdicts.items():
            print(f"  k={k} {verdict}: cda {a['cda']:.4f} asr {a['asr']:.4f} strict "
                  f"{a['cda_strict']:.4f}/{a['asr_strict']:.4f} alarm c/t {a['alarm_rate_clean']:.4f}/"
                  f"{a['alarm_rate_trigger']:.4f} ood c/t {a['ood_rate_clean']:.4f}/{a['ood_rate_trigger']:.4f}",
                  flush=True)
    for spread, a in report.get("threshold_spreads", {}).items():
        print(f"  thresholds {spread}: cda {a['cda']:.4f} asr {a['asr']:.4f} strict {a['cda_strict']:.4f}/"
              f"{a['asr_strict']:.4f} alarm c/t {a['alarm_rate_clean']:.4f}/{a['alarm_rate_trigger']:.4f} "
              f"ood c/t {a['ood_rate_clean']:.4f}/{a['ood_rate_trigger']:.4f}", flush=True)
    if "after_without_consistency" in report:
        a = report["after_without_consistency"]
        print(f"  no veto: cda {a['cda']:.3f} asr {a['asr']:.3f} strict {a['cda_strict']:.3f}/"
              f"{a['asr_strict']:.3f} ood c/t {a['ood_rate_clean']:.3f}/{a['ood_rate_trigger']:.3f}",
              flush=True)


if __name__ == "__main__":
    main()
