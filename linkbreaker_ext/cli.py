"""``linkbreaker`` command line: ``demo``, ``train``, ``fit``, ``evaluate``, ``reproduce``."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from . import attacks, data, experiment, metrics, models, plots, reproduce, summary, training
from .guard import LinkBreaker


def _table(report: dict) -> str:
    b, a = report["before"], report["after"]
    rows = [("CDA (clean accuracy)", b["cda"], a["cda"]), ("ASR (attack success)", b["asr"], a["asr"]),
            ("R-Acc (triggered, true label)", None, a["r_acc"]),
            ("alarm rate, clean", None, a["alarm_rate_clean"]),
            ("alarm rate, triggered", None, a["alarm_rate_trigger"]),
            ("OOD rate, clean", None, a["ood_rate_clean"])]
    fmt = lambda v: "      -" if v is None else f"{100 * v:6.2f}%"  # noqa: E731
    lines = [f"{'metric':32s} {'before':>8s} {'after':>8s}", "-" * 50]
    lines += [f"{name:32s} {fmt(bv):>8s} {fmt(av):>8s}" for name, bv, av in rows]
    if "drop_pairs" in report:  # the drop as flips on the same clean inputs, with its sampling error
        p = report["drop_pairs"]
        lines.append(f"CDA drop {100 * (b['cda'] - a['cda']):.2f} pts +- {100 * p['se']:.2f} (answers lost "
                     f"{p['lost']}, gained {p['gained']} of {p['n']})")
    t = report["timing"]
    lines.append(f"fit {t['fit_s']:.1f} s, online {t['online_ms_per_sample']:.3f} ms/sample")
    return "\n".join(lines)


def _write_outputs(report, results, guard, out: Path, json_path, title: str):
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(report, indent=2))
    rc, yc, rt, yt = results
    shown = sorted(set(yt.tolist()))[:1] + [4]
    for cls in dict.fromkeys(shown):
        plots.confidence_distributions(rc.confidences, yc, rt.confidences, yt, guard.thresholds, cls,
                                       out / f"confidences_class{cls}.png", title)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda requested but CUDA is not available")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device must be auto, cpu or cuda[:N], got {name!r}") from None


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _tag(value: str) -> str:
    if not value or not all(c.isalnum() or c in "-_." for c in value):
        raise argparse.ArgumentTypeError(f"--tag {value!r}: use letters, digits, '-', '_' or '.'")
    return value


def _writable(path) -> Path:
    """Refuse an output path that is a directory before any work is done."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"--out {path} is a directory; give a file path")
    return path


def cmd_demo(args):
    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    d = experiment.split_data("mnist", args.data, args.val_fraction, args.seed)
    attack = experiment.make_attack(args.attack, target=args.target, seed=args.seed)
    print(f"[demo] {len(d['y_train'])} training, {len(d['y_val'])} clean validation, "
          f"{len(d['y_test'])} test images (source: {args.data or 'embedded subset'})")
    model = experiment.train_model("mnist", attack, d["x_train"], d["y_train"], args.epochs, args.seed,
                                   progress=not args.quiet).to(_device(args.device))
    guard = LinkBreaker.fit(model, d["x_val"], d["y_val"], 10, progress=not args.quiet, seed=args.seed)
    report, results = experiment.evaluate(model, guard, attack, d["x_test"], d["y_test"],
                                          args.n_clean, args.n_trigger, args.seed)
    guard.save(Path(args.out) / "guard.safetensors")
    _write_outputs(report, results, guard, Path(args.out), args.json, f"LinkBreaker demo ({args.attack})")
    print(_table(report))
    print(f"[demo] wrote {args.out}/report.json, confidence plots and guard.safetensors "
          f"in {time.perf_counter() - t0:.0f} s")


