"""Dev studies (issue #6) of the stability test's neighbour, on saved guards recalibrated (no refit).

``--study contrast``: the neighbour noise scaled to each input's contrast. On GTSRB the clean signs
that the stability test turned away were the dark, flat ones (pixel std about 0.02 against a median
of 0.17): the fixed noise of std 0.05 drowns them. ``stability_contrast = q`` scales the patterns,
for an input of lower contrast than the validation set's q quantile, by the ratio of the two (never
up). Compared with the tail bound (today's) and the quantile bound (the calibration falls' 0.995
quantile alone, at least the floor).

``--study jitter``: a geometric neighbour. Each neighbour is the input resampled through a fixed
random displacement of up to ``stability_jitter`` pixels (per pixel and axis), then its noise added:
WaNet's noise mode trains its warp plus such a jitter to keep the true label, so the backdoor hangs
on exact geometry, and noise training does not protect it there.

A setting is ``noise:contrast[:bound[:jitter]]`` (bound: tail unless named; jitter 0 unless named).
Each model's **saved guard** is recalibrated with each setting (calibration-stage fields) and judged
on the dev half (``--n`` clean and ``--n`` triggered inputs, hint reading). Per setting: CDA after
the guard, ASR, the share of clean inputs the bare model gets right whose true head is confident but
fails the stability test, and the bound.

Writes ``results/dev/stability-<study>/<dataset>-<run>.json``; ``--table`` writes
``results/dev/stability-<study>.md``.

    python scripts/stability_neighbour_study.py --study jitter --dataset cifar10 --runs wanet-noise-0 wanet-0
    python scripts/stability_neighbour_study.py --study jitter --table   # summary of every saved run
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from linkbreaker_ext import experiment, training  # noqa: E402

DEV = slice(0, 5000)
# per study: its settings (noise:contrast[:bound[:jitter]]; the first is the reference, today's
# default) and its title
STUDIES = {
    "contrast": (["0.05:0", "0.05:0.5", "0.05:0.75", "0.05:0:quantile", "0.05:0.5:quantile"],
                 "The stability test's noise scaled to each input's contrast (dev)"),
    "jitter": (["0.05:0", "0.05:0:tail:0.5", "0.05:0:tail:1", "0:0:tail:0.5", "0:0:tail:0.3",
                "0:0:quantile:0.5"],
               "A geometric neighbour: the stability test's inputs resampled through a fixed jitter (dev)"),
}


def parse(setting: str) -> dict:
    """``noise:contrast[:bound[:jitter]]`` -> the calibration fields it sets."""
    noise, q, rule, jitter = (setting.split(":") + ["tail", "0"][len(setting.split(":")) - 2:])[:4]
    return {"stability_noise": float(noise), "stability_contrast": float(q), "stability_bound": rule,
            "stability_jitter": float(jitter)}


def order(settings: list, setting: str) -> int:
    """A setting's column: its place in the study's settings, others after them."""
    return settings.index(setting) if setting in settings else len(settings)


def judge(guard, xc, yc, xt, target, right) -> dict:
    r = guard(xc)
    i = torch.arange(len(yc))
    confident = r.confidences[i, yc] >= r.thresholds[yc]
    unstable = (r.stability[i, yc] > 1) & confident & right
    out = {"cda": (r.labels.cpu() == yc).float().mean().item(),
           "stability_refusals": unstable.float().mean().item(),
           "bound": float(guard.stability["bound"])}
    if xt is not None:
        out["asr"] = (guard(xt).labels.cpu() == target).float().mean().item()
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--study", choices=sorted(STUDIES), default="contrast")
    p.add_argument("--dataset", default="cifar10")
    p.add_argument("--runs", nargs="+", help="<attack>-<seed> under runs/<dataset>/")
    p.add_argument("--settings", nargs="+", default=None,
                   help="stability_noise:stability_contrast[:stability_bound[:stability_jitter]] "
                        "(default bound: tail, jitter: 0; default settings: the study's)")
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--table", action="store_true", help="print a summary of the saved studies and stop")
    args = p.parse_args()
    settings, title = STUDIES[args.study]
    out_dir = ROOT / "results" / "dev" / f"stability-{args.study}"
    if args.table:
        text = table(out_dir, settings)
        (out_dir.parent / f"stability-{args.study}.md").write_text(
            f"# {title}\n\nMade by `python scripts/stability_neighbour_study.py --study {args.study} "
            f"--table` from the JSONs in `stability-{args.study}/`.\n\n" + text + "\n")
        print(text)
        return
    if not args.runs:
        p.error("--runs is required (or --table)")
    torch.set_num_threads(1)
    out_dir.mkdir(parents=True, exist_ok=True)
    for run in args.runs:
        split, model, attack, saved, seed = experiment.saved_run(args.dataset, run, args.data,
                                                                 ROOT / "runs" / args.dataset)
        xc, yc, xt, _, target = experiment.eval_sets(attack, split["x_test"], split["y_test"], args.n,
                                                     args.n, seed, DEV)
        right = training.predict_logits(model, xc).argmax(1) == yc
        path = out_dir / f"{args.dataset}-{run}.json"
        out = json.loads(path.read_text()) if path.is_file() else {
            "dataset": args.dataset, "run": run, "split": "dev", "n": args.n, "rows": []}
        for setting in args.settings or settings:
            fields = parse(setting)
            g = saved.recalibrate(split["x_val"], split["y_val"], **fields)
            row = {"setting": setting, **fields,
                   **judge(g, xc, yc, xt if attack is not None else None, target, right)}
            out["rows"] = [r for r in out["rows"] if r["setting"] != setting] + [row]  # a re-run replaces its row
            print(args.dataset, run, json.dumps(row), flush=True)
        out["rows"].sort(key=lambda r: order(settings, r["setting"]))
        path.write_text(json.dumps(out, indent=1) + "\n")


def table(out_dir: Path, settings: list) -> str:
    """Per model: CDA change against the first setting (points) / ASR (%) / stability refusals (%);
    then the mean over models of each data set."""
    studies = [json.loads(p.read_text()) for p in sorted(out_dir.glob("*.json"))]
    if not studies:
        raise SystemExit(f"no studies in {out_dir}")
    names = sorted({r["setting"] for d in studies for r in d["rows"]}, key=lambda n: order(settings, n))
    head = "| model (dev) | " + " | ".join(names) + " |"
    lines = ["Settings: stability_noise : stability_contrast (0 = the same noise for every input) [: "
             "stability_bound, tail unless named [: stability_jitter in pixels, 0 unless named]].", "",
             "CDA change against the first column (points) / ASR (%) / clean inputs refused by the "
             "stability test (%), dev half, hint reading.", "", head, "|" + " --- |" * (1 + len(names))]
    means = {}
    for d in studies:
        rows = {r["setting"]: r for r in d["rows"]}
        ref = rows[settings[0]]["cda"]
        cells = []
        for n in names:
            r = rows.get(n)
            if r is None:
                cells.append("-")
                continue
            asr = f"{100 * r['asr']:.1f}" if "asr" in r else "-"
            cells.append(f"{100 * (r['cda'] - ref):+.1f} / {asr} / {100 * r['stability_refusals']:.1f}")
            means.setdefault((d["dataset"], n), []).append((ref, r))
        lines.append(f"| {d['dataset']} {d['run']} | " + " | ".join(cells) + " |")
    lines += ["", "| mean over models | " + " | ".join(names) + " |", "|" + " --- |" * (1 + len(names))]
    for ds in dict.fromkeys(d["dataset"] for d in studies):
        cells = []
        for n in names:
            pairs = means.get((ds, n), [])
            cells.append(f"{statistics.mean(100 * (r['cda'] - ref) for ref, r in pairs):+.2f} / "
                         f"{statistics.mean(100 * r['stability_refusals'] for _, r in pairs):.2f} "
                         f"({len(pairs)})" if pairs else "-")
        lines.append(f"| {ds}: CDA change / refusals (models) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
