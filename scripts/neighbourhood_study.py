"""Dev study (issue #6, the paper's Fig. 12): the neighbourhood rank test (``neighbourhood_quantile``)
on the saved guards, recalibrated (no refit), against the same guards without it (the default
until session 35).

A Trojan square at 50-70 % of its strength fires the backdoor with every neuron inside its bound
(docs/results.md, "Trigger transparency"). The rank test (after TED, S&P 2024) asks instead where the input
sits among the validation samples in head k's view of the last masked layer: how many samples of
other classes are nearer than the nearest one of class k. A faint trigger turns the answer; the
input's neighbourhood there is still its source class. ``scripts/faint_trigger_neighbourhood.py``
was the first look, on the bare model; this study runs the guard itself.

Three ways to act on a failed test: ``veto`` (the head is not credible, as the other checks: it
can also turn an alarm into an accepted answer), ``refuse`` (the rank-free decision stands, except that
an accepted answer whose head fails the test raises the alarm), ``alarm`` (the guard's rule:
``refuse``, and an OOD verdict's hint weighs the test too) and ``hint`` (only the hint). For each run and each setting (rule x
bound quantile x gate quantile, ``none``: every head judged), all from one forward of the
recalibrated guard:

* clean dev inputs (test indices 0-4999): the CDA drop (hint reading) against the undefended model,
  and the share of clean inputs that the guard without the test answers rightly and accepts but the setting
  refuses (what the test costs);
* triggered dev inputs at each transparency (0: the full trigger): the ASR after the guard (hint
  reading).

Writes ``results/dev/neighbourhood/<dataset>-<run>-<work>.json`` per run (``--out``: another folder)
and, with ``--table``, a summary ``summary.md`` beside them from every JSON there. Several
``--quantiles`` share one forward per input set: a head's ratio is its score over the bound.

    python scripts/neighbourhood_study.py --work runs/cifar10-sgdbf16-e80 --runs trojan-square-0 none-0
    python scripts/neighbourhood_study.py --table
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from linkbreaker_ext import LinkBreaker, experiment  # noqa: E402
from linkbreaker_ext.reproduce import SPLITS  # noqa: E402
from linkbreaker_ext.verdict import ACCEPT, alarm_on_failed_ranks, combined_ratio, decide, gated  # noqa: E402

OUT = ROOT / "results" / "dev" / "neighbourhood"


def _gate(text):
    return None if text == "none" else float(text)


RULES = ("veto", "alarm", "refuse", "hint")


def decisions(r, rule: str, gate, cfg):
    """``(labels, verdict)`` of a rank-test guard's result ``r`` (its ``neighbourhood`` ratios
    ungated) under ``rule`` with the gate value ``gate`` (None: every head judged). ``"veto"``: a
    head that fails the test is not credible (it joins the veto ratios); ``"alarm"``: the guard's
    rule, the rank-free credible heads, an accepted answer whose head fails the test raises the alarm, and
    an OOD verdict's hint weighs the test too; ``"refuse"``: the alarm alone, hints as without it;
    ``"hint"``: the hints alone, verdicts as without it."""
    base = combined_ratio(r.consistency, gated(r.stability, r.consistency, r.stability_gate))
    near = gated(r.neighbourhood, r.consistency, gate)
    args = (cfg.inconsistent_verdict, cfg.ood_hint, cfg.alarm_margin)
    if rule == "veto":
        return decide(r.confidences, r.thresholds, combined_ratio(base, near), *args)
    if rule == "alarm":
        return decide(r.confidences, r.thresholds, base, *args, near)
    if rule == "hint":
        return decide(r.confidences, r.thresholds, base, *args, near, False)
    return alarm_on_failed_ranks(*decide(r.confidences, r.thresholds, base, *args), near)


def study(work: Path, run: str, quantiles, gates, transparencies, n_clean, n_trigger, data) -> dict:
    attack_name, seed = run.rsplit("-", 1)
    seed = int(seed)
    model, meta = experiment.load_model(work / "models" / f"{run}.safetensors")
    attack = experiment.attacks.Attack.from_dict(meta["attack"]) if meta["attack"] else None
    guard = LinkBreaker.load(work / "guards" / f"{run}.safetensors", model)
    split = experiment.split_data(meta["dataset"], data, None, seed)
    if guard.neighbourhood is not None:  # the baseline: the same guard without the rank test
        guard = guard.recalibrate(split["x_val"], split["y_val"], neighbourhood_quantile=None)
    xc, yc, xt, _, target = experiment.eval_sets(attack, split["x_test"], split["y_test"], n_clean,
                                                 n_trigger, seed, SPLITS["dev"])
    x0 = experiment.triggered_originals(attack, split["x_test"], split["y_test"], n_clean, n_trigger,
                                        seed, SPLITS["dev"])
    triggered = {f"{t:g}": x0 + (1 - t) * (xt - x0) for t in transparencies}
    with torch.no_grad():
        model_cda = 100 * (model(xc).argmax(1) == yc).double().mean().item()
    rows, default, first = [], None, None
    for q in quantiles:
        # one forward per input set: the rules, gates and bounds are decisions on the same scores
        # (a head's ratio is its rank score over the bound, so another quantile only rescales it)
        g = guard.recalibrate(split["x_val"], split["y_val"], neighbourhood_quantile=q, neighbourhood_gate=None)
        if first is None:
            first = (g, g(xc), {t: g(x) for t, x in triggered.items()})
        scale = float(first[0].neighbourhood["bound"]) / float(g.neighbourhood["bound"])
        rc = dataclasses.replace(first[1], neighbourhood=first[1].neighbourhood * scale)
        rts = {t: dataclasses.replace(r, neighbourhood=r.neighbourhood * scale) for t, r in first[2].items()}
        if default is None:  # the guard without the rank test: the same forwards
            lc, vc = decide(rc.confidences, rc.thresholds, combined_ratio(
                rc.consistency, gated(rc.stability, rc.consistency, rc.stability_gate)),
                g.config.inconsistent_verdict, g.config.ood_hint, g.config.alarm_margin)
            base_right = ((lc == yc) & (vc == ACCEPT)).cpu()
            assert torch.equal(lc, guard(xc).labels), "the rank-free decision is not the guard's without the test"
            default = {"cda": round(100 * (lc.cpu() == yc).double().mean().item(), 3), "asr": {}}
            default["drop"] = round(model_cda - default["cda"], 3)
        gate_values = {gq: None if gq is None else float(guard.recalibrate(
            split["x_val"], split["y_val"], neighbourhood_quantile=q, neighbourhood_gate=gq).neighbourhood["gate"])
            for gq in gates}
        for t, r in rts.items():
            if t not in default["asr"]:
                lt, _ = decide(r.confidences, r.thresholds, combined_ratio(
                    r.consistency, gated(r.stability, r.consistency, r.stability_gate)),
                    g.config.inconsistent_verdict, g.config.ood_hint, g.config.alarm_margin)
                default["asr"][t] = round(100 * (lt.cpu() == target).double().mean().item(), 3)
        for rule in RULES:
            for gq, value in gate_values.items():
                gate = None if value is None else torch.tensor(value)
                lc, vc = decisions(rc, rule, gate, g.config)
                right = ((lc == yc) & (vc == ACCEPT)).cpu()
                row = {"rule": rule, "quantile": q, "gate": "none" if gq is None else gq,
                       "gate_value": None if value is None else round(value, 4),
                       "bound": round(float(g.neighbourhood["bound"]), 4), "evidence": g.neighbourhood_evidence(),
                       "cda": round(100 * (lc.cpu() == yc).double().mean().item(), 3),
                       "refused_of_default_right": round(100 * (base_right & ~right).double().mean().item(), 3),
                       "asr": {t: round(100 * (decisions(r, rule, gate, g.config)[0].cpu() == target)
                                        .double().mean().item(), 3) for t, r in rts.items()}}
                row["drop"] = round(model_cda - row["cda"], 3)
                rows.append(row)
                print(run, json.dumps(row), flush=True)
    return {"dataset": meta["dataset"], "run": run, "work": str(work), "split": "dev", "target": target,
            "n_clean": len(xc), "n_trigger": len(xt), "model_cda": round(model_cda, 3), "default": default,
            "settings": rows}


def table(out: Path = OUT) -> str:
    runs = [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]
    lines = ["# The neighbourhood rank test on the dev halves", "",
             "Made by `python scripts/neighbourhood_study.py --table"
             + ("" if out == OUT else f" --out {out.relative_to(ROOT)}") + "` from the per-run JSONs beside it "
             "(each names its command). Saved guards recalibrated with `neighbourhood_quantile=q` and "
             "`neighbourhood_gate=g` (*none*: every head judged). *cost*: clean dev inputs the guard "
             "without the test answers rightly and accepts that the setting refuses (%); *drop*: CDA drop, hint "
             "reading (points); *ASR t*: ASR after the guard (hint reading, %) with the trigger at "
             "transparency t (0: full strength).", ""]
    attack = lambda r: r["run"].rsplit("-", 1)[0]  # noqa: E731
    for work, name in sorted({(r["work"], attack(r)) for r in runs}):
        group = [r for r in runs if r["work"] == work and attack(r) == name]
        ts = list(group[0]["default"]["asr"])
        keys = [(s["rule"], s["quantile"], s["gate"]) for s in group[0]["settings"]]
        lines += [f"## {group[0]['dataset']} {name}, {work} ({len(group)} runs: "
                  + ", ".join(r["run"] for r in group) + ")", "",
                  "| setting | drop | cost | " + " | ".join(f"ASR t={t}" for t in ts) + " |",
                  "| --- " * (3 + len(ts)) + "|"]

        def mean(vals):
            return sum(vals) / len(vals)
        lines.append("| without the rank test | " + f"{mean([r['default']['drop'] for r in group]):.2f} | - | "
                     + " | ".join(f"{mean([r['default']['asr'][t] for r in group]):.2f}" for t in ts) + " |")
        for rule, q, gate in keys:
            key = lambda s: (s["rule"], s["quantile"], s["gate"])  # noqa: E731
            rows = [next(s for s in r["settings"] if key(s) == (rule, q, gate)) for r in group
                    if any(key(s) == (rule, q, gate) for s in r["settings"])]
            if len(rows) != len(group):
                continue
            lines.append(f"| {rule}, q {q:g}, gate {gate} | {mean([s['drop'] for s in rows]):.2f} | "
                         f"{mean([s['refused_of_default_right'] for s in rows]):.2f} | "
                         + " | ".join(f"{mean([s['asr'][t] for s in rows]):.2f}" for t in ts) + " |")
        lines += ["", "Per run, drop / ASR at the faintest transparency, default -> each setting:", ""]
        for r in group:
            t = ts[-1] if len(ts) > 1 else ts[0]
            cells = [f"{s['drop']:.2f} / {s['asr'][t]:.2f}" for s in r["settings"]]
            lines.append(f"- {r['run']}: {r['default']['drop']:.2f} / {r['default']['asr'][t]:.2f} -> "
                         + "; ".join(f"{s['rule']} q {s['quantile']:g} gate {s['gate']}: {c}"
                                     for s, c in zip(r["settings"], cells)))
        lines.append("")
    text = "\n".join(lines)
    (out / "summary.md").write_text(text + "\n")
    return text


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="runs/cifar10-sgdbf16-e80")
    ap.add_argument("--runs", nargs="+", default=["trojan-square-0"])
    ap.add_argument("--quantiles", type=float, nargs="+", default=[0.99])
    ap.add_argument("--gates", type=_gate, nargs="+", default=[None, 0.5, 0.9])
    ap.add_argument("--transparency", type=float, nargs="+", default=[0.0, 0.3, 0.5])
    ap.add_argument("--n-clean", type=int, default=1000)
    ap.add_argument("--n-trigger", type=int, default=500)
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--out", default=str(OUT.relative_to(ROOT)), help="folder of the per-run JSONs and summary")
    ap.add_argument("--table", action="store_true", help="only summarise the JSONs already written")
    args = ap.parse_args()
    if args.table:
        print(table(ROOT / args.out))
        return
    torch.set_num_threads(1)
    work, out = Path(args.work), ROOT / args.out
    out.mkdir(parents=True, exist_ok=True)
    for run in args.runs:
        res = study(work, run, args.quantiles, args.gates, args.transparency, args.n_clean, args.n_trigger,
                    args.data)
        res["command"] = ("python scripts/neighbourhood_study.py --work " + args.work + " --runs " + run
                          + " --quantiles " + " ".join(f"{q:g}" for q in args.quantiles)
                          + " --gates " + " ".join("none" if g is None else f"{g:g}" for g in args.gates)
                          + " --transparency " + " ".join(f"{t:g}" for t in args.transparency)
                          + f" --n-clean {args.n_clean} --n-trigger {args.n_trigger}"
                          + ("" if ROOT / args.out == OUT else f" --out {args.out}"))
        (out / f"{res['dataset']}-{run}-{work.name}.json").write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
