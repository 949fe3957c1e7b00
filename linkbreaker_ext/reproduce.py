"""``linkbreaker reproduce``: one command per results table.

For every (attack, seed): the data split of :func:`experiment.split_data` (a stratified 2% of the
training split as the clean validation set, or with ``validation="test-tail"`` GTSRB's unread test
images, :data:`experiment.TEST_TAIL`), the cached model of :func:`experiment.model_for`
(trained, resumably, if absent), the guard fitted on the validation set with ``seed=seed``, and
:func:`experiment.evaluate` on one half of the test split: ``heldout`` = indices 5000-end (the
reported numbers; 5000-9999 with the test tail as validation set), ``dev`` = indices 0-4999 (where the method was designed). Each run writes
``<work>/reports/<split>-<attack>-<seed>.json`` (an existing report made with the same guard
configuration, defaults included, is reused, so an interrupted run resumes; one made under other
defaults is measured again) and a copy under ``<results>/runs/<dataset>/``; the table, mean ± std over seeds beside
the paper's numbers and issue #6's targets, goes to ``<results>/<dataset>-<split>.md``.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import statistics
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import data, experiment, models, safefiles, training
from .fitting import CALIBRATION_FIELDS, data_fingerprint
from .config import GuardConfig, with_legacy
from .guard import LinkBreaker

SPLITS = {"heldout": slice(5000, None), "dev": slice(0, 5000)}

# The paper's numbers after the defense (CDA %, ASR %): Tables II (data poisoning) and III (Trojan).
PAPER = {
    ("mnist", "badnets"): (98.06, 2.0), ("mnist", "trojan-square"): (99.1, 0.6),
    ("cifar10", "badnets"): (89.36, 0.4), ("cifar10", "trojan-square"): (88.73, 1.3),
    ("cifar10", "source-specific"): (82.62, 13.2),
    ("gtsrb", "badnets"): (98.28, 0.3), ("gtsrb", "trojan-watermark"): (98.2, 0.8),
}

# Issue #6's targets after the defense: (largest CDA drop in points against the undefended model,
# largest ASR in %; None = no ASR bound).
TARGETS = {
    ("cifar10", "badnets"): (1.0, 0.5), ("cifar10", "trojan-square"): (1.0, 1.0),
    ("cifar10", "source-specific"): (2.0, 10.0),
    ("cifar10", "blended"): (2.0, 5.0), ("cifar10", "sig"): (2.0, 5.0), ("cifar10", "wanet"): (2.0, 5.0),
    ("gtsrb", "badnets"): (1.0, 0.5), ("gtsrb", "trojan-watermark"): (1.0, 1.0),
    ("mnist", "blended"): (1.0, 5.0),
    ("mnist", experiment.NO_ATTACK): (1.0, None), ("cifar10", experiment.NO_ATTACK): (1.0, None),
    ("gtsrb", experiment.NO_ATTACK): (1.0, None),
}


def parse_settings(items) -> dict:
    """``["field=value", ...]`` -> GuardConfig overrides (values as Python literals)."""
    import ast

    fields = {f.name for f in dataclasses.fields(GuardConfig)}
    out = {}
    for item in items or ():
        if "=" not in item:
            raise ValueError(f"--set expects field=value, got {item!r}")
        key, value = item.split("=", 1)
        key = key.strip()
        if key not in fields:
            raise ValueError(f"unknown GuardConfig field {key!r}; known: {sorted(fields)}")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value  # a bare string such as fill=mean
        if isinstance(out[key], list):
            out[key] = tuple(out[key])
    return out


def _jsonable(settings: dict) -> dict:
    return json.loads(json.dumps({k: list(v) if isinstance(v, tuple) else v for k, v in settings.items()}))


def config_record(config: GuardConfig) -> dict:
    """A guard configuration as a report records it (JSON types: tuples as lists)."""
    return _jsonable(dataclasses.asdict(config))


def recorded_config(stored: dict | None, seed: int) -> dict | None:
    """The whole configuration a cached report was made with. A field the report does not record
    did not exist yet: it had its legacy value (``config.with_legacy``) if its default changed since,
    otherwise today's default, so adding a field leaves existing reports fresh."""
    if stored is None:
        return None
    defaults = config_record(GuardConfig(seed=seed))
    return {**defaults, **_jsonable(with_legacy(stored))}


