"""Dev study (issue #6): the stability test's filtered neighbour (``stability_median``), and which
heads it should judge.

GTSRB's Trojan watermark is thin dashed lines; a 3x3 median filter erases them and keeps the sign
(``python scripts/neighbour_signals.py --guarded``: the bare model's answer on the guard's escapes
falls a median 20.7 log-odds under the filter, a clean answer 0.67). This asks how the guard should
use that fall. For each saved run (recalibrated with ``stability_median``, no refit), on the dev
half, from one pass of the heads over the inputs and their filtered copies, the decision is made
again (:func:`linkbreaker_ext.verdict.decide`) four ways:

* ``default``: today's guard (no filtered neighbour);
* ``gated``: the filtered fall joins the stability ratio, under the stability test's gate (what
  ``stability_median`` does);
* ``ungated``: the filtered fall judges every head, the jitter's ratio stays gated;
* ``gated_hint``: as ``gated``, and the filtered fall also judges every head that an OOD verdict
  could name (the ratio the hint reads), never which heads are credible;
* ``stable_hint``: as ``gated``, and an OOD verdict without a consistent head names the head
  nearest to its bounds among those that pass both neighbours' tests ungated (jitter and filter
  ratios <= 1), where there is one: the watermark's OOD escapes have no consistent head, and the
  target head, whose ratios are the smallest, fails the filter while the source head passes it;
* ``filter_hint``: as ``stable_hint``, with the filter's ratio alone (the jitter's, ungated, costs
  clean hints): what ``stability_median`` did in session 40;
* ``filter_flip`` / ``filter_below``: as ``filter_hint``, the filter's fall counting only where the
  filtered copy's top head is another (the filter takes the answer away) / the head is no longer
  confident there;
* ``tail`` / ``tail_hint``: the filter's veto (``tail_hint``: and its hint rule) judging only heads
  whose consistency ratio exceeds the rank test's gate (the 0.9 quantile of the validation pool's
  ratios) instead of the stability test's (the median): the watermark's escapes sit at their
  bounds, the clean answers the filter takes away mostly near the median. ``tail_hint`` is what
  ``stability_median`` does since session 41 (``stability_median_gate=0.9``), and ``implemented``
  is that guard's own answers, which must equal it; ``tail_flip`` / ``tail_flip_hint`` add the
  flip rule;
* ``filter_hint@q`` (``--quantiles``): as ``filter_hint``, the filter's bound set at the quantile q
  of the confident calibration heads' filtered falls alone (at least the floor) instead of the
  jitter's rule: where a higher bound trades catches for clean answers.

Reported per variant: the CDA drop against the bare model on the same clean inputs (points), the
ASR after the guard (hint reading and accepted only, %), and the clean answers it loses and gains
against ``default``. Writes ``results/dev/filtered-neighbour/<dataset>-<run>-<work>.json``.

    python scripts/filtered_neighbour_study.py --work runs/gtsrb-sgdbf16-e30-t1 \
        --runs trojan-watermark-0 badnets-0 --n 2000 --quantiles 0.995 0.999 1.0
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from linkbreaker_ext import experiment  # noqa: E402
from linkbreaker_ext.reproduce import SPLITS  # noqa: E402
from linkbreaker_ext.verdict import (ACCEPT, combined_ratio, decide, gated, median_filter,  # noqa: E402
                                     stability_ratio)

OUT = ROOT / "results" / "dev" / "filtered-neighbour"


def filtered_ratios(guard, x, conf):
    """``([B, N], [B, N])``: each head's fall in own-class log-odds from ``x`` (head confidences
    ``conf``) to its median-filtered copy, over the filtered neighbour's calibrated bound (not
    gated); and the heads' confidences on the filtered copy."""
    size = guard.config.stability_median
    near = torch.cat([guard.head_confidences(median_filter(x[i:i + 256], size))[0]
                      for i in range(0, len(x), 256)])
    return stability_ratio(conf, near, guard.stability["median_bound"]), near


def quantile_bound(guard, q: float) -> float:
    """The filtered neighbour's bound at quantile ``q`` of the calibration split's own-class falls
    of confident heads (at least ``stability_floor``)."""
    d = guard.diagnostics
    drops, y, conf = d["calibration_median_drops"], d["calibration_labels"], d["calibration_conf"]
    i = torch.arange(len(y))
    keep = conf[i, y] >= guard.thresholds.cpu()[y]
    return max(guard.config.stability_floor, torch.quantile(drops[i, y][keep].double(), q).item())


