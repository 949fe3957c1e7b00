"""Dev study (issue #6): does a joint deviation over several layers catch what the per-layer
consistency check lets through?

The consistency check judges each layer alone: a head is consistent when every layer's deviation is
within that layer's bound (``consistency_reduce="per_layer"``, the maximum over layers against 1).
A faint trigger, or a watermark near its bound, can sit just inside the bound in several late layers
at once, which a clean input seldom does. Beatrix (NDSS 2023) scores the deviations of several
layers together; this study asks whether the mean of a head's per-layer ratios over the last ``k``
evidence entries (each already relative to its layer's bound) separates them.

For each saved guard (no refit; the runs in ``results/dev/joint-deviation/`` used session 34's
default, without the rank test), on the dev halves (test indices 0-4999):

* the bound of each statistic is its ``--quantile`` over the clean dev inputs' own-class heads (an
  optimistic, test-tuned bound: the study asks whether the statistic separates at all, before any
  calibration is designed), and, beside it, over the validation set (in-sample for the fit split,
  so lower);
* *cost*: clean dev inputs the guard answers rightly and accepts whose own head exceeds the
  validation bound (%);
* *caught*: triggered dev inputs that pass the guard (hint reading) whose target head exceeds the
  dev bound (% of all triggered inputs), at each transparency.

    python scripts/joint_deviation_study.py --work runs/cifar10-sgdbf16-e80 --runs trojan-square-1
    python scripts/joint_deviation_study.py --table
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from linkbreaker_ext import LinkBreaker, experiment  # noqa: E402
from linkbreaker_ext.reproduce import SPLITS  # noqa: E402

OUT = ROOT / "results" / "dev" / "joint-deviation"


def statistics(by_layer: torch.Tensor) -> dict:
    """``{name: [...]}`` joint statistics of per-layer ratios ``[..., L]``: today's maximum, and the
    mean over the last k evidence entries (the late layer last) or over all of them."""
    L = by_layer.shape[-1]
    out = {"max (today)": by_layer.amax(-1), "mean, all": by_layer.mean(-1)}
    for k in (2, 3, 4, L // 2):
        out[f"mean, last {k}"] = by_layer[..., -k:].mean(-1)
    return out


def study(work: Path, run: str, quantile: float, transparencies, n_clean, n_trigger, data) -> dict:
    model, meta = experiment.load_model(work / "models" / f"{run}.safetensors")
    if not meta["attack"]:
        raise SystemExit(f"{run}: a clean model has no trigger to catch; every run's *cost* column "
                         "already measures clean inputs")
    attack = experiment.attacks.Attack.from_dict(meta["attack"])
    guard = LinkBreaker.load(work / "guards" / f"{run}.safetensors", model)
    seed = int(run.rsplit("-", 1)[1])
    split = experiment.split_data(meta["dataset"], data, None, seed)
    xc, yc, xt, _, target = experiment.eval_sets(attack, split["x_test"], split["y_test"], n_clean,
                                                 n_trigger, seed, SPLITS["dev"])
    x0 = experiment.triggered_originals(attack, split["x_test"], split["y_test"], n_clean, n_trigger,
                                        seed, SPLITS["dev"])
    bounds = guard.profile["bounds"]

    def own(d, y):  # [B, L]: each input's head of class y, relative to its bound
        return d[torch.arange(len(y)), y] / bounds[y, None]

    rc = guard(xc)
    right = (rc.labels == yc) & (rc.verdict == 0)
    clean = statistics(own(guard.deviations(xc, by_layer=True), yc))
    val = statistics(own(guard.deviations(split["x_val"], by_layer=True), split["y_val"]))
    trig = {}
    for t in transparencies:
        x = x0 + (1 - t) * (xt - x0)
        r = guard(x)
        tgt = torch.full((len(x),), target, dtype=torch.long)
        trig[f"{t:g}"] = (r.labels == target, statistics(own(guard.deviations(x, by_layer=True), tgt)))
    rows = []
    for name in clean:
        dev_bound = float(torch.quantile(clean[name], quantile))
        val_bound = float(torch.quantile(val[name], quantile))
        row = {"statistic": name, "dev_bound": round(dev_bound, 4), "val_bound": round(val_bound, 4),
               "cost": round(100 * (right & (clean[name] > val_bound)).double().mean().item(), 3),
               "passed": {}, "caught": {}}
        for t, (passed, stats) in trig.items():
            row["passed"][t] = round(100 * passed.double().mean().item(), 3)
            row["caught"][t] = round(100 * (passed & (stats[name] > dev_bound)).double().mean().item(), 3)
        rows.append(row)
        print(run, json.dumps(row), flush=True)
    return {"dataset": meta["dataset"], "run": run, "work": str(work), "split": "dev",
            "evidence": guard._profile_layers(), "quantile": quantile, "n_clean": len(xc),
            "n_trigger": len(xt), "statistics": rows}


def table() -> str:
    runs = [json.loads(p.read_text()) for p in sorted(OUT.glob("*.json"))]
    lines = ["# A joint deviation over the late layers, on the dev halves", "",
             "Made by `python scripts/joint_deviation_study.py --table` from the per-run JSONs beside "
             "it (each names its command). *passed*: triggered inputs that pass today's guard (hint "
             "reading, %); *caught*: those whose target head's statistic exceeds its bound set on the "
             "clean dev inputs (%); *cost*: clean inputs answered rightly and accepted whose own head "
             "exceeds the bound set on the validation set (%). t: transparency (0: full strength).", ""]
    for r in runs:
        ts = list(r["statistics"][0]["passed"])
        lines += [f"## {r['dataset']} {r['run']} ({r['work']})", "",
                  "| statistic | dev bound | val bound | cost | "
                  + " | ".join(f"passed / caught, t={t}" for t in ts) + " |",
                  "| --- " * (4 + len(ts)) + "|"]
        for s in r["statistics"]:
            lines.append(f"| {s['statistic']} | {s['dev_bound']:.3f} | {s['val_bound']:.3f} | {s['cost']:.2f} | "
                         + " | ".join(f"{s['passed'][t]:.1f} / {s['caught'][t]:.1f}" for t in ts) + " |")
        lines.append("")
    text = "\n".join(lines)
    (OUT / "summary.md").write_text(text + "\n")
    return text


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="runs/cifar10-sgdbf16-e80")
    ap.add_argument("--runs", nargs="+", default=["trojan-square-1"])
    ap.add_argument("--quantile", type=float, default=0.995)
    ap.add_argument("--transparency", type=float, nargs="+", default=[0.0, 0.3, 0.5])
    ap.add_argument("--n-clean", type=int, default=1000)
    ap.add_argument("--n-trigger", type=int, default=500)
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--table", action="store_true", help="only summarise the JSONs already written")
    args = ap.parse_args()
    if args.table:
        print(table())
        return
    torch.set_num_threads(1)
    OUT.mkdir(parents=True, exist_ok=True)
    work = Path(args.work)
    for run in args.runs:
        res = study(work, run, args.quantile, args.transparency, args.n_clean, args.n_trigger, args.data)
        res["command"] = (f"python scripts/joint_deviation_study.py --work {args.work} --runs {run} "
                          f"--quantile {args.quantile:g} --transparency "
                          + " ".join(f"{t:g}" for t in args.transparency)
                          + f" --n-clean {args.n_clean} --n-trigger {args.n_trigger}")
        (OUT / f"{res['dataset']}-{run}-{work.name}.json").write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
