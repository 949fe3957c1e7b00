"""``linkbreaker summary``: the README's table of targets, from the committed per-run reports.

Each results folder of ``linkbreaker reproduce`` holds one JSON report per run under
``runs/<dataset>/``. This collects the default (untagged) held-out reports of the folders it is
given (and of the tagged variants named), one row per (data set, architecture, recipe, attack[,
tag]): the mean ± std over seeds of the CDA drop and the ASR after the guard, beside the paper's
numbers and issue #6's target, and whether every run was measured with today's default guard
(:class:`GuardConfig` as it stands now). A row measured with another configuration names the
fields that differ, so the table cannot silently present an older guard's numbers as today's.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from .config import GuardConfig
from .reproduce import PAPER, TARGETS, config_record, pct, recorded_config, target_verdict

_DEFAULT_RUN = re.compile(r"^(?P<split>heldout|dev)-(?P<attack>.+)-(?P<seed>\d+)\.json$")


def default_drift(report: dict) -> list[str]:
    """The ``GuardConfig`` fields in which the run's guard differs from today's default (``[]``:
    measured with today's default). Fields the report does not record take the value they had
    when it was made (:func:`reproduce.recorded_config`)."""
    seed = report["seed"]
    today = config_record(GuardConfig(seed=seed))
    made = recorded_config(report.get("guard_config"), seed)
    if made is None:
        return ["guard_config (not recorded)"]
    return sorted(k for k in today if made.get(k) != today[k])


def collect(folders, split: str = "heldout") -> dict:
    """``{(dataset, arch, recipe, attack, tag): {"folder": str, "reports": [report]}}`` from the
    default reports (``<split>-<attack>-<seed>.json``, no tag) of each folder's ``runs/<dataset>/``;
    a folder given as ``FOLDER:DATASET`` contributes that data set's reports only, and one given as
    ``FOLDER@TAG`` (or ``FOLDER:DATASET@TAG``) the reports of that tagged variant
    (``<split>-<attack>-<seed>-<TAG>.json``, ``linkbreaker reproduce --tag``), a row of its own. One
    key appearing in two folders is an error: the table would not say which one it shows."""
    rows: dict = {}
    for spec in map(str, folders):
        place, _, tag = spec.partition("@")
        folder, _, only = place.partition(":")
        folder = Path(folder)
        runs = folder / "runs"
        if not runs.is_dir():
            raise ValueError(f"{folder} has no runs/ folder: not a results folder of linkbreaker reproduce")
        found = 0
        suffix = f"-{tag}.json" if tag else ".json"
        for path in sorted(runs.glob(f"{only or '*'}/*{suffix}")):
            m = _DEFAULT_RUN.match(path.name[:len(path.name) - len(suffix)] + ".json")
            if m is None or m["split"] != split:
                continue
            report = json.loads(path.read_text())
            if report.get("attack") != m["attack"] or report.get("seed") != int(m["seed"]):
                continue  # a tagged run: <attack>-<seed>-<tag> parses as another attack name
            key = (report["dataset"], report.get("arch", "?"), report.get("recipe", "adam"), report["attack"], tag)
            entry = rows.setdefault(key, {"folder": spec, "reports": []})
            if entry["folder"] != spec:
                raise ValueError(f"{key} has reports in both {entry['folder']} and {spec}: list one of them")
            entry["reports"].append(report)
            found += 1
        if not found:
            raise ValueError(f"{spec} holds no {f'{tag!r}' if tag else 'default'} {split} report")
    for entry in rows.values():
        entry["reports"].sort(key=lambda r: r["seed"])
    return rows


def _cell(values) -> str:
    """Mean ± std in %; one seed has no spread to show."""
    return pct(values) if len(values) > 1 else pct(values).split(" ±")[0]


def table(folders, split: str = "heldout") -> str:
    """The markdown table of :func:`collect`, with the command that regenerates it."""
    rows = collect(folders, split)
    lines = [
        f"# LinkBreaker against issue #6's targets ({split} half of the test split)",
        "",
        "Mean ± std over seeds, in %, on the same clean and triggered inputs before and after the "
        "guard (CDA drop in points; an out-of-distribution verdict's label hint counted as the "
        "guard's answer). *guard*: whether every run was measured with today's default "
        "`GuardConfig`, or the fields in which it differs. Each row's folder holds its full table "
        "(the ablation rows, the accepted-only reading) and its per-run JSONs.",
        "",
        "| data set | model | recipe | attack | seeds | CDA before | CDA after | CDA drop "
        "| ASR undefended | ASR after | paper CDA / ASR | target | verdict | guard | folder |",
        "| --- " * 15 + "|",
    ]
    for (dataset, arch, recipe, attack, tag), entry in sorted(rows.items()):
        reps = entry["reports"]
        target = TARGETS.get((dataset, attack))
        text, verdict = target_verdict(target, reps, "") if target else ("-", "-")
        paper = PAPER.get((dataset, attack))
        drift = sorted({f for r in reps for f in default_drift(r)})
        lines.append(
            f"| {dataset} | {arch} | {recipe} | {attack}{f' ({tag})' if tag else ''} "
            f"| {' '.join(str(r['seed']) for r in reps)} "
            f"| {_cell([r['before']['cda'] for r in reps])} | {_cell([r['after']['cda'] for r in reps])} "
            f"| {_cell([r['before']['cda'] - r['after']['cda'] for r in reps])} "
            f"| {_cell([r['before']['asr'] for r in reps])} | {_cell([r['after']['asr'] for r in reps])} "
            f"| {f'{paper[0]:g} / {paper[1]:g}' if paper else '-'} | {text} | {verdict} "
            f"| {'default' if not drift else 'differs: ' + ', '.join(drift)} | `{entry['folder']}` |")
    lines += ["", f"Regenerate: `linkbreaker summary {' '.join(map(str, folders))}"
                  f"{'' if split == 'heldout' else ' --split ' + split}`."]
    return "\n".join(lines) + "\n"