def cmd_train(args):
    if args.val_fraction is None:
        args.val_fraction = experiment.val_fraction(args.dataset)
    d = experiment.split_data(args.dataset, args.data, args.val_fraction, args.seed)
    attack = experiment.make_attack(args.attack, target=args.target, seed=args.seed, dataset=args.dataset)
    model = experiment.train_model(args.dataset, attack, d["x_train"], d["y_train"], args.epochs,
                                   args.seed, progress=not args.quiet, arch=args.arch, recipe=args.recipe)
    meta = {"dataset": args.dataset, "arch": args.arch or models.DEFAULT_ARCH.get(args.dataset),
            "recipe": args.recipe,
            "num_classes": int(d["y_train"].max()) + 1, "seed": args.seed,
            "val_fraction": args.val_fraction, "attack": attack.to_dict() if attack else None,
            "train_threads": torch.get_num_threads()}
    experiment.save_model(args.out, model, meta)
    acc = training.accuracy(model, d["x_test"], d["y_test"])
    print(f"wrote {args.out} (clean test accuracy {100 * acc:.2f}%)")


def _load(args):
    model, meta = experiment.load_model(args.model)
    model = model.to(_device(args.device))
    d = experiment.split_data(meta["dataset"], args.data, meta["val_fraction"], meta["seed"])
    return model, meta, d


def cmd_fit(args):
    model, meta, d = _load(args)
    _writable(args.out)
    try:
        overrides = json.loads(args.config) if args.config else {}
    except json.JSONDecodeError as e:
        raise ValueError(f"--config is not valid JSON: {e}") from None
    if not isinstance(overrides, dict):
        raise ValueError(f"--config must be a JSON object of GuardConfig fields, got {args.config!r}")
    guard = LinkBreaker.fit(model, d["x_val"], d["y_val"], meta["num_classes"],
                            layers=args.layers, progress=not args.quiet, **overrides)
    guard.save(args.out)
    print(f"wrote {args.out}: layers {guard.layers} + late {guard.late_layer!r}, thresholds "
          f"{[round(t, 3) for t in guard.thresholds.tolist()]}, fit {guard.diagnostics['fit_s']:.1f} s")


def cmd_evaluate(args):
    model, meta, d = _load(args)
    attack = attacks.Attack.from_dict(meta["attack"]) if meta["attack"] else None
    if args.defense != "linkbreaker":
        from .baselines.evaluate import evaluate_defense
        sets = experiment.eval_sets(attack, d["x_test"], d["y_test"], args.n_clean, args.n_trigger,
                                    meta["seed"])
        _, report = evaluate_defense(args.defense, model, d["x_val"], d["y_val"], meta["num_classes"],
                                     sets, meta["seed"])
        report["before"] = metrics.undefended(
            training.predict_logits(model, sets[0]).argmax(1), sets[1],
            training.predict_logits(model, sets[2]).argmax(1), sets[4])
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(report, indent=2, default=str))
        a = report["after"]
        print(f"{args.defense}: CDA {100 * report['before']['cda']:.2f}% -> {100 * a['cda']:.2f}%, "
              f"ASR {100 * report['before']['asr']:.2f}% -> {100 * a['asr']:.2f}%"
              + (f", AUROC {report['auroc']:.4f}" if "auroc" in report else ""))
        return
    if not args.guard:
        raise ValueError("--guard is required with --defense linkbreaker")
    guard = LinkBreaker.load(args.guard, model)
    report, results = experiment.evaluate(model, guard, attack, d["x_test"], d["y_test"],
                                          args.n_clean, args.n_trigger, meta["seed"])
    _write_outputs(report, results, guard, Path(args.out), args.json, f"{meta['dataset']}")
    print(_table(report))


