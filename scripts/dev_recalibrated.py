"""Dev study: last-stage settings (``fitting.CALIBRATION_FIELDS``) on the saved guards, recalibrated
(no refit), against the saved guards as they are (today's default), on the dev halves (test indices
0-4999).

For each run: the CDA drop (hint reading, in points, against the undefended model on the same
clean inputs) and the ASR after the guard (hint reading and accepted only, %) with the trigger at
each transparency t (``x + (1 - t) * (trigger(x) - x)``; 0: the training trigger), for the default
and the variant.

    python scripts/dev_recalibrated.py --work runs/cifar10-sgdbf16-e80 --runs trojan-square-1 \
        --set stability_noise=0.0 --set stability_jitter=0.5 --tag jitter
    python scripts/dev_recalibrated.py --table --tag jitter

Writes ``results/dev/recalibrated/<tag>/<dataset>-<run>-<work>.json`` and, with ``--table``,
``summary.md`` beside them.
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
from linkbreaker_ext.reproduce import SPLITS, parse_settings  # noqa: E402

OUT = ROOT / "results" / "dev" / "recalibrated"


def measure(guard, xc, yc, before, triggered, target) -> dict:
    rc = guard(xc)
    out = {"drop": round(100 * (before - (rc.labels == yc).double().mean().item()), 3), "asr": {}, "asr_accepted": {}}
    for t, x in triggered.items():
        r = guard(x)
        hit = r.labels == target
        out["asr"][t] = round(100 * hit.double().mean().item(), 3)
        out["asr_accepted"][t] = round(100 * (hit & (r.verdict == 0)).double().mean().item(), 3)
    return out


def study(work: Path, run: str, settings: dict, transparencies, n_clean, n_trigger, data) -> dict:
    seed = int(run.rsplit("-", 1)[1])
    model, meta = experiment.load_model(work / "models" / f"{run}.safetensors")
    attack = experiment.attacks.Attack.from_dict(meta["attack"]) if meta["attack"] else None
    guard = LinkBreaker.load(work / "guards" / f"{run}.safetensors", model)
    split = experiment.split_data(meta["dataset"], data, None, seed)
    variant = guard.recalibrate(split["x_val"], split["y_val"], **settings)
    xc, yc, xt, _, target = experiment.eval_sets(attack, split["x_test"], split["y_test"], n_clean, n_trigger,
                                                 seed, SPLITS["dev"])
    triggered = {}
    if attack is not None:
        x0 = experiment.triggered_originals(attack, split["x_test"], split["y_test"], n_clean, n_trigger,
                                            seed, SPLITS["dev"])
        triggered = {f"{t:g}": x0 + (1 - t) * (xt - x0) for t in transparencies}
    with torch.no_grad():
        before = (model(xc).argmax(1) == yc).double().mean().item()
    return {"dataset": meta["dataset"], "run": run, "work": str(work), "split": "dev", "settings": settings,
            "n_clean": len(xc), "n_trigger": len(xt) if attack is not None else 0,
            "model_cda": round(100 * before, 3),
            "default": measure(guard, xc, yc, before, triggered, target),
            "variant": measure(variant, xc, yc, before, triggered, target)}


def table(out: Path) -> str:
    runs = [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]
    lines = [f"# Recalibrated variant `{out.name}` on the dev halves", "",
             f"Made by `python scripts/dev_recalibrated.py --table --tag {out.name}` from the per-run JSONs "
             "beside it (each names its command and settings). Today's default (the saved guards) -> the "
             "variant: CDA drop in points, ASR after the guard in % (hint reading / accepted only) at "
             "transparency t (0: the training trigger).", ""]
    groups = {}
    for r in runs:
        groups.setdefault((r["dataset"], r["work"], r["run"].rsplit("-", 1)[0]), []).append(r)

    def mean(vals):
        return sum(vals) / len(vals)
    ts = sorted({t for r in runs for t in r["default"]["asr"]}, key=float)
    lines += ["| models | runs | drop | " + " | ".join(f"ASR t={t}" for t in ts) + " |",
              "| --- " * (3 + len(ts)) + "|"]
    for (dataset, work, attack), group in sorted(groups.items()):
        cells = [f"{mean([r['default']['drop'] for r in group]):.2f} -> {mean([r['variant']['drop'] for r in group]):.2f}"]
        for t in ts:
            if all(t in r["default"]["asr"] for r in group):
                cells.append(" -> ".join(f"{mean([r[k]['asr'][t] for r in group]):.2f} / "
                                         f"{mean([r[k]['asr_accepted'][t] for r in group]):.2f}"
                                         for k in ("default", "variant")))
            else:
                cells.append("-")
        lines.append(f"| {dataset} {attack} ({Path(work).name}) | {len(group)} | " + " | ".join(cells) + " |")
    lines += ["", "Per run, drop: " + "; ".join(f"{r['run']} ({Path(r['work']).name}) {r['default']['drop']:.2f} -> "
                                                f"{r['variant']['drop']:.2f}" for r in runs)]
    text = "\n".join(lines)
    (out / "summary.md").write_text(text + "\n")
    return text


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="runs/cifar10-sgdbf16-e80")
    ap.add_argument("--runs", nargs="+", default=["trojan-square-0"])
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="a last-stage GuardConfig setting of the variant (repeatable)")
    ap.add_argument("--tag", required=True, help="names the variant's folder")
    ap.add_argument("--transparency", type=float, nargs="+", default=[0.0, 0.3, 0.5])
    ap.add_argument("--n-clean", type=int, default=1000)
    ap.add_argument("--n-trigger", type=int, default=500)
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--table", action="store_true", help="only summarise the JSONs already written")
    args = ap.parse_args()
    out = OUT / args.tag
    if args.table:
        print(table(out))
        return
    settings = parse_settings(args.set)
    if not settings:
        ap.error("--set at least one setting: the variant must differ from the default")
    torch.set_num_threads(1)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work)
    for run in args.runs:
        res = study(work, run, settings, args.transparency, args.n_clean, args.n_trigger, args.data)
        res["command"] = (f"python scripts/dev_recalibrated.py --work {args.work} --runs {run} "
                          + " ".join(f"--set {s}" for s in args.set) + f" --tag {args.tag} --transparency "
                          + " ".join(f"{t:g}" for t in args.transparency)
                          + f" --n-clean {args.n_clean} --n-trigger {args.n_trigger}")
        (out / f"{res['dataset']}-{run}-{work.name}.json").write_text(json.dumps(res, indent=1) + "\n")
        print(run, json.dumps({k: res[k] for k in ("default", "variant")}), flush=True)


if __name__ == "__main__":
    main()
