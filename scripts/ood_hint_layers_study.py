"""Dev study (issue #6): an OOD verdict's label hint from the input's nearest validation image at one
masked evidence, instead of the guard's rule.

An OOD verdict's hint counts as the guard's answer in the hint reading. On GTSRB it carries about
ten points of clean accuracy (the accepted-only CDA is 87-90 %, the hint reading's 97 %), and it is
also how a watermarked sign reaches its target there: the target's head, below its threshold but
consistent and the most confident of the consistent ones, is named (held-out seed 0: 1.35 of its
3.35 %; on the dev half at 30 % transparency 16.8 % against 0.8 % accepted). The rank test already
weighs the hint at the last masked layer, where the watermark has made the sign the target's. At
an earlier evidence its neighbourhood may still be the source class's. For every OOD verdict of the
saved guard this study replaces the hint by the class of the nearest validation image (cosine, the
guard's first head view) at each masked evidence, and counts, on the dev half (test indices
0-4999):

* *CDA*: clean inputs answered with their class, hint reading (points, against the guard's);
* *ASR*: triggered inputs (at each ``--transparencies``) answered with the target, hint reading;

and the same where the guard keeps its hint but gives none (-1) when the nearest image's class at
that evidence disagrees with it (``withhold@<evidence>``).

    python scripts/ood_hint_layers_study.py --work runs/gtsrb-sgdbf16-e30 --runs trojan-watermark-0

Writes ``results/dev/ood-hint-layers/<work folder>-<run>.json``.
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
from linkbreaker_ext import OOD, LinkBreaker, experiment  # noqa: E402
from linkbreaker_ext.reproduce import SPLITS  # noqa: E402

OUT = ROOT / "results" / "dev" / "ood-hint-layers"


def study(work: Path, run: str, transparencies, n: int, data) -> dict:
    model, meta = experiment.load_model(work / "models" / f"{run}.safetensors")
    guard = LinkBreaker.load(work / "guards" / f"{run}.safetensors", model)
    seed = int(run.rsplit("-", 1)[1])
    split = experiment.split_data(meta["dataset"], data, None, seed)
    attack = experiment.attacks.Attack.from_dict(meta["attack"]) if meta["attack"] else None
    pool = SPLITS["dev"]
    first = guard._hidden_masks()[1][0][:1]  # the first head's view
    names = guard._profile_layers()[:-1]  # every masked evidence

    def views(x):  # every masked evidence's units in the view(s) kept (head_confidences chunks the forward)
        u = guard.head_confidences(x, with_units=True)[3]
        return {k: F.normalize(u[k][:, first[0]].float(), dim=-1) for k in names}

    yv = split["y_val"]
    refs = views(split["x_val"])

    def nearest(x):
        u = views(x)
        return {k: yv[(u[k] @ refs[k].T).argmax(1)] for k in names}

    def answers(x):
        r = guard(x)
        ood = r.verdict == OOD
        near = nearest(x)
        alt = {k: torch.where(ood, v, r.labels) for k, v in near.items()}
        # or no hint (-1) where the guard's hint and the nearest image's class disagree
        held = {f"withhold@{k}": r.labels.masked_fill(ood & (v != r.labels), -1) for k, v in near.items()}
        return {"guard": r.labels, **alt, **held}, ood

    pct = lambda m: round(100 * m.double().mean().item(), 3)  # noqa: E731
    xc, yc, xt, _, target = experiment.eval_sets(attack, split["x_test"], split["y_test"], n, n, seed, pool)
    sets = []
    if attack is not None:  # a clean model: its clean inputs only
        x0 = experiment.triggered_originals(attack, split["x_test"], split["y_test"], n, n, seed, pool)
        sets = [(t, x0 + (1 - t) * (xt - x0)) for t in transparencies]
    labels, ood = answers(xc)
    res = {"dataset": meta["dataset"], "run": run, "work": str(work), "split": "dev", "n": n,
           "clean_ood": pct(ood), "cda": {k: pct(v == yc) for k, v in labels.items()},
           "cda_among_ood": {k: pct((v == yc)[ood]) for k, v in labels.items()}, "asr": {}}
    for t, x in sets:
        labels, ood_t = answers(x)
        res["asr"][f"{t:g}"] = {"ood": pct(ood_t), **{k: pct(v == target) for k, v in labels.items()}}
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="runs/gtsrb-sgdbf16-e30")
    ap.add_argument("--runs", nargs="+", default=["trojan-watermark-0"])
    ap.add_argument("--transparencies", type=float, nargs="+", default=[0.0, 0.3])
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    OUT.mkdir(parents=True, exist_ok=True)
    work = Path(args.work)
    for run in args.runs:
        res = study(work, run, args.transparencies, args.n, args.data)
        res["command"] = (f"python scripts/ood_hint_layers_study.py --work {args.work} --runs {run} --transparencies "
                          + " ".join(f"{t:g}" for t in args.transparencies) + f" --n {args.n}")
        (OUT / f"{work.name}-{run}.json").write_text(json.dumps(res, indent=1) + "\n")
        print(run, json.dumps({k: res[k] for k in ("clean_ood", "cda", "asr")}), flush=True)


if __name__ == "__main__":
    main()
