"""Dev study (issue #6): which samples should set the consistency bounds?

The fit keeps 30 % of the 2 % validation set for calibration (589 GTSRB signs, 300 CIFAR-10
images), and the per-layer ``"tail"`` bound sits just past that split's largest deviation, capped at
k MADs. So how far it reaches depends on how many samples the split has, and a layer with a heavy
clean tail is held at k MADs and refuses more clean inputs than the others. This script measures
both on the saved guards of a work folder, without a refit: one forward of the heads over the
validation set and ``--n`` clean and triggered inputs of the **dev** half of the test split (with
the stability test's neighbours), cached in ``<work>/dev/<run>-calsize.safetensors``; then the
bounds are recomputed (the guard's own rule, k and margin) from

- random stratified subsets of the calibration split (25-100 %, consistency veto alone);
- the calibration split plus the fit split, in-sample (the class profiles were computed on it);
- the calibration split plus the fit split out of fold (``consistency_split="all"``);
- each of those with a quantile floor (``consistency_quantile``);

and the heads decided again (:func:`linkbreaker_ext.verdict.decide`, the guard's verdict and hint)
with the stability test's ratios as the guard combines them: the same answers a guard recalibrated
with those settings gives. It also reports how much smaller the in-sample deviations are.

    python scripts/calibration_size.py --dataset gtsrb --work runs/gtsrb-sgdbf16-e30 \\
        --runs badnets-0 none-1 trojan-watermark-1
    python scripts/calibration_size.py --table   # markdown summary of the saved studies

Writes ``results/dev/calibration-size/<dataset>-<run>-<work name>.json`` (``--table``: the
``summary.md`` beside them).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from linkbreaker_ext import calibrate, data, experiment, fitting, salient, training  # noqa: E402
from linkbreaker_ext.verdict import combined_ratio, decide  # noqa: E402

DEV = slice(0, 5000)
FRACTIONS = (0.25, 0.5, 0.75, 1.0)
QUANTILE = 0.995
OUT = ROOT / "results" / "dev" / "calibration-size"


def dump(dataset: str, run: str, work: Path, n: int, source: str) -> Path:
    """The heads' confidences and per-layer deviation ratios (to the fitted bounds) on both
    validation splits and the dev inputs, the fit split's out-of-fold ratios, and the dev inputs'
    stability ratios, cached once per run."""
    out = work / "dev" / f"{run}-calsize.safetensors"
    if out.is_file():
        return out
    split, model, attack, guard, seed = experiment.saved_run(dataset, run, source, work)
    cfg = guard.config
    if cfg.consistency_center != "pooled" or cfg.consistency_reduce != "per_layer" or cfg.drop_misclassified:
        raise SystemExit(f"{run}: this study recomputes pooled per-layer bounds on the whole validation set")
    cal_idx, fit_idx = data.stratified_split(split["y_val"], cfg.calibration_fraction, seed=cfg.seed)
    xc, yc, xt, yt, target = experiment.eval_sets(attack, split["x_test"], split["y_test"], n, n, seed, DEV)
    t = {}
    for name, x in (("cal", split["x_val"][cal_idx]), ("fit", split["x_val"][fit_idx]), ("c", xc), ("t", xt)):
        t[f"conf_{name}"], t[f"dev_{name}"] = guard._heads_with_deviations(x, by_layer=True)
        if name in ("c", "t"):
            t[f"stab_{name}"] = guard.stability_ratios(x, t[f"conf_{name}"])
    # the fit split's deviations out of fold, in the same units as the rest (the guard's norms hold
    # its fitted per-layer bounds; with the pooled center every class shares a layer's bound)
    names = guard._profile_layers()
    units, y_fit = fitting._own_units(guard, split["x_val"][fit_idx], split["y_val"][fit_idx])
    oof, used = salient.out_of_fold_deviations({k: units[k] for k in names}, y_fit,
                                               {k: guard.profile[f"weight.{k}"] for k in names},
                                               guard.num_heads, seed=cfg.seed)
    typical = fitting._typical_deviations(guard, units, y_fit, guard.num_heads)  # [K, L], unbounded
    fitted_bound = (guard.profile["norms"] / typical)[0].cpu()  # [L]
    t.update({"oof_fit": oof / fitted_bound, "oof_used": used,
              "y_cal": split["y_val"][cal_idx], "y_fit": split["y_val"][fit_idx], "y_c": yc, "y_t": yt,
              "pred_c": training.predict_logits(model, xc).argmax(1),
              "pred_t": training.predict_logits(model, xt).argmax(1),
              "thresholds": guard.thresholds, "target": torch.tensor(target)})
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in t.items()}, str(out),
              metadata={"rule": cfg.consistency_bound, "k": str(cfg.consistency_mad_k),
                        "margin": str(cfg.consistency_margin), "ood_hint": cfg.ood_hint,
                        "inconsistent_verdict": cfg.inconsistent_verdict})
    return out


def subset(y: torch.Tensor, fraction: float, g: torch.Generator) -> torch.Tensor:
    """A random ``fraction`` of every class's samples (at least one each)."""
    picked = []
    for k in y.unique():
        idx = (y == k).nonzero().flatten()
        m = max(1, round(fraction * len(idx)))
        picked.append(idx[torch.randperm(len(idx), generator=g)[:m]])
    return torch.cat(picked)


