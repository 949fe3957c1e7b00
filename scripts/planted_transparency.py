"""The paper's Fig. 12 as its attacker makes it: a Trojan square *planted* at transparency t.

    python scripts/planted_transparency.py --work runs/cifar10-sgdbf16-e80 --epochs 80 --transparency 0.3 0.5
    python scripts/planted_transparency.py --work runs/cifar10-sgdbf16-e80 --table

Sec. VI-C: "an attacker will increase the concealment by changing its transparency ... controlled
experiments on CIFAR-10 with transparency settings of 30 %, 50 %, 70 % and 90 %". As in Sec. VI-B
(trigger size, where "the compromised DNNs are trained using trigger samples" of each size), each
setting is its own Trojaned model: the work folder's clean model of the seed, then Liu et al.'s
neuron selection, trigger generation and retraining (``experiment.plant_trojan``, the reproduction's
own Trojan step) with the square blended in at t (``TrojanAttack(transparency=t)``:
``(1 - t) * pattern + t * x`` on its pixels, in generation, retraining and evaluation alike). The
default guard is fitted on the clean validation split and judged on the held-out half (2,000 clean +
2,000 triggered inputs), as ``linkbreaker reproduce`` judges the table's models.

``scripts/trigger_transparency.py`` measures the other reading: the full-strength model's trigger
faded at test time, which fires its backdoor only partly.

Models and guards go to ``<work>/transparency/``, one report per setting to
``results/transparency-planted/<work name>/`` (skipped when present: a cut run resumes; several
processes may share the work, one setting each); ``--table`` writes ``table.md`` beside them. ``--set FIELD=VALUE --tag NAME`` judges with the saved
default guard recalibrated with last-stage settings (no refit), in reports named ``...-<tag>.json``.
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
from linkbreaker_ext import LinkBreaker, data, experiment  # noqa: E402
from linkbreaker_ext.attacks import Attack  # noqa: E402
from linkbreaker_ext.reproduce import SPLITS, parse_settings, write_report  # noqa: E402

PAPER = "ASR after LinkBreaker below 2.7 % at 30, 50, 70 and 90 % (Fig. 12)"


def _name(attack: str, t: float, seed: int) -> str:
    return f"{attack}-t{round(100 * t)}-{seed}"


def planted(args, t: float, split: dict, folder: Path):
    """The Trojaned model of this transparency (cached), its attack, and the seconds it took."""
    path = folder / f"{_name(args.attack, t, args.seed)}.safetensors"
    if path.is_file():
        model, meta = experiment.load_model(path)
        return model, Attack.from_dict(meta["attack"]), meta["make_s"]
    clean_path = Path(args.work) / "models" / f"none-{args.seed}.safetensors"
    if not clean_path.is_file():
        raise SystemExit(f"{clean_path} is missing: `linkbreaker reproduce --dataset {args.dataset} "
                         f"--attacks none --seeds {args.seed} --work {args.work} ...` trains it")
    start = time.time()
    model, meta = experiment.load_model(clean_path)
    settings = experiment.make_attack(args.attack, target=0, seed=args.seed, dataset=args.dataset).to_dict()
    attack = Attack.from_dict({**settings, "transparency": t})
    model = experiment.plant_trojan(args.dataset, model, attack, split["x_train"], split["y_train"],
                                    args.epochs, args.seed, progress=not args.quiet,
                                    recipe=meta.get("recipe", "adam"))
    make_s = time.time() - start
    folder.mkdir(parents=True, exist_ok=True)
    experiment.save_model(path, model, {**meta, "attack": attack.to_dict(), "make_s": make_s,
                                        "train_threads": torch.get_num_threads()})
    return model.eval(), attack, make_s


def run(args, t: float, split: dict, out: Path, settings: dict) -> None:
    report_path = out / f"{args.dataset}-{_name(args.attack, t, args.seed)}{'-' + args.tag if args.tag else ''}.json"
    if report_path.is_file():
        return
    folder = Path(args.work) / "transparency"
    model, attack, make_s = planted(args, t, split, folder)
    guard_path = folder / f"guard-{_name(args.attack, t, args.seed)}.safetensors"
    if guard_path.is_file():
        guard = LinkBreaker.load(guard_path, model)
    else:
        guard = LinkBreaker.fit(model, split["x_val"], split["y_val"], data.spec(args.dataset).num_classes,
                                progress=False, seed=args.seed)
        guard.save(guard_path)
    if settings:
        guard = guard.recalibrate(split["x_val"], split["y_val"], **settings)
    report, _ = experiment.evaluate(model, guard, attack, split["x_test"], split["y_test"], args.n, args.n,
                                    args.seed, SPLITS[args.split])
    report.update(dataset=args.dataset, attack=args.attack, transparency=t, seed=args.seed,
                  guard=args.tag or "default", settings=settings,
                  split=args.split, work=Path(args.work).name, make_s=make_s,
                  guard_config=guard.config.__dict__, torch_threads=torch.get_num_threads(),
                  command=" ".join(["python scripts/planted_transparency.py"] + sys.argv[1:]))
    write_report(report_path, report, default=list)
    b, a = report["before"], report["after"]
    print(f"t = {t:g}: before CDA {b['cda']:.4f} ASR {b['asr']:.4f}; after CDA {a['cda']:.4f} "
          f"ASR {a['asr']:.4f} (accepted only {a['asr_strict']:.4f})", flush=True)


def table(out: Path) -> str:
    reports = sorted((json.loads(p.read_text()) for p in out.glob("*.json")),
                     key=lambda r: (r["dataset"], r["attack"], r["transparency"], r["seed"],
                                    r.get("guard", "default") != "default", r.get("guard", "default")))
    if not reports:
        raise SystemExit(f"no reports in {out}")
    lines = [f"# A Trojan square planted at part of its strength (the paper's Fig. 12), `{out.name}`", "",
             "One Trojaned model per transparency t: the work folder's clean model of the seed, then "
             "Liu et al.'s trigger generation and the recipe's retraining with the square blended in at "
             "t; the default guard fitted on the clean validation split (the *guard* column: `default`, or a "
             "`--tag` variant, that guard recalibrated with the report's `settings`); "
             f"{reports[0]['counts']['clean']:,} clean + {reports[0]['counts']['triggered']:,} triggered "
             f"inputs of the {reports[0]['split']} half. Percentages. The paper: {PAPER}. Each report "
             "names the command that made it; `python scripts/planted_transparency.py --work <work> "
             "--table` writes this table.", "",
             "| data set | attack | t | seed | guard | CDA before | ASR before | CDA after | CDA drop | ASR after (accepted only) | triggered: alarms / OOD | AUROC |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in reports:
        b, a = r["before"], r["after"]
        lines.append(f"| {r['dataset']} | {r['attack']} | {100 * r['transparency']:.0f} % | {r['seed']} | {r.get('guard', 'default')} | "
                     f"{100 * b['cda']:.2f} | {100 * b['asr']:.2f} | {100 * a['cda']:.2f} | "
                     f"{100 * (b['cda'] - a['cda']):.2f} | {100 * a['asr']:.2f} ({100 * a['asr_strict']:.2f}) | "
                     f"{100 * a['alarm_rate_trigger']:.1f} / {100 * a['ood_rate_trigger']:.1f} | "
                     f"{r.get('auroc', float('nan')):.3f} |")
    text = "\n".join(lines) + "\n"
    (out / "table.md").write_text(text)
    return text


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="cifar10")
    p.add_argument("--attack", default="trojan-square", choices=["trojan-square", "trojan-watermark"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", required=True, help="the work folder whose clean model the Trojans start from")
    p.add_argument("--epochs", type=int, default=None,
                   help="the work folder's training epochs (the Trojan retrains a quarter of them)")
    p.add_argument("--transparency", type=float, nargs="+", default=[0.3, 0.5, 0.7, 0.9])
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--split", choices=sorted(SPLITS), default="heldout")
    p.add_argument("--n", type=int, default=2000, help="clean and triggered inputs each")
    p.add_argument("--out", default=None, help="default: results/transparency-planted/<work name>")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="a last-stage GuardConfig setting the saved guard is recalibrated with (repeatable)")
    p.add_argument("--tag", default=None, help="names a --set variant's reports")
    p.add_argument("--table", action="store_true", help="only rebuild the table")
    args = p.parse_args()
    settings = parse_settings(args.set)
    if bool(settings) != bool(args.tag):
        p.error("--set and --tag go together (a variant's reports must not overwrite the default's)")
    if not all(0 < t < 1 for t in args.transparency):
        p.error("--transparency values must lie in (0, 1): 0 is the table's own model, 1 no trigger")
    out = Path(args.out or ROOT / "results" / "transparency-planted" / Path(args.work).name)
    torch.set_num_threads(args.threads)
    if not args.table:
        split = experiment.split_data(args.dataset, args.data, None, args.seed)
        for t in args.transparency:
            run(args, t, split, out, settings)
    print(table(out))


if __name__ == "__main__":
    main()