def _saved_guard(path: Path, model, target: GuardConfig, d: dict):
    """``(guard, recalibrated fields)`` from the guard saved at ``path`` when it can serve ``target``:
    fitted for this model and validation set with the same settings, or with settings that differ
    only in the last stage (``fitting.CALIBRATION_FIELDS``), which it is recalibrated for instead of
    refitted. ``(None, None)`` otherwise: the caller fits a new guard."""
    if not path.is_file():
        return None, None
    try:
        saved = LinkBreaker.load(path, model)
    except safefiles.GuardFileError:
        return None, None
    if saved.data_sha256 not in (None, data_fingerprint(d["x_val"], d["y_val"])):  # another validation set
        return None, None
    changed = sorted(f.name for f in dataclasses.fields(GuardConfig)
                     if getattr(saved.config, f.name) != getattr(target, f.name))
    if not set(changed) <= CALIBRATION_FIELDS:
        return None, None
    if not changed:
        return saved, None
    try:
        guard = saved.recalibrate(d["x_val"], d["y_val"], **{k: getattr(target, k) for k in changed})
    except ValueError:  # fitted on another validation set
        return None, None
    return guard, changed


def report_name(split: str, attack_name: str, seed: int, tag: str | None) -> str:
    """A run's file stem: ``<split>-<attack>-<seed>[-<tag>]``."""
    return f"{split}-{attack_name}-{seed}" + (f"-{tag}" if tag else "")


def run_one(dataset: str, attack_name: str, seed: int, *, data_source, work, split: str = "heldout",
            device="cpu", settings: dict | None = None, n_clean: int = 2000, n_trigger: int = 2000,
            epochs: int | None = None, progress: bool = False, tag: str | None = None,
            validation: str = "train", arch: str | None = None, recipe: str = "adam") -> dict:
    """One run's report (cached in ``<work>/reports``; a ``tag`` names a variant, e.g. an ablation's
    settings, whose reports and guards sit beside the default's and share its models;
    ``validation``: where the guard's validation set comes from, :func:`experiment.split_data`;
    ``arch``: the model architecture, default the data set's paper one; ``recipe``: the training
    recipe, ``training.RECIPES``; one ``work`` per architecture and recipe)."""
    settings = dict(settings or {})
    arch = arch or models.DEFAULT_ARCH.get(dataset)
    path = Path(work) / "reports" / f"{report_name(split, attack_name, seed, tag)}.json"
    # the whole configuration the guard would be fitted with (defaults included): a report made
    # under other defaults is stale and is measured again
    target = GuardConfig(**{**settings, "seed": seed})
    config = config_record(target)
    if path.is_file():
        report = json.loads(path.read_text())
        experiment.check_made_with(path, {"dataset": dataset, **report}, arch, recipe)
        if report.get("settings", {}) != _jsonable(settings):
            raise ValueError(f"{path} was made with the guard settings {report.get('settings')}, not "
                             f"{_jsonable(settings)}: remove it or use another --work folder")
        # ... and so is one whose validation set came from elsewhere (reports before the field: "train")
        if (recorded_config(report.get("guard_config"), seed) == config
                and report.get("validation", "train") == validation):
            return report
    pool = SPLITS[split]
    d = experiment.split_data(dataset, data_source, None, seed, validation=validation)
    model, attack = experiment.model_for(dataset, attack_name, seed, d, work, epochs, progress, arch, recipe)
    model = model.to(device).eval()
    guards = Path(work) / "guards"
    guard_path = guards / f"{attack_name}-{seed}{'-' + tag if tag else ''}.safetensors"
    # a tagged variant of the last stage alone starts from the default's saved guard
    guard, recalibrated = _saved_guard(guard_path, model, target, d)
    if guard is None and tag:
        guard, recalibrated = _saved_guard(guards / f"{attack_name}-{seed}.safetensors", model, target, d)
    if guard is None:
        guard = LinkBreaker.fit(model, d["x_val"], d["y_val"], data.spec(dataset).num_classes,
                                progress=False, seed=seed, **settings)
    # the fitted guard is kept beside the report, so verdict variants can be re-measured without a refit
    guard.save(guard_path)
    report, _ = experiment.evaluate(model, guard, attack, d["x_test"], d["y_test"], n_clean, n_trigger,
                                    seed, pool)
    x_pool, y_pool = d["x_test"][pool], d["y_test"][pool]
    report.update({
        "dataset": dataset, "attack": attack_name, "attack_config": report.get("attack"),
        "model": type(model).__name__, "arch": arch, "recipe": recipe, "defense": "linkbreaker", "seed": seed, "split": split,
        "clean_model_cda": training.accuracy(model, x_pool, y_pool),
        "clean_pool": len(y_pool),
        "layers": list(guard.layers), "late_layer": guard.late_layer,
        "kept": {k: m.mean(1).tolist() for k, m in guard.masks.items()},  # share of neurons per head
        "thresholds": guard.thresholds.tolist(),
        "settings": _jsonable(settings),
        "guard_config": config,
        "validation": validation, "validation_size": len(d["y_val"]),
        "device": str(device), "torch_threads": torch.get_num_threads(),
    })
    if recalibrated is not None:
        report["recalibrated"] = recalibrated
    write_report(path, report)
    return report