def cached_forwards(work: Path) -> list:
    """The cached dev forwards of :func:`dump` under ``work`` (``dev/<run>-calsize.safetensors``),
    the input of every dev study that re-decides them; a clear exit where there are none."""
    paths = sorted((Path(work) / "dev").glob("*-calsize.safetensors"))
    if not paths:
        raise SystemExit(f"{work}: no cached dev forwards; run scripts/calibration_size.py first")
    return paths


def studies_by_work(out: Path, work: Path, runs: list) -> dict:
    """Saves one work folder's per-run results as ``out/<work name>.json`` and returns every work
    folder's saved so far, ``{work: runs}``: a study's summary covers all the folders it was run on,
    one call each."""
    (out / f"{Path(work).name}.json").write_text(json.dumps({"work": str(work), "runs": runs}, indent=1) + "\n")
    return {json.loads(q.read_text())["work"]: json.loads(q.read_text())["runs"] for q in sorted(out.glob("*.json"))}


class Study:
    """One cached run: its pools of calibration deviations, and the guard's answers with bounds set
    on any of them."""

    def __init__(self, path: Path):
        self.c = load_file(str(path))
        with safe_open(str(path), "pt") as f:
            self.meta = f.metadata()
        c = self.c
        self.k = c["conf_cal"].shape[1]
        conf_ok = lambda conf, y: conf[torch.arange(len(y)), y] >= c["thresholds"][y]  # noqa: E731
        used = c["oof_used"].bool()
        self.pools = {
            "cal": (c["dev_cal"], c["y_cal"], conf_ok(c["conf_cal"], c["y_cal"])),
            "fit in-sample": (c["dev_fit"], c["y_fit"], conf_ok(c["conf_fit"], c["y_fit"])),
            "fit out of fold": (calibrate.own_class_pool(c["oof_fit"][used], c["y_fit"][used], self.k), c["y_fit"][used],
                                conf_ok(c["conf_fit"][used], c["y_fit"][used])),
        }

    def pool(self, *names):
        parts = [self.pools[n] for n in names]
        return tuple(torch.cat([p[i] for p in parts]) for i in range(3))

    def bounds(self, dev, y, keep=None, quantile=None) -> torch.Tensor:
        """``[K, L]``: the guard's own bound rule (its k and margin, pooled center) on ``dev``
        (``[n, K, L]``, labels ``y``), with a ``quantile`` floor over the ``keep`` samples."""
        m = self.meta
        return calibrate.layer_bounds(dev, y, float(m["k"]), center="pooled", rule=m["rule"],
                                      margin=float(m["margin"]), quantile=quantile, keep=keep)

    def default_bounds(self) -> torch.Tensor:
        """The bounds of today's default: the whole validation set (the fit split out of fold),
        with the quantile floor."""
        return self.bounds(*self.pool("cal", "fit out of fold"), quantile=QUANTILE)

    def judged(self, dev, y, keep, quantile=None, stability=True) -> dict:
        """CDA (hint reading), clean vetoes of a right model's true head, clean refusals and ASR, in
        %, with the bounds set on ``dev`` (``[n, K, L]``, labels ``y``)."""
        c, m = self.c, self.meta
        b = self.bounds(dev, y, keep, quantile)
        res = {}
        for s in ("c", "t"):
            ratio = combined_ratio((c[f"dev_{s}"] / b).amax(-1), c[f"stab_{s}"] if stability else None)
            res[s] = decide(c[f"conf_{s}"], c["thresholds"], ratio, m["inconsistent_verdict"], m["ood_hint"])
        y_c, target = c["y_c"], int(c["target"])
        right = c["pred_c"] == y_c
        vetoed = (c["dev_c"][torch.arange(len(y_c)), y_c] / b[y_c]).amax(-1) > 1
        pct = lambda t: round(100 * t.double().mean().item(), 3)  # noqa: E731
        return {"cda": pct(res["c"][0] == y_c), "true_head_vetoed_when_model_right": pct(vetoed & right),
                "clean_refused": pct(res["c"][1] != 0), "asr": pct(res["t"][0] == target)}


