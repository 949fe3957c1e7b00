"""The offline phase, run once: validation set -> neighbours (Alg. 1) -> neuron statistics and
salient sets (Alg. 2) -> credibility criteria (MAD) -> a fitted :class:`LinkBreaker`.

Data flows one way through the stages, each in its own module: :mod:`neighbours`, :mod:`salient`
(statistics, importance, dormant neurons, consistency profile), :mod:`search` (set sizes) and
:mod:`calibrate` (thresholds and bounds). Everything runs on the model's device.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import time
import warnings

import torch
from torch import nn

from . import calibrate, salient, search
from .config import NON_IMAGE_NOISE, GuardConfig
from .data import stratified_split
from .layers import (INPUT, LATE, TappedModel, auto_layers, check_layers, evidence_layer, final_linear,
                     frozen_copy, logits_of, units)
from .neighbours import generate_neighbours, perturbed_samples
from .verdict import input_contrast, median_filter, neighbourhood_scores, stability_falls


def as_tensors(x, y):
    """Accept tensors, a Dataset or a DataLoader of (x, y) pairs."""
    if isinstance(x, torch.Tensor):
        if y is None:
            raise ValueError("y_val is required when x_val is a tensor")
        return x, torch.as_tensor(y)
    if y is not None:
        raise ValueError("give y_val only with a tensor x_val; a Dataset/DataLoader carries labels")
    if isinstance(x, torch.utils.data.Dataset):
        x = torch.utils.data.DataLoader(x, batch_size=512)
    xs, ys = zip(*[(xb, torch.as_tensor(yb)) for xb, yb in x])
    return torch.cat(xs), torch.cat(ys)


def _validate(x, y, num_classes, cfg, outputs: int):
    if len(y) == 0:
        raise ValueError("the validation set is empty")
    if x.dim() < 2 or len(x) != len(y):
        raise ValueError(f"x_val {tuple(x.shape)} and y_val {tuple(y.shape)} do not match")
    if not x.is_floating_point() or not torch.isfinite(x).all():
        raise ValueError("x_val must be a floating tensor without NaN or Inf")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool or y.dim() != 1:
        raise ValueError(f"y_val must be a 1-D integer tensor of class labels, got {y.dtype} "
                         f"{tuple(y.shape)}")
    # default: the classifier's width, so a class absent from the labels is not silently dropped
    num_classes = int(num_classes if num_classes is not None else outputs)
    if y.min() < 0 or y.max() >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes})")
    if num_classes != outputs:
        raise ValueError(f"num_classes={num_classes} but the classifier (the last nn.Linear) has "
                         f"{outputs} outputs: pass the model's number of classes, or name the "
                         f"classifier if another Linear comes after it in registration order")
    counts = torch.bincount(y, minlength=num_classes)
    need = max(cfg.min_per_class, 2)  # one for the fit split, one for calibration, at the least
    if counts.min() < need:
        raise ValueError(f"too few validation samples: class {int(counts.argmin())} has "
                         f"{int(counts.min())}, need at least {need} per class")
    return num_classes


@torch.no_grad()
def _predict(net, x, device, rows: int) -> torch.Tensor:
    """The model's labels for ``x`` (CPU), chunk by chunk on ``device``."""
    return torch.cat([logits_of(net(x[i:i + rows].to(device))).argmax(1).cpu()
                      for i in range(0, len(x), rows)])


def blank_input(x):
    """A content-free input: every pixel at its channel's median value over the validation set
    (black for MNIST). Its activations are the reference that non-salient neurons fall back to."""
    med = x.transpose(0, 1).flatten(1).median(dim=1).values if x.dim() > 2 else x.median(0).values
    shape = (1, x.shape[1]) + (1,) * (x.dim() - 2)
    return med.reshape(shape).expand(1, *x.shape[1:]).contiguous().float()


def _per_class_subset(y, per_class, seed):
    if per_class is None:
        return torch.arange(len(y))
    g = torch.Generator().manual_seed(seed)
    keep = [idx[torch.randperm(len(idx), generator=g)[:per_class]]
            for idx in (torch.nonzero(y == c).flatten() for c in torch.unique(y))]
    return torch.cat(keep).sort().values


def _check_fields(config_cls, overrides):
    known = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown GuardConfig field(s) {unknown}; known: {sorted(known)}")


