"""Dev study (issue #6): the neighbourhood rank test read at every masked layer's evidence, not only
the last one.

The rank test reads the last masked layer's last view. On GTSRB its bound sits at the floor (every
validation sign's rank there is 0) and the watermarked signs that seed 0's guard accepts rank 0
too: at the last conv layer the watermark has already made them the target's. Earlier, their
neighbourhood may still be the source class's. For each masked evidence this study sets the rank
test's bound (the ``--quantiles`` of the validation samples' leave-one-out own-class scores, at
least log 2; over every validation sample, where the guard keeps those whose own head is
confident, so its bounds are a little lower), judges only heads over the saved guard's gate (as
the guard does),
and counts, on the dev half (test indices 0-4999), for each evidence, for a head that fails at any of
them, and for one score summed over the evidences (``sum``: all; ``sum-last``: the last masked
layer's views; each with its own bound, the same quantile of the validation samples' summed scores):

* *cost*: clean inputs the saved guard answers rightly and accepts whose head fails (%);
* *caught*: triggered inputs (at ``--transparency``) the saved guard accepts as the target whose
  target head fails (%), beside how many it accepts.

The references are the validation set in its stored order, the same samples as the guard's.

    python scripts/rank_layers_study.py --work runs/gtsrb-sgdbf16-e30 --runs trojan-watermark-0

Writes ``results/dev/rank-layers/<dataset>-<run>-t<t>.json`` (session 35's default guards), or
``<out>/<work folder>-<run>-t<t>.json`` with ``--out`` (session 36's: ``results/dev/rank-layers-s36/``).
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
from linkbreaker_ext import LinkBreaker, experiment  # noqa: E402
from linkbreaker_ext.reproduce import SPLITS  # noqa: E402
from linkbreaker_ext.verdict import neighbourhood_scores  # noqa: E402

OUT = ROOT / "results" / "dev" / "rank-layers"


def study(work: Path, run: str, quantiles, transparency: float, n: int, data) -> dict:
    model, meta = experiment.load_model(work / "models" / f"{run}.safetensors")
    if not meta["attack"]:
        raise SystemExit(f"{run}: a clean model has no trigger; every run's cost column measures clean inputs")
    attack = experiment.attacks.Attack.from_dict(meta["attack"])
    guard = LinkBreaker.load(work / "guards" / f"{run}.safetensors", model)
    if guard.neighbourhood is None or "gate" not in guard.neighbourhood:
        raise SystemExit(f"{run}: the saved guard has no gated rank test (today's reproduce saves one)")
    seed = int(run.rsplit("-", 1)[1])
    split = experiment.split_data(meta["dataset"], data, None, seed)
    xc, yc, xt, _, target = experiment.eval_sets(attack, split["x_test"], split["y_test"], n, n, seed, SPLITS["dev"])
    x0 = experiment.triggered_originals(attack, split["x_test"], split["y_test"], n, n, seed, SPLITS["dev"])
    xt = x0 + (1 - transparency) * (xt - x0)
    first, row = guard._hidden_masks()[1]
    names = guard._profile_layers()[:-1]  # every masked evidence (the late layer is not masked)

    def views(x):  # every masked evidence's units in the view(s) kept (head_confidences chunks the forward)
        u = guard.head_confidences(x, with_units=True)[3]
        return {k: u[k][:, first].float() for k in names}

    yv = split["y_val"]
    uv, uc, ut = views(split["x_val"]), views(xc), views(xt)
    rc, rt = guard(xc), guard(xt)
    right = (rc.verdict == 0) & (rc.labels == yc)
    passed = (rt.verdict == 0) & (rt.labels == target)
    gate = float(guard.neighbourhood["gate"])
    judged_c = rc.consistency.gather(1, yc[:, None])[:, 0] > gate
    judged_t = rt.consistency[:, target] > gate
    pct = lambda m: round(100 * m.double().mean().item(), 3)  # noqa: E731
    # each evidence's scores, once: the validation samples' own (left out), the clean inputs' own,
    # the triggered inputs' target's
    scores = {}
    for k in names:
        refs = F.normalize(uv[k], dim=-1).transpose(0, 1).contiguous()  # [V, R, D]
        scores[k] = (neighbourhood_scores(uv[k], refs, yv, row, torch.arange(len(yv))).gather(1, yv[:, None])[:, 0],
                     neighbourhood_scores(uc[k], refs, yv, row).gather(1, yc[:, None])[:, 0],
                     neighbourhood_scores(ut[k], refs, yv, row)[:, target])
    last = [k for k in names if k.split("@")[0] == names[-1].split("@")[0]]  # the last masked layer's views
    # TED's idea, simply: one score summed over evidences (a faint trigger's input may sit among its
    # source class at several layers, each too weakly to pass one evidence's bound)
    sums = {"sum": names, "sum-last": last}
    rows = []
    for q in quantiles:
        any_c, any_t = torch.zeros_like(right), torch.zeros_like(passed)
        for k in names:
            own, sc, st = scores[k]
            bound = max(float(torch.quantile(own, q)), float(torch.tensor(2.0).log()))
            fail_c, fail_t = sc > bound, st > bound
            any_c |= fail_c
            any_t |= fail_t
            rows.append({"quantile": q, "evidence": k, "bound": round(bound, 4),
                         "cost": pct(right & judged_c & fail_c), "caught": pct(passed & judged_t & fail_t)})
        rows.append({"quantile": q, "evidence": "any", "cost": pct(right & judged_c & any_c),
                     "caught": pct(passed & judged_t & any_t)})
        for name, members in sums.items():
            own, sc, st = (sum(scores[k][i] for k in members) for i in range(3))
            bound = max(float(torch.quantile(own, q)), float(torch.tensor(2.0).log()))
            rows.append({"quantile": q, "evidence": name, "members": members, "bound": round(bound, 4),
                         "cost": pct(right & judged_c & (sc > bound)), "caught": pct(passed & judged_t & (st > bound))})
    return {"dataset": meta["dataset"], "run": run, "work": str(work), "split": "dev", "transparency": transparency,
            "n": n, "gate": round(gate, 4), "accepted_right": pct(right), "passed": pct(passed), "rows": rows}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="runs/gtsrb-sgdbf16-e30")
    ap.add_argument("--runs", nargs="+", default=["trojan-watermark-0"])
    ap.add_argument("--quantiles", type=float, nargs="+", default=[0.995, 0.999])
    ap.add_argument("--transparency", type=float, default=0.0)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--out", default=str(OUT.relative_to(ROOT)),
                    help="folder for the JSONs (another one keeps an earlier default's study)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = ROOT / args.out
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work)
    for run in args.runs:
        res = study(work, run, args.quantiles, args.transparency, args.n, args.data)
        res["command"] = (f"python scripts/rank_layers_study.py --work {args.work} --runs {run} --quantiles "
                          + " ".join(f"{q:g}" for q in args.quantiles)
                          + f" --transparency {args.transparency:g} --n {args.n}"
                          + ("" if args.out == str(OUT.relative_to(ROOT)) else f" --out {args.out}"))
        stem = f"{res['dataset']}-{run}" if out == OUT else f"{work.name}-{run}"  # one work's runs apart from another's
        (out / f"{stem}-t{args.transparency:g}.json").write_text(json.dumps(res, indent=1) + "\n")
        for r in res["rows"]:
            print(run, json.dumps(r), flush=True)
        print(run, "accepted right", res["accepted_right"], "passed", res["passed"], flush=True)


if __name__ == "__main__":
    main()