def study(path: Path, resamples: int) -> dict:
    s = Study(path)
    g = torch.Generator().manual_seed(0)
    rows = {}
    dev, y, keep = s.pools["cal"]
    for frac in FRACTIONS:  # the consistency veto alone: how the bound's reach grows with the sample count
        runs = []
        for _ in range(1 if frac == 1.0 else resamples):
            i = subset(y, frac, g)
            runs.append(s.judged(dev[i], y[i], keep[i], stability=False))
        rows[f"veto alone, cal {frac:g}"] = {**{k: round(sum(r[k] for r in runs) / len(runs), 3) for k in runs[0]},
                                             "n": round(frac * len(y))}
    variants = {"cal (until session 31)": ("cal",), "cal + fit in-sample": ("cal", "fit in-sample"),
                "cal + fit out of fold": ("cal", "fit out of fold")}
    for name, pools in variants.items():
        d, yy, kk = s.pool(*pools)
        rows[f"veto alone, {name}"] = {**s.judged(d, yy, kk, stability=False), "n": len(yy)}
        for q in (None, QUANTILE):
            label = name if q is None else f"{name}, q {q:g}"
            if pools == ("cal", "fit out of fold") and q == QUANTILE:
                label += " (the default)"
            rows[label] = {**s.judged(d, yy, kk, q), "n": len(yy)}
    c = s.c
    own = lambda d, y: d[torch.arange(len(y)), y].log()  # noqa: E731  [n, L] log deviation ratios
    medians = {n: own(c[f"dev_{n}"], c[f"y_{n}"]).median(0).values for n in ("cal", "fit", "c")}
    medians["fit out of fold"] = c["oof_fit"][c["oof_used"].bool()].log().median(0).values
    shift = {f"{n} - cal": round((medians[n] - medians["cal"]).mean().item(), 3)
             for n in ("fit", "fit out of fold", "c")}
    return {"rule": s.meta["rule"], "k": float(s.meta["k"]), "margin": float(s.meta["margin"]),
            "model_cda": round(100 * (c["pred_c"] == c["y_c"]).double().mean().item(), 2),
            "n_clean": len(c["y_c"]), "n_trigger": len(c["y_t"]), "rows": rows,
            "median_own_log_ratio_shift": shift, "evidence_tails": evidence_tails(s)}


def evidence_tails(s: Study) -> dict:
    """Per evidence, with the bounds on the calibration split alone (the rule until session 31): the
    99th percentile of the calibration split's own deviations relative to its bound (above 1: the
    k-MAD cap refuses over 1 % of its own clean samples), and the share of the dev clean inputs the
    model gets right whose true head that evidence alone vetoes; and the share of triggered inputs
    whose *true* class head is confident (those that could join the quantile floor's pool if a
    poisoned validation set labelled them truly)."""
    c = s.c
    b = s.bounds(c["dev_cal"], c["y_cal"])  # [K, L]
    own = lambda d, y: d[torch.arange(len(y)), y] / b[y]  # noqa: E731  [n, L]
    cal, clean = own(c["dev_cal"], c["y_cal"]), own(c["dev_c"], c["y_c"])
    right = (c["pred_c"] == c["y_c"])[:, None]
    y_t = c["y_t"]
    true_confident = c["conf_t"][torch.arange(len(y_t)), y_t] >= c["thresholds"][y_t]
    return {"cal_q99_over_bound": [round(v, 3) for v in cal.double().quantile(0.99, 0).tolist()],
            "clean_right_vetoed_pct": [round(100 * v, 3) for v in ((clean > 1) & right).double().mean(0).tolist()],
            "triggered_true_head_confident_pct": round(100 * true_confident.double().mean().item(), 3)}