def write_report(path, report: dict, default=None) -> None:
    """Write a run's JSON so that it is either complete or absent: a cut run resumes from the
    reports that exist (``default``: ``json.dumps``' fallback for values JSON lacks)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=2, default=default))
    tmp.replace(path)


def _mean_sd(values):
    mean = statistics.mean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else 0.0)


def pct(values) -> str:
    """Fractions as ``"mean ± std"`` in % (std 0 for one value)."""
    mean, sd = _mean_sd([100 * v for v in values])
    return f"{round(mean, 2) + 0.0:.2f} ± {sd:.2f}"  # + 0.0: no "-0.00"


def _target_cells(dataset, attack_name, reps):
    """(target text, verdict text) for one row, under both readings of an OOD verdict (its label
    hint counts / only accepted answers count); the CDA drop is paired: the same clean inputs
    before and after the guard."""
    target = TARGETS.get((dataset, attack_name))
    if target is None:
        return "-", "-"
    text, hint = target_verdict(target, reps, "")
    _, strict = target_verdict(target, reps, "_strict")
    return text, f"hint reading {hint}; Alg. 3 reading {strict}"


def target_verdict(target, reps, suffix):
    """``(target text, "met (...)" / "missed: ...")`` for a target ``(max drop, max ASR or None)``
    on the mean over ``reps``; ``suffix`` "_strict" reads accepted answers only."""
    max_drop, max_asr = target
    # judged as printed, to 0.01 points: float rounding must not turn "at the limit" into a miss
    drop = round(statistics.mean(100 * (r["before"]["cda"] - r["after"]["cda" + suffix]) for r in reps), 2)
    asr = round(statistics.mean(100 * r["after"]["asr" + suffix] for r in reps), 2)
    text = f"drop <= {max_drop:g}" + (f", ASR <= {max_asr:g}%" if max_asr is not None else "")
    misses = []
    if drop > max_drop:
        misses.append(f"drop {drop - max_drop:.2f} pts over")
    if max_asr is not None and asr > max_asr:
        misses.append(f"ASR {asr - max_asr:.2f} pts over")
    if misses:
        return text, "missed: " + ", ".join(misses)
    slack = [f"drop {max_drop - drop:.2f} pts under"]
    if max_asr is not None:
        slack.append(f"ASR {max_asr - asr:.2f} pts under")
    return text, "met (" + ", ".join(slack) + ")"


def table(dataset: str, split: str, reports: dict, tag: str | None = None, validation: str = "train",
          options: str = "") -> str:
    """The markdown table for ``{attack: [report per seed]}``; ``options``: the rest of the command
    line that regenerates it (another architecture, recipe or folders)."""
    lines = [
        f"# LinkBreaker on {dataset} ({split} half of the test split)",
        "",
        "Mean ± std over seeds, in %. *undefended*: the model without the guard (CDA on the whole "
        f"{split} clean pool, ASR on the triggered inputs); *after*: with the guard, counting the "
        "label hint of an out-of-distribution verdict as the guard's answer; *accepted only*: "
        "counting only accepted answers (Alg. 3: anything but exactly one credible head is refused). "
        "*CDA drop*: undefended minus guarded CDA on the same clean inputs, in points (hint "
        "reading). *paper*: LinkBreaker after the defense (Tables II and III). *target*: issue #6. "
        "Rows marked *+ alarm verdict* / *+ OOD verdict* / *+ confident hint* / *+ nearest hint* / "
        "*- alarm margin* / *- neighbourhood test* / *- stability gate* / *- stability test* / *- consistency check* / *- both checks* are the same fitted "
        "guard and forward passes with only the decision changed (`inconsistent_verdict`; `ood_hint`, the "
        "label an OOD verdict without a consistent head suggests; `alarm_margin=0`, only a confident head "
        "raises the alarm; `neighbourhood_quantile=None`, no neighbourhood rank test; `stability_gate=None`, the stability test judging every head; the neurons consistency check without the "
        "neighbour stability test; the paper's confidence test alone, which the *- consistency "
        "check* rows of guards without the stability test also are): an ablation that costs no refit.",
        "",
        "| attack | model | seeds | CDA undefended | ASR undefended | CDA after | ASR after "
        "| CDA after, accepted only | ASR after, accepted only | CDA drop "
        "| R-Acc | clean alarms | clean OOD | trigger alarms | trigger OOD | paper CDA / ASR | target | verdict |",
        "| --- " * 18 + "|",
    ]
    # Beside each fitted guard, variants measured on the same forward passes (same heads,
    # thresholds and bounds; only the decision differs): the other verdict for a confident but
    # inconsistent head, the consistency check alone (no stability test) and the paper's
    # confidence test alone (neither veto: "- both checks" where the guard has the stability test).
    variants = [("after", ""), ("after_inconsistent_alarm", " + alarm verdict"),
                ("after_inconsistent_ood", " + OOD verdict"),
                ("after_ood_hint_confident", " + confident hint"), ("after_ood_hint_nearest", " + nearest hint"),
                ("after_without_alarm_margin", " - alarm margin"),
                ("after_without_neighbourhood", " - neighbourhood test"),
                ("after_without_filtered_neighbour", " - filtered neighbour"),
                ("after_without_stability_gate", " - stability gate"),
                ("after_without_stability", " - stability test"),
                ("after_without_consistency", " - consistency check")]
    if any("after_without_filtered_neighbour" in r for rs in reports.values() for r in rs):
        lines[2] += (" *- filtered neighbour*: the same, without the median-filtered neighbour "
                     "(`stability_median=0`: neither its veto nor its say in an OOD verdict's hint).")
    for attack_name, reps in reports.items():
        if not reps:
            continue
        both = all("after_without_stability" in r for r in reps)
        for key, label in variants:
            if key == "after_without_consistency" and both:
                label = " - both checks"
            if not all(key in r for r in reps):
                continue
            view = [dict(r, after=r[key]) for r in reps]
            lines.append(_row(dataset, attack_name, view, label, with_target=True))
    all_reps = [r for rs in reports.values() for r in rs]
    settings = {json.dumps(r.get("settings", {}), sort_keys=True) for r in all_reps}
    seeds = " ".join(str(s) for s in sorted({r["seed"] for r in all_reps}))
    sets = "".join(f" --set {k}={v!r}".replace("'", "") if isinstance(v, str) else f" --set {k}={v}"
                   for k, v in (all_reps[0].get("settings") or {}).items()) if all_reps else ""
    # CPU training is bit-reproducible only at the thread count it ran with: name it when the runs agree
    runs_on = {(r.get("device"), r.get("torch_threads")) for r in all_reps}
    if len(runs_on) == 1 and (only := runs_on.pop())[0] == "cpu" and only[1]:
        options = f" --threads {only[1]}" + options
    lines += ["", f"Guard settings (GuardConfig overrides): {', '.join(sorted(settings))}.",
              f"Per-run reports, in this table's folder: `runs/{dataset}/{split}-<attack>-<seed>{'-' + tag if tag else ''}.json`. "
              f"Regenerate: `linkbreaker reproduce --dataset {dataset} --split {split} "
              f"--attacks {' '.join(reports)} --seeds {seeds}{sets}{' --tag ' + tag if tag else ''}"
              f"{'' if validation == 'train' else ' --validation ' + validation}{options}`."]
    return "\n".join(lines) + "\n"


def _row(dataset, attack_name, reps, label="", with_target=True) -> str:
    b = lambda k: pct([r["before"][k] for r in reps])  # noqa: E731
    a = lambda k: pct([r["after"][k] for r in reps])  # noqa: E731
    drop = pct([r["before"]["cda"] - r["after"]["cda"] for r in reps])
    paper = PAPER.get((dataset, attack_name))
    paper_text = f"{paper[0]:g} / {paper[1]:g}" if paper else "-"
    target, verdict = _target_cells(dataset, attack_name, reps)
    names = ", ".join(sorted({r.get("model", "?") for r in reps}))
    seeds = " ".join(str(r["seed"]) for r in reps)
    return (f"| {attack_name}{label} | {names} | {seeds} | {pct([r['clean_model_cda'] for r in reps])} "
            f"| {b('asr')} | {a('cda')} | {a('asr')} | {a('cda_strict')} | {a('asr_strict')} "
            f"| {drop} | {a('r_acc')} "
            f"| {a('alarm_rate_clean')} | {a('ood_rate_clean')} | {a('alarm_rate_trigger')} "
            f"| {a('ood_rate_trigger')} | {paper_text} | {target} | {verdict} |")


def reproduce(dataset: str, attacks, seeds, *, data_source="../shared/data", work=None,
              split: str = "heldout", device="cpu", settings: dict | None = None,
              n_clean: int = 2000, n_trigger: int = 2000, epochs: int | None = None,
              results="results", progress: bool = True, tag: str | None = None,
              trained_only: bool = False, validation: str = "train", arch: str | None = None,
              recipe: str = "adam"):
    """Run every (attack, seed), write the per-run reports and the table; returns
    ``(reports {attack: [report]}, table path)``. ``trained_only``: skip the runs whose model is not
    in ``work`` yet instead of training it (a table from what is there while training goes on)."""
    data.spec(dataset)  # unknown data set: a clear error before any work
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    work = Path(work or Path("runs") / dataset)
    runs_dir = Path(results) / "runs" / dataset
    reports = {a: [] for a in attacks}
    jobs = [(a, s) for a in attacks for s in seeds
            if not trained_only or (work / "models" / f"{a}-{s}.safetensors").is_file()]
    if not jobs:
        raise ValueError(f"no trained model in {work / 'models'} for attacks {list(attacks)} and "
                         f"seeds {list(seeds)}")
    bar = tqdm(jobs, desc=f"reproduce {dataset}", unit="run", disable=not progress)
    for attack_name, seed in bar:
        bar.set_postfix_str(f"{attack_name} seed {seed}")
        rep = run_one(dataset, attack_name, seed, data_source=data_source, work=work, split=split,
                      device=device, settings=settings, n_clean=n_clean, n_trigger=n_trigger,
                      epochs=epochs, progress=progress, tag=tag, validation=validation, arch=arch,
                      recipe=recipe)
        reports[attack_name].append(rep)
        runs_dir.mkdir(parents=True, exist_ok=True)
        name = report_name(split, attack_name, seed, tag)
        shutil.copyfile(work / "reports" / f"{name}.json", runs_dir / f"{name}.json")
    out = Path(results) / f"{dataset}-{split}{'-' + tag if tag else ''}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    options = "".join(f" --{name} {value}" for name, value in (
        ("arch", arch), ("recipe", recipe if recipe != "adam" else None), ("epochs", epochs),
        ("work", work if work != Path("runs") / dataset else None),
        ("results", results if str(results) != "results" else None)) if value is not None)
    out.write_text(table(dataset, split, reports, tag, validation, options))
    return reports, out
