"""Dev study (issue #6): confidence thresholds that refuse fewer clean inputs as out-of-distribution?

The paper's MAD confidence test refuses 8.6-11.4 % of clean GTSRB test signs and 5.5-9 % of clean
CIFAR-10 images (Alg. 3's reading: no credible head). Its per-class threshold, median - 3 MADs of
the class's own-head log-odds on the validation set, is fitted to samples that the model finds easy:
GTSRB's validation signs are frames of training tracks (99.9 % accuracy on them, 97.5 % on test
signs). Two ways to widen it, compared on the saved guards' dev answers (no refit, no new forward
for the decision: the same confidences and veto ratios, decided again with each variant's
thresholds; the stability bound stays the saved one):

* **noisy copies** (``GuardConfig.threshold_noisy_copies``): the validation samples' own-head
  confidences *and* those of their M noisy neighbours (the guard's own fixed stability patterns,
  labels kept) pooled per class, for their own class only. The paper grows the small validation
  set with neighbours (Alg. 1) for the set search; Alg. 1's neighbours are optimised to keep the
  confidence, plain noise shows how far a clean confidence moves. *As samples*: the copies also
  count as other classes' confidences in head k (the threshold's out-quantile raise);
* **a wider MAD multiple** (``mad_k`` 4 and 5 instead of 3) on the validation samples alone.

Reported per variant: CDA (hint / accepted only), ASR (hint / accepted only), clean OOD and alarm
shares, the median threshold.

    python scripts/threshold_pool_study.py --dataset gtsrb --runs badnets-0 none-0 trojan-watermark-0
    python scripts/threshold_pool_study.py --table   # markdown summary of the saved studies
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from linkbreaker_ext import calibrate, experiment, metrics  # noqa: E402
from linkbreaker_ext.verdict import GuardResult, decide  # noqa: E402

DEV = slice(0, 5000)
# name -> (noisy copies: None, "own" (their own class only, the option) or "all" (as ordinary
# samples, also in other classes' heads), mad_k; None: the guard's own)
VARIANTS = {"today": (None, None), "noisy copies": ("own", None), "noisy copies as samples": ("all", None),
            "mad_k 4": (None, 4.0), "mad_k 5": (None, 5.0)}
KEYS = ("cda", "cda_strict", "asr", "asr_strict", "ood_rate_clean", "alarm_rate_clean")


def validation_confidences(guard, x):
    """The heads' confidences on the validation samples ``[n, K]`` and on their M noisy neighbours
    ``[M, n, K]`` (the confidence test's outputs only: thresholds play no part here)."""
    half = torch.full((guard.num_heads,), 0.5)
    conf = guard.head_confidences(x, thresholds=half)[0].cpu()
    near = guard.head_confidences(guard.neighbour(x), thresholds=half)[0].cpu()
    return conf, near.reshape(-1, len(x), conf.shape[1])


def thresholds_for(guard, conf, near, y, noisy, mad_k):
    cfg = guard.config
    copies = (near.flatten(0, 1), y.repeat(near.shape[0]))
    if noisy == "all":
        conf, y = torch.cat([conf, copies[0]]), torch.cat([y, copies[1]])
    return calibrate.confidence_thresholds(conf, y, cfg.mad_k if mad_k is None else mad_k,
                                           cfg.out_quantile, cfg.threshold_floor,
                                           own_extra=copies if noisy == "own" else None)


def forwards(dataset, run, data, n):
    """What the variants decide on: the validation confidences (and their noisy copies') and the
    guard's dev answers; cached under runs/<dataset>/threshold-pool/ (tensors only), so that a new
    variant costs no forward."""
    cache = ROOT / "runs" / dataset / "threshold-pool" / f"{run}-n{n}.pt"
    split, _, attack, guard, seed = experiment.saved_run(dataset, run, data, ROOT / "runs" / dataset)
    if cache.is_file():
        return guard, torch.load(cache, weights_only=True)
    if guard.config.threshold_split != "all":
        raise SystemExit(f"{run}: the guard's thresholds come from {guard.config.threshold_split!r}; "
                         "this study compares against thresholds from the whole validation set")
    x, y = split["x_val"].float(), split["y_val"].long()
    conf, near = validation_confidences(guard, x)
    xc, yc, xt, yt, target = experiment.eval_sets(attack, split["x_test"], split["y_test"], n, n, seed, DEV)
    rc, rt = guard(xc), guard(xt)
    out = {"conf": conf, "near": near, "y": y, "yc": yc, "yt": yt, "target": torch.tensor(target),
           **{f"{k}_{name}": getattr(r, name).cpu() for k, r in (("clean", rc), ("trig", rt))
              for name in ("confidences", "credibility")}}
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save(out, cache)
    return guard, out


def study(dataset, run, data, n):
    guard, f = forwards(dataset, run, data, n)
    cfg = guard.config
    out = {"dataset": dataset, "run": run, "split": "dev", "n": n, "validation": len(f["y"]),
           "noisy_copies": int(f["near"].shape[0]), "variants": {}}
    for name, (noisy, mad_k) in VARIANTS.items():
        th = thresholds_for(guard, f["conf"], f["near"], f["y"], noisy, mad_k)
        if name == "today" and not torch.allclose(th, guard.thresholds.cpu(), atol=1e-5):
            raise SystemExit(f"{run}: the saved thresholds are not the validation set's today: refit or recalibrate")
        decided = [GuardResult(*decide(f[f"{k}_confidences"], th, f[f"{k}_credibility"], cfg.inconsistent_verdict,
                                       cfg.ood_hint), f[f"{k}_confidences"], th) for k in ("clean", "trig")]
        m = metrics.defended(decided[0], f["yc"], decided[1], f["yt"], int(f["target"]))
        out["variants"][name] = {**{k: round(100 * m[k], 2) for k in KEYS},
                                 "threshold_median": round(float(th.median()), 4)}
    return out


def table(folder: Path) -> str:
    """One row per saved study: today's numbers, then each variant's change against them, in
    points: CDA hint / accepted only, ASR hint / accepted only, clean OOD."""
    names = list(VARIANTS)[1:]
    rows = ["| model | today: CDA (hint / accepted), ASR (hint / accepted), clean OOD | "
            + " | ".join(f"{v}: change" for v in names) + " |",
            "| --- | --- | " + " | ".join("---" for _ in names) + " |"]
    fields = ("cda", "cda_strict", "asr", "asr_strict", "ood_rate_clean")
    means = {v: [] for v in names}
    for path in sorted(folder.glob("*.json")):
        s = json.loads(path.read_text())
        ref = s["variants"]["today"]
        cells = []
        for v in names:
            d = [s["variants"][v][k] - ref[k] for k in fields]
            means[v].append(d)
            cells.append("{:+.2f} / {:+.2f}, {:+.2f} / {:+.2f}, {:+.2f}".format(*d))
        rows.append(f"| {s['dataset']} {s['run']} | {ref['cda']:.2f} / {ref['cda_strict']:.2f}, "
                    f"{ref['asr']:.2f} / {ref['asr_strict']:.2f}, {ref['ood_rate_clean']:.2f} | " + " | ".join(cells) + " |")
    if any(means.values()):
        cells = ["{:+.2f} / {:+.2f}, {:+.2f} / {:+.2f}, {:+.2f}".format(*torch.tensor(means[v]).mean(0).tolist())
                 for v in names]
        rows.append("| mean change | | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--dataset", default="gtsrb")
    p.add_argument("--runs", nargs="*", default=[], help="<attack>-<seed> under runs/<dataset>/")
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--table", action="store_true")
    args = p.parse_args()
    folder = ROOT / "results" / "dev" / "threshold-pool"
    if args.table:
        print(table(folder))
        return
    torch.set_num_threads(1)
    folder.mkdir(parents=True, exist_ok=True)
    for run in args.runs:
        out = study(args.dataset, run, args.data, args.n)
        (folder / f"{args.dataset}-{run}.json").write_text(json.dumps(out, indent=2))
        print(f"{args.dataset} {run}: " + "; ".join(f"{k}: {v}" for k, v in out["variants"].items()), flush=True)


if __name__ == "__main__":
    main()
