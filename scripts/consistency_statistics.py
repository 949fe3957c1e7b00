"""Dev study (issue #6): which neuron statistic and which aggregation let the consistency check see a
*small, localised* trigger (the Trojan square) without costing clean accuracy.

A saved guard's masks, fills, confidences and thresholds are kept; only the consistency evidence is
recomputed, from one batched forward of the N heads per input, for several variants:

* unit at a hidden conv layer: ``mean`` (the channel mean, today's default), ``max`` (the channel's
  spatial maximum), ``grid`` (channel means over a 4x4 grid of cells: where on the map, not only how
  much);
* aggregation over class k's salient units: ``mean`` robust z (today's) or ``top`` (the mean of the
  largest 10 % of z-scores: a trigger moves a few units a lot);
* reduction over layers: ``max`` of normalised deviations against one bound (the first default),
  ``perlayer``: every layer against its own calibrated bound, or ``pooled``: the same with each
  layer's spread (MAD) pooled over the classes (``consistency_reduce="per_layer"``).

Profiles come from the fit split of the validation set, bounds from its calibration split (the fit's
own seeded split), decisions are measured on the **dev** half of the test split (indices 0-4999),
with the same inputs as ``scripts/dev_sweep.py``. Writes ``results/dev/<dataset>/statistics-<attack>-<seed>.json``.

    python scripts/consistency_statistics.py --attack trojan-square --seed 0
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from linkbreaker_ext import calibrate, data, experiment, metrics, salient  # noqa: E402
from linkbreaker_ext.guard import GuardResult, LinkBreaker, decide  # noqa: E402
from linkbreaker_ext.layers import INPUT, LATE, expand_mask  # noqa: E402

GRID = 4
UNITS = ("mean", "max", "grid")
AGGREGATIONS = ("mean", "top")
TOP_SHARE = 0.1


def head_units(guard, x, rows=32):
    """Per masked layer and unit kind ``{(layer, kind): [B, N, D]}`` of the N heads' masked views, the
    late features ``{(late, kind)}`` and the confidences ``[B, N]``."""
    tapped, n = guard.tapped, guard.num_heads
    masks = {k: guard.masks[k] for k in guard.layers}
    out, confs = {}, []
    for s in range(0, len(x), rows):
        xb = x[s:s + rows]
        b = len(xb)
        seen = {}

        def mask(name, a):
            m, fill = masks[name], guard.fills[name]
            heads = a.reshape(b, n, *a.shape[1:])
            m = expand_mask(m.to(a.dtype), a.shape, name)
            o = (m * heads + (1 - m) * fill.to(a.dtype).reshape(a.shape[1:])).reshape(a.shape)
            if name == INPUT or o.dim() != 4:
                u = o.flatten(1).float()
                for kind in UNITS:
                    seen[(name, kind)] = u.reshape(b, n, -1)
            else:
                seen[(name, "mean")] = o.float().mean((2, 3)).reshape(b, n, -1)
                seen[(name, "max")] = o.float().amax((2, 3)).reshape(b, n, -1)
                g = torch.nn.functional.adaptive_avg_pool2d(o.float(), GRID)  # [BN, C, G, G]
                seen[(name, "grid")] = g.flatten(1).reshape(b, n, -1)
            return o

        with torch.no_grad():
            late = tapped._run(xb.repeat_interleave(n, 0), mask).reshape(b, n, -1).float()
            conf = guard.head_confidences(xb, features=late)[0]
        for kind in UNITS:
            seen[(LATE, kind)] = late
        for key, v in seen.items():
            out.setdefault(key, []).append(v)
        confs.append(conf)
    return {k: torch.cat(v) for k, v in out.items()}, torch.cat(confs)


def weights_for(guard, layer, kind, d):
    """Class k's salient units ``[K, D]`` for this unit kind (a channel's grid cells share its flag)."""
    w = guard.profile[f"weight.{layer}"]
    if w.shape[1] == d:
        return w
    return w[:, :, None].expand(-1, -1, d // w.shape[1]).reshape(w.shape[0], d)


def z_scores(u, center, scale):
    return ((u[:, None, :] if u.dim() == 2 else u) - center[None]).abs() / scale[None]


def aggregate(z, w, how):
    """``[B, K]`` from robust z ``[B, K, D]`` over class k's units ``w`` ``[K, D]``."""
    if how == "mean":
        wn = w / w.sum(1, keepdim=True).clamp_min(1e-12)
        return (z * wn[None]).sum(-1)
    count = w.sum(1)  # [K]
    top = (count * TOP_SHARE).ceil().clamp_min(1).long()
    zs = (z * w[None]).sort(-1, descending=True).values.cumsum(-1)  # [B, K, D]
    idx = (top - 1).view(1, -1, 1).expand(z.shape[0], -1, 1)
    return zs.gather(-1, idx).squeeze(-1) / top[None].float()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--dataset", default="cifar10")
    p.add_argument("--attack", default="trojan-square")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", default="../shared/data")
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--ks", nargs="*", type=float, default=[3, 4, 5, 6, 8])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--variants", nargs="*", default=None,
                   help="unit/aggregation pairs to measure, e.g. max/mean (default: all)")
    p.add_argument("--tag", default=None, help="suffix of the JSON file name")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(f"runs/{args.dataset}")
    split = experiment.split_data(args.dataset, args.data, 0.02, args.seed)
    model, meta = experiment.load_model(work / "models" / f"{args.attack}-{args.seed}.safetensors")
    attack = experiment.attacks.Attack.from_dict(meta["attack"]) if meta["attack"] else None
    guard = LinkBreaker.load(work / "guards" / f"{args.attack}-{args.seed}.safetensors", model)
    K = guard.num_heads
    t0 = time.time()

    x_val, y_val = split["x_val"], split["y_val"]
    calib_idx, fit_idx = data.stratified_split(y_val, guard.config.calibration_fraction,
                                               seed=guard.config.seed)
    val_units, _ = head_units(guard, x_val)
    rows = torch.arange(len(y_val))
    own = {key: u[rows, y_val] for key, u in val_units.items()}  # each sample through its own head
    del val_units
    xc, yc, xt, yt, target = experiment.eval_sets(attack, split["x_test"], split["y_test"], args.n,
                                                  args.n, args.seed, slice(0, 5000))
    print(f"val forward {time.time() - t0:.0f}s", flush=True)

    layers = [*guard.layers, LATE]
    variants = [(unit, how) for unit in UNITS for how in AGGREGATIONS
                if args.variants is None or f"{unit}/{how}" in args.variants]
    # per variant: profile per layer, norms, calibration deviations per layer [n_cal, L] (own head)
    prof = {}
    for var in variants:
        unit, how = var
        per_layer = {}
        cal = []
        for layer in layers:
            key = (layer, unit)
            u_fit, y_fit = own[key][fit_idx], y_val[fit_idx]
            center, scale = salient.robust_class_profile(u_fit, y_fit, K)
            w = weights_for(guard, layer, unit, u_fit.shape[1])
            d_fit = aggregate(z_scores(u_fit, center, scale), w, how)
            norm = torch.stack([d_fit[y_fit == k, k].median() for k in range(K)]).clamp_min(1e-6)
            u_cal = own[key][calib_idx]
            d_cal = aggregate(z_scores(u_cal, center, scale), w, how)
            cal.append(d_cal[torch.arange(len(calib_idx)), y_val[calib_idx]] / norm[y_val[calib_idx]])
            per_layer[layer] = (center, scale, w, norm)
        prof[var] = (per_layer, torch.stack(cal, 1))  # [n_cal, L]

    def dev_deviations(x):
        out = {var: [] for var in variants}
        conf = []
        for s in range(0, len(x), 200):
            units_, c = head_units(guard, x[s:s + 200])
            conf.append(c)
            for var in variants:
                per_layer, _ = prof[var]
                ds = []
                for layer in layers:
                    center, scale, w, norm = per_layer[layer]
                    ds.append(aggregate(z_scores(units_[(layer, var[0])], center, scale), w, var[1])
                              / norm[None])
                out[var].append(torch.stack(ds, -1))  # [B, N, L]
        return {v: torch.cat(d) for v, d in out.items()}, torch.cat(conf)

    dev_c, conf_c = dev_deviations(xc)
    dev_t, conf_t = dev_deviations(xt)
    print(f"dev forward {time.time() - t0:.0f}s", flush=True)

    y_cal = y_val[calib_idx]
    th = guard.thresholds
    results = {}
    for var in variants:
        _, cal = prof[var]
        name = f"{var[0]}/{var[1]}"
        res = {"layer_auroc": {}}
        # separability per layer: target head on triggered inputs against the true head on clean ones
        idc = torch.arange(len(yc))
        for li, layer in enumerate(layers):
            res["layer_auroc"][layer] = round(metrics.auroc(dev_c[var][idc, yc, li],
                                                            dev_t[var][:, target, li]), 4)
        for reduce in ("max", "perlayer", "pooled"):
            for k in args.ks:
                if reduce == "max":
                    bound = calibrate.consistency_bounds(cal.amax(1)[:, None].expand(-1, K), y_cal, k)  # [K]
                    ratio = [d.amax(-1) / bound for d in (dev_c[var], dev_t[var])]
                else:
                    bounds = torch.stack([calibrate.consistency_bounds(
                        cal[:, li, None].expand(-1, K), y_cal, k, pooled_spread=reduce == "pooled")
                        for li in range(len(layers))], 1)  # [K, L]
                    ratio = [(d / bounds[None]).amax(-1) for d in (dev_c[var], dev_t[var])]
                rs = []
                for conf, r in zip((conf_c, conf_t), ratio):
                    labels, verdict = decide(conf, th, r, "alarm")
                    rs.append(GuardResult(labels, verdict, conf, th, r))
                m = metrics.defended(rs[0], yc, rs[1], yt, target)
                res[f"{reduce}/k={k:g}"] = {"cda": round(m["cda"], 4), "asr": round(m["asr"], 4),
                                            "cda_strict": round(m["cda_strict"], 4)}
        results[name] = res
        best = " ".join(f"{r}:{v['cda']:.3f}/{v['asr']:.3f}" for r, v in res.items() if r != "layer_auroc")
        print(name, res["layer_auroc"], "\n   ", best, flush=True)
    out = Path("results/dev") / args.dataset / f"statistics-{args.attack}-{args.seed}{'-' + args.tag if args.tag else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"dataset": args.dataset, "attack": args.attack, "seed": args.seed,
                               "split": "dev (test indices 0-4999)", "n": args.n, "grid": GRID,
                               "top_share": TOP_SHARE, "variants": results}, indent=2))
    print(f"wrote {out} in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
