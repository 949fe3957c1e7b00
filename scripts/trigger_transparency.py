"""The paper's Fig. 12 (Sec. VI-C): the defense against a trigger made more transparent at test time.

    python scripts/trigger_transparency.py --dataset cifar10 --attack trojan-square --seed 0

The model and its fitted guard are the held-out run's (``<work>/models/<attack>-<seed>.safetensors``
and ``<work>/guards/<attack>-<seed>.safetensors``, as ``linkbreaker reproduce`` leaves them: no refit,
so every transparency is judged by the same guard). A trigger at transparency t is
``x + (1 - t) * (attack.apply(x) - x)``: t = 0 is the training trigger, t = 1 no trigger. The
triggered inputs are the held-out run's (``experiment.eval_sets``, test indices 5000-, non-target
classes; ``--split dev`` draws them from the dev half, 0-4999, for design work). Writes
``results/figures/<dataset>-<attack>-<seed>-transparency[-<work>][-dev].{json,png}`` (the work folder's
name is added when ``--work`` names one: another model's curve; ``--set FIELD=VALUE`` recalibrates the
saved guard with last-stage settings first, and ``--tag`` names that variant's files) and prints a
markdown table: ASR
before and after the guard (both readings), trigger alarms, R-Acc, and at each of the check's
evidences where the target head stands against its bound.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from linkbreaker_ext import LinkBreaker, experiment, metrics, plots, training  # noqa: E402
from linkbreaker_ext.reproduce import SPLITS, parse_settings  # noqa: E402


DEFAULT_TRANSPARENCY = [0.0, 0.3, 0.5, 0.7, 0.9]


def evidence(guard, x, r, target) -> dict:
    """Where the check sees the trigger: for the triggered inputs whose target head is confident,
    the median of that head's ratio to its bound at each evidence (> 1: outside) and the share
    outside. A fainter trigger moves the neurons less; this says at which layers it falls inside."""
    if not guard.profile:
        return {}
    confident = r.confidences[:, target] >= r.thresholds[target]
    ratios = guard.deviations(x[confident.to(x.device)], by_layer=True)[:, target].cpu()  # [n, L]
    if not len(ratios):
        return {}
    return {name: {"median_ratio": round(ratios[:, i].median().item(), 4),
                   "share_outside": round((ratios[:, i] > 1).float().mean().item(), 4)}
            for i, name in enumerate(guard._profile_layers())}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", default="cifar10")
    p.add_argument("--attack", default="trojan-square")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", default="../shared/data")
    p.add_argument("--work", default=None, help="models and guards cache (default: runs/<dataset>)")
    p.add_argument("--split", choices=sorted(SPLITS), default="heldout",
                   help="test half the triggered inputs come from (design decisions: dev)")
    p.add_argument("--transparency", type=float, nargs="+", default=DEFAULT_TRANSPARENCY)
    p.add_argument("--n", type=int, default=2000, help="triggered inputs")
    p.add_argument("--out", default="results/figures")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="a last-stage GuardConfig setting the saved guard is recalibrated with (repeatable)")
    p.add_argument("--tag", default=None, help="names a --set variant's output files")
    args = p.parse_args()
    settings = parse_settings(args.set)
    if settings and not args.tag:
        p.error("--set needs --tag (the variant's files must not overwrite the default's)")
    torch.set_num_threads(args.threads)
    if not all(0 <= t <= 1 for t in args.transparency):
        p.error("--transparency values must lie in [0, 1]")
    work = Path(args.work or f"runs/{args.dataset}")
    model, meta = experiment.load_model(work / "models" / f"{args.attack}-{args.seed}.safetensors")
    attack = experiment.attacks.Attack.from_dict(meta["attack"])
    guard = LinkBreaker.load(work / "guards" / f"{args.attack}-{args.seed}.safetensors", model)
    split = experiment.split_data(args.dataset, args.data, None, args.seed)
    if settings:
        guard = guard.recalibrate(split["x_val"], split["y_val"], **settings)
    _, _, xt, yt, target = experiment.eval_sets(attack, split["x_test"], split["y_test"], 0, args.n,
                                                args.seed, SPLITS[args.split])
    # eval_sets stamps the trigger; the blend starts from the same draw's clean images
    x_clean = experiment.triggered_originals(attack, split["x_test"], split["y_test"], 0, args.n, args.seed,
                                             SPLITS[args.split])
    assert torch.equal(attack.apply(x_clean), xt), "draw out of step"

    rows = []
    for t in args.transparency:
        x = x_clean + (1 - t) * (xt - x_clean)
        before = training.predict_logits(model, x).argmax(1)
        r = guard(x)
        after = metrics.defended(r, yt, r, yt, target)  # only its triggered-side keys are read
        rows.append({"transparency": t, "asr_before": (before == target).float().mean().item(),
                     "asr_after": after["asr"], "asr_after_accepted_only": after["asr_strict"],
                     "alarm_rate": after["alarm_rate_trigger"], "ood_rate": after["ood_rate_trigger"],
                     "r_acc": after["r_acc"], "evidence": evidence(guard, x, r, target)})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / (f"{args.dataset}-{args.attack}-{args.seed}-transparency"
                  f"{'-' + work.name if args.work else ''}{'-dev' if args.split == 'dev' else ''}"
                  f"{'-' + args.tag if args.tag else ''}")
    cmd = (f"python scripts/trigger_transparency.py --dataset {args.dataset} --attack {args.attack} "
           f"--seed {args.seed}" + (f" --work {args.work}" if args.work else "")
           + (f" --split {args.split}" if args.split != "heldout" else "")
           + (f" --n {args.n}" if args.n != 2000 else "")
           + (f" --transparency {' '.join(f'{t:g}' for t in args.transparency)}"
              if args.transparency != DEFAULT_TRANSPARENCY else "")
           + "".join(f" --set {item}" for item in args.set) + (f" --tag {args.tag}" if args.tag else ""))
    stem.with_name(stem.name + ".json").write_text(json.dumps({"command": cmd, "n": len(yt), "rows": rows,
                                                     "guard_config": guard.config.__dict__}, indent=2,
                                                    default=list))
    plots.percent_curves(rows, "transparency", [("asr_before", "ASR, no defense"),
                                                ("asr_after", "ASR after (hint reading)"),
                                                ("alarm_rate", "trigger alarms"), ("r_acc", "R-Acc")],
                         "trigger transparency (%)", f"{args.dataset} {args.attack}, seed {args.seed}",
                         stem.with_name(stem.name + ".png"), x_scale=100)
    print(f"`{cmd}` ({len(yt)} triggered {args.split} inputs)\n")
    names = next((list(r["evidence"]) for r in rows if r["evidence"]), [])
    print("| transparency | ASR before | ASR after (hint / accepted only) | trigger alarms | R-Acc |"
          + "".join(f" {n} |" for n in names))
    print("| --- " * (5 + len(names)) + "|")
    for r in rows:
        cells = "".join(f" {r['evidence'][n]['median_ratio']:.2f} ({100 * r['evidence'][n]['share_outside']:.0f} %) |"
                        if n in r["evidence"] else " - |" for n in names)
        print(f"| {100 * r['transparency']:.0f} % | {100 * r['asr_before']:.2f} | {100 * r['asr_after']:.2f} / "
              f"{100 * r['asr_after_accepted_only']:.2f} | {100 * r['alarm_rate']:.2f} | {100 * r['r_acc']:.2f} |"
              + cells)
    if names:
        print("\nPer evidence: the target head's median ratio to its bound over the triggered inputs it is "
              "confident on (> 1: outside), and the share outside.")


if __name__ == "__main__":
    main()
