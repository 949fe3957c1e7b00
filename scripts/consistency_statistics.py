"""Dev study (issue #6): which neuron statistic and which aggregation let the consistency check see a
*small, localised* trigger (the Trojan square) without costing clean accuracy.

A saved guard's masks, fills, confidences and thresholds are kept; only the consistency evidence is
recomputed, from one batched forward of the N heads per input, for several variants:

* unit at a hidden conv layer: ``mean`` (the channel mean), ``max`` (the channel's spatial
  maximum), ``grid`` (channel means over a 4x4 grid of cells: where on the map, not only how much),
  ``gram`` (channel co-activations, the upper triangle of the Gram matrix over positions: Beatrix's
  first-order feature);
* aggregation over class k's salient units: ``mean`` robust z, ``top`` (the mean of the largest
  10 % of z-scores: a trigger moves a few units a lot) or ``maha`` (signed robust z whitened by the
  classes' pooled residual covariance, shrunk 20 % to its diagonal; every unit counts);
* reduction over layers: ``max`` of normalised deviations against one bound (the first default),
  ``perlayer``: every layer against its own calibrated bound, ``pooled``: the same with each layer's
  spread (MAD) pooled over the classes (``consistency_reduce="per_layer"``), or ``joint``: ``pooled``
  plus one more bound on the geometric mean over layers (a trigger that moves every layer a little).

``--combine a+b``: the layers of several variants, each with its own bound (the library's
``consistency_units="mean+max"`` is ``--combine mean/mean+max/mean`` with ``pooled``).

Profiles come from the fit split of the validation set, bounds from its calibration split (the fit's
own seeded split), decisions are measured on the **dev** half of the test split (indices 0-4999),
with the same inputs as ``scripts/dev_sweep.py``. Writes ``results/dev/<dataset>/statistics-<attack>-<seed>.json``.

    python scripts/consistency_statistics.py --attack trojan-square --seed 0
    python scripts/consistency_statistics.py --table      # results/dev/consistency-statistics.md
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
from linkbreaker_ext.verdict import GuardResult, decide  # noqa: E402
from linkbreaker_ext.layers import INPUT, LATE, expand_mask  # noqa: E402

GRID = 4
UNITS = ("mean", "max", "grid", "gram")
AGGREGATIONS = ("mean", "top", "maha")
SHRINK = 0.2  # maha: covariance shrunk this much towards its diagonal
TOP_SHARE = 0.1


def gram(a):
    """``[B, C(C+1)/2]`` channel co-activations of a conv map ``a`` ``[B, C, H, W]``: the upper
    triangle of its Gram matrix over positions (Beatrix's first-order Gram feature)."""
    f = a.flatten(2)
    g = f @ f.transpose(1, 2) / f.shape[2]
    i, j = torch.triu_indices(a.shape[1], a.shape[1], device=a.device)
    return g[:, i, j]


def head_units(guard, x, rows=32, kinds=UNITS):
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
                for kind in kinds:
                    seen[(name, kind)] = u.reshape(b, n, -1)
            else:
                view = {"mean": lambda t: t.mean((2, 3)), "max": lambda t: t.amax((2, 3)),
                        "grid": lambda t: torch.nn.functional.adaptive_avg_pool2d(t, GRID).flatten(1),
                        "gram": gram}
                for kind in kinds:
                    seen[(name, kind)] = view[kind](o.float()).reshape(b, n, -1)
            return o

        with torch.no_grad():
            late = tapped._run(xb.repeat_interleave(n, 0), mask).reshape(b, n, -1).float()
            conf = guard.head_confidences(xb, features=late)[0]
        for kind in kinds:
            seen[(LATE, kind)] = late
        for key, v in seen.items():
            out.setdefault(key, []).append(v)
        confs.append(conf)
    return {k: torch.cat(v) for k, v in out.items()}, torch.cat(confs)


def weights_for(guard, layer, kind, d):
    """Class k's salient units ``[K, D]`` for this unit kind (a channel's grid cells share its flag; a
    channel pair counts when both channels do)."""
    w = guard.profile.get(f"weight.{layer}")
    if w is None:  # a guard that reads this layer in several views weighs them alike
        w = next(v for k, v in guard.profile.items() if k.startswith(f"weight.{layer}@"))
    if w.shape[1] == d:
        return w
    if kind == "gram":
        i, j = torch.triu_indices(w.shape[1], w.shape[1])
        return w[:, i] * w[:, j]
    return w[:, :, None].expand(-1, -1, d // w.shape[1]).reshape(w.shape[0], d)


def z_scores(u, center, scale, how="mean"):
    """Robust z ``[B, K, D]``; signed for ``maha`` (whitened next)."""
    r = ((u[:, None, :] if u.dim() == 2 else u) - center[None]) / scale[None]
    return r if how == "maha" else r.abs()


def aggregate(z, w, how):
    """``[B, K]`` from robust z ``[B, K, D]`` over class k's units ``w`` ``[K, D]`` (``maha``: ``w``
    is the inverse residual covariance ``[D, D]``, and every unit counts)."""
    if how == "maha":
        return ((z @ w) * z).sum(-1).clamp_min(0).div(z.shape[-1]).sqrt()
    if how == "mean":
        wn = w / w.sum(1, keepdim=True).clamp_min(1e-12)
        return (z * wn[None]).sum(-1)
    count = w.sum(1)  # [K]
    top = (count * TOP_SHARE).ceil().clamp_min(1).long()
    zs = (z * w[None]).sort(-1, descending=True).values.cumsum(-1)  # [B, K, D]
    idx = (top - 1).view(1, -1, 1).expand(z.shape[0], -1, 1)
    return zs.gather(-1, idx).squeeze(-1) / top[None].float()


def bare_rates(dataset, attack_name, seed, n, data_source):
    """The undefended model's CDA and ASR on the same dev inputs (for the CDA drop)."""
    split = experiment.split_data(dataset, data_source, None, seed)
    model, meta = experiment.load_model(Path(f"runs/{dataset}") / "models" / f"{attack_name}-{seed}.safetensors")
    attack = experiment.attacks.Attack.from_dict(meta["attack"]) if meta["attack"] else None
    xc, yc, xt, yt, target = experiment.eval_sets(attack, split["x_test"], split["y_test"], n, n, seed,
                                                  slice(0, 5000))
    return metrics.undefended(training.predict_logits(model, xc).argmax(1), yc,
                              training.predict_logits(model, xt).argmax(1), target)


def write_table(data_source, out=Path("results/dev/consistency-statistics.md")):
    """The dev tables behind the choice (docs/method.md, "A small trigger" and "Two views")."""
    lines = ["# The consistency check's statistic and bound (dev half)", "",
             "Made by `python scripts/consistency_statistics.py --table` from the JSONs beside it "
             "(`results/dev/<dataset>/statistics-*.json`, each made by `python scripts/"
             "consistency_statistics.py --dataset D --attack A --n N [--variants ...] --tag T`). "
             "Dev half of the test split (indices 0-4999), seed-0 models and their saved guards; only "
             "the consistency evidence and its bounds change. Units: `mean` = channel mean, `max` = "
             "channel spatial max, `grid` = channel means on a 4x4 grid; aggregation `mean` = mean "
             "robust z over the salient units, `top` = mean of the top 10 %. Bound: `max` = one bound "
             "on the max of the layers' normalised deviations (the first default), `perlayer` = one "
             "bound per layer and class, `pooled` = per layer, with the MAD pooled over classes (the "
             "default since). The default now reads both views, `mean/mean+max/mean` with `pooled` "
             "bounds (last section).", ""]
    screen = Path("results/dev/cifar10/statistics-trojan-square-0.json")
    if screen.is_file():
        r = json.loads(screen.read_text())
        layers = list(next(iter(r["variants"].values()))["layer_auroc"])
        lines += [f"## Screening: CIFAR-10 Trojan square, {r['n']} + {r['n']} inputs", "",
                  "AUROC per layer (target head on triggered inputs against the true head on clean "
                  "ones), then CDA / ASR (hint reading, %) at k = 5:", "",
                  "| units / aggregation | " + " | ".join(layers) + " | bound max | bound perlayer |",
                  "| --- " * (len(layers) + 3) + "|"]
        for name, v in r["variants"].items():
            cells = [f"{v['layer_auroc'][l]:.3f}" for l in layers]
            cells += [f"{100 * v[f'{b}/k=5']['cda']:.1f} / {100 * v[f'{b}/k=5']['asr']:.1f}"
                      for b in ("max", "perlayer")]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    for dataset in ("cifar10", "mnist"):
        runs = {a: Path(f"results/dev/{dataset}/statistics-{a}-0-n2000.json")
                for a in ("trojan-square", "badnets", "blended", "none")}
        runs = {a: json.loads(p.read_text()) for a, p in runs.items() if p.is_file()}
        if not runs:
            continue
        bare = {a: bare_rates(dataset, a, 0, r["n"], data_source) for a, r in runs.items()}
        n = next(iter(runs.values()))["n"]
        lines += [f"## {dataset.upper()}, {n} + {n} inputs: CDA drop (points) / ASR (%)", "",
                  "Bare model: " + "; ".join(f"{a} CDA {100 * b['cda']:.2f} ASR {100 * b['asr']:.2f}"
                                             for a, b in bare.items()) + ".", "",
                  "| variant | k | " + " | ".join(runs) + " |", "| --- " * (len(runs) + 2) + "|"]
        for name, bound, label in (("mean/mean", "max", "channel mean, one bound (first default)"),
                                   ("max/mean", "max", "channel max, one bound"),
                                   ("max/mean", "perlayer", "channel max, per layer, class MAD"),
                                   ("max/mean", "pooled", "channel max, per layer, pooled MAD (second default)")):
            ks = sorted({float(key.split("=")[1]) for key in runs[next(iter(runs))]["variants"][name]
                         if key.startswith(bound + "/")})
            for k in ks:
                cells = []
                for a, r in runs.items():
                    v = r["variants"][name][f"{bound}/k={k:g}"]
                    cells.append(f"{round(100 * (bare[a]['cda'] - v['cda']), 2) + 0.0:.2f} / {100 * v['asr']:.2f}")
                mark = "**" if (name, bound, k) == ("max/mean", "pooled", 5.0) else ""
                lines.append(f"| {mark}{label}{mark} | {k:g} | " + " | ".join(cells) + " |")
        lines += ["", "(*none*: a model without a backdoor probed with a BadNets trigger; its ASR is "
                  "the share of probed inputs labelled 0.)", ""]
    for dataset in ("cifar10", "mnist"):
        combos = {a: Path(f"results/dev/{dataset}/statistics-{a}-0-combo.json")
                  for a in ("wanet", "trojan-square", "badnets", "blended", "none")}
        combos = {a: json.loads(p.read_text()) for a, p in combos.items() if p.is_file()}
        if not combos:
            continue
        bare = {a: bare_rates(dataset, a, 0, r["n"], data_source) for a, r in combos.items()}
        n = next(iter(combos.values()))["n"]
        lines += [f"## Both views of a channel (the default: **bold**), {dataset.upper()}, {n} + {n} "
                  "inputs", "", "CDA drop (points) / ASR (%). `a+b`: the layers of both variants, each "
                  "judged against its own bound (`pooled`) or all under one bound on their maximum "
                  "(`max`). Made with `--variants mean/mean mean/top max/mean --combine "
                  "mean/mean+max/mean mean/top+max/mean --tag combo`.", "",
                  "Bare model: " + "; ".join(f"{a} CDA {100 * b['cda']:.2f} ASR {100 * b['asr']:.2f}"
                                             for a, b in bare.items()) + ".", "",
                  "| variant | bound | k | " + " | ".join(combos) + " |", "| --- " * (len(combos) + 3) + "|"]
        for name in ("max/mean", "mean/mean", "mean/top", "mean/mean+max/mean", "mean/top+max/mean"):
            for bound in ("max", "pooled"):
                for k in (4, 5, 6):
                    cells = []
                    for a, r in combos.items():
                        v = r["variants"][name][f"{bound}/k={k:g}"]
                        cells.append(f"{round(100 * (bare[a]['cda'] - v['cda']), 2) + 0.0:.2f} / "
                                     f"{100 * v['asr']:.2f}")
                    mark = "**" if (name, bound, k) == ("mean/mean+max/mean", "pooled", 5) else ""
                    lines.append(f"| {mark}{name}{mark} | {bound} | {k} | " + " | ".join(cells) + " |")
        lines.append("")
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


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
    p.add_argument("--combine", nargs="*", default=[],
                   help="variants judged together, every layer of each against its own bound, e.g. "
                        "mean/mean+max/mean (the parts must be among --variants)")
    p.add_argument("--table", action="store_true",
                   help="only write results/dev/consistency-statistics.md from the saved JSONs")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.table:
        return write_table(args.data)
    work = Path(f"runs/{args.dataset}")
    split = experiment.split_data(args.dataset, args.data, None, args.seed)
    model, meta = experiment.load_model(work / "models" / f"{args.attack}-{args.seed}.safetensors")
    attack = experiment.attacks.Attack.from_dict(meta["attack"]) if meta["attack"] else None
    guard = LinkBreaker.load(work / "guards" / f"{args.attack}-{args.seed}.safetensors", model)
    K = guard.num_heads
    t0 = time.time()

    x_val, y_val = split["x_val"], split["y_val"]
    calib_idx, fit_idx = data.stratified_split(y_val, guard.config.calibration_fraction,
                                               seed=guard.config.seed)
    variants = [(unit, how) for unit in UNITS for how in AGGREGATIONS
                if args.variants is None or f"{unit}/{how}" in args.variants]
    kinds = {unit for unit, _ in variants}
    val_units, _ = head_units(guard, x_val, kinds=kinds)
    rows = torch.arange(len(y_val))
    own = {key: u[rows, y_val] for key, u in val_units.items()}  # each sample through its own head
    del val_units
    xc, yc, xt, yt, target = experiment.eval_sets(attack, split["x_test"], split["y_test"], args.n,
                                                  args.n, args.seed, slice(0, 5000))
    print(f"val forward {time.time() - t0:.0f}s", flush=True)

    layers = [*guard.layers, LATE]
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
            if how == "maha":  # whitened by the classes' pooled residual covariance (all units)
                r = ((u_fit - center[y_fit]) / scale[y_fit]).double()
                c = r.T @ r / len(r)
                c = (1 - SHRINK) * c + SHRINK * torch.diag(c.diagonal().clamp_min(1e-6))
                w = torch.linalg.inv(c).float()
            d_fit = aggregate(z_scores(u_fit, center, scale, how), w, how)
            norm = torch.stack([d_fit[y_fit == k, k].median() for k in range(K)]).clamp_min(1e-6)
            u_cal = own[key][calib_idx]
            d_cal = aggregate(z_scores(u_cal, center, scale, how), w, how)
            cal.append(d_cal[torch.arange(len(calib_idx)), y_val[calib_idx]] / norm[y_val[calib_idx]])
            per_layer[layer] = (center, scale, w, norm)
        prof[var] = (per_layer, torch.stack(cal, 1))  # [n_cal, L]

    def dev_deviations(x):
        out = {var: [] for var in variants}
        conf = []
        for s in range(0, len(x), 200):
            units_, c = head_units(guard, x[s:s + 200], kinds=kinds)
            conf.append(c)
            for var in variants:
                per_layer, _ = prof[var]
                ds = []
                for layer in layers:
                    center, scale, w, norm = per_layer[layer]
                    ds.append(aggregate(z_scores(units_[(layer, var[0])], center, scale, var[1]), w,
                                        var[1]) / norm[None])
                out[var].append(torch.stack(ds, -1))  # [B, N, L]
        return {v: torch.cat(d) for v, d in out.items()}, torch.cat(conf)

    dev_c, conf_c = dev_deviations(xc)
    dev_t, conf_t = dev_deviations(xt)
    print(f"dev forward {time.time() - t0:.0f}s", flush=True)
    # combined evidence: every layer in each variant's view, each with its own bound
    for combo in args.combine:
        parts = [tuple(v.split("/")) for v in combo.split("+")]
        missing = [p for p in parts if p not in prof]
        if missing:
            p.error(f"--combine {combo}: measure {missing} with --variants too")
        prof[combo] = (None, torch.cat([prof[v][1] for v in parts], 1))
        dev_c[combo] = torch.cat([dev_c[v] for v in parts], -1)
        dev_t[combo] = torch.cat([dev_t[v] for v in parts], -1)
        variants.append(combo)

    y_cal = y_val[calib_idx]
    th = guard.thresholds
    results = {}
    for var in variants:
        _, cal = prof[var]
        name = var if isinstance(var, str) else f"{var[0]}/{var[1]}"
        res = {"layer_auroc": {}}
        names = layers if not isinstance(var, str) else [f"{lay}@{i}" for i in range(len(var.split("+")))
                                                            for lay in layers]
        # separability per layer: target head on triggered inputs against the true head on clean ones
        idc = torch.arange(len(yc))
        for li, layer in enumerate(names):
            res["layer_auroc"][layer] = round(metrics.auroc(dev_c[var][idc, yc, li],
                                                            dev_t[var][:, target, li]), 4)
        for reduce in ("max", "perlayer", "pooled", "joint"):
            for k in args.ks:
                if reduce == "max":
                    bound = calibrate.consistency_bounds(cal.amax(1)[:, None].expand(-1, K), y_cal, k)  # [K]
                    ratio = [d.amax(-1) / bound for d in (dev_c[var], dev_t[var])]
                elif reduce == "joint":
                    # pooled per-layer bounds, and one more on the geometric mean over layers (a
                    # trigger that moves several layers a little, each within its own bound)
                    bounds = calibrate.layer_bounds(cal[:, None, :].expand(-1, K, -1), y_cal, k)
                    geo = lambda d: d.clamp_min(1e-12).log().mean(-1).exp()  # noqa: E731
                    jb = calibrate.consistency_bounds(geo(cal)[:, None].expand(-1, K), y_cal, k,
                                                      pooled_spread=True)
                    ratio = [torch.maximum((d / bounds[None]).amax(-1), geo(d) / jb)
                             for d in (dev_c[var], dev_t[var])]
                else:
                    bounds = calibrate.layer_bounds(cal[:, None, :].expand(-1, K, -1), y_cal, k,
                                                    pooled_spread=reduce == "pooled")  # [K, L]
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