def is_image(shape) -> bool:
    """Whether inputs of ``shape`` (one sample's) are images [C, H, W] that the jitter can resample."""
    return len(shape) == 3 and min(shape[1:]) >= 2


def check_median_inputs(cfg: GuardConfig, shape):
    """``stability_median`` filters images: refuse it, naming the field, on any other input."""
    if cfg.stability_median and not (is_image(shape) and min(shape[1:]) >= cfg.stability_median):
        raise ValueError(f"stability_median={cfg.stability_median} filters images [C, H, W] at least "
                         f"that large; these inputs are {list(shape)}: set stability_median=0")


def neighbour_for_inputs(cfg: GuardConfig, shape) -> GuardConfig:
    """The settings the fit runs with for inputs of ``shape``: the geometric neighbour
    (``stability_jitter``, on by default) resamples images; on any other input the stability test
    falls back to Gaussian noise of std :data:`NON_IMAGE_NOISE` (or ``stability_noise`` where it is
    set), with a warning, so the default fits every input and the saved config says what ran."""
    if cfg.stability_jitter == 0 or is_image(shape):
        return cfg
    noise = cfg.stability_noise or NON_IMAGE_NOISE
    warnings.warn(f"stability_jitter={cfg.stability_jitter} resamples images [C, H, W]; these inputs "
                  f"are {list(shape)}: the stability test uses Gaussian noise of std {noise} instead "
                  f"(stability_jitter=0, stability_noise={noise})", stacklevel=4)
    return dataclasses.replace(cfg, stability_jitter=0.0, stability_noise=noise)