def table() -> str:
    """Means over the saved studies, per data set: CDA drop (hint) / ASR."""
    studies = [json.loads(p.read_text()) for p in sorted(OUT.glob("*.json"))]
    lines = ["# Which samples set the consistency bounds (dev halves)", "",
             "Made by `python scripts/calibration_size.py --table` from the per-run JSONs beside it; "
             "each JSON names its command's run. CDA drop (hint reading, points) / ASR (%), means over "
             "the runs; *veto alone*: the consistency veto without the stability test.", ""]
    for dataset, work in sorted({(s["dataset"], s["work"]) for s in studies}):  # one group per model family
        runs = [s for s in studies if (s["dataset"], s["work"]) == (dataset, work)]
        lines += [f"## {dataset}, {work} ({len(runs)} run{'s' if len(runs) > 1 else ''}: {', '.join(r['run'] for r in runs)})", "",
                  "| bounds set on | samples | CDA drop | true head vetoed (model right) | clean refused | ASR, mean / max |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for row in runs[0]["rows"]:
            vals = [r["rows"][row] for r in runs]
            mean = lambda k: sum(v[k] for v in vals) / len(vals)  # noqa: E731
            drop = sum(r["model_cda"] - r["rows"][row]["cda"] for r in runs) / len(runs)
            lines.append(f"| {row} | {mean('n'):.0f} | {drop:.2f} | {mean('true_head_vetoed_when_model_right'):.2f} | "
                         f"{mean('clean_refused'):.2f} | {mean('asr'):.2f} / {max(v['asr'] for v in vals):.2f} |")
        lines.append("")
        per_run = ["| run | " + " | ".join(runs[0]["rows"]) + " |", "| --- |" + " --- |" * len(runs[0]["rows"])]
        for r in runs:
            per_run.append(f"| {r['run']} | " + " | ".join(
                f"{r['model_cda'] - v['cda']:.2f} / {v['asr']:.2f}" for v in r["rows"].values()) + " |")
        lines += ["Per run, CDA drop / ASR:", ""] + per_run + [""]
    text = "\n".join(lines)
    (OUT / "summary.md").write_text(text)
    return text


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--dataset", default="gtsrb")
    p.add_argument("--runs", nargs="+", default=[], help="<attack>-<seed> under the work folder")
    p.add_argument("--work", help="models and guards cache, e.g. runs/gtsrb-sgdbf16-e30")
    p.add_argument("--n", type=int, default=2000, help="dev clean and triggered inputs")
    p.add_argument("--resamples", type=int, default=50)
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--table", action="store_true", help="summarise the saved studies")
    args = p.parse_args()
    if args.table:
        print(table())
        return
    if not args.runs or not args.work:
        p.error("--runs and --work are needed (or --table)")
    torch.set_num_threads(1)
    work = Path(args.work)
    OUT.mkdir(parents=True, exist_ok=True)
    for run in args.runs:
        res = {"dataset": args.dataset, "run": run, "work": args.work, "split": "dev",
               "command": f"python scripts/calibration_size.py --dataset {args.dataset} --work {args.work} "
                          f"--runs {run} --n {args.n} --resamples {args.resamples}",
               **study(dump(args.dataset, run, work, args.n, args.data), args.resamples)}
        (OUT / f"{args.dataset}-{run}-{work.name}.json").write_text(json.dumps(res, indent=2))
        print(run, json.dumps({k: v for k, v in res["rows"].items() if not k.startswith("veto alone, cal ")}),
              res["median_own_log_ratio_shift"], flush=True)


if __name__ == "__main__":
    main()
