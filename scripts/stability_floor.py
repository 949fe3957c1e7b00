"""Dev study (issue #6): the stability test's bound where clean falls are mostly 0 (MNIST).

Held-out MNIST lost 2.5-3.3 points of CDA to the first stability test: float32 confidences near 1
move in steps of 6e-8, so two saturated confidences one step apart differ by log 2 in log-odds, and
on MNIST the median fall and its MAD are ~0, so a median + 4.25 MAD bound (0.2-0.5) sits below that
rounding. For saved guards of both data sets, on the dev half (1,000 clean + 1,000 triggered
inputs), the share of clean inputs a head answers right and the test would veto, and of triggered
inputs whose confident target head it vetoes, for log-odds capped at ``eps`` and bounds floored at
``floor``. Writes ``results/dev/stability-floor.json``.

    python scripts/stability_floor.py
"""
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from linkbreaker_ext import experiment  # noqa: E402
from linkbreaker_ext.data import stratified_split  # noqa: E402
from linkbreaker_ext.guard import LinkBreaker  # noqa: E402
torch.set_num_threads(1)


def lo(c, eps):
    c = c.double().clamp(eps, 1 - eps)
    return torch.log(c) - torch.log1p(-c)



out = []
for name, ds in [(n, "mnist") for n in ("none-0", "badnets-1", "blended-2", "trojan-square-0")] + [(n, "cifar10") for n in ("none-2", "trojan-square-2", "wanet-2", "wanet-0", "wanet-1", "badnets-1", "sig-2")]:
    a, s = name.rsplit("-", 1)
    split = experiment.split_data(ds, "../shared/data", None, int(s))
    model, meta = experiment.load_model(ROOT / "runs" / ds / "models" / f"{name}.safetensors")
    g = LinkBreaker.load(ROOT / "runs" / ds / "guards" / f"{name}.safetensors", model)
    # the one-neighbour test this study was made for (std 0.01, MAD rule), whatever the saved default
    g = g.recalibrate(split["x_val"], split["y_val"], stability_noise=0.01, stability_draws=1,
                      stability_bound="mad", stability_floor=0.5)
    ci, _ = stratified_split(split["y_val"], g.config.calibration_fraction, seed=g.config.seed)
    x, y = split["x_val"][ci], split["y_val"][ci]
    conf = g.head_confidences(x)[0]; near = g.head_confidences(g.neighbour(x))[0]
    attack = experiment.attacks.Attack.from_dict(meta["attack"]) if meta["attack"] else None
    xc, yc, xt, yt, target = experiment.eval_sets(attack, split["x_test"], split["y_test"], 1000, 1000, int(s), slice(0, 5000))
    cc = g.head_confidences(xc)[0]; cn = g.head_confidences(g.neighbour(xc))[0]
    tc = g.head_confidences(xt)[0]; tn = g.head_confidences(g.neighbour(xt))[0]
    i = torch.arange(len(y)); own = conf[i, y]; ok = own >= g.thresholds[y]
    for eps in (1e-7, 1e-5):
        fall = (lo(own, eps) - lo(near[i, y], eps))[ok]
        med = fall.median(); mad = 1.4826 * (fall - med).abs().median()
        j = torch.arange(len(yc)); okc = (cc[j, yc] >= g.thresholds[yc])
        fc = (lo(cc[j, yc], eps) - lo(cn[j, yc], eps))
        k = torch.arange(len(xt)); okt = tc[k, target] >= g.thresholds[target]
        ft = (lo(tc[k, target], eps) - lo(tn[k, target], eps))
        for floor in (0.1, 0.5, 1.0, 2.0):
            b = max((med + 4.25 * mad).item(), floor)
            row = dict(model=f"{ds}/{name}", eps=eps, floor=floor, bound=round(b, 3),
                       clean_right_vetoed=((fc > b) & okc).double().mean().item(), trig_vetoed=((ft > b) & okt).double().mean().item(), trig_confident=okt.double().mean().item())
            out.append(row); print(json.dumps(row), flush=True)
(ROOT / "results" / "dev" / "stability-floor.json").write_text(json.dumps(out, indent=1) + "\n")
