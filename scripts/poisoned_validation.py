"""Poisoned validation data (issue 9): how far the guard's ASR and CDA move when the defender's
"clean" validation set holds a few triggered samples.

For each attack (MNIST BadNets and Blended, the cached models of ``experiment.model_for``) and each
rate (0 %, 1 %, 2 %, 5 %), a random ``rate`` share of the clean validation set (2 % of the training
split, 1,200 images) is replaced by triggered copies of themselves. The copies keep their **true
label** (``--label true``, the default and the realistic case: a triggered sample in the defender's
set carries the label the defender's data gives it, and the defender believes it is clean);
``--label target`` labels them with the attack's target instead. Only samples whose true class is not
the target are replaced (a triggered image of the target class is harmless), and the 1 % set is
part of the 2 % set, which is part of the 5 % set (one seeded permutation). The guard is fitted
with ``LinkBreaker.fit`` (``GuardConfig`` defaults, ``seed``) and measured with
``experiment.evaluate`` on the held-out test half (indices 5000-9999): 2,000 clean and 2,000
triggered inputs.

``--variant filtered`` fits with ``drop_misclassified=True``: the fit drops the validation samples
the model itself does not classify as their label (a triggered sample with its true label is
misclassified by a backdoored model, which predicts the target).

One JSON per run goes to ``results/poisoned/`` (runs already there are reused; ``--force`` refits)
and the markdown table to ``results/poisoned-validation.md``.

    OMP_NUM_THREADS=1 nice -n 10 python scripts/poisoned_validation.py --data ../shared/data
    python scripts/poisoned_validation.py --quick     # a smoke test: cheap guard, 200+200 inputs

``--quick`` uses the embedded MNIST subset, a 2 % validation split (240 images), a cheap guard
(no neighbours, three set sizes), 200 + 200 test inputs from the subset's test indices 1500-2999 and
the rates 0 % and 5 %, and writes to ``results/poisoned/quick/``: it checks the pipeline, its
numbers are not a measurement.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, installed or not
from linkbreaker_ext import LinkBreaker, experiment, training  # noqa: E402

RATES = (0.0, 0.01, 0.02, 0.05)
ATTACKS = ("badnets", "blended")


def poison(x_val, y_val, attack, rate, seed, label="true"):
    """``(x, y, idx)``: the validation set with ``round(rate * n)`` non-target samples replaced by
    their triggered copies (nested across rates for one seed)."""
    n = round(rate * len(y_val))
    g = torch.Generator().manual_seed(20_000 + seed)
    candidates = torch.nonzero(y_val != attack.target).flatten()
    idx = candidates[torch.randperm(len(candidates), generator=g)[:n]].sort().values
    x, y = x_val.clone(), y_val.clone()
    if n:
        x[idx] = attack.apply(x_val[idx])
        if label == "target":
            y[idx] = attack.target
    return x, y, idx


def run_one(model, attack, d, rate, args, overrides, pool, n_clean, n_trigger):
    num_classes = int(d["y_train"].max()) + 1
    x, y, idx = poison(d["x_val"], d["y_val"], attack, rate, args.seed, args.label)
    is_poisoned = torch.zeros(len(y), dtype=torch.bool)
    is_poisoned[idx] = True
    info = {"n_validation": len(y), "n_poisoned": len(idx),
            "poisoned_per_class": torch.bincount(d["y_val"][idx], minlength=num_classes).tolist()}
    if args.variant == "filtered":
        pred = training.predict_logits(model, x).argmax(1)
        keep = pred == y
        info.update({"filtered_out": int((~keep).sum()),
                     "filtered_out_poisoned": int((~keep & is_poisoned).sum()),
                     "poisoned_left": int((keep & is_poisoned).sum())})
        overrides = dict(overrides, drop_misclassified=True)  # the fit drops them itself
    t0 = time.perf_counter()
    guard = LinkBreaker.fit(model, x, y, num_classes, progress=False, seed=args.seed, **overrides)
    if args.variant == "filtered":
        assert guard.diagnostics["n_dropped_misclassified"] == info["filtered_out"]
    fit_s = time.perf_counter() - t0
    report, _ = experiment.evaluate(model, guard, attack, d["x_test"], d["y_test"], n_clean, n_trigger,
                                    args.seed, pool)
    report["timing"]["fit_s"] = fit_s
    report.update({"dataset": args.dataset, "rate": rate, "label": args.label, "variant": args.variant, "seed": args.seed,
                   "poisoning": info, "thresholds": guard.thresholds.tolist(),
                   "kept": guard.diagnostics.get("kept"), "settings": overrides,
                   "pool": [pool.start, pool.stop], "quick": args.quick})
    return report


def table(out_dir: Path, command: str, quick: bool) -> str:
    rows = [json.loads(p.read_text()) for p in sorted(out_dir.glob("*.json"))]
    rows.sort(key=lambda r: (r["attack"]["name"], r["variant"], r["label"], r["rate"]))
    base = {(r["attack"]["name"], r["variant"], r["label"]): r for r in rows if r["rate"] == 0}
    pct = lambda v: f"{100 * v:.2f}"  # noqa: E731
    lines = []
    if quick:
        lines += ["**QUICK smoke test** (cheap guard, 200 + 200 inputs from the embedded subset): checks the "
                  "pipeline; these numbers are not a measurement.", ""]
    # the rows may come from several invocations (one per variant / label): name each
    made_by = sorted({"python scripts/poisoned_validation.py"
                      + (f" --dataset {r['dataset']}" if r.get("dataset", "mnist") != "mnist" else "")
                      + f" --data ../shared/data --variant {r['variant']}"
                      + (f" --label {r['label']}" if r["label"] != "true" else "") for r in rows})
    lines += ["Commands: " + "; ".join(f"`{c}`" for c in made_by) + f" (last run: `{command}`)", "",
              "| attack | variant | label of poisoned samples | poisoned | n poisoned | CDA before | ASR before "
              "| CDA after | ASR after | CDA change vs 0 % | ASR change vs 0 % | R-Acc | clean alarms "
              "| clean OOD | fit s |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        b = base.get((r["attack"]["name"], r["variant"], r["label"]))
        a, bf = r["after"], r["before"]
        dc = f"{100 * (a['cda'] - b['after']['cda']):+.2f}" if b else "-"
        da = f"{100 * (a['asr'] - b['after']['asr']):+.2f}" if b else "-"
        p = r["poisoning"]
        n = f"{p['n_poisoned']}" + (f" ({p['poisoned_left']} left after filter, "
                                    f"{p['filtered_out']} dropped)" if "poisoned_left" in p else "")
        lines.append(f"| {r['attack']['name']} | {r['variant']} | {r['label']} | {100 * r['rate']:.0f} % | {n} "
                     f"| {pct(bf['cda'])} | {pct(bf['asr'])} | {pct(a['cda'])} | {pct(a['asr'])} | {dc} | {da} "
                     f"| {pct(a['r_acc'])} | {pct(a['alarm_rate_clean'])} | {pct(a['ood_rate_clean'])} "
                     f"| {r['timing']['fit_s']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="mnist", choices=["mnist", "cifar10", "gtsrb"])
    p.add_argument("--data", default="../shared/data", help="parquet folder (../shared/data layout)")
    p.add_argument("--work", default=None, help="cached models (experiment.model_for; default runs/<dataset>)")
    p.add_argument("--attacks", nargs="+", default=list(ATTACKS), choices=list(ATTACKS))
    p.add_argument("--rates", nargs="+", type=float, default=None)
    p.add_argument("--label", choices=["true", "target"], default="true")
    p.add_argument("--variant", choices=["plain", "filtered"], default="plain")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON folder (default results/poisoned[/quick])")
    p.add_argument("--table", default=None, help="markdown table (default results/poisoned-validation.md)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--force", action="store_true", help="refit runs whose JSON exists")
    args = p.parse_args(argv)
    command = "python scripts/poisoned_validation.py " + " ".join(sys.argv[1:] if argv is None else argv)
    # MNIST keeps the original paths; other data sets get their own folder and table
    suffix = "" if args.dataset == "mnist" else f"/{args.dataset}"
    out = Path(args.out or ("results/poisoned/quick" if args.quick else f"results/poisoned{suffix}"))
    table_path = Path(args.table or (out / "table.md" if args.quick else
                                     f"results/poisoned-validation{suffix.replace('/', '-')}.md"))
    work = args.work or f"runs/{args.dataset}"
    if args.quick and args.dataset != "mnist":
        p.error("--quick uses the embedded MNIST subset")
    out.mkdir(parents=True, exist_ok=True)
    if args.quick:
        rates = args.rates or [0.0, 0.05]
        d = experiment.split_data("mnist", "embedded", None, args.seed)
        overrides = {"neighbours": 0, "fractions": (0.1, 0.5, 1.0), "search_per_class": 10}
        pool, n_clean, n_trigger = slice(1500, None), 200, 200
    else:
        rates = args.rates or list(RATES)
        d = experiment.split_data(args.dataset, args.data, None, args.seed)
        overrides = {}
        pool, n_clean, n_trigger = slice(5000, None), 2000, 2000
    for name in args.attacks:
        model, attack = experiment.model_for(args.dataset, name, args.seed, d, work, progress=False)
        for rate in rates:
            path = out / f"{name}-{args.variant}-{args.label}-{round(100 * rate)}pct-seed{args.seed}.json"
            if path.exists() and not args.force:
                print(f"[poisoned] {path} exists, reused")
                continue
            t0 = time.perf_counter()
            report = run_one(model, attack, d, rate, args, overrides, pool, n_clean, n_trigger)
            path.write_text(json.dumps(report, indent=2))
            a = report["after"]
            print(f"[poisoned] {name} {args.variant} {args.label} {100 * rate:.0f} %: CDA {100 * a['cda']:.2f} "
                  f"ASR {100 * a['asr']:.2f} ({time.perf_counter() - t0:.0f} s) -> {path}", flush=True)
    table_path.parent.mkdir(parents=True, exist_ok=True)
    table_path.write_text(table(out, command, args.quick))
    print(table_path.read_text())


if __name__ == "__main__":
    main()
