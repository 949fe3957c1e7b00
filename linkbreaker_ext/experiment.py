"""One reproducible experiment, shared by the CLI, the demo and the reproduction scripts:
split the data (clean validation set disjoint from training and test), train a clean or attacked
model, fit the guard, and measure the model before and the guard after on clean and triggered inputs.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from . import attacks, data, metrics, models, safefiles, training
from .guard import LinkBreaker
from .verdict import GuardResult, combined_ratio, decide, gated, score_from_result as guard_score

NO_ATTACK = "none"
MODEL_KEY = "linkbreaker-model"


# The clean validation set's share of the training split: the paper's 2 %, except on GTSRB, where
# 2 % leaves 4 images of the rarest classes (210 training images) and a guard needs at least
# ``GuardConfig.min_per_class`` (5) per class to calibrate; 5 % gives 10-113 per class.
VAL_FRACTION = {"gtsrb": 0.05}


def val_fraction(dataset: str) -> float:
    return VAL_FRACTION.get(dataset, 0.02)


# The test images no evaluation reads (reproduce's halves are 0-4999 and 5000-9999, so only GTSRB,
# with 12,630, has any): from this index on, a source of validation images that come from new
# tracks, unlike a draw from GTSRB's training split, whose ~30 frames per physical sign repeat
# what the model trained on (the clean ResNet20 is 99.9 % right on such a draw, 97.5 % on test).
TEST_TAIL = {"gtsrb": 10000}
VALIDATION_SOURCES = ("train", "test-tail")


def split_data(dataset: str, source, val_fraction_: float | None = None, seed: int = 0,
               validation: str = "train"):
    """Train/validation/test tensors. The model trains on the training split less a stratified
    ``val_fraction_`` (default: :func:`val_fraction`) that it never sees. That draw is the validation
    set (``validation="train"``, the default); ``"test-tail"`` takes the test split's unread tail
    (:data:`TEST_TAIL`) instead, and cuts the test split there (the draw stays out of training, so
    the models are the same)."""
    if validation not in VALIDATION_SOURCES:
        raise ValueError(f"validation must be one of {VALIDATION_SOURCES}, got {validation!r}")
    val_fraction_ = val_fraction(dataset) if val_fraction_ is None else val_fraction_
    x, y = data.load_split(dataset, "train", source)
    x_test, y_test = data.load_split(dataset, "test", source)
    val, rest = data.stratified_split(y, val_fraction_, seed=seed)
    out = {"x_train": x[rest], "y_train": y[rest], "x_val": x[val], "y_val": y[val],
           "x_test": x_test, "y_test": y_test}
    if validation == "test-tail":
        start = TEST_TAIL.get(dataset)
        if start is None or len(y_test) <= start:
            raise ValueError(f"{dataset}'s test split has no unread tail to validate on "
                             f"(only {sorted(TEST_TAIL)} do)")
        out.update(x_val=x_test[start:], y_val=y_test[start:], x_test=x_test[:start], y_test=y_test[:start])
    return out


# Attack settings that depend on the data set (issue #6: CIFAR-10's source-specific backdoor flips
# horse and ship to airplane, the STRIP paper's choice).
ATTACK_SETTINGS = {("cifar10", "source-specific"): {"source_classes": (7, 8)}}


def make_attack(name: str, target: int = 0, seed: int = 0, dataset: str | None = None):
    """The attack ``name`` with the data set's settings (:data:`ATTACK_SETTINGS`), or None for
    ``"none"``."""
    if name == NO_ATTACK:
        return None
    return attacks.make_attack(name, target=target, seed=seed, **ATTACK_SETTINGS.get((dataset, name), {}))


# Training recipe per data set: natural images get crop/flip augmentation and more epochs.
EPOCHS = {"mnist": 8, "cifar10": 15, "gtsrb": 10}
AUGMENT = {"mnist": False, "cifar10": "crop_flip", "gtsrb": "crop"}  # no mirrored traffic signs


def train_model(dataset: str, attack, x, y, epochs: int | None = None, seed: int = 0,
                progress: bool = True, checkpoint=None, arch: str | None = None, recipe: str = "adam"):
    """A clean model, a data-poisoned one (BadNets, Blended, source-specific) or a Trojaned one (clean
    training, then Liu et al.'s neuron selection, trigger generation and retraining). ``checkpoint``
    (a path) makes the training resumable epoch by epoch. ``arch``: a key of ``models.MODELS``
    (default: the paper's architecture for the data set); ``recipe``: a key of
    ``training.RECIPES``."""
    torch.manual_seed(seed)
    model = models.build_model(dataset, data.spec(dataset).num_classes, arch)
    if dataset != "mnist":  # measured 2.6x faster for the conv nets on CPU
        model = model.to(memory_format=torch.channels_last)
    epochs = EPOCHS.get(dataset, 10) if epochs is None else epochs
    kw = dict(epochs=epochs, seed=seed, progress=progress, augment=AUGMENT.get(dataset, False),
              checkpoint=checkpoint, recipe=recipe)
    if attack is None:
        return training.train_classifier(model, x, y, desc="train clean", **kw)
    if isinstance(attack, attacks.TrojanAttack):
        training.train_classifier(model, x, y, desc="train clean", **kw)
        return plant_trojan(dataset, model, attack, x, y, epochs, seed, progress, recipe)
    return attack.train_backdoored(model, x, y, desc=f"train {attack.name}", **kw)


def plant_trojan(dataset: str, model, attack, x, y, epochs: int | None = None, seed: int = 0,
                 progress: bool = True, recipe: str = "adam"):
    """Liu et al.'s Trojan planted in a trained clean ``model`` (changed in place and returned), with
    the recipe's retraining: a quarter of the clean training's epochs, at least one."""
    epochs = EPOCHS.get(dataset, 10) if epochs is None else epochs
    if dataset != "mnist":  # as train_model trains the conv nets (faster on CPU)
        model = model.to(memory_format=torch.channels_last)
    return attack.poison_model(model, x, y, epochs=max(1, epochs // 4), seed=seed, progress=progress,
                               recipe=recipe)


def eval_sets(attack, x_test, y_test, n_clean: int = 2000, n_trigger: int = 2000, seed: int = 0,
              pool: slice = slice(None)):
    """``n_clean`` clean test inputs and ``n_trigger`` triggered test inputs whose true class is not
    the target, drawn from ``x_test[pool]``. A clean model is probed with a default BadNets trigger."""
    xs, ys, probe, ci, ti = _eval_draw(attack, x_test, y_test, n_clean, n_trigger, seed, pool)
    xt, yt = probe.triggered_eval_set(xs, ys)
    return xs[ci], ys[ci], xt[ti], yt[ti], probe.target


def triggered_originals(attack, x_test, y_test, n_clean: int = 2000, n_trigger: int = 2000, seed: int = 0,
                        pool: slice = slice(None)) -> torch.Tensor:
    """The images of :func:`eval_sets`' triggered inputs (same arguments, same order) before the
    trigger: what a trigger at part of its strength is blended from."""
    xs, ys, probe, _, ti = _eval_draw(attack, x_test, y_test, n_clean, n_trigger, seed, pool)
    return xs[probe.eval_population(ys)][ti]


def _eval_draw(attack, x_test, y_test, n_clean, n_trigger, seed, pool):
    """The pool, the attack (a default BadNets probe for a clean model) and the indices of the
    clean draw (into the pool) and of the triggered draw (into the attack's ASR population)."""
    g = torch.Generator().manual_seed(10_000 + seed)
    xs, ys = x_test[pool], y_test[pool]
    ci = torch.randperm(len(xs), generator=g)[:n_clean]
    probe = attack or attacks.BadNets(target=0, seed=seed)
    ti = torch.randperm(int(probe.eval_population(ys).sum()), generator=g)[:n_trigger]
    return xs, ys, probe, ci, ti


def evaluate(model, guard: LinkBreaker, attack, x_test, y_test, n_clean=2000, n_trigger=2000,
             seed: int = 0, pool: slice = slice(None)):
    """The report: ``{"before": {cda, asr}, "after": {...}, "timing": {...}}`` (fractions)."""
    xc, yc, xt, yt, target = eval_sets(attack, x_test, y_test, n_clean, n_trigger, seed, pool)
    device = next(model.parameters()).device
    bare_clean = training.predict_logits(model, xc).argmax(1)
    before = metrics.undefended(bare_clean, yc, training.predict_logits(model, xt).argmax(1), target)
    start = time.perf_counter()
    rc = guard(xc.to(device))
    online_s = time.perf_counter() - start
    rt = guard(xt.to(device))
    after = metrics.defended(rc, yc, rt, yt, target)
    report = {"before": before, "after": after,
              "timing": {"fit_s": guard.diagnostics.get("fit_s", float("nan")),
                         "online_ms_per_sample": 1000 * online_s / max(len(xc), 1)},
              "attack": attack.to_dict() if attack is not None else None,
              "counts": {"clean": len(xc), "triggered": len(xt)},
              "drop_pairs": metrics.paired_drop(bare_clean, rc.labels, yc)}
    if rc.credibility is not None:
        # The same heads and thresholds without the vetoes (the paper's credibility test alone),
        # from the same forward passes: the ablation of the checks comes for free. Every variant
        # but the paper's test alone and "- neighbourhood test" keeps the rank test's alarms.
        cfg = guard.config

        def variant(ratio, inconsistent=cfg.inconsistent_verdict, hint=cfg.ood_hint, margin=cfg.alarm_margin,
                    ranks=True, filtered=True):
            return [redecided(r, ratio(r), inconsistent, hint, margin, r.rank_ratio if ranks else None,
                              cfg.neighbourhood_alarm, r.filtered_judged if filtered else None) for r in (rc, rt)]

        def add(key, results):
            report[key] = metrics.defended(results[0], yc, results[1], yt, target)
        add("after_without_consistency", [redecided(r) for r in (rc, rt)])
        if rc.stability is not None and rc.consistency is not None:  # ... and without the stability test
            add("after_without_stability", variant(lambda r: r.consistency, filtered=False))
            if rc.stability_gate is not None:  # ... and with the stability test judging every head
                add("after_without_stability_gate", variant(
                    lambda r: combined_ratio(r.consistency, r.stability, r.filtered_judged)))
            if rc.filtered is not None:  # ... and without the filtered neighbour (stability_median)
                add("after_without_filtered_neighbour", variant(
                    lambda r: combined_ratio(r.consistency, gated(r.stability, r.consistency, r.stability_gate)),
                    filtered=False))
        if rc.neighbourhood is not None:  # ... and without the neighbourhood rank test
            add("after_without_neighbourhood", variant(lambda r: r.credibility, ranks=False))
        # ... and with the other verdict for a confident but inconsistent top head
        other = "ood" if cfg.inconsistent_verdict == "alarm" else "alarm"
        add(f"after_inconsistent_{other}", variant(lambda r: r.credibility, inconsistent=other))
        # ... and with the other hint for an OOD verdict without a consistent head
        hint = "confident" if cfg.ood_hint == "nearest" else "nearest"
        add(f"after_ood_hint_{hint}", variant(lambda r: r.credibility, hint=hint))
        if cfg.alarm_margin > 0 and cfg.inconsistent_verdict == "alarm":
            # ... and with only a confident head raising the alarm (the rule until session 32)
            add("after_without_alarm_margin", variant(lambda r: r.credibility, inconsistent="alarm", margin=0.0))
        report["auroc"] = metrics.auroc(guard_score(rc), guard_score(rt))
    return report, (rc, yc, rt, yt)


def redecided(r: GuardResult, ratio=None, inconsistent_verdict: str = "alarm",
              ood_hint: str = "nearest", alarm_margin: float = 0.0, ranks=None,
              rank_alarm: bool = True, hint_filter=None) -> GuardResult:
    """``r``'s heads decided again (:func:`guard.decide`) with veto ratios ``ratio`` (None: the
    paper's confidence test alone), ``inconsistent_verdict``, ``ood_hint``, ``alarm_margin`` and the
    rank test's judged ratios ``ranks`` (None: no rank test; ``rank_alarm=False``: hints only) and
    the filtered neighbour's ratios ``hint_filter`` that an OOD hint avoids (None: none): a
    decision variant that needs no new forward pass. The result carries ``ratio`` as its consistency
    ratios."""
    labels, verdict = decide(r.confidences, r.thresholds, ratio, inconsistent_verdict, ood_hint, alarm_margin,
                             ranks, rank_alarm, hint_filter)
    return GuardResult(labels, verdict, r.confidences, r.thresholds, ratio)


def model_for(dataset: str, attack_name: str, seed: int, split: dict, work, epochs: int | None = None,
              progress: bool = True, arch: str | None = None, recipe: str = "adam"):
    """The cached model ``<work>/models/<attack>-<seed>.safetensors``, trained (resumably) if absent.
    ``arch`` (default: the data set's paper architecture) and the training ``recipe`` must match a
    cached model's: one work folder per architecture and recipe. Returns ``(model, attack)``."""
    arch = arch or models.DEFAULT_ARCH.get(dataset)
    path = Path(work) / "models" / f"{attack_name}-{seed}.safetensors"
    if path.is_file():
        model, meta = _load_cached(path, arch, recipe)
        return model, (attacks.Attack.from_dict(meta["attack"]) if meta["attack"] else None)
    attack = make_attack(attack_name, target=0, seed=seed, dataset=dataset)
    path.parent.mkdir(parents=True, exist_ok=True)
    ckpt = path.with_suffix(".ckpt")
    clean = path.with_name(f"none-{seed}.safetensors")
    if isinstance(attack, attacks.TrojanAttack) and clean.is_file():
        # the clean model of this seed is the clean training a Trojan starts from (same data, seed
        # and recipe): plant the Trojan in it instead of training it again (20-30 CPU-minutes)
        model = plant_trojan(dataset, _load_cached(clean, arch, recipe)[0], attack, split["x_train"],
                             split["y_train"], epochs, seed, progress, recipe)
    else:
        model = train_model(dataset, attack, split["x_train"], split["y_train"], epochs, seed, progress,
                            checkpoint=None if dataset == "mnist" else ckpt, arch=arch, recipe=recipe)
    save_model(path, model, {"dataset": dataset, "arch": arch, "recipe": recipe, "num_classes": data.spec(dataset).num_classes,
                             "seed": seed, "val_fraction": val_fraction(dataset),
                             "attack": attack.to_dict() if attack else None,
                             # bfloat16 CPU training is reproducible at one thread count only
                             "train_threads": torch.get_num_threads()})
    ckpt.unlink(missing_ok=True)
    return model, attack


def _load_cached(path, arch: str, recipe: str = "adam"):
    """:func:`load_model` of a cached model, refused when :func:`check_made_with` refuses it."""
    model, meta = load_model(path)
    check_made_with(path, meta, arch, recipe)
    return model, meta


def check_made_with(path, meta: dict, arch: str, recipe: str):
    """Refuse a cached model or report (``meta``: its metadata, with ``dataset``) made with another
    architecture or training recipe than the run asks for: one work folder per architecture and
    recipe."""
    if model_arch(meta) != arch:
        raise ValueError(f"{path} was made with a {model_arch(meta)} model, not {arch}: give each "
                         "architecture its own work folder (--work)")
    if model_recipe(meta) != recipe:
        raise ValueError(f"{path} was made with the {model_recipe(meta)} recipe, not {recipe}: give "
                         "each training recipe its own work folder (--work)")


def save_model(path, model, meta: dict):
    """The model's weights and ``meta`` (data set, classes, seed, attack) in one safetensors file."""
    safefiles.write(path, model.state_dict(), MODEL_KEY, meta)


def model_arch(meta: dict) -> str | None:
    """The architecture a saved model's (or report's) metadata names (files written before ``arch``
    was recorded hold the data set's paper architecture)."""
    return meta.get("arch") or models.DEFAULT_ARCH.get(meta["dataset"])


def model_recipe(meta: dict) -> str:
    """The training recipe a saved model's (or report's) metadata names (files written before
    ``recipe`` was recorded were all trained with Adam)."""
    return meta.get("recipe", "adam")


def load_model(path):
    """``(model, meta)`` from :func:`save_model`'s file (no pickle involved)."""
    state, meta = safefiles.read(path, MODEL_KEY, "linkbreaker model", "model")
    model = models.build_model(meta["dataset"], meta["num_classes"], meta.get("arch"))
    model.load_state_dict(state)
    return model.eval(), meta


def saved_run(dataset: str, run: str, data_source, work, guards: str = "guards"):
    """``(split, model, attack, guard, seed)`` of a reproduced run ``<attack>-<seed>`` cached under
    ``work`` (``runs/<dataset>``): its data split, its model and attack, and the guard ``reproduce``
    saved beside it (folder ``guards``), so dev studies re-judge exactly what the tables measured."""
    seed = int(run.rsplit("-", 1)[1])
    split = split_data(dataset, data_source, None, seed)
    model, meta = load_model(Path(work) / "models" / f"{run}.safetensors")
    attack = attacks.Attack.from_dict(meta["attack"]) if meta["attack"] else None
    guard = LinkBreaker.load(Path(work) / guards / f"{run}.safetensors", model)
    return split, model, attack, guard, seed
