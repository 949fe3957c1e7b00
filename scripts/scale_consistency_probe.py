"""Dev probe (issue #6): does SCALE-UP's signal catch what today's guard lets through?

The watermark's escapes on GTSRB seed 0 are answers whose head is confident, consistent and stable:
every test the guard asks of a head, the trigger passes. SCALE-UP (Guo et al., ICLR 2023; the
project's baseline, ``baselines.ScaleUp``) asks the opposite question: a backdoor's prediction
survives amplifying the pixels (x * n, clipped), where a clean image's drifts. On the older GTSRB
model it flagged 99.4 % of the watermarked signs at 1.5 % of clean ones
(results/baselines/gtsrb.md). An answer that is *too* stable under amplification is the signal
the guard lacks.

For a saved run and the **dev** half of the test split, this scores every clean and triggered input
with data-limited SCALE-UP, fitted and thresholded on the run's clean validation set only (at
several false-rejection rates), and asks of the guard's answers (accepted, or an OOD verdict's hint):

- ``escapes_caught``: the share of the triggered inputs the guard answers with the target that the
  flag would turn into an alarm;
- ``clean_lost``: the share of clean inputs the guard answers correctly that it would turn into an
  alarm (the CDA it costs, in points / 100);
- each also *gated* as the stability test is: only answers whose head's consistency ratio is above
  the guard's stability gate (the validation pool's median) are judged.

    python scripts/scale_consistency_probe.py --dataset gtsrb --runs trojan-watermark-0 none-0 \
        --work runs/gtsrb-sgdbf16-e30 --n 2000

Writes ``results/dev/scale-consistency/<dataset>-<run>.json``.
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
from linkbreaker_ext import experiment  # noqa: E402
from linkbreaker_ext.baselines import ScaleUp  # noqa: E402
from linkbreaker_ext.baselines.base import holdout_split  # noqa: E402

DEV = slice(0, 5000)
FRRS = (0.01, 0.005, 0.002, 0.0)


def share(flag: torch.Tensor, among: torch.Tensor):
    """The share of ``among`` (bool) that ``flag`` (bool) marks; None when ``among`` is empty."""
    return flag[among].float().mean().item() if among.any() else None


def probe(dataset: str, run: str, work: Path, data: str, n: int) -> dict:
    split, model, attack, guard, seed = experiment.saved_run(dataset, run, data, work)
    xc, yc, xt, _, target = experiment.eval_sets(attack, split["x_test"], split["y_test"], n, n, seed, DEV)
    rc, rt = guard(xc), guard(xt)
    kept = rc.labels == yc            # clean answers the guard gets right (an alarm's label is -1)
    escaped = rt.labels == target     # hint reading, as the tables count ASR
    gate = guard.stability.get("gate") if guard.stability else None

    def head_ratio(r):  # the answering head's consistency ratio (deviation / bound)
        return r.consistency.gather(1, r.labels.clamp_min(0)[:, None])[:, 0]

    gated_c = head_ratio(rc) > gate if gate is not None else torch.ones_like(kept)
    gated_t = head_ratio(rt) > gate if gate is not None else torch.ones_like(escaped)
    detector = ScaleUp(seed=seed).fit(model, split["x_val"], split["y_val"], guard.num_heads)
    s_c, s_t = detector.score(xc).cpu(), detector.score(xt).cpu()
    _, hold = holdout_split(split["y_val"], detector.holdout, detector.seed)  # its threshold's half
    s_hold = detector.score(split["x_val"][hold]).cpu()
    rows = []
    for frr in FRRS:
        thr = float(torch.quantile(s_hold.double(), 1 - frr)) if frr > 0 else float(s_hold.max())
        fc, ft = s_c > thr, s_t > thr
        rows.append({"frr": frr, "threshold": thr,
                     "escapes_caught": share(ft, escaped), "clean_lost": share(fc, kept),
                     "escapes_caught_gated": share(ft & gated_t, escaped),
                     "clean_lost_gated": share(fc & gated_c, kept),
                     "triggered_flagged": ft.float().mean().item(),
                     "clean_flagged": fc.float().mean().item()})
    return {"dataset": dataset, "run": run, "split": "dev", "work": str(work), "n": n,
            "target": int(target), "cda_guard": kept.float().mean().item(),
            "asr_guard": escaped.float().mean().item(), "escaped": int(escaped.sum()),
            "clean_kept": int(kept.sum()), "gate": None if gate is None else float(gate),
            "escapes_gated": share(gated_t, escaped), "clean_gated": share(gated_c, kept),
            "escape_scores": s_t[escaped].tolist(), "rows": rows}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--dataset", default="gtsrb")
    p.add_argument("--runs", nargs="+", default=["trojan-watermark-0"])
    p.add_argument("--work", default="runs/gtsrb-sgdbf16-e30")
    p.add_argument("--data", default="../shared/data")
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out_dir = ROOT / "results" / "dev" / "scale-consistency"
    out_dir.mkdir(parents=True, exist_ok=True)
    for run in args.runs:
        t0 = time.time()
        r = probe(args.dataset, run, Path(args.work), args.data, args.n)
        r["seconds"] = time.time() - t0
        out = out_dir / f"{args.dataset}-{run}.json"
        out.write_text(json.dumps(r, indent=2))
        print(f"{args.dataset} {run}: guard CDA {100 * r['cda_guard']:.2f}, ASR {100 * r['asr_guard']:.2f} "
              f"({r['escaped']} escapes; gated: {r['escapes_gated']}, clean gated {r['clean_gated']})")
        for row in r["rows"]:
            print(f"  frr {row['frr']:<6} escapes caught {row['escapes_caught']} "
                  f"(gated {row['escapes_caught_gated']}), clean lost {row['clean_lost']:.4f} "
                  f"(gated {row['clean_lost_gated']:.4f}); flagged clean {row['clean_flagged']:.4f}, "
                  f"triggered {row['triggered_flagged']:.4f}")
        print(f"wrote {out.relative_to(ROOT)} ({r['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