def fit_guard(cls, model: nn.Module, x_val, y_val, num_classes, layers, config, progress, **overrides):

    t0 = time.perf_counter()
    _check_fields(GuardConfig, overrides)
    cfg = dataclasses.replace(config or GuardConfig(), **overrides)
    x, y = as_tensors(x_val, y_val)
    x, y = x.detach().cpu(), y.detach().cpu()  # the rule: data lives on the CPU, chunks go to the model
    data_sha256 = data_fingerprint(x, y)
    num_classes = _validate(x, y, num_classes, cfg, final_linear(model)[1].out_features)
    x, y = x.float(), y.long()
    device = next(model.parameters()).device
    # Everything below runs on the guard's own frozen float32 copy: the user's model is never
    # switched to eval mode, hooked or given gradients by the fit.
    net = frozen_copy(model)
    n_dropped = 0
    if cfg.drop_misclassified:
        # A triggered sample that slipped into the "clean" set keeps its true label, and a backdoored
        # model predicts the target for it: dropping what the model gets wrong removes it.
        keep = _predict(net, x, device, cfg.batch_rows or 4096) == y
        n_dropped = int((~keep).sum())
        x, y = x[keep], y[keep]
        try:
            _validate(x, y, num_classes, cfg, num_classes)
        except ValueError as e:
            raise ValueError(f"after drop_misclassified removed {n_dropped} samples the model "
                             f"misclassifies: {e}") from None
    if layers is None:
        layers = [INPUT] + [n for n in auto_layers(net, x[:1].to(device), cfg.hidden_layers)
                            if n != INPUT]
    layers = check_layers(net, layers)
    if cfg.image_margins and (INPUT not in layers or not is_image(x.shape[1:])):
        raise ValueError(f"GuardConfig.image_margins=True blanks bands of an image's pixels: it needs "
                         f"image inputs [C, H, W] (got {list(x.shape[1:])}) and {INPUT!r} among the "
                         f"masked layers (got {list(layers)})")
    tapped = TappedModel(net, layers, private=True)
    calib_idx, fit_idx = stratified_split(y, cfg.calibration_fraction, seed=cfg.seed)
    x_fit, y_fit = x[fit_idx], y[fit_idx]
    stage_s = {}  # seconds per stage, so Table V's offline time can be attributed
    t_stage = time.perf_counter()
    if cfg.neighbour_mode == "perturb":  # the paper's Table VIII baseline
        x_nb, y_nb = perturbed_samples(x_fit, y_fit, cfg.neighbours, cfg.neighbour_noise, cfg.seed)
    else:
        x_nb, y_nb = generate_neighbours(
            net, x_fit, y_fit, cfg.neighbours, cfg.neighbour_noise, cfg.neighbour_lambda,
            cfg.neighbour_step, cfg.neighbour_iters, batch_size=cfg.batch_rows or 4096, seed=cfg.seed,
            progress=progress)
    x_aug, y_aug = torch.cat([x_fit, x_nb]), torch.cat([y_fit, y_nb])
    stage_s["neighbours"], t_stage = time.perf_counter() - t_stage, time.perf_counter()
    stats = _layer_statistics(tapped, x_aug, y_aug, len(x_fit), blank_input(x), num_classes, cfg,
                              device)
    stage_s["statistics"], t_stage = time.perf_counter() - t_stage, time.perf_counter()

    scores = {k: s["score"] for k, s in stats.items()}
    fills = {k: s["fill"] for k, s in stats.items()}
    ones = {k: torch.ones_like(v) for k, v in scores.items()}
    cfg = neighbour_for_inputs(cfg, x.shape[1:])  # once the model has taken these inputs
    check_median_inputs(cfg, x.shape[1:])
    guard = cls(model, layers, tapped.late_name, ones, fills, torch.full((num_classes,), 0.5), {},
                cfg, x.shape[1:], tapped=tapped, input_range=(x.min().item(), x.max().item()))

    # Set sizes (Alg. 2 line 6), judged on the fit split (originals only unless configured).
    x_s, y_s = (x_aug, y_aug) if cfg.search_on_neighbours else (x_fit, y_fit)
    sub = _per_class_subset(y_s, cfg.search_per_class, cfg.seed)
    x_s, y_s = x_s[sub], y_s[sub].to(device)
    half = torch.full((num_classes,), 0.5, device=device)
    margins = None
    if cfg.image_margins:
        margins, keep = _unused_margins(guard, x_s, y_s, half, cfg)
        scores[INPUT] = scores[INPUT] * keep

    def masks_for(fractions):
        # a layer switched off (use_early / use_late False) keeps every neuron, dormant ones included
        used = {k: cfg.use_late if k == LATE else cfg.use_early for k in scores}
        return {k: salient.top_fraction_masks(scores[k], fractions.get(k, torch.ones(num_classes)),
                                              cfg.min_importance) if used[k] else torch.ones_like(scores[k])
                for k in scores}

    cache = {}

    def evaluate(fractions):
        # the late stage only changes late masks, applied after the forward: reuse its features
        masks = masks_for(fractions)
        key = tuple(tuple(fractions.get(k, torch.ones(1)).tolist()) for k in layers)
        if key not in cache:
            cache.clear()
            cache[key] = guard.head_features(x_s, masks)
        conf = guard.head_confidences(None, masks, half, features=cache[key])[0]
        return search.head_rates(conf, y_s, cfg.reliability_measure)

    stages = []
    if cfg.use_early:
        stages.append(("masked layers", list(layers)))
    if cfg.use_late:
        stages.append(("late", [LATE]))
    chosen, table = search.search_sets(evaluate, stages, cfg.fractions, cfg.tolerance_in,
                                       cfg.tolerance_out, num_classes, progress)
    guard.masks = masks_for(chosen)
    stage_s["set_search"], t_stage = time.perf_counter() - t_stage, time.perf_counter()

    # Credibility criteria on the calibration split, which the search never saw, and (by default)
    # the fit split where a criterion can be taken without bias: confidences, out-of-fold deviations.
    x_cal, y_cal = x[calib_idx], y[calib_idx]
    own = None
    if cfg.consistency:
        own = _own_units(guard, x_fit, y_fit)
        guard.profile = _consistency_profile(guard, stats, *own, num_classes)
    calibration = _calibrate(guard, x_fit, y_fit, x_cal, y_cal, num_classes, cfg, own)
    stage_s["profile_and_calibration"] = time.perf_counter() - t_stage
    guard.diagnostics = {
        "fit_s": time.perf_counter() - t0, "stage_s": stage_s, "layers": list(layers), "mask_search": table,
        "chosen_fractions": {k: v.tolist() for k, v in chosen.items()},
        "kept": {k: m.mean(1).tolist() for k, m in guard.masks.items()},
        "n_fit": len(x_fit), "n_neighbours": len(x_nb), "n_calibration": len(calib_idx),
        "n_dropped_misclassified": n_dropped, **calibration,
        **({"image_margins": margins} if margins is not None else {}),
    }
    guard.data_sha256 = data_sha256
    return guard