def cmd_reproduce(args):
    settings = reproduce.parse_settings(args.set)
    reports, table = reproduce.reproduce(
        args.dataset, args.attacks, args.seeds, data_source=args.data,
        work=args.work or f"runs/{args.dataset}", split=args.split, device=_device(args.device),
        settings=settings, n_clean=args.n_clean, n_trigger=args.n_trigger, epochs=args.epochs,
        results=args.results, progress=not args.quiet, tag=args.tag, trained_only=args.trained_only,
        validation=args.validation, arch=args.arch, recipe=args.recipe)
    print(table.read_text())
    print(f"wrote {table} and {sum(map(len, reports.values()))} run reports in "
          f"{args.results}/runs/{args.dataset}/")


def cmd_summary(args):
    text = summary.table(args.folders, args.split)
    if args.out is None:
        print(text, end="")
        return
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(f"wrote {args.out}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="linkbreaker", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    def common(s, data_default=None):
        s.add_argument("--data", default=data_default,
                       help="parquet folder (e.g. ../shared/data), 'torchvision' or 'embedded' "
                            "(default: " + (data_default or "the MNIST subset shipped in the package")
                            + ")")
        s.add_argument("--device", default="auto", help="auto, cpu or cuda")
        s.add_argument("--quiet", action="store_true", help="no progress bars")
        s.add_argument("--threads", type=_positive, default=None,
                       help="torch CPU threads (default: torch's). Training on the CPU is reproducible "
                            "at one thread count only: the committed tables' models were trained on 1")

    s = sub.add_parser("demo", help="train a BadNets MNIST model, fit the guard, report before/after")
    common(s)
    s.add_argument("--attack", default="badnets", choices=["none", *attacks.ATTACKS])
    s.add_argument("--target", type=int, default=0)
    s.add_argument("--epochs", type=int, default=6)
    s.add_argument("--seed", type=int, default=0)
    # 10 % of the 12,000-image subset = 1,200 clean samples, the size of the paper's 2 % of full MNIST
    s.add_argument("--val-fraction", type=float, default=0.1)
    s.add_argument("--n-clean", type=_positive, default=2000)
    s.add_argument("--n-trigger", type=_positive, default=2000)
    s.add_argument("--out", default="demo-out")
    s.add_argument("--json", help="also write the report to this path")
    s.set_defaults(func=cmd_demo)

    s = sub.add_parser("train", help="train a clean or attacked model (safetensors + metadata)")
    common(s)
    s.add_argument("--dataset", default="mnist")
    s.add_argument("--attack", default="none", choices=["none", *attacks.ATTACKS])
    s.add_argument("--target", type=int, default=0)
    s.add_argument("--epochs", type=int, default=8)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--arch", default=None, choices=sorted(models.MODELS),
                   help="model architecture (default: the paper's for the data set, Table I)")
    s.add_argument("--recipe", default="adam", choices=sorted(training.RECIPES),
                   help="optimiser, one-cycle schedule: adam (3e-3), sgd (0.1, Nesterov momentum 0.9, "
                        "weight decay 5e-4) or sgd-bf16 (sgd under bfloat16 autocast)")
    s.add_argument("--val-fraction", type=float, default=None,
                   help="clean validation share of the training split, never trained on (default: "
                        "0.02, the paper's; 0.05 on GTSRB, whose rarest classes would keep 4 images)")
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("fit", help="fit a guard on the model's clean validation split")
    common(s)
    s.add_argument("--model", required=True)
    s.add_argument("--layers", nargs="+", default=None, metavar="NAME",
                   help="masked layers: module names and/or 'input' (default: automatic, the input "
                        "pixels plus GuardConfig.hidden_layers hidden layers spread over the network)")
    s.add_argument("--config", help="JSON object of GuardConfig overrides, e.g. '{\"neighbours\": 0}'")
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_fit)

    s = sub.add_parser("evaluate", help="CDA/ASR before and after the guard on the test split")
    common(s)
    s.add_argument("--model", required=True)
    s.add_argument("--guard", help="the fitted guard (for --defense linkbreaker)")
    s.add_argument("--defense", default="linkbreaker",
                   choices=["linkbreaker", "strip", "neural-cleanse", "abs", "fine-pruning", "scale-up",
                            "ibd-psc"], help="baselines are fitted on the model's validation split")
    s.add_argument("--n-clean", type=_positive, default=2000)
    s.add_argument("--n-trigger", type=_positive, default=2000)
    s.add_argument("--out", default="eval-out")
    s.add_argument("--json", help="also write the report to this path")
    s.set_defaults(func=cmd_evaluate)

    s = sub.add_parser("reproduce", help="a results table: train/load models, fit and evaluate the "
                                         "guard for every attack and seed, write JSON reports and "
                                         "results/<dataset>-<split>.md")
    common(s, data_default="../shared/data")
    s.add_argument("--dataset", required=True, choices=sorted(data.DATASETS))
    s.add_argument("--attacks", nargs="+", required=True, choices=["none", *attacks.ATTACKS],
                   metavar="ATTACK", help=f"from: none {' '.join(attacks.ATTACKS)}")
    s.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    s.add_argument("--split", choices=sorted(reproduce.SPLITS), default="heldout",
                   help="test half to report on: heldout (indices 5000-end) or dev (0-4999)")
    s.add_argument("--work", default=None, help="models and reports cache (default: runs/<dataset>)")
    s.add_argument("--results", default="results", help="where the table and run copies go")
    s.add_argument("--tag", default=None, type=_tag,
                   help="name a variant (e.g. an ablation's --set): its reports, guards and table get "
                        "this suffix and share the default's models")
    s.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="GuardConfig override, repeatable (e.g. --set neighbours=0)")
    s.add_argument("--epochs", type=int, default=None, help="training epochs for missing models "
                                                             "(default: the data set's recipe)")
    s.add_argument("--arch", default=None, choices=sorted(models.MODELS),
                   help="model architecture (default: the paper's for the data set, Table I; e.g. "
                        "resnet18 on GTSRB for Table VII); one --work folder per architecture")
    s.add_argument("--recipe", default="adam", choices=sorted(training.RECIPES),
                   help="training recipe of missing models: adam (default), sgd (Nesterov, weight "
                        "decay 5e-4) or sgd-bf16 (sgd under bfloat16 autocast); one --work folder per "
                        "recipe")
    s.add_argument("--trained-only", action="store_true",
                   help="skip (attack, seed) runs whose model is not trained yet instead of training it")
    s.add_argument("--validation", choices=experiment.VALIDATION_SOURCES, default="train",
                   help="the guard's validation set: a draw from the training split the model never "
                        "trained on (default), or the test split's unread tail (GTSRB: new tracks; "
                        "use with --tag)")
    s.add_argument("--n-clean", type=_positive, default=2000)
    s.add_argument("--n-trigger", type=_positive, default=2000)
    s.set_defaults(func=cmd_reproduce)

    s = sub.add_parser("summary", help="the README's table of targets: every default per-run report "
                                       "of the given results folders, one row per model and attack")
    s.add_argument("folders", nargs="+", help="results folders of linkbreaker reproduce (--results); "
                   "FOLDER:DATASET keeps one data set, FOLDER@TAG shows a tagged variant's runs (--tag)")
    s.add_argument("--split", choices=sorted(reproduce.SPLITS), default="heldout")
    s.add_argument("--out", default=None, help="write the markdown here (default: print it)")
    s.set_defaults(func=cmd_summary)

    s = sub.add_parser("bench", add_help=False,
                       help="latency of the op, the guard and STRIP against the bare model "
                            "([--quick] [--device cpu|cuda] --json PATH; --help for more)")
    s.add_argument("bench_args", nargs=argparse.REMAINDER)
    s.set_defaults(func=None)
    return p


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # its own parser: linkbreaker_ext.benchmark
        from . import benchmark
        return benchmark.main(argv[1:])
    args = build_parser().parse_args(argv)
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    try:
        args.func(args)
    except (ValueError, OSError) as e:  # FileNotFoundError, FileExistsError, ... are OSErrors
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
