"""Dev study (issue #6, WaNet): does a **contrastive** layer-wise test see what the absolute one misses?

The guard's consistency check asks, per layer, "how far is this input from class k's clean profile",
against a bound calibrated on class k. A warp such as WaNet keeps the deviation from the target's
profile inside that bound at most layers: early and middle layers are broad for every class. TED
(S&P 2024) asks a relative question instead: is the input's neighbourhood at layer l of the class it
is predicted as? This script measures that question in the guard's own terms:

    rel_l(x, k) = log d_l(x, k) - min_j log d_l(x, j)

where ``d_l(x, j)`` is the mean robust z-score of the model's (unmasked) layer-l units from class j's
clean profile (median / MAD of the fit split). ``rel = 0``: no class fits layer l better than k.
Each layer's bound is the ``m`` quantile of ``rel_l(x, y)`` on the calibration split, pooled over
classes (``rel`` is 0 for most clean samples, so a MAD is 0 and the guard's MAD rule cannot be used). A head k whose ``rel`` exceeds a bound at
any layer is inconsistent, on top of the guard's own check; the decision is re-taken with
``experiment.redecided`` (the same forwards), so rows differ only in the test.

A saved guard gives the layers, the fit/calibration split (its seeded split of the validation set)
and the heads' confidences; decisions are measured on the **dev** half of the test split (indices
0-4999), as ``scripts/dev_sweep.py`` does. Writes ``results/dev/<dataset>/contrastive-<attack>-<seed>.json``.

    python scripts/contrastive_consistency.py --attack wanet --seed 0
    python scripts/contrastive_consistency.py --table   # results/dev/contrastive-consistency.md
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from linkbreaker_ext import calibrate, data, experiment, metrics, salient, training  # noqa: E402
from linkbreaker_ext.guard import LinkBreaker  # noqa: E402
from linkbreaker_ext.layers import INPUT, units  # noqa: E402

VIEWS = ("mean", "max")


@torch.no_grad()
def layer_units(model, layers, x, rows=256):
    """``{"<layer>@<view>": [B, D]}``: channel means and maxima of each hidden layer's output on the
    unmasked model, plus the late features (the final Linear's input)."""
    mods = dict(model.named_modules())
    late_name = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)][-1]
    out = {}
    for s in range(0, len(x), rows):
        grabbed = {}
        hooks = [mods[n].register_forward_hook(lambda m, i, o, n=n: grabbed.__setitem__(n, o))
                 for n in layers]
        hooks.append(mods[late_name].register_forward_pre_hook(
            lambda m, i: grabbed.__setitem__("late", i[0])))
        try:
            model(x[s:s + rows])
        finally:
            for h in hooks:
                h.remove()
        for n in layers:
            for v in VIEWS:
                out.setdefault(f"{n}@{v}", []).append(units(grabbed[n], n, v))
        out.setdefault("late", []).append(grabbed["late"].flatten(1).float())
    return {k: torch.cat(v) for k, v in out.items()}


def class_deviations(u, profile):
    """``[B, K]`` mean robust z of ``u`` from every class's profile (every unit counts)."""
    center, scale = profile
    w = torch.ones_like(center)
    return salient.deviation(u, center, scale, w)


def relative(d):
    """``[B, K]`` log-deviation from class k minus the best class's: 0 where k fits best."""
    logd = d.clamp_min(1e-12).log()
    return logd - logd.min(1, keepdim=True).values


