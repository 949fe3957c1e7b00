"""Dev probe (issue #6): does the bare model need its image margins, and would Alg. 2 drop them?

GTSRB's images are whole camera frames resized, the sign in the middle and background around it;
its patch triggers (the BadNets square, the Trojan watermark) sit near the edges, like MNIST's. On
the dev half (test indices 0-4999) and the validation set, with the saved model and the input
layer's fill (the guard's blank input), this measures:

* ``bands``: for each side and width, the mean own-class confidence the validation set loses when
  that band is blanked (the set search's ``in`` measure; its budget is 0.002) and the bare model's
  ASR on triggered dev inputs with the band blanked;
* ``importance``: Alg. 2's input importance (``salient.importance`` on the validation images), the
  target class's top fractions: which rows its head would blank, its confidence loss, and the ASR
  through that head's input mask;
* ``attribution``: pixels ranked by a gradient attribution shared by all classes (|gradient x
  (input - fill)| of the own-class log-probability, averaged over the validation set), the lowest
  shares blanked for every input: clean accuracy and ASR.

    python scripts/margins_probe.py --dataset gtsrb --work runs/gtsrb-sgdbf16-e30 --runs trojan-watermark-0 badnets-0

Writes ``results/dev/margins/probe-<dataset>-<run>.json``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from linkbreaker_ext import experiment, salient, search, training  # noqa: E402
from linkbreaker_ext.reproduce import SPLITS  # noqa: E402

OUT = ROOT / "results" / "dev" / "margins"


def probe(dataset: str, work: Path, run: str, n: int, data) -> dict:
    split, model, attack, guard, seed = experiment.saved_run(dataset, run, data, work)
    xv, yv = split["x_val"], split["y_val"]
    c, h, w = xv.shape[1:]
    fill = guard.fills["input"].reshape(xv.shape[1:])
    xc, yc, xt, _, target = experiment.eval_sets(attack, split["x_test"], split["y_test"], n, n, seed,
                                                 SPLITS["dev"])

    def blank(x, keep):  # keep [H, W] or [C*H*W]
        keep = keep.reshape(-1, h, w) if keep.numel() != h * w else keep
        return x * keep + fill * (1 - keep)

    def own_conf(x, y):
        return training.predict_logits(model, x).softmax(1)[torch.arange(len(y)), y]

    def asr(x):
        return round(100 * (training.predict_logits(model, x).argmax(1) == target).double().mean().item(), 2)

    def acc(x):
        return round(100 * (training.predict_logits(model, x).argmax(1) == yc).double().mean().item(), 2)

    base = own_conf(xv, yv).mean().item()
    bands = []
    for side in search.SIDES:
        for width in range(1, h // 4 + 1):
            keep = search.margin_mask((h, w), {side: width})
            bands.append({"side": side, "width": width,
                          "loss": round(base - own_conf(blank(xv, keep), yv).mean().item(), 5),
                          "asr": asr(blank(xt, keep))})

    mu, sd, ref = salient.class_statistics(xv.flatten(1), yv, guard.num_heads)
    score = salient.importance(mu, sd, ref)
    on_target = yv == target
    importance = []
    for q in (0.95, 0.9, 0.8, 0.7, 0.5):
        m = salient.top_fraction_masks(score, torch.full((guard.num_heads,), q))[target]
        dropped = (1 - m).reshape(c, h, w).amax(0)  # a pixel blanked in any channel
        importance.append({"fraction": q, "dropped_per_row": dropped.sum(1).int().tolist(),
                           "target_loss": round(own_conf(xv[on_target], yv[on_target]).mean().item()
                                                - own_conf(blank(xv[on_target], m), yv[on_target]).mean().item(), 5),
                           "asr_through_target_mask": asr(blank(xt, m))})

    model.eval()
    attr = torch.zeros(h, w)
    for i in range(0, len(xv), 256):
        x = xv[i:i + 256].clone().requires_grad_(True)
        lp = model(x).log_softmax(1)[torch.arange(len(x)), yv[i:i + 256]]
        g, = torch.autograd.grad(lp.sum(), x)
        attr += (g * (x.detach() - fill)).sum(1).abs().sum(0)
    order = attr.flatten().argsort()
    attribution = []
    for share in (0.05, 0.1, 0.2, 0.3):
        keep = torch.ones(h * w)
        keep[order[:int(share * h * w)]] = 0
        keep = keep.reshape(h, w)
        attribution.append({"share": share, "dropped_per_row": (1 - keep).sum(1).int().tolist(),
                            "clean_acc": acc(blank(xc, keep)), "asr": asr(blank(xt, keep))})
    return {"dataset": dataset, "run": run, "work": str(work), "split": "dev", "n": n, "target": target,
            "validation_own_confidence": round(base, 5), "clean_acc": acc(xc), "asr": asr(xt),
            "bands": bands, "importance": importance, "attribution": attribution}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="gtsrb")
    ap.add_argument("--work", default="runs/gtsrb-sgdbf16-e30")
    ap.add_argument("--runs", nargs="+", default=["trojan-watermark-0"])
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    OUT.mkdir(parents=True, exist_ok=True)
    for run in args.runs:
        res = probe(args.dataset, Path(args.work), run, args.n, args.data)
        res["command"] = (f"python scripts/margins_probe.py --dataset {args.dataset} --work {args.work} "
                          f"--runs {run} --n {args.n}")
        (OUT / f"probe-{args.dataset}-{run}.json").write_text(json.dumps(res, indent=1) + "\n")
        best = {s: max([b["width"] for b in res["bands"] if b["side"] == s and b["loss"] <= 0.002], default=0)
                for s in search.SIDES}
        print(run, "clean", res["clean_acc"], "ASR", res["asr"], "widest bands within 0.002:", best,
              "ASR there:", {s: next((b["asr"] for b in res["bands"] if b["side"] == s and b["width"] == v), None)
                             for s, v in best.items()}, flush=True)


if __name__ == "__main__":
    main()
