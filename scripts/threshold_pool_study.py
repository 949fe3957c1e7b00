"""Dev study (issue #6): confidence thresholds that refuse fewer clean inputs as out-of-distribution?

The paper's MAD confidence test refuses 8.6-11.4 % of clean GTSRB test signs and 5.5-9 % of clean
CIFAR-10 images (Alg. 3's reading: no credible head). Its per-class threshold, median - 3 MADs of
the class's own-head log-odds on the validation set, is fitted to samples that the model finds easy:
GTSRB's validation signs are frames of training tracks (99.9 % accuracy on them, 97.5 % on test
signs). Two ways to widen it, compared on the saved guards' dev answers (no refit; the same
confidences and veto ratios, decided again with each variant's thresholds; the stability bound
stays the saved one):

* **noisy copies**: the validation samples' confidences pooled with those of their M noisy
  neighbours (the guard's own fixed stability patterns, labels kept). The paper grows its small
  validation set with neighbours (Alg. 1) for the set search; Alg. 1's are optimised to keep the
  confidence, plain noise shows how far a clean confidence moves;
* **a wider MAD multiple** (``mad_k`` 4, 5, 6 instead of 3) on the validation samples alone.

Refusing is selective prediction, so each variant is also read as a coverage (clean inputs
accepted) and the accuracy of the accepted answers, beside the bare model's accuracy on the same
share of its most confident inputs (:func:`bare_selective`). Forwards are cached under
``runs/<dataset>/threshold-pool/`` (tensors only), so a new variant costs no forward.

    python scripts/threshold_pool_study.py --dataset gtsrb --runs badnets-0 none-0 trojan-watermark-0
    python scripts/threshold_pool_study.py --table   # markdown summary of the saved studies
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from linkbreaker_ext import calibrate, experiment, metrics, training  # noqa: E402
from linkbreaker_ext.verdict import GuardResult, decide  # noqa: E402
from calibration_pool_study import heads_and_neighbours, study_cli  # noqa: E402  (a script beside this one)

DEV = slice(0, 5000)
# name -> (pool the noisy copies with the validation samples, mad_k; None: the guard's own)
VARIANTS = {"today": (False, None), "noisy copies": (True, None),
            "mad_k 4": (False, 4.0), "mad_k 5": (False, 5.0), "mad_k 6": (False, 6.0)}
KEYS = ("cda", "cda_strict", "asr", "asr_strict", "ood_rate_clean", "alarm_rate_clean", "accept_accuracy_clean")


def thresholds_for(guard, conf, near, y, noisy: bool, mad_k):
    cfg = guard.config
    if noisy:
        conf, y = torch.cat([conf, near.flatten(0, 1)]), torch.cat([y, y.repeat(near.shape[0])])
    return calibrate.confidence_thresholds(conf, y, cfg.mad_k if mad_k is None else mad_k,
                                           cfg.out_quantile, cfg.threshold_floor)


def forwards(dataset, run, data, n):
    """What the variants decide on: the validation confidences (and their noisy copies') and the
    guard's dev answers; cached under runs/<dataset>/threshold-pool/ (tensors only), so that a new
    variant costs no forward."""
    cache = ROOT / "runs" / dataset / "threshold-pool" / f"{run}-n{n}.pt"
    split, model, attack, guard, seed = experiment.saved_run(dataset, run, data, ROOT / "runs" / dataset)
    if cache.is_file():
        return guard, torch.load(cache, weights_only=True)
    if guard.config.threshold_split != "all":
        raise SystemExit(f"{run}: the guard's thresholds come from {guard.config.threshold_split!r}; "
                         "this study compares against thresholds from the whole validation set")
    x, y = split["x_val"].float(), split["y_val"].long()
    conf, near = heads_and_neighbours(guard, x)
    xc, yc, xt, yt, target = experiment.eval_sets(attack, split["x_test"], split["y_test"], n, n, seed, DEV)
    rc, rt = guard(xc), guard(xt)
    out = {"conf": conf, "near": near, "y": y, "yc": yc, "yt": yt, "target": torch.tensor(target),
           "model_clean": training.predict_logits(model, xc).softmax(1),
           **{f"{k}_{name}": getattr(r, name).cpu() for k, r in (("clean", rc), ("trig", rt))
              for name in ("confidences", "credibility")}}
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save(out, cache)
    return guard, out


def bare_selective(f, coverage: float) -> float:
    """The bare model as a selective classifier at the same coverage: the accuracy of its answers
    on the ``coverage`` share of clean inputs it is most confident about (softmax maximum)."""
    top, pred = f["model_clean"].max(1)
    keep = top.argsort(descending=True)[:max(1, round(coverage * len(top)))]
    return (pred[keep] == f["yc"][keep]).float().mean().item()


def noisy_copy_destinations(near, y) -> dict:
    """Where the noisy copies of the validation samples go (the most confident head): the share
    that changes class, the share of those going to the most common destination, and how many
    other classes send most of their copies there. Noise that reads as a trigger sends every
    class's copies to the target (docs/method.md, "What the OOD refusals buy")."""
    top = near.argmax(-1)  # [M, n]
    moved = top != y
    k = near.shape[-1]
    counts = torch.bincount(top[moved], minlength=k)
    sink = int(counts.argmax())
    majority = sum(int((top[:, y == c] == sink).float().mean() > 0.5) for c in range(k) if c != sink and (y == c).any())
    return {"moved": round(moved.float().mean().item(), 4), "top_destination": sink,
            "top_destination_share": round(counts[sink].item() / max(1, int(counts.sum())), 4),
            "classes_mostly_sent_there": majority, "other_classes": k - 1}


def study(dataset, run, data, n):
    guard, f = forwards(dataset, run, data, n)
    cfg = guard.config
    out = {"dataset": dataset, "run": run, "split": "dev", "n": n, "validation": len(f["y"]),
           "noisy_copies": int(f["near"].shape[0]),
           "noisy_copy_destinations": noisy_copy_destinations(f["near"], f["y"]), "variants": {}}
    for name, (noisy, mad_k) in VARIANTS.items():
        th = thresholds_for(guard, f["conf"], f["near"], f["y"], noisy, mad_k)
        if name == "today" and not torch.allclose(th, guard.thresholds.cpu(), atol=1e-5):
            raise SystemExit(f"{run}: the saved thresholds are not the validation set's today: refit or recalibrate")
        decided = [GuardResult(*decide(f[f"{k}_confidences"], th, f[f"{k}_credibility"], cfg.inconsistent_verdict,
                                       cfg.ood_hint), f[f"{k}_confidences"], th) for k in ("clean", "trig")]
        m = metrics.defended(decided[0], f["yc"], decided[1], f["yt"], int(f["target"]))
        coverage = 1 - m["ood_rate_clean"] - m["alarm_rate_clean"]
        out["variants"][name] = {**{k: round(100 * m[k], 2) for k in KEYS},
                                 "bare_selective_accuracy": round(100 * bare_selective(f, coverage), 2),
                                 "threshold_median": round(float(th.median()), 4),
                                 "threshold_max": round(float(th.max()), 4)}
    return out


def table(folder: Path) -> str:
    """One row per saved study, one cell per variant: the change in hint-reading CDA and in ASR
    (hint) against today's thresholds, in points, then the clean inputs accepted (coverage) and the
    accuracy of those accepted answers, in %, beside the bare model's at the same coverage
    (:func:`bare_selective`): refusing is selective prediction, and a wider threshold buys
    coverage with accuracy."""
    names = list(VARIANTS)
    rows = ["| model | " + " | ".join(f"{v}: CDA change, ASR change, coverage, accepted accuracy (bare model at that coverage)" for v in names) + " |",
            "| --- | " + " | ".join("---" for _ in names) + " |"]
    studies = [json.loads(path.read_text()) for path in sorted(folder.glob("*.json"))]
    cell = "{:+.2f}, {:+.2f}, {:.1f}, {:.2f} ({:.2f})"
    per_study = []
    for s in studies:
        ref = s["variants"]["today"]
        per_study.append({v: [r["cda"] - ref["cda"], r["asr"] - ref["asr"],
                              100 - r["ood_rate_clean"] - r["alarm_rate_clean"], r["accept_accuracy_clean"],
                              r["bare_selective_accuracy"]]
                          for v, r in ((v, s["variants"][v]) for v in names)})
        rows.append(f"| {s['dataset']} {s['run']} | " + " | ".join(cell.format(*per_study[-1][v]) for v in names) + " |")
    for ds in sorted({s["dataset"] for s in studies}):
        picked = [cells for s, cells in zip(studies, per_study) if s["dataset"] == ds]
        rows.append(f"| mean, {ds} | " + " | ".join(
            cell.format(*torch.tensor([c[v] for c in picked]).mean(0).tolist()) for v in names) + " |")
    rows += ["", "Where the noisy copies of the validation samples go (:func:`noisy_copy_destinations`):", "",
             "| model | copies that change class | share of those to the top destination | other classes mostly sent there |",
             "| --- | --- | --- | --- |"]
    for s in studies:
        d = s["noisy_copy_destinations"]
        rows.append(f"| {s['dataset']} {s['run']} | {100 * d['moved']:.1f} % | {100 * d['top_destination_share']:.1f} % "
                    f"(class {d['top_destination']}) | {d['classes_mostly_sent_there']} / {d['other_classes']} |")
    return "\n".join(rows)


def main():
    study_cli("threshold-pool", study, table,
              lambda out: "; ".join(f"{k}: {v}" for k, v in out["variants"].items()))


if __name__ == "__main__":
    main()