CALIBRATION_FIELDS = frozenset({"mad_k", "out_quantile", "threshold_floor", "threshold_split", "consistency_mad_k",
                                "consistency_center", "consistency_bound", "consistency_margin", "consistency_quantile",
                                "consistency_split", "consistency_peak",
                                "consistency_reduce", "inconsistent_verdict", "ood_hint", "alarm_margin", "stability_noise", "stability_draws",
                                "stability_contrast", "stability_jitter", "stability_median", "stability_median_gate", "stability_bound", "stability_floor",
                                "stability_quantile", "stability_gate", "neighbourhood_quantile",
                                "neighbourhood_gate", "neighbourhood_alarm"})
"""The settings of the last stage alone: a fitted guard takes new values of these by
:func:`recalibrate_guard`, without the neighbours, statistics and set search of a refit."""


def data_fingerprint(x: torch.Tensor, y: torch.Tensor) -> str:
    """SHA-256 of a validation set (shapes and float32/int64 bytes): recalibration must see the
    very samples the guard was fitted on, or its fit/calibration split would not be the fit's."""
    h = hashlib.sha256()
    for t in (x.detach().float().cpu().contiguous(), y.detach().long().cpu().contiguous()):
        h.update(str(tuple(t.shape)).encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _calibrate(guard, x_fit, y_fit, x_cal, y_cal, num_classes, cfg, own=None) -> dict:
    """Alg. 3's credibility criteria, set on ``guard`` in place: the confidence thresholds from the
    calibration split or the whole validation set (``cfg.threshold_split``), and (with a
    consistency profile) each class's typical deviation on the fit split, then the per-layer or
    reduced consistency bounds from the calibration split (``cfg.consistency_split="all"``: with the
    fit split's out-of-fold deviations too), and the
    stability test's noise pattern and bound (``cfg.stability_test``). Returns the
    calibration split's confidences and deviations, so other bounds can be studied without a refit.
    ``own``: :func:`_own_units` of the fit split, when the caller has them already."""
    device = guard.device
    half = torch.full((num_classes,), 0.5, device=device)
    conf = guard.head_confidences(x_cal, thresholds=half)[0].cpu()
    conf_fit = None
    if cfg.threshold_split == "all" or cfg.consistency_split == "all":
        conf_fit = guard.head_confidences(x_fit, thresholds=half)[0].cpu()
    conf_th, y_th = conf, y_cal
    if cfg.threshold_split == "all":
        conf_th = torch.cat([conf, conf_fit])
        y_th = torch.cat([y_cal.cpu(), y_fit.cpu()])
    guard.thresholds = calibrate.confidence_thresholds(
        conf_th, y_th, cfg.mad_k, cfg.out_quantile, cfg.threshold_floor).to(device)
    dev = by_layer = layer_bounds = pool = y_pool = confident = None
    if cfg.consistency and guard.profile:
        profile = {k: v for k, v in guard.profile.items() if k not in ("norms", "bounds")}
        guard.profile = profile
        own = own or _own_units(guard, x_fit, y_fit)
        profile["norms"] = _typical_deviations(guard, *own, num_classes)
        by_layer = guard.deviations(x_cal, by_layer=True).cpu()  # [n_cal, K, L]
        pool, y_pool, conf_pool = by_layer, y_cal.cpu(), conf
        if cfg.consistency_split == "all":  # the fit split joins, each sample out of its fold
            readings = guard.readings()
            oof, used = salient.out_of_fold_deviations(
                {k: own[0][k] for k, _ in readings}, own[1], {k: profile[f"weight.{k}"] for k, _ in readings},
                num_classes, seed=cfg.seed, readings=readings)
            y_oof = y_fit.cpu()[used]
            pool = torch.cat([by_layer, calibrate.own_class_pool(oof[used], y_oof, num_classes)])
            y_pool = torch.cat([y_pool, y_oof])
            conf_pool = torch.cat([conf, conf_fit[used]])
        # the samples a veto could turn away: their own head is confident (the quantile floor's pool)
        confident = conf_pool[torch.arange(len(y_pool)), y_pool] >= guard.thresholds.cpu()[y_pool]
        floor = {"quantile": cfg.consistency_quantile, "keep": confident}
        if cfg.consistency_reduce == "per_layer":
            # every layer against its own bound, folded into its norm: the max over layers is then
            # judged against 1
            layer_bounds = calibrate.layer_bounds(pool, y_pool, cfg.consistency_mad_k,
                                                  center=cfg.consistency_center,
                                                  rule=cfg.consistency_bound,
                                                  margin=cfg.consistency_margin, **floor)  # [K, L]
            profile["norms"] = profile["norms"] * layer_bounds.to(device)
            profile["bounds"] = torch.ones(num_classes, device=device)
            dev = (by_layer / layer_bounds).amax(-1)
        else:
            dev = salient.reduce_layers(by_layer, cfg.consistency_reduce)
            profile["bounds"] = calibrate.consistency_bounds(
                salient.reduce_layers(pool, cfg.consistency_reduce), y_pool, cfg.consistency_mad_k,
                center=cfg.consistency_center, rule=cfg.consistency_bound,
                margin=cfg.consistency_margin, **floor).to(device)
    drops = median_drops = None
    guard.stability = None
    if cfg.stability_test:
        guard.stability = {"noise": stability_pattern(guard.input_shape, cfg, guard.input_range).to(device)}
        if cfg.stability_jitter > 0:
            guard.stability["jitter"] = jitter_grids(guard.input_shape, cfg).to(device)
        if cfg.stability_contrast > 0:  # the reference contrast, from the whole validation set
            guard.stability["contrast"] = torch.quantile(
                input_contrast(torch.cat([x_fit, x_cal]).float()), cfg.stability_contrast).to(device)
        conf_n = guard.head_confidences(guard.neighbour(x_cal), thresholds=half)[0].cpu()
        conf_n = conf_n.reshape(cfg.stability_draws, len(x_cal), -1)  # [M, n_cal, K], pattern-major

        def bound_of(conf_near):  # the same rule for every neighbour
            return calibrate.stability_bound(
                conf, conf_near, y_cal, guard.thresholds.cpu(),
                None if cfg.stability_bound == "quantile" else cfg.consistency_mad_k,
                cfg.consistency_margin if cfg.stability_bound == "tail" else None, cfg.stability_floor,
                cfg.stability_quantile).to(device)
        guard.stability["bound"] = bound_of(conf_n)
        drops = stability_falls(conf, conf_n).float()  # [n_cal, K]
        if cfg.stability_median:  # the filtered neighbour: its own bound, by the same rule
            check_median_inputs(cfg, guard.input_shape)
            step = guard._batch_rows()  # the filter's windows: size^2 copies of a chunk at a time
            conf_m = torch.cat([guard.head_confidences(median_filter(x_cal[i:i + step].to(device),
                                                                     cfg.stability_median),
                                                       thresholds=half)[0].cpu()
                                for i in range(0, len(x_cal), step)])
            guard.stability["median_bound"] = bound_of(conf_m)
            median_drops = stability_falls(conf, conf_m).float()
        if cfg.stability_gate is not None and pool is not None:
            guard.stability["gate"] = ratio_gate(pool, y_pool, confident, layer_bounds,
                                                 profile["bounds"].cpu(), cfg, cfg.stability_gate).to(device)
        if cfg.stability_median and cfg.stability_median_gate is not None and pool is not None:
            guard.stability["median_gate"] = ratio_gate(pool, y_pool, confident, layer_bounds, profile["bounds"].cpu(),
                                                        cfg, cfg.stability_median_gate).to(device)
    guard.neighbourhood = near = None
    if cfg.neighbourhood_quantile is not None and pool is not None:  # its gate reads the consistency ratio
        guard.neighbourhood, near = neighbourhood_state(guard, torch.cat([x_fit, x_cal]),
                                                        torch.cat([y_fit, y_cal]), cfg)
        if cfg.neighbourhood_gate is not None:
            guard.neighbourhood["gate"] = ratio_gate(pool, y_pool, confident, layer_bounds,
                                                     profile["bounds"].cpu(), cfg, cfg.neighbourhood_gate).to(device)
    return {"calibration_conf": conf, "calibration_labels": y_cal, "calibration_deviations": dev,
            "calibration_deviations_by_layer": by_layer, "layer_bounds": layer_bounds,
            # the samples the consistency bounds were set on ([n, K, L]: only own-class entries
            # count), their labels and which of them the quantile floor pooled
            "bound_deviations": pool, "bound_labels": y_pool, "bound_confident": confident,
            "calibration_stability_drops": drops, "calibration_median_drops": median_drops,
            # the whole validation set's own-head neighbourhood scores (fit split first), each
            # sample left out of the references, and whether its own head was confident
            "neighbourhood_scores": None if near is None else near[0],
            "neighbourhood_confident": None if near is None else near[1]}


def ratio_gate(pool, y_pool, confident, layer_bounds, bounds, cfg, quantile: float) -> torch.Tensor:
    """0-d: the ``quantile`` of the consistency ratios (each sample's own head) of the samples the
    bounds were set on whose own head is confident and consistent; 0 (every head judged) when there
    are none. The stability and neighbourhood tests' gates."""
    i = torch.arange(len(y_pool))
    if layer_bounds is not None:  # per_layer: each evidence against its own bound
        own = (pool[i, y_pool] / layer_bounds[y_pool]).amax(-1)
    else:
        own = salient.reduce_layers(pool, cfg.consistency_reduce)[i, y_pool] / bounds[y_pool]
    own = own[confident & (own <= 1)]
    return torch.quantile(own.float(), quantile) if len(own) else torch.tensor(0.0)


def neighbourhood_state(guard, x, y, cfg):
    """The neighbourhood rank test's state: every validation sample ``x`` at
    :meth:`~LinkBreaker.neighbourhood_evidence` in each distinct view of the heads (one per row of
    masks, :func:`~linkbreaker_ext.layers.head_rows`; L2-normalised, ``[V, R, D]``), their labels and the
    bound, the ``cfg.neighbourhood_quantile`` of the samples' own-head scores whose own head is
    confident, each sample left out of the references it is scored against (in-sample, every sample
    would find itself at distance 0). At least log 2: a rank of 1 is never evidence. Also returns
    ``(scores, confident)`` of the samples."""
    name = guard.neighbourhood_evidence()
    first, row = guard._hidden_masks()[1]  # heads that share a row of masks share a view
    y = y.to(guard.device)
    conf, _, _, units_ = guard.head_confidences(x, with_units=True)
    views = units_[name][:, first]  # [R, V, D]
    refs = nn.functional.normalize(views.float(), dim=-1).transpose(0, 1).contiguous()  # [V, R, D]
    i = torch.arange(len(y), device=guard.device)
    step = max(1, guard._batch_rows() // guard.num_heads)
    own = []
    for s in range(0, len(y), step):  # [V, step, R] distances at a time
        rows = slice(s, s + step)
        own.append(neighbourhood_scores(views[rows], refs, y, row, i[rows]).gather(1, y[rows, None])[:, 0])
    own = torch.cat(own)
    confident = conf[i, y] >= guard.thresholds[y]
    pool = own[confident] if confident.any() else own
    bound = torch.quantile(pool, cfg.neighbourhood_quantile).clamp_min(math.log(2))
    return {"references": refs, "labels": y, "bound": bound}, (own.cpu(), confident.cpu())


def stability_pattern(shape, cfg, value_range=None) -> torch.Tensor:
    """The stability test's fixed noise pattern (``[*shape]``), or ``cfg.stability_draws`` of them
    (``[M, *shape]``, the first the same as the one): Gaussian, std ``cfg.stability_noise`` times
    the validation set's value range, drawn from ``cfg.seed`` (the same guard settings give the same
    patterns, so verdicts are deterministic and a recalibration equals a refit)."""
    span = 1.0 if value_range is None else max(value_range[1] - value_range[0], 1e-6)
    g = torch.Generator().manual_seed(1_000_003 + cfg.seed)
    m = cfg.stability_draws
    return torch.randn((m, *shape) if m > 1 else tuple(shape), generator=g) * (cfg.stability_noise * span)


def jitter_grids(shape, cfg) -> torch.Tensor:
    """The stability test's fixed displacement fields as ``grid_sample`` grids, ``[M, H, W, 2]``
    (M = ``cfg.stability_draws``): every pixel moved by a uniform random amount of up to
    ``cfg.stability_jitter`` pixels per axis, drawn from ``cfg.seed`` (deterministic, like the noise
    patterns). Image inputs ``[C, H, W]`` only."""
    if not is_image(shape):
        raise ValueError(f"stability_jitter={cfg.stability_jitter} resamples images [C, H, W] with H, W "
                         f">= 2; these inputs are {list(shape)}: set stability_jitter=0")
    _, h, w = shape
    g = torch.Generator().manual_seed(2_000_003 + cfg.seed)
    gy, gx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    pixel = torch.tensor([2 / (w - 1), 2 / (h - 1)])  # one pixel in grid units (align_corners=True)
    shift = (torch.rand(cfg.stability_draws, h, w, 2, generator=g) * 2 - 1) * cfg.stability_jitter * pixel
    return (torch.stack([gx, gy], -1) + shift).clamp(-1, 1)


def recalibrate_guard(guard, x_val, y_val=None, **overrides):
    """A copy of a fitted ``guard`` with new :data:`CALIBRATION_FIELDS` settings, recalibrated on the
    validation set it was fitted on (the same fit/calibration split is drawn again from its seed).
    Its masks, fills and neuron profile are the guard's, so it equals a refit with these settings
    at a fraction of the cost (no neighbours, statistics or set search)."""

    _check_fields(GuardConfig, overrides)
    refit = sorted(k for k in set(overrides) - CALIBRATION_FIELDS
                   if overrides[k] != getattr(guard.config, k))
    if refit:
        raise ValueError(f"{refit} change the salient sets or the neuron profile: they need a refit "
                         f"(LinkBreaker.fit); recalibration takes only {sorted(CALIBRATION_FIELDS)}")
    cfg = dataclasses.replace(guard.config, **overrides)
    x, y = as_tensors(x_val, y_val)
    x, y = x.detach().cpu(), y.detach().cpu()
    num_classes = _validate(x, y, guard.num_heads, cfg, guard.num_heads)
    recorded = guard.data_sha256
    if recorded is not None and recorded != data_fingerprint(x, y):
        raise ValueError("x_val/y_val are not the validation set this guard was fitted on (their "
                         "fingerprint differs): recalibration redraws the fit's own split")
    x, y = x.float(), y.long()
    if cfg.drop_misclassified:
        keep = _predict(guard.tapped.net, x, guard.device, guard._batch_rows()) == y
        x, y = x[keep], y[keep]
    calib_idx, fit_idx = stratified_split(y, cfg.calibration_fraction, seed=cfg.seed)
    # a copy of the fitted state; _calibrate replaces the thresholds, norms and bounds
    new = type(guard)(guard.model, guard.layers, guard.late_layer, guard.masks, guard.fills,
                      guard.thresholds, guard.profile, cfg, guard.input_shape, tapped=guard.tapped,
                      input_range=guard.input_range)
    calibration = _calibrate(new, x[fit_idx], y[fit_idx], x[calib_idx], y[calib_idx], num_classes, cfg)
    new.diagnostics = {**guard.diagnostics, **calibration, "recalibrated": sorted(overrides)}
    new.data_sha256 = recorded
    return new


def _layer_statistics(tapped, x_aug, y_aug, n_clean, blank, num_classes, cfg, device):
    """Per layer (masked layers and the late layer): importance ``[K, D_unit]`` with dormant neurons
    at 0, the dormant flags and the element-level fill."""
    rows = cfg.batch_rows or (256 if device.type == "cpu" else 8192)
    unit_parts, clean_elems = {}, {}
    for start in range(0, len(x_aug), rows):
        acts = tapped.activations(x_aug[start:start + rows].to(device))
        for k, a in acts.items():
            unit_parts.setdefault(k, []).append(units(a, k))
            n_here = max(0, min(len(a), n_clean - start))
            if n_here:  # element activations are kept for the real clean samples only (the fill)
                clean_elems.setdefault(k, []).append(a[:n_here].flatten(1))
    blank_acts = tapped.activations(blank.to(device))
    y_aug = y_aug.to(device)
    g = torch.Generator().manual_seed(cfg.seed)
    out = {}
    for k, parts in unit_parts.items():
        u = torch.cat(parts)
        mu, sd, mean = salient.class_statistics(u, y_aug, num_classes)
        score = salient.importance(mu, sd, mean)
        # Dormancy is judged on the real clean samples only: the neighbours' noise touches every
        # pixel, including the ones a trigger uses.
        clean_u = u[:n_clean]
        dormant = salient.dormant(clean_u, clean_u.median(0).values, cfg.min_active)
        score = score * ~dormant
        elems = torch.cat(clean_elems[k])
        typical = elems.median(0).values
        fill = mean.new_zeros(0)
        if cfg.fill == "mean":
            fill = elems.mean(0)
        else:
            fill = blank_acts[k].flatten().float()
        # A dormant neuron is filled with the value clean data gives it, so masking it changes
        # nothing for clean inputs and erases whatever a trigger does to it.
        dormant_elems = _unit_to_elements(dormant, blank_acts[k].shape, k)
        fill = torch.where(dormant_elems, typical, fill)
        noise = torch.randn(fill.shape, generator=g).to(device) * elems.std(0).mean()
        out[k] = {"score": score, "fill": fill + cfg.noise_amplitude * noise,
                  "dormant": dormant}
    return out


def _unit_to_elements(unit_flags, shape, layer):
    """A per-unit flag ``[D_unit]`` spread to the layer's elements (a channel covers its map)."""
    if layer not in (INPUT, LATE) and len(shape) == 4:
        return unit_flags[:, None].expand(-1, shape[2] * shape[3]).reshape(-1)
    return unit_flags


def _unused_margins(guard, x_s, y_s, half, cfg):
    """``({side: width}, keep [C*H*W])``: :func:`search.search_margins` on the set search's samples,
    every head seeing the whole network but the bands, which take the input layer's fill; ``keep``
    flags the input's neurons (every channel of a pixel alike) on the guard's device."""
    c, h, w = guard.input_shape

    def flat(keep):  # [H, W] -> [1, C*H*W], the input layer's neuron order
        return keep.to(guard.device).expand(c, -1, -1).reshape(1, -1)

    def evaluate(keep):
        conf = guard.head_confidences(x_s, {INPUT: flat(keep).expand(guard.num_heads, -1)}, half)[0]
        return search.head_rates(conf, y_s, cfg.reliability_measure)

    widths, keep = search.search_margins(evaluate, (h, w), cfg.tolerance_in, cfg.tolerance_out)
    return widths, flat(keep)


def _own_units(guard, x_fit, y_fit):
    """Each fit sample's neuron values as its own class's head sees them: ``({evidence: [n, D]}, y)``."""
    y = y_fit.to(guard.device)
    _, _, _, heads = guard.head_confidences(x_fit, with_units=True)
    rows = torch.arange(len(y), device=guard.device)
    return {layer: u[rows, y] for layer, u in heads.items()}, y


def _consistency_profile(guard, stats, own, y, num_classes):
    """Per layer, class k's robust profile of the neuron values head k sees on class k's clean fit
    samples (``own``, from :func:`_own_units`): center, scale and the salient, live neurons it
    weighs."""
    profile = {}
    for name in guard._profile_layers(available=own):  # a layer, or one view of it ("<layer>@<view>")
        layer = evidence_layer(name)[0]
        s = stats[layer]
        center, scale = salient.robust_class_profile(own[name], y, num_classes)
        weight = guard.masks[layer] * (~s["dormant"]).float()
        empty = weight.sum(1) == 0  # a class with no salient neuron here is judged on all live ones
        weight[empty] = (~s["dormant"]).float()
        profile.update({f"center.{name}": center, f"scale.{name}": scale, f"weight.{name}": weight})
    return profile


def _typical_deviations(guard, own, y, num_classes):
    """``[K, L]``: class k's median deviation from its own profile on the fit split, per reading of
    an evidence (:meth:`LinkBreaker.readings`), so that the layers' deviations are comparable."""
    norms = []
    for name, how in guard.readings():
        d = salient.deviation(own[name], guard.profile[f"center.{name}"], guard.profile[f"scale.{name}"],
                              guard.profile[f"weight.{name}"], how)
        norms.append(salient.class_medians(d[torch.arange(len(y)), y], y, num_classes))
    return torch.stack(norms, 1)
