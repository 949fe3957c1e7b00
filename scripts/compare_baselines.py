"""LinkBreaker beside the baseline defenses (issue #7), on the same models, data and triggers.

    python scripts/compare_baselines.py --data ../shared/data                 # MNIST, seed 0
    python scripts/compare_baselines.py --data ../shared/data --seeds 0 1 2
    python scripts/compare_baselines.py --dataset cifar10 --reuse-guards     # CIFAR-10, seed 0
    python scripts/compare_baselines.py --dataset cifar10 --work runs/cifar10-sgdbf16-e80 \
        --recipe sgd-bf16 --reuse-guards --out results/baselines/cifar10-sgdbf16-e80

Models come from ``experiment.model_for`` (cached under --work, shared with ``linkbreaker reproduce``;
``--reuse-guards`` loads the guards that ``reproduce`` saved there instead of fitting again, and takes
their offline time from the fit's own record).
Every defense fits on the same clean validation set (2 % of the training split, never trained on);
input-level detectors hold out half of it to set their threshold at 1 % false rejection. Evaluation
uses 2,000 clean and 2,000 triggered inputs from the held-out test half (indices 5000-9999), as
reproduce_mnist.py does. One JSON per (attack, seed, defense) goes to <out>/runs/ (skipped when it
exists, so an interrupted run resumes); the markdown tables are rebuilt from all of the data set's
JSONs there, this call's and earlier ones' (``--tables-only``: rebuild, run nothing).
Scoring rules: an input flagged by a detector is an error on clean data and not an attack success
(the same rule as LinkBreaker's alarms); a repaired model is scored by its labels.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from linkbreaker_ext import LinkBreaker, attacks, data, experiment, metrics, training  # noqa: E402
from linkbreaker_ext.baselines import make_defense, roc_auc  # noqa: E402
from linkbreaker_ext.guard import fingerprint  # noqa: E402
from linkbreaker_ext.verdict import score_from_result  # noqa: E402
from linkbreaker_ext.baselines.evaluate import _rate, evaluate_defense  # noqa: E402

DEFENSES = ["linkbreaker", "strip", "scale-up", "ibd-psc", "neural-cleanse", "abs", "fine-pruning"]
DETECTORS = ["linkbreaker", "strip", "scale-up", "ibd-psc"]
ATTACKS = {"mnist": ["badnets", "trojan-square", "blended", "none"],
           "cifar10": ["trojan-square", "wanet", "badnets", "blended", "sig", "source-specific", "none"],
           "gtsrb": ["trojan-watermark", "badnets", "none"]}
POISONING = {"badnets": "data", "blended": "data", "trojan-square": "model", "trojan-watermark": "model", "none": "clean"}


def run_linkbreaker(model, val, sets, seed, num_classes, saved=None):
    xc, yc, xt, yt, target = sets
    device = next(model.parameters()).device
    if saved is not None and Path(saved).is_file():
        guard = LinkBreaker.load(saved, model)
        fit_s = guard.diagnostics.get("fit_s", float("nan"))
    else:
        start = time.perf_counter()
        guard = LinkBreaker.fit(model, val[0], val[1], num_classes=num_classes, progress=False,
                                seed=seed)
        fit_s = time.perf_counter() - start
    start = time.perf_counter()
    rc = guard(xc.to(device))
    online = time.perf_counter() - start
    rt = guard(xt.to(device))
    sc, st = score_from_result(rc).cpu(), score_from_result(rt).cpu()  # guard.score, no second pass
    fc, ft = rc.verdict.cpu() != 0, rt.verdict.cpu() != 0
    return guard, {"after": metrics.defended(rc, yc, rt, yt, target), "auroc": roc_auc(sc, st),
                   "tpr": _rate(ft), "fpr": _rate(fc), "flag_rule": "verdict != 0 (alarm or OOD)",
                   "timing": {"offline_s": fit_s, "online_ms_per_sample": 1000 * online / len(xc),
                              "fit_stage_s": guard.diagnostics.get("stage_s")}}


def run_baseline(name, model, val, sets, seed, num_classes):
    return evaluate_defense(name, model, val[0], val[1], num_classes, sets, seed)


# FGSM/BIM budgets: the paper's MNIST setting, and the usual 8/255 on natural images
ADV_EPS = {"mnist": 0.2}


def adversarial(model, guard, strip, x, y, seed, eps=0.2):
    """Table VI: FGSM/BIM/DeepFool examples that fool the bare model; the share each defense answers
    with the true label ("correct") and the share it flags."""
    torch.manual_seed(seed)
    device = next(model.parameters()).device
    out = {}
    advs = {"fgsm": attacks.fgsm(model, x, y, eps=eps),
            "bim": attacks.bim(model, x, y, eps=eps, alpha=eps / 10, steps=20),
            "deepfool": attacks.deepfool(model, x, y)}
    for name, xa in advs.items():
        fooled = training.predict_logits(model, xa).argmax(1) != y
        xa, ya = xa[fooled], y[fooled]
        r = guard(xa.to(device))
        flag_s = strip.detect(xa).cpu()
        pred = training.predict_logits(model, xa).argmax(1)
        out[name] = {"n": int(fooled.sum()), "fooled_rate": _rate(fooled),
                     "linkbreaker": {"correct": _rate(r.labels.cpu() == ya),
                                     "flagged": _rate(r.verdict.cpu() != 0)},
                     "strip": {"correct": _rate(~flag_s & (pred == ya)), "flagged": _rate(flag_s)}}
    out["settings"] = {"fgsm": {"eps": eps}, "bim": {"eps": eps, "alpha": eps / 10, "steps": 20},
                       "deepfool": {"steps": 50, "overshoot": 0.02}}
    return out


TIMED = ("linkbreaker", "neural-cleanse", "strip")  # the defenses of Table V's ratios


def timing_attack(runs: dict, attacks_: list) -> str:
    """The model Table V reads: the first (in ``attacks_`` order) whose LinkBreaker, Neural Cleanse
    and STRIP runs were all measured in one call (the JSON's ``call``; runs from before the field
    were measured together in the call that ran them), else the first with all three, else the
    first. ``runs``: {defense: {attack: [per-run JSON]}}."""
    timed = [a for a in attacks_ if all(a in runs.get(d, {}) for d in TIMED)]
    one_call = [a for a in timed if len({r.get("call") for d in TIMED for r in runs[d][a]}) == 1]
    return (one_call or timed or attacks_)[0]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--dataset", default="mnist", choices=["mnist", "cifar10", "gtsrb"])
    p.add_argument("--data", default="../shared/data")
    p.add_argument("--work", default=None, help="default: runs/<dataset>")
    p.add_argument("--recipe", default="adam", choices=sorted(training.RECIPES),
                   help="the training recipe of --work's models (one work folder per recipe)")
    p.add_argument("--epochs", type=int, default=None, help="training epochs of missing models")
    p.add_argument("--reuse-guards", action="store_true",
                   help="load <work>/guards/<attack>-<seed>.safetensors (saved by reproduce) if present")
    p.add_argument("--out", default="results/baselines")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--attacks", nargs="+", default=None,
                   help="default: the data set's reproduction attacks (the tables' row order)")
    p.add_argument("--defenses", nargs="+", default=DEFENSES, choices=DEFENSES)
    p.add_argument("--adversarial-attacks", nargs="*", default=["none", "badnets"])
    p.add_argument("--adversarial-n", type=int, default=500)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tables-only", action="store_true",
                   help="rebuild the markdown tables from the per-run JSONs that exist; run nothing")
    args = p.parse_args()
    args.work = args.work or f"runs/{args.dataset}"
    args.attacks = args.attacks or ATTACKS[args.dataset]
    if args.tables_only:
        return write_tables(Path(args.out), args)
    DATASET = args.dataset
    num_classes = data.spec(DATASET).num_classes
    torch.set_num_threads(args.threads)
    # which call measured a run: Table V compares timings of one call only (one machine, one load)
    call = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    runs = Path(args.out) / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    pool = slice(5000, 10000)

    for seed in args.seeds:
        split = experiment.split_data(DATASET, args.data, None, seed)
        val = (split["x_val"], split["y_val"])
        for attack_name in args.attacks:
            model, attack = experiment.model_for(DATASET, attack_name, seed, split, args.work,
                                                 args.epochs, progress=False, recipe=args.recipe)
            sets = experiment.eval_sets(attack, split["x_test"], split["y_test"], 2000, 2000, seed, pool)
            xc, yc, xt, yt, target = sets
            before = metrics.undefended(training.predict_logits(model, xc).argmax(1), yc,
                                        training.predict_logits(model, xt).argmax(1), target)
            fitted = {}
            for name in args.defenses:
                path = runs / f"{DATASET}-{attack_name}-{seed}-{name}.json"
                if path.is_file():
                    continue
                t0 = time.perf_counter()
                if name == "linkbreaker":
                    saved = Path(args.work) / "guards" / f"{attack_name}-{seed}.safetensors"
                    obj, rep = run_linkbreaker(model, val, sets, seed, num_classes,
                                               saved if args.reuse_guards else None)
                    rep["guard_reused"] = bool(args.reuse_guards and saved.is_file())
                else:
                    obj, rep = run_baseline(name, model, val, sets, seed, num_classes)
                fitted[name] = obj
                rep.update(defense=name, dataset=DATASET, attack=attack_name, seed=seed,
                           poisoning=POISONING.get(attack_name, "data"), before=before,
                           split="heldout", counts={"clean": len(xc), "triggered": len(xt)},
                           attack_settings=attack.to_dict() if attack is not None else None,
                           wall_s=time.perf_counter() - t0, threads=args.threads, call=call,
                           model_sha256=fingerprint(model))  # which model: models get retrained
                path.write_text(json.dumps(rep, indent=2, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))
                a = rep["after"]
                print(f"{attack_name} seed {seed} {name}: CDA {a['cda']:.4f} ASR {a['asr']:.4f} "
                      f"auroc {rep.get('auroc', float('nan')):.4f} fit {rep['timing']['offline_s']:.1f}s "
                      f"online {rep['timing']['online_ms_per_sample']:.3f} ms", flush=True)
            adv_path = runs / f"{DATASET}-{attack_name}-{seed}-adversarial.json"
            if attack_name in args.adversarial_attacks and not adv_path.is_file():
                # fitted alone when this call did not evaluate them: the adversarial table needs the
                # fitted defenses, not another pass over the 4,000 evaluation inputs
                saved = Path(args.work) / "guards" / f"{attack_name}-{seed}.safetensors"
                guard = fitted.get("linkbreaker") or (
                    LinkBreaker.load(saved, model) if args.reuse_guards and saved.is_file() else
                    LinkBreaker.fit(model, val[0], val[1], num_classes=num_classes, progress=False, seed=seed))
                strip = fitted.get("strip") or make_defense("strip", seed=seed).fit(model, val[0], val[1], num_classes)
                g = torch.Generator().manual_seed(20_000 + seed)
                xs, ys = split["x_test"][pool], split["y_test"][pool]
                idx = torch.randperm(len(xs), generator=g)[:args.adversarial_n]
                rep = adversarial(model, guard, strip, xs[idx], ys[idx], seed, ADV_EPS.get(DATASET, 8 / 255))
                rep.update(dataset=DATASET, attack=attack_name, seed=seed, model=attack_name)
                adv_path.write_text(json.dumps(rep, indent=2, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))
                print(f"{attack_name} seed {seed} adversarial: "
                      f"{ {k: v for k, v in rep.items() if k in ('fgsm', 'bim', 'deepfool')} }", flush=True)
    write_tables(Path(args.out), args)


# ----------------------------------------------------------------------------------------- tables

def present_runs(out: Path, dataset: str, attack_order) -> tuple[list, list, list]:
    """``(attacks, seeds, adversarial attacks)`` of every per-run JSON under ``<out>/runs/`` for
    ``dataset``: the tables cover all of them, not only this call's, so a partial run (one attack, one
    defense) never drops the other rows. Attacks come in ``attack_order`` first, then the rest sorted."""
    pattern = re.compile(rf"^{re.escape(dataset)}-(.+)-(\d+)-(.+)\.json$")
    found, seeds, adv = set(), set(), set()
    for f in (out / "runs").glob(f"{dataset}-*.json"):
        m = pattern.match(f.name)
        if not m:
            continue
        attack, seed, suffix = m.group(1), int(m.group(2)), m.group(3)
        if suffix == "adversarial":
            adv.add(attack)
        elif suffix in DEFENSES:
            found.add(attack)
        else:
            continue
        seeds.add(seed)
    order = [a for a in attack_order if a in found] + sorted(found - set(attack_order))
    return order, sorted(seeds), [a for a in order if a in adv] + sorted(adv - set(order))


def _load(out: Path, dataset, seeds, attacks_, suffix):
    reps = {}
    for a in attacks_:
        for s in seeds:
            f = out / "runs" / f"{dataset}-{a}-{s}-{suffix}.json"
            if f.is_file():
                reps.setdefault(a, []).append(json.loads(f.read_text()))
    return reps


def _pct(values):
    values = [100 * v for v in values if v == v]
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def _num(values, fmt):
    values = [v for v in values if v == v]
    return fmt.format(statistics.mean(values)) if values else "n/a"


CAPABILITIES = [
    # defense, output, model access, clean data used, forwards per input online, source of the row
    ("linkbreaker", "label per input, or alarm / OOD", "white-box (masked layers + final Linear)",
     "validation set (sets, class profiles, MAD thresholds and bounds)", "N heads in one batched pass of one row per distinct head mask (1-4 on the guards fitted so far, N at most)"),
    ("strip", "flag per input", "black-box softmax", "validation half: overlay pool; other half: threshold",
     "100 (superimposed copies)"),
    ("scale-up", "flag per input", "black-box labels", "validation half: per-class SPC stats; other half: threshold",
     "6 (original + 5 amplified copies)"),
    ("ibd-psc", "flag per input", "white-box parameters", "validation half: layer selection; other half: threshold",
     "1 + number of amplified models (<= 6)"),
    ("neural-cleanse", "model verdict + unlearned model", "white-box gradients", "validation set (trigger search, unlearning)",
     "1 (the repaired model)"),
    ("abs", "model verdict + unlearned model (our addition)", "white-box gradients + hooks",
     "5 images per class (stimulation), validation set (REASR, unlearning)", "1 (the repaired model)"),
    ("fine-pruning", "pruned + fine-tuned model (no verdict)", "white-box (last conv layer)",
     "validation set (activations, accuracy rule, fine-tuning)", "1 (the repaired model)"),
]


def write_tables(out: Path, args):
    """``<out>/<dataset>.md`` from every per-run JSON present for the data set (:func:`present_runs`)."""
    DATASET = args.dataset
    attacks_, seeds, adv_attacks = present_runs(out, DATASET, args.attacks)
    if not attacks_:
        raise SystemExit(f"no per-run JSON for {DATASET} under {out / 'runs'}")
    runs = {d: _load(out, DATASET, seeds, attacks_, d) for d in DEFENSES}
    threads = sorted({r.get("threads", args.threads) for d in runs.values() for reps in d.values() for r in reps})
    reused = any(r.get("guard_reused") for reps in runs["linkbreaker"].values() for r in reps)
    reuse = " --reuse-guards" if reused or args.reuse_guards else ""
    adv_flag = f" --adversarial-attacks {' '.join(adv_attacks)}" if adv_attacks else " --adversarial-attacks"
    # the models' folder, recipe and the tables' folder, where they are not the defaults
    where = "".join(f" {flag} {value}" for flag, value, default in (
        ("--work", args.work, f"runs/{DATASET}"), ("--recipe", args.recipe, "adam"),
        ("--out", str(out), "results/baselines")) if value != default)
    lines = [f"# Baselines beside LinkBreaker on {DATASET.upper()}", "",
             f"Generated by `python scripts/compare_baselines.py --dataset {DATASET} --data {args.data} "
             f"--seeds {' '.join(map(str, seeds))} --attacks {' '.join(attacks_)}{where}{reuse}{adv_flag}` "
             f"({'/'.join(map(str, threads))} thread(s); the tables cover every per-run JSON in `runs/`, "
             "so a call for one attack or defense adds its rows; `--tables-only` rebuilds them). "
             "Held-out test half (indices 5000-9999): 2,000 clean and 2,000 triggered inputs (true class "
             "!= target 0). A detector's flag counts as an error on clean inputs and as no attack success "
             "on triggered ones; a repaired model is scored by its labels. Percentages; mean ± sd over seeds "
             "when there are several.", ""]
    for title, kind in (("Table II (data poisoning)", "data"), ("Table III (model poisoning)", "model"),
                        ("Clean model (the attack's trigger as a probe)", "clean")):
        attacks_k = [a for a in attacks_ if POISONING.get(a, "data") == kind]
        if not attacks_k:
            continue
        lines += [f"## {title}", "", "| attack | defense | CDA before | ASR before | CDA after | ASR after "
                  "| R-Acc | clean flagged | model flagged |", "| --- " * 9 + "|"]
        for a in attacks_k:
            for d in DEFENSES:
                reps = runs[d].get(a)
                if not reps:
                    continue
                rows = [(d, [r["after"] for r in reps])]
                if d == "linkbreaker":  # the detectors' rule: a refused input (alarm or OOD) is
                    # an error on clean data and no success for the attacker; the hint reading too
                    strict = [dict(r["after"], cda=r["after"]["cda_strict"], asr=r["after"]["asr_strict"])
                              for r in reps if "cda_strict" in r["after"]]
                    rows = ([("linkbreaker (refusals as detections)", strict)] if len(strict) == len(reps)
                            else []) + [("linkbreaker (OOD label hints as answers)", [r["after"] for r in reps])]
                if d == "fine-pruning":
                    rows = [("fine-pruning: prune only", [r["after_prune"] for r in reps]),
                            ("fine-pruning: prune + fine-tune", [r["after"] for r in reps])]
                for label, afters in rows:
                    flagged = ", ".join("-" if r.get("flagged") is None else ("yes" if r["flagged"] else "no")
                                        for r in reps)
                    clean_flag = _pct([x.get("alarm_rate_clean", float("nan")) for x in afters]) \
                        if d != "linkbreaker" else _pct([r["fpr"] for r in reps])
                    lines.append(f"| {a} | {label} | {_pct([r['before']['cda'] for r in reps])} "
                                 f"| {_pct([r['before']['asr'] for r in reps])} "
                                 f"| {_pct([x['cda'] for x in afters])} | {_pct([x['asr'] for x in afters])} "
                                 f"| {_pct([x['r_acc'] for x in afters])} | {clean_flag} | {flagged} |")
        lines.append("")

    lines += ["## AUROC of the continuous scores (triggered vs clean inputs)", "",
              "| attack | " + " | ".join(DETECTORS) + " |", "| --- " * (len(DETECTORS) + 1) + "|"]
    for a in attacks_:
        cells = [_num([r["auroc"] for r in runs[d].get(a, [])], "{:.4f}") for d in DETECTORS]
        lines.append(f"| {a} | " + " | ".join(cells) + " |")
    lines += ["", "LinkBreaker's score: `guard.score(x)` (docs/method.md).", "",
              "TPR / FPR at each detector's operating point (threshold at 1 % false rejection on held-out "
              "validation data; LinkBreaker: verdict != accept, and its trigger alarm alone, since an OOD "
              "verdict is Alg. 3's refusal of an input no head vouches for, selective prediction rather "
              "than a trigger claim: docs/method.md, \"What the OOD refusals buy\"):", "",
              "| attack | " + " | ".join(f"{d} TPR / FPR" for d in DETECTORS[:1]) + " | linkbreaker, alarm only "
              "TPR / FPR | " + " | ".join(f"{d} TPR / FPR" for d in DETECTORS[1:]) + " |",
              "| --- " * (len(DETECTORS) + 2) + "|"]
    for a in attacks_:
        cells = [f"{_pct([r['tpr'] for r in runs[d].get(a, [])])} / {_pct([r['fpr'] for r in runs[d].get(a, [])])}"
                 for d in DETECTORS]
        lb = runs["linkbreaker"].get(a, [])
        alarm = (f"{_pct([r['after']['alarm_rate_trigger'] for r in lb])} / "
                 f"{_pct([r['after']['alarm_rate_clean'] for r in lb])}")
        lines.append(f"| {a} | {cells[0]} | {alarm} | " + " | ".join(cells[1:]) + " |")

    lines += ["", "## Table IV (capabilities, from what the code does)", "",
              "No method needs triggered samples; every method uses only the clean validation set.", "",
              "| defense | output | model access | clean data used for | forwards per input online |",
              "| --- | --- | --- | --- | --- |"]
    lines += [f"| {' | '.join(row)} |" for row in CAPABILITIES]

    t_attack = timing_attack(runs, attacks_)
    lines += ["", f"## Table V (time, {t_attack} model, one run, same machine, {'/'.join(map(str, threads))} thread(s))", "",
              "| defense | offline s | online ms / input |", "| --- | --- | --- |"]
    tv = {}
    for d in DEFENSES:
        reps = runs[d].get(t_attack, [])
        if reps:
            tv[d] = (statistics.mean(r["timing"]["offline_s"] for r in reps),
                     statistics.mean(r["timing"]["online_ms_per_sample"] for r in reps))
            lines.append(f"| {d} | {tv[d][0]:.1f} | {tv[d][1]:.3f} |")
    if "linkbreaker" in tv and "neural-cleanse" in tv and "strip" in tv:
        lines += ["", f"Neural Cleanse offline / LinkBreaker offline = "
                  f"{tv['neural-cleanse'][0] / tv['linkbreaker'][0]:.2f}x (paper: 18x); STRIP online / "
                  f"LinkBreaker online = {tv['strip'][1] / tv['linkbreaker'][1]:.2f}x (paper: 3.7x). "
                  "Online time of a repairing defense is the repaired model's plain forward."]
        stages = [r["timing"].get("fit_stage_s") for r in runs["linkbreaker"].get(t_attack, [])]
        if stages and all(stages):
            parts = ", ".join(f"{k.replace('_', ' ')} {statistics.mean(st[k] for st in stages):.1f} s"
                              for k in stages[0])
            lines += ["", f"LinkBreaker's offline time by stage: {parts}."]

    adv = _load(out, DATASET, seeds, adv_attacks, "adversarial")
    eps = ADV_EPS.get(DATASET, 8 / 255)
    if adv:
        lines += ["", "## Table VI (adversarial examples that fool the bare model)", "",
                  "correct = answered with the true label; flagged = alarm/OOD (LinkBreaker) or above "
                  f"threshold (STRIP). FGSM eps {eps:.4g}; BIM eps {eps:.4g}, step {eps / 10:.4g}, 20 steps; "
                  "DeepFool 50 steps.", "",
                  "| model | defense | FGSM correct / flagged | BIM correct / flagged | DeepFool correct / flagged |",
                  "| --- | --- | --- | --- | --- |"]
        for a, reps in adv.items():
            for d in ("strip", "linkbreaker"):
                cells = [f"{_pct([r[k][d]['correct'] for r in reps])} / {_pct([r[k][d]['flagged'] for r in reps])}"
                         for k in ("fgsm", "bim", "deepfool")]
                lines.append(f"| {a} | {d} | " + " | ".join(cells) + " |")
        def drawn(r):  # the clean test inputs attacked: fooled count / fooled rate
            rates = [r[k]["n"] / r[k]["fooled_rate"] for k in ("fgsm", "bim", "deepfool") if r[k]["fooled_rate"] > 0]
            return f"{round(rates[0])}" if rates else "?"
        lines += ["", "Adversarial examples per model (fooled / attacked): " + "; ".join(
            f"{a}: " + ", ".join(f"{k} {_num([r[k]['n'] for r in reps], '{:.0f}')}"
                                 for k in ("fgsm", "bim", "deepfool")) + f" / {drawn(reps[0])}"
            for a, reps in adv.items())]
    (out / f"{DATASET}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