def run(args):
    torch.set_num_threads(args.threads)
    work = Path(f"runs/{args.dataset}")
    split = experiment.split_data(args.dataset, args.data, None, args.seed)
    model, meta = experiment.load_model(work / "models" / f"{args.attack}-{args.seed}.safetensors")
    attack = experiment.attacks.Attack.from_dict(meta["attack"]) if meta["attack"] else None
    model.eval()
    guard = LinkBreaker.load(work / "guards" / f"{args.attack}-{args.seed}.safetensors", model)
    K = data.spec(args.dataset).num_classes
    layers = [n for n in guard.layers if n != INPUT]
    y_val = split["y_val"]
    cal_idx, fit_idx = data.stratified_split(y_val, guard.config.calibration_fraction, seed=guard.config.seed)
    t = time.perf_counter()
    fit_u = layer_units(model, layers, split["x_val"][fit_idx])
    cal_u = layer_units(model, layers, split["x_val"][cal_idx])
    y_fit, y_cal = y_val[fit_idx], y_val[cal_idx]
    profiles = {e: salient.robust_class_profile(u, y_fit, K) for e, u in fit_u.items()}
    cal_rel = {e: relative(class_deviations(cal_u[e], profiles[e])) for e in profiles}

    xc, yc, xt, yt, target = experiment.eval_sets(attack, split["x_test"], split["y_test"], args.n,
                                                  args.n, args.seed, slice(0, 5000))
    rc, rt = guard(xc), guard(xt)
    test_rel = {}
    for name, x in (("clean", xc), ("trigger", xt)):
        u = layer_units(model, layers, x)
        test_rel[name] = {e: relative(class_deviations(u[e], profiles[e])) for e in profiles}
    evidences = list(profiles)
    report = {"dataset": args.dataset, "attack": args.attack, "seed": args.seed, "n": args.n,
              "evidences": evidences, "undefended": metrics.undefended(
                  training.predict_logits(model, xc).argmax(1), yc,
                  training.predict_logits(model, xt).argmax(1), target),
              "guard": metrics.defended(rc, yc, rt, yt, target), "rows": {}}
    # per evidence: AUROC of rel at the predicted-as-target head (clean: own class)
    auroc = {}
    for e in evidences:
        sc = test_rel["clean"][e][torch.arange(len(yc)), yc]
        st = test_rel["trigger"][e][:, target]
        auroc[e] = metrics.auroc(sc, st)
    report["auroc"] = auroc
    for m in args.ms:
        for use in args.subsets:
            chosen = evidences if use == "all" else [e for e in evidences if e.endswith(f"@{use}") or
                                                     (use == "late" and e == "late")]
            ratios = []
            for r, rel in ((rc, test_rel["clean"]), (rt, test_rel["trigger"])):
                q = torch.zeros_like(r.confidences)
                for e in chosen:
                    # rel is 0 for most clean samples (their class fits best), so a MAD is 0: the
                    # bound is a high quantile of the calibration split's own-class rel instead
                    own = cal_rel[e][torch.arange(len(y_cal)), y_cal]
                    b = torch.quantile(own, m).clamp_min(1e-3)
                    q = torch.maximum(q, rel[e] / b)
                ratios.append(torch.maximum(r.consistency, q) if r.consistency is not None else q)
            decided = [experiment.redecided(r, q, guard.config.inconsistent_verdict)
                       for r, q in zip((rc, rt), ratios)]
            report["rows"][f"m={m} {use}"] = metrics.defended(decided[0], yc, decided[1], yt, target)
    report["seconds"] = round(time.perf_counter() - t, 1)
    out = Path("results/dev") / args.dataset / f"contrastive-{args.attack}-{args.seed}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    g, u = report["guard"], report["undefended"]
    print(f"{args.attack}: undefended cda {u['cda']:.4f} asr {u['asr']:.4f} | guard cda {g['cda']:.4f} "
          f"asr {g['asr']:.4f}")
    print("  auroc " + " ".join(f"{e}={a:.3f}" for e, a in auroc.items()))
    for key, a in report["rows"].items():
        print(f"  {key:<12} cda {a['cda']:.4f} (drop {100 * (u['cda'] - a['cda']):.2f}) asr {a['asr']:.4f} "
              f"alarm c/t {a['alarm_rate_clean']:.3f}/{a['alarm_rate_trigger']:.3f}", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="cifar10")
    p.add_argument("--attack", default="wanet")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", default="../shared/data")
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--ms", nargs="*", type=float, default=[0.99, 0.995, 1.0],
                   help="quantiles of the calibration split's own-class rel used as bounds")
    p.add_argument("--subsets", nargs="*", default=["all", "mean", "max"])
    p.add_argument("--threads", type=int, default=1)
    run(p.parse_args())


if __name__ == "__main__":
    main()
