"""Dev study (issue #6): does some other neighbour of the input than faint Gaussian noise expose a
WaNet trained through noise (``wanet-noise``), which the guard's stability test cannot see?

The stability test asks how far the answer's log-odds fall from the input to one noisy neighbour.
Here the same fall is measured, on the bare model and its own answer, for other neighbours:

* ``adv<e>``: one signed-gradient step of size ``e``/255 that lowers the answer's log-odds (a
  trigger is a strong feature: triggered inputs may resist it more, or less, than clean ones);
* ``blur``, ``down2`` (half resolution and back), ``shift1`` (one pixel), ``bright`` (+0.1),
  ``contrast`` (x0.8), ``noise<s>`` (Gaussian, std s): corruptions of the kind TeCo (CVPR 2023)
  compares, whose robustness differs between clean and triggered inputs;
* ``jitter<a>``: the guard's jittered neighbour (``stability_jitter=a``, one grid, no noise): every
  pixel displaced by a fixed random amount of up to ``a`` pixels per axis (bilinear); WaNet's noise
  mode teaches the model that its warp plus such a jitter is no trigger;
* ``spread``: the standard deviation of a sample's falls over the corruptions (TeCo's idea:
  triggered inputs resist some corruptions and not others).

For each, the AUROC of triggered against clean dev inputs (both directions: a score above 0.5 in
``auroc_low`` means triggered inputs fall *less*), and the share of triggered inputs caught at a
threshold set on the clean calibration split (its 99th percentile, both tails) together with the
share of dev clean inputs it refuses. Bare model only: a screen, before anything enters the guard.

``median3`` (a 3x3 median filter per channel, a classic remover of sparse patterns) and ``blur5``
(a wider binomial blur) were added for GTSRB's Trojan watermark, whose trigger is thin dashed lines.

``--guarded``: judge the saved guard's leftovers instead of the bare model's whole populations. The
triggered inputs screened are the guard's *escapes* (answered with the target, hint reading) and
the clean ones are the answers it gets right; each signal's threshold is set on the clean
calibration split at the quantiles of ``GUARDED_QUANTILES``, and the report says how many escapes
each would catch and how many right answers it would cost. A signal worth carrying into the guard
catches escapes at a cost of a few tenths of a point.

Writes ``results/dev/<dataset>/neighbours-<attack>-<seed>[-guarded].json``.

    python scripts/neighbour_signals.py --attack wanet-noise --seed 1 --n 500
    python scripts/neighbour_signals.py --dataset gtsrb --attack trojan-watermark --seed 0 \
        --work runs/gtsrb-sgdbf16-e30-t1 --guarded --n 2000
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from linkbreaker_ext import experiment  # noqa: E402
from linkbreaker_ext.data import stratified_split  # noqa: E402
from linkbreaker_ext.metrics import auroc  # noqa: E402
from linkbreaker_ext.config import GuardConfig  # noqa: E402
from linkbreaker_ext.fitting import jitter_grids  # noqa: E402
from linkbreaker_ext.verdict import median_filter, neighbour  # noqa: E402

DEV = slice(0, 5000)
ROWS = 250
GUARDED_QUANTILES = (0.99, 0.995, 0.999)



def answer_log_odds(model, x, labels):
    """From the logits, not the softmax: exact where float32 confidences saturate, and with a gradient."""
    z = model(x)
    own = z.gather(1, labels[:, None])[:, 0]
    rest = z.scatter(1, labels[:, None], float("-inf")).logsumexp(1)
    return (own - rest).double()


def corruptions(x):
    """The neighbours without gradients: name -> transformed batch (values stay in [0, 1])."""
    g = torch.Generator().manual_seed(0)
    kernel = torch.tensor([1.0, 2.0, 1.0])
    kernel = (kernel[:, None] * kernel[None, :] / 16).expand(x.shape[1], 1, 3, 3)
    wide = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0])
    wide = (wide[:, None] * wide[None, :] / 256).expand(x.shape[1], 1, 5, 5)
    out = {
        "blur": F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernel, groups=x.shape[1]),
        "blur5": F.conv2d(F.pad(x, (2, 2, 2, 2), mode="replicate"), wide, groups=x.shape[1]),
        "median3": median_filter(x, 3),
        "down2": F.interpolate(F.avg_pool2d(x, 2), scale_factor=2, mode="bilinear", align_corners=False),
        "shift1": torch.roll(x, shifts=1, dims=3),
        "bright": (x + 0.1).clamp(0, 1),
        "contrast": ((x - x.mean((1, 2, 3), keepdim=True)) * 0.8 + x.mean((1, 2, 3), keepdim=True)).clamp(0, 1),
    }
    for s in (0.03, 0.06):
        out[f"noise{s}"] = (x + torch.randn(x.shape[1:], generator=g) * s).clamp(0, 1)
    for a in (0.5, 1.0):  # the guard's own jittered neighbour (one grid, no noise)
        grids = jitter_grids(x.shape[1:], GuardConfig(stability_jitter=a, stability_draws=1))
        out[f"jitter{a}"] = neighbour(x, torch.zeros(x.shape[1:]), None, None, grids)
    return out


def falls(model, x, eps_list):
    """name -> [B] fall of the bare model's answer's log-odds, input to neighbour."""
    result: dict[str, list] = {}
    for i in range(0, len(x), ROWS):
        xb = x[i:i + ROWS]
        with torch.no_grad():
            labels = model(xb).argmax(1)
            base = answer_log_odds(model, xb, labels)
            for name, near in corruptions(xb).items():
                result.setdefault(name, []).append(base - answer_log_odds(model, near, labels))
        xg = xb.clone().requires_grad_(True)
        grad, = torch.autograd.grad(answer_log_odds(model, xg, labels).sum(), xg)
        with torch.no_grad():
            for e in eps_list:
                near = (xb - e / 255 * grad.sign()).clamp(0, 1)
                result.setdefault(f"adv{e}", []).append(base - answer_log_odds(model, near, labels))
    out = {k: torch.cat(v) for k, v in result.items()}
    corr = torch.stack([v for k, v in out.items() if not k.startswith(("adv", "jitter"))], 1)
    out["spread"] = corr.std(1)
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--dataset", default="cifar10")
    p.add_argument("--attack", default="wanet-noise")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", default="../shared/data")
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--eps", type=float, nargs="+", default=[0.5, 1.0, 2.0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--work", default=None, help="the reproduce work folder (default runs/<dataset>)")
    p.add_argument("--guarded", action="store_true",
                   help="screen the saved guard's escapes against the clean answers it gets right")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.work) if args.work else ROOT / "runs" / args.dataset
    run = f"{args.attack}-{args.seed}"
    if args.guarded:
        split, model, attack, guard, _ = experiment.saved_run(args.dataset, run, args.data, work)
    else:
        split = experiment.split_data(args.dataset, args.data, None, args.seed)
        model, meta = experiment.load_model(work / "models" / f"{run}.safetensors")
        attack = experiment.attacks.Attack.from_dict(meta["attack"]) if meta["attack"] else None
    model.eval()
    cal, _ = stratified_split(split["y_val"], 0.3, seed=0)
    x_cal = split["x_val"][cal]
    xc, yc, xt, _, target = experiment.eval_sets(attack, split["x_test"], split["y_test"], args.n,
                                                 args.n, args.seed, DEV)
    kept = torch.ones(len(xc), dtype=torch.bool)
    if args.guarded:  # the guard's escapes, and the clean answers it gets right
        hit = guard(xt).labels == target
        kept = guard(xc).labels == yc
    else:
        hit = model(xt).argmax(1) == target  # triggered inputs that work: the ones a guard must catch
    f_cal, f_c, f_t = (falls(model, x, args.eps) for x in (x_cal, xc, xt))
    out = {"dataset": args.dataset, "attack": args.attack, "seed": args.seed, "n": args.n,
           "work": str(work), "guarded": args.guarded, "escapes" if args.guarded else "hits": int(hit.sum()),
           "asr_bare" if not args.guarded else "asr_guarded": hit.float().mean().item(),
           "clean_kept": int(kept.sum()), "signals": {}}
    for name in f_c:
        if args.guarded:
            t, c = f_t[name][hit], f_c[name][kept]
            out["signals"][name] = row = {
                "auroc_high": auroc(c, t) if len(t) else None, "clean_median": c.median().item(),
                "escape_median": t.median().item() if len(t) else None, "by_quantile": {}}
            for q in GUARDED_QUANTILES:
                hi = f_cal[name].quantile(q).item()
                row["by_quantile"][str(q)] = {"threshold": hi, "escapes_caught": int((t > hi).sum()),
                                             "clean_right_lost": int((c > hi).sum())}
            qs = " ".join(f"q{q}: {v['escapes_caught']}/{len(t)} caught, {v['clean_right_lost']} lost"
                          for q, v in row["by_quantile"].items())
            print(f"{name:10s} auroc {row['auroc_high']} | median clean {row['clean_median']:.3f} "
                  f"escape {row['escape_median']} | {qs}", flush=True)
            continue
        t = f_t[name][hit]
        lo, hi = f_cal[name].quantile(0.005).item(), f_cal[name].quantile(0.995).item()
        row = {"auroc_high": auroc(f_c[name], t), "auroc_low": auroc(-f_c[name], -t),
               "cal_q005": lo, "cal_q995": hi,
               "clean_median": f_c[name].median().item(), "trigger_median": t.median().item(),
               "caught_high": (t > hi).float().mean().item(), "clean_high": (f_c[name] > hi).float().mean().item(),
               "caught_low": (t < lo).float().mean().item(), "clean_low": (f_c[name] < lo).float().mean().item()}
        out["signals"][name] = row
        print(f"{name:10s} auroc hi {row['auroc_high']:.3f} lo {row['auroc_low']:.3f} | median clean "
              f"{row['clean_median']:.3f} trig {row['trigger_median']:.3f} | caught hi {row['caught_high']:.3f} "
              f"(clean {row['clean_high']:.3f}) lo {row['caught_low']:.3f} (clean {row['clean_low']:.3f})", flush=True)
    tag = "-guarded" if args.guarded else ""
    dest = ROOT / "results" / "dev" / args.dataset / f"neighbours-{run}{tag}.json"
    dest.write_text(json.dumps(out, indent=1) + "\n")
    print("wrote", dest)


if __name__ == "__main__":
    main()
