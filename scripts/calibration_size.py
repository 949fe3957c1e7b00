"""Dev study (issue #6): does the consistency check refuse clean inputs because its bounds are set
on too few calibration samples?

The fit keeps 30 % of the 2 % validation set for calibration (about 235 GTSRB signs, 5 per class),
and the per-layer ``"tail"`` bound sits just past that split's largest deviation, so how far it
reaches depends on how many samples the split has. This script measures that dependence on the
saved guards of a work folder, without a refit: one forward of the heads over the validation set
and ``--n`` clean and triggered inputs of the **dev** half of the test split, cached in
``<work>/dev/<run>-calsize.safetensors``; then the bounds are recomputed (the guard's own rule,
k and margin) from random stratified subsets of the calibration split (25-100 %), and from the
calibration split plus the fit split, whose deviations are in-sample (the class profiles were
computed on it), and the heads decided again (the consistency veto alone; the stability test is
not in this study). It also reports how much smaller the in-sample deviations are.

    python scripts/calibration_size.py --dataset gtsrb --work runs/gtsrb-sgdbf16-e30 \\
        --runs badnets-0 none-1 trojan-watermark-1

Writes ``results/dev/calibration-size/<dataset>-<run>-<work name>.json``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from linkbreaker_ext import calibrate, data, experiment, training  # noqa: E402
from linkbreaker_ext.verdict import GuardResult  # noqa: E402

DEV = slice(0, 5000)
FRACTIONS = (0.25, 0.5, 0.75, 1.0)


def dump(dataset: str, run: str, work: Path, n: int, source: str) -> Path:
    """The heads' confidences and per-layer deviation ratios on the validation set (both splits)
    and the dev inputs, cached once per run."""
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
    t.update({"y_cal": split["y_val"][cal_idx], "y_fit": split["y_val"][fit_idx], "y_c": yc, "y_t": yt,
              "pred_c": training.predict_logits(model, xc).argmax(1),
              "pred_t": training.predict_logits(model, xt).argmax(1),
              "thresholds": guard.thresholds, "target": torch.tensor(target)})
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in t.items()}, str(out),
              metadata={"rule": cfg.consistency_bound, "k": str(cfg.consistency_mad_k),
                        "margin": str(cfg.consistency_margin)})
    return out


def subset(y: torch.Tensor, fraction: float, g: torch.Generator) -> torch.Tensor:
    """A random ``fraction`` of every class's samples (at least one each)."""
    picked = []
    for k in y.unique():
        idx = (y == k).nonzero().flatten()
        m = max(1, round(fraction * len(idx)))
        picked.append(idx[torch.randperm(len(idx), generator=g)[:m]])
    return torch.cat(picked)


def judged(c: dict, dev_cal: torch.Tensor, y_cal: torch.Tensor, rule: str, k: float, margin: float) -> dict:
    """CDA (hint reading), clean vetoes of a right model's true head and ASR, in %, with the bounds
    set on ``dev_cal``."""
    b = calibrate.layer_bounds(dev_cal, y_cal, k, center="pooled", rule=rule, margin=margin)
    out = {}
    for s in ("c", "t"):
        r = experiment.redecided(GuardResult(None, None, c[f"conf_{s}"], c["thresholds"]),
                                 (c[f"dev_{s}"] / b).amax(-1), "alarm")
        out[s] = r
    y, target = c["y_c"], int(c["target"])
    rows = torch.arange(len(y))
    right = c["pred_c"] == y
    vetoed = (c["dev_c"][rows, y] / b[y]).amax(-1) > 1
    return {"cda": 100 * (out["c"].labels == y).double().mean().item(),
            "true_head_vetoed_when_model_right": 100 * (vetoed & right).double().mean().item(),
            "asr": 100 * (out["t"].labels == target).double().mean().item()}


def study(path: Path, resamples: int) -> dict:
    c = load_file(str(path))
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    rule, k, margin = meta["rule"], float(meta["k"]), float(meta["margin"])
    g = torch.Generator().manual_seed(0)
    rows = {}
    for frac in FRACTIONS:
        runs = [judged(c, c["dev_cal"][i], c["y_cal"][i], rule, k, margin)
                for i in (subset(c["y_cal"], frac, g) for _ in range(1 if frac == 1.0 else resamples))]
        rows[f"cal {frac:g}"] = {m: round(sum(r[m] for r in runs) / len(runs), 3) for m in runs[0]}
        rows[f"cal {frac:g}"]["n_cal"] = round(frac * len(c["y_cal"]))
    both = judged(c, torch.cat([c["dev_cal"], c["dev_fit"]]), torch.cat([c["y_cal"], c["y_fit"]]), rule, k, margin)
    rows["cal + fit (in-sample)"] = {**{m: round(v, 3) for m, v in both.items()},
                                     "n_cal": len(c["y_cal"]) + len(c["y_fit"])}
    own = lambda d, y: d[torch.arange(len(y)), y].log()  # noqa: E731  [n, L] log deviation ratios
    medians = {s: own(c[f"dev_{s}"], c[f"y_{s}"]).median(0).values for s in ("cal", "fit", "c")}
    bias = {f"{s} - cal": round((medians[s] - medians["cal"]).mean().item(), 3) for s in ("fit", "c")}
    return {"rule": rule, "k": k, "margin": margin, "model_cda": round(100 * (c["pred_c"] == c["y_c"]).double().mean().item(), 2),
            "n_clean": len(c["y_c"]), "n_trigger": len(c["y_t"]), "rows": rows,
            "median_own_log_ratio_shift": bias}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--dataset", default="gtsrb")
    p.add_argument("--runs", nargs="+", required=True, help="<attack>-<seed> under the work folder")
    p.add_argument("--work", required=True, help="models and guards cache, e.g. runs/gtsrb-sgdbf16-e30")
    p.add_argument("--n", type=int, default=2000, help="dev clean and triggered inputs")
    p.add_argument("--resamples", type=int, default=50)
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    args = p.parse_args()
    torch.set_num_threads(1)
    work = Path(args.work)
    out_dir = ROOT / "results" / "dev" / "calibration-size"
    out_dir.mkdir(parents=True, exist_ok=True)
    for run in args.runs:
        res = {"dataset": args.dataset, "run": run, "work": args.work, "split": "dev",
               **study(dump(args.dataset, run, work, args.n, args.data), args.resamples)}
        (out_dir / f"{args.dataset}-{run}-{work.name}.json").write_text(json.dumps(res, indent=2))
        print(run, json.dumps(res["rows"]), res["median_own_log_ratio_shift"], flush=True)


if __name__ == "__main__":
    main()
