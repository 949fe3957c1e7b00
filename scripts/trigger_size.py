"""The paper's Fig. 11 on CIFAR-10: how the size of a Trojan square (1-15 % of the image) changes
CDA and ASR before and after the guard.

Each size is its own Trojaned model, made as ``linkbreaker reproduce`` makes the 3 % one
(``experiment.train_model``): the clean seed-0 model (``runs/cifar10/models/none-0``, the same
recipe's clean stage), then ``experiment.plant_trojan``: Liu et al.'s neuron selection, trigger
generation and the recipe's 3 epochs of retraining with the square of that size. A default guard is fitted on
the clean validation split and judged on the held-out half of the test split (2,000 clean +
2,000 triggered inputs), as the reproduction does.

    python scripts/trigger_size.py --fractions 0.01 0.05 0.10 0.15
    python scripts/trigger_size.py --table     # results/trigger-size/cifar10.{md,png,json}

The table adds the reproduction's own 3 % model (``results/seeds/runs/cifar10/heldout-trojan-square-0.json``)
as a marked reference row unless 3 % was measured here too.

Models and guards go to ``runs/cifar10/trigger-size/``, reports to
``results/trigger-size/cifar10-trojan-square-<percent>.json`` (skipped when present: a cut run
resumes; several processes may share the work, one size each).
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
from linkbreaker_ext import experiment, plots  # noqa: E402
from linkbreaker_ext.attacks import TrojanAttack  # noqa: E402
from linkbreaker_ext.guard import LinkBreaker  # noqa: E402
from linkbreaker_ext.reproduce import write_report  # noqa: E402

HELDOUT = slice(5000, 10000)
OUT = ROOT / "results" / "trigger-size"
WORK = ROOT / "runs" / "cifar10" / "trigger-size"
CLEAN = ROOT / "runs" / "cifar10" / "models" / "none-0.safetensors"
REPRODUCTION = ROOT / "results" / "seeds" / "runs" / "cifar10" / "heldout-trojan-square-0.json"
PAPER = "ASR after LinkBreaker below 9 % at every size (Fig. 11: 1, 5, 10 and 15 %)"


def _percent(fraction: float) -> str:
    return f"{100 * fraction:g}"


def trojaned(fraction: float, split: dict) -> tuple[torch.nn.Module, TrojanAttack, float]:
    """The Trojaned model for this size (cached), its attack, and the seconds it took to make."""
    path = WORK / f"trojan-square-{_percent(fraction)}-0.safetensors"
    if path.is_file():
        model, meta = experiment.load_model(path)
        return model, TrojanAttack.from_dict(meta["attack"]), float(meta.get("make_s", float("nan")))
    if not CLEAN.is_file():
        raise SystemExit(f"{CLEAN} is missing: `linkbreaker reproduce --dataset cifar10 --attacks none` "
                         "trains it")
    t0 = time.time()
    model, meta = experiment.load_model(CLEAN)
    attack = TrojanAttack(target=0, shape="square", size_fraction=fraction, seed=0)
    model = experiment.plant_trojan("cifar10", model, attack, split["x_train"], split["y_train"],
                                    seed=0, progress=False)
    make_s = time.time() - t0
    WORK.mkdir(parents=True, exist_ok=True)
    experiment.save_model(path, model, {**meta, "attack": attack.to_dict(), "make_s": make_s})
    return model.eval(), attack, make_s


def run(fraction: float, split: dict) -> None:
    report_path = OUT / f"cifar10-trojan-square-{_percent(fraction)}.json"
    if report_path.is_file():
        return
    model, attack, make_s = trojaned(fraction, split)
    guard_path = WORK / f"guard-trojan-square-{_percent(fraction)}-0.safetensors"
    if guard_path.is_file():
        guard = LinkBreaker.load(guard_path, model)
    else:
        guard = LinkBreaker.fit(model, split["x_val"], split["y_val"], num_classes=10, progress=False,
                                seed=0)
        guard.save(guard_path)
    report, _ = experiment.evaluate(model, guard, attack, split["x_test"], split["y_test"], 2000, 2000,
                                    0, HELDOUT)
    side = int(attack.mask(tuple(split["x_test"].shape[1:])).sum()) ** 0.5
    report.update(dataset="cifar10", attack="trojan-square", size_fraction=fraction, side=int(side),
                  size_share=side * side / (32 * 32), make_s=make_s, split="heldout", seed=0,
                  layers=list(guard.layers), late_layer=guard.late_layer)
    write_report(report_path, report, default=str)
    b, a = report["before"], report["after"]
    print(f"{_percent(fraction)} %: before CDA {b['cda']:.4f} ASR {b['asr']:.4f}; after CDA "
          f"{a['cda']:.4f} ASR {a['asr']:.4f} (accepted {a['asr_strict']:.4f})", flush=True)


def _reproduction_row() -> dict | None:
    """The reproduction's own 3 % Trojan square (seed 0, the same recipe in one process), as a
    reference row when this script did not measure 3 % itself."""
    if not REPRODUCTION.is_file():
        return None
    r = json.loads(REPRODUCTION.read_text())
    attack = TrojanAttack.from_dict(r["attack_config"])
    side = int(attack.mask((3, 32, 32)).sum()) ** 0.5
    return dict(r, size_fraction=attack.size_fraction, side=int(side), size_share=side * side / 1024,
                source="the reproduction's model (`results/seeds/runs/cifar10/heldout-trojan-square-0.json`)")


def table() -> None:
    rows = [json.loads(p.read_text()) for p in OUT.glob("cifar10-trojan-square-*.json")]
    if not rows:
        raise SystemExit(f"no reports in {OUT}")
    reference = _reproduction_row()
    if reference and all(abs(r["size_fraction"] - reference["size_fraction"]) > 1e-9 for r in rows):
        rows.append(reference)
    rows.sort(key=lambda r: r["size_fraction"])
    cmd = "python scripts/trigger_size.py --fractions " + " ".join(
        f"{r['size_fraction']:g}" for r in rows if "source" not in r)
    lines = ["# Trigger size (the paper's Fig. 11), CIFAR-10, held-out, seed 0", "",
             "One Trojaned model per size (the clean seed-0 model, then Liu et al.'s trigger generation "
             "and 3 epochs of retraining with a bottom-right square of that share of the image); the "
             "default guard fitted on the clean validation split; 2,000 clean + 2,000 triggered "
             f"held-out inputs. Percentages. The paper: {PAPER}. Made by `{cmd}`, then "
             "`python scripts/trigger_size.py --table`.", "",
             "| square (share) | CDA before | ASR before | CDA after | CDA drop | ASR after (accepted only) | triggered: alarms / OOD | AUROC |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    flat = []
    for r in rows:
        b, a = r["before"], r["after"]
        mark = " *" if "source" in r else ""
        lines.append(f"| {r['side']}x{r['side']} ({100 * r['size_share']:.1f} %){mark} | {100 * b['cda']:.2f} | "
                     f"{100 * b['asr']:.2f} | {100 * a['cda']:.2f} | {100 * (b['cda'] - a['cda']):.2f} | "
                     f"{100 * a['asr']:.2f} ({100 * a['asr_strict']:.2f}) | "
                     f"{100 * a['alarm_rate_trigger']:.1f} / {100 * a['ood_rate_trigger']:.1f} | "
                     f"{r.get('auroc', float('nan')):.3f} |")
        flat.append({"size_share": r["size_share"], "cda_before": b["cda"], "asr_before": b["asr"],
                     "cda_after": a["cda"], "asr_after": a["asr"]})
    if reference in rows:
        lines += ["", f"\\* {reference['source']}: trained from scratch in one process (clean stage, then "
                  "the same poisoning), not fine-tuned from the saved clean model."]
    (OUT / "cifar10.md").write_text("\n".join(lines) + "\n")
    (OUT / "cifar10.json").write_text(json.dumps({"command": cmd, "rows": flat}, indent=2))
    plots.percent_curves(flat, "size_share", [("cda_before", "CDA before"), ("asr_before", "ASR before"),
                                              ("cda_after", "CDA after"), ("asr_after", "ASR after")],
                         "Trojan square, % of the image", "CIFAR-10, trigger size (Fig. 11)",
                         OUT / "cifar10.png", x_scale=100)
    print("\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--fractions", type=float, nargs="+", default=[0.01, 0.05, 0.10, 0.15])
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--table", action="store_true", help="only rebuild the table and figure")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if not args.table:
        split = experiment.split_data("cifar10", args.data, None, 0)
        for fraction in args.fractions:
            run(fraction, split)
    table()


if __name__ == "__main__":
    main()