def variants(guard, r, filtered, near, quantiles=()):
    """``{name: (labels, verdict)}`` of the four decisions, from the default guard's result ``r``
    and the filtered ratios."""
    cfg = guard.config
    jitter = gated(r.stability, r.consistency, r.stability_gate)
    base = combined_ratio(r.consistency, jitter)
    gate_f = gated(filtered, r.consistency, r.stability_gate)

    def run(veto, hint_extra=None):
        ranks = r.rank_ratio
        labels, verdict = decide(r.confidences, r.thresholds, veto, cfg.inconsistent_verdict, cfg.ood_hint,
                                 cfg.alarm_margin, ranks, cfg.neighbourhood_alarm)
        if hint_extra is None:
            return labels, verdict
        # the hint of an OOD verdict re-read with the filtered fall judging every head
        l2, v2 = decide(r.confidences, r.thresholds, veto, cfg.inconsistent_verdict, cfg.ood_hint,
                        cfg.alarm_margin, combined_ratio(ranks, hint_extra), cfg.neighbourhood_alarm)
        ood = verdict == 2
        return torch.where(ood & (v2 == 2), l2, labels), verdict

    def skipping(ratio, skip):
        """The veto ``ratio``, and an OOD hint that skips the heads ``skip`` marks."""
        hint = combined_ratio(ratio, r.rank_ratio)
        return run(ratio, torch.where(skip, hint + 1e3, torch.zeros_like(hint)))

    def with_filter(f, gate, hint_gated=False):
        """The filter's ratios ``f`` in the veto under ``gate``, and in the hint rule (gated too
        with ``hint_gated``)."""
        judged = gated(f, r.consistency, gate)
        return skipping(combined_ratio(base, judged), (judged if hint_gated else f) > 1)

    veto = combined_ratio(base, gate_f)
    out = {"default": run(base),
            "gated": run(veto),
            "ungated": run(combined_ratio(base, filtered)),
            "gated_hint": run(veto, filtered),
            "stable_hint": skipping(veto, combined_ratio(r.stability, filtered) > 1),
            "filter_hint": with_filter(filtered, r.stability_gate)}
    # the filter's fall counts only where it takes the answer away: on the filtered copy head k is
    # no longer the most confident head (``flip``), or no longer confident (``below``)
    top = near.topk(2, dim=1)
    best = torch.arange(near.shape[1]) == top.indices[:, :1]  # [B, N]: the filtered copy's top head
    others = torch.where(best, top.values[:, 1:], top.values[:, :1])  # the best head but k
    flip = filtered.masked_fill(near >= others, 0.0)
    out["filter_flip"] = with_filter(flip, r.stability_gate)
    out["filter_below"] = with_filter(filtered.masked_fill(near >= r.thresholds.to(near.dtype), 0.0),
                                      r.stability_gate)
    # the filter judging only heads whose consistency ratio sits in the clean tail: past the rank
    # test's gate (the 0.9 quantile of the validation pool's), not the stability test's (the median)
    tail = guard.stability["median_gate"]
    out["tail"], out["tail_hint"] = with_filter(filtered, tail), with_filter(filtered, tail, True)
    out["tail_flip"], out["tail_flip_hint"] = with_filter(flip, tail), with_filter(flip, tail, True)
    bound = guard.stability["median_bound"].item()
    for q in quantiles:  # the filter's ratios against another bound
        out[f"filter_hint@{q:g}"] = with_filter(filtered * (bound / quantile_bound(guard, q)), r.stability_gate)
    return out


def study(work: Path, dataset: str, run: str, size: int, n: int, data, quantiles=()) -> dict:
    split, model, attack, guard, seed = experiment.saved_run(dataset, run, data, work)
    g = guard.recalibrate(split["x_val"], split["y_val"], stability_median=size, stability_median_gate=0.9)
    xc, yc, xt, _, target = experiment.eval_sets(attack, split["x_test"], split["y_test"], n, n, seed,
                                                 SPLITS["dev"])
    with torch.no_grad():
        before = model(xc).argmax(1) == yc
        rc, rt = guard(xc), guard(xt)
        gc, gt = g(xc), g(xt)  # the library's filtered neighbour, for the check below
        (fc, nc), (ft, nt) = filtered_ratios(g, xc, rc.confidences), filtered_ratios(g, xt, rt.confidences)
    vc, vt = variants(g, rc, fc, nc, quantiles), variants(g, rt, ft, nt, quantiles)
    vc["implemented"], vt["implemented"] = (gc.labels, gc.verdict), (gt.labels, gt.verdict)
    same = all(torch.equal(a, b) for v in (vc, vt) for a, b in zip(v["implemented"], v["tail_hint"]))
    right0 = vc["default"][0] == yc
    out = {"run": run, "work": str(work), "split": "dev", "stability_median": size, "n_clean": len(xc),
           "n_trigger": len(xt), "median_bound": g.stability["median_bound"].item(),
           "stability_bound": g.stability["bound"].item(),
           "median_gate": g.stability["median_gate"].item(), "stability_gate": g.stability["gate"].item(),
           "implemented_equals_tail_hint": same,
           "quantile_bounds": {f"{q:g}": quantile_bound(g, q) for q in quantiles}, "variants": {}}
    for name in vc:
        right = vc[name][0] == yc
        hit = vt[name][0] == target
        out["variants"][name] = {
            "drop": round(100 * (before.double().mean() - right.double().mean()).item(), 3),
            "asr": round(100 * hit.double().mean().item(), 3),
            "asr_accepted": round(100 * (hit & (vt[name][1] == ACCEPT)).double().mean().item(), 3),
            "clean_lost_vs_default": int((right0 & ~right).sum()),
            "clean_gained_vs_default": int((~right0 & right).sum()),
        }
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", required=True)
    ap.add_argument("--runs", nargs="+", required=True)
    ap.add_argument("--size", type=int, default=3, help="the median filter's side")
    ap.add_argument("--n", type=int, default=2000, help="clean and triggered dev inputs each")
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quantiles", type=float, nargs="*", default=[],
                    help="also the filter's bound at these quantiles of its calibration falls")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    OUT.mkdir(parents=True, exist_ok=True)
    for run in args.runs:
        dataset = experiment.load_model(work / "models" / f"{run}.safetensors")[1]["dataset"]
        result = study(work, dataset, run, args.size, args.n, args.data, args.quantiles)
        dest = OUT / f"{dataset}-{run}-{work.name}.json"
        dest.write_text(json.dumps(result, indent=1) + "\n")
        for name, v in result["variants"].items():
            print(f"{run} ({work.name}) {name:>10}: drop {v['drop']:.2f}, ASR {v['asr']:.2f} / "
                  f"{v['asr_accepted']:.2f}, clean lost {v['clean_lost_vs_default']} gained "
                  f"{v['clean_gained_vs_default']} vs default", flush=True)
        print(f"the guard's own answers equal tail_hint: {result['implemented_equals_tail_hint']}; wrote",
              dest.relative_to(ROOT))


if __name__ == "__main__":
    main()
