"""The credibility criteria of Alg. 3, one per class, from the MAD of clean calibration samples that
the salient-set search never saw (sets chosen on the same samples could look optimistic), except
the confidence thresholds, which by default use the whole validation set (per class, the
calibration split is too few samples for a MAD, and the fit split's confidences measured no higher:
``GuardConfig.threshold_split``), and the consistency bounds, which by default also use the fit
split's deviations, taken out of fold (in-sample they are too small; the tail rule reaches further
with more samples: ``GuardConfig.consistency_split``).

* a **confidence threshold** (the paper's): a lower bound on head k's confidence in class k;
* a **consistency bound** (ours, after Beatrix's robust deviations and TED's layer-wise view): an
  upper bound on how far an input's salient neurons sit from class k's clean profile.
"""
from __future__ import annotations

import torch

from .verdict import stability_falls

MAD_SCALE = 1.4826  # MAD -> standard deviation for a normal distribution


def confidence_thresholds(conf: torch.Tensor, y: torch.Tensor, mad_k: float, out_quantile,
                          floor: float, pooled_spread: bool = False) -> torch.Tensor:
    """``[K]``: ``median - mad_k * 1.4826 * MAD`` of class k's own-head confidences **in log-odds**
    (near 1 the probability-scale MAD is ~0), raised to the ``out_quantile`` of other classes'
    confidences in head k unless that refuses more than ``1 - out_quantile`` of class k; at least
    ``floor``. ``pooled_spread``: the MAD around each class's own median is taken over all classes'
    samples together (as :func:`consistency_bounds` can): a class whose few calibration samples
    happen to agree does not get a threshold that refuses its next sample."""
    n = conf.shape[1]
    logit = torch.logit(conf.clamp(1e-7, 1 - 1e-7).double())
    th = torch.full((n,), float(floor), dtype=torch.float64)
    own = logit[torch.arange(len(y)), y]
    meds = {k: own[y == k].median() for k in range(n) if (y == k).any()}
    pooled = (own - torch.stack([meds[int(c)] for c in y])).abs().median() if pooled_spread and meds else None
    for k in range(n):
        s = logit[y == k, k]
        if not len(s):
            continue
        med = meds[k]
        mad = pooled if pooled is not None else (s - med).abs().median()
        bound = torch.sigmoid(med - mad_k * MAD_SCALE * mad)
        if out_quantile is not None:
            other = logit[y != k, k]
            if len(other):
                raised = torch.quantile(other, out_quantile)
                cap = torch.quantile(s, 1 - out_quantile)
                bound = torch.maximum(bound, torch.sigmoid(torch.minimum(raised, cap)))
        th[k] = bound
    return th.clamp_min(floor).float()


CENTERS = ("class", "pooled", "shrunk")
SHRINK_PRIOR = 10  # "shrunk": the pooled median counts as this many samples of every class


RULES = ("mad", "max", "tail")


def consistency_bounds(dev: torch.Tensor, y: torch.Tensor, mad_k: float,
                       pooled_spread: bool = False, center: str = "class", rule: str = "mad",
                       margin: float = 0.75, quantile: float | None = None,
                       keep: torch.Tensor | None = None) -> torch.Tensor:
    """``[K]``: ``median + mad_k * 1.4826 * MAD`` of class k's own deviations, in log space (the
    deviations are ratios, skewed to the right). Inputs of class k above it are inconsistent.
    ``pooled_spread``: the MAD around each class's own median is taken over all classes' samples
    together (a layer's spread is estimated from ~K times more samples: steadier when every layer
    gets its own bound from a few calibration samples per class). ``center``: each class's own
    median (``"class"``), the median over all classes (``"pooled"``: the deviations are already
    relative to each class's typical one), or the class's median shrunk towards the pooled one as if
    the pooled median were :data:`SHRINK_PRIOR` more samples (``"shrunk"``: a class with 3
    calibration samples leans on the others, one with 100 on itself). ``rule="max"``: instead, every
    class's bound is the largest deviation of any calibration sample at its own class (the
    deviations are relative to each class's typical one, so they pool): an empirical bound that fits
    each layer's own tail where a common k does not (``mad_k``, ``center`` and ``pooled_spread``
    are then unused; one triggered sample in the calibration split raises it). ``rule="tail"``:
    the lower of the ``"mad"`` bound and the largest calibration deviation plus ``margin`` MADs (in
    log space, the MAD as for ``"mad"``): where the clean tail ends well inside ``mad_k`` MADs the
    bound sits just past it, where the tail is long it stays at ``mad_k`` MADs. ``quantile``: every
    bound is then raised, where lower, to that quantile of the own-class deviations of the samples
    ``keep`` marks (all when None; the fit passes those whose own head is confident), pooled over
    classes: whatever a layer's tail looks like, it refuses at most about ``1 - quantile`` of
    them."""
    if center not in CENTERS:
        raise ValueError(f"center must be one of {CENTERS}, got {center!r}")
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    if not margin >= 0:
        raise ValueError(f"margin must be a number >= 0, got {margin!r}")
    if quantile is not None and not 0 < quantile <= 1:
        raise ValueError(f"quantile must lie in (0, 1] or be None, got {quantile!r}")
    if keep is not None and keep.shape != y.shape:
        raise ValueError(f"keep must flag each of the {len(y)} samples, got shape {list(keep.shape)}")
    bounds = _rule_bounds(dev, y, mad_k, pooled_spread, center, rule, margin)
    if quantile is None:
        return bounds
    own = dev[torch.arange(len(y)), y]
    pool = own if keep is None else own[keep.to(own.device)]
    if not len(pool):
        return bounds
    floor = torch.quantile(pool.double(), quantile).float()
    return torch.where(torch.isfinite(bounds), bounds.clamp_min(floor), bounds)


def _rule_bounds(dev, y, mad_k, pooled_spread, center, rule, margin) -> torch.Tensor:
    """:func:`consistency_bounds` without the quantile floor."""
    n = dev.shape[1]
    logd = dev.clamp_min(1e-12).double().log()
    bounds = torch.full((n,), float("inf"), dtype=torch.float64)
    own = logd[torch.arange(len(y)), y]
    if rule == "max":
        present = torch.bincount(y, minlength=n) > 0
        bounds[present] = own.max().exp() if len(own) else float("inf")
        return bounds.float()
    med = torch.zeros(n, dtype=torch.float64)
    mad = torch.zeros(n, dtype=torch.float64)
    present = torch.zeros(n, dtype=torch.bool)
    for k in range(n):
        s = own[y == k]
        if len(s):
            present[k] = True
            med[k] = s.median()
            mad[k] = (s - med[k]).abs().median()
    if center != "class" and present.any():
        pooled = own.median()
        if center == "pooled":
            med[:] = pooled
        else:
            counts = torch.bincount(y, minlength=n).double()
            med = (counts * med + SHRINK_PRIOR * pooled) / (counts + SHRINK_PRIOR)
    if pooled_spread and present.any():
        mad[:] = (own - med[y]).abs().median()
    log_bound = med + mad_k * MAD_SCALE * mad
    if rule == "tail" and len(own):
        log_bound = torch.minimum(log_bound, own.max() + margin * MAD_SCALE * mad)
    bounds[present] = log_bound[present].exp()
    return bounds.float()


def own_class_pool(d: torch.Tensor, y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``[n, L]`` own-class deviations as the ``[n, K, L]`` the bound rules take: they read only
    each sample's own class, so the other entries are placeholders (1)."""
    out = torch.ones(len(y), num_classes, d.shape[-1], dtype=d.dtype)
    out[torch.arange(len(y)), y] = d
    return out


def layer_bounds(dev: torch.Tensor, y: torch.Tensor, mad_k: float, pooled_spread: bool = True,
                 center: str = "class", rule: str = "mad", margin: float = 0.75,
                 quantile: float | None = None, keep: torch.Tensor | None = None) -> torch.Tensor:
    """``[K, L]``: :func:`consistency_bounds` of every layer's deviations ``dev`` ``[n, K, L]`` on its
    own (the ``per_layer`` consistency check: a trigger may move one layer far and the others not at
    all)."""
    return torch.stack([consistency_bounds(dev[..., i], y, mad_k, pooled_spread, center, rule, margin,
                                           quantile, keep)
                        for i in range(dev.shape[-1])], 1)


STABILITY_FLOOR = 2.0  # log-odds (GuardConfig.stability_floor): a head may always lose a factor 7.4
#                       in odds; where most clean falls are near 0, as on MNIST, the MAD alone is ~0
NO_BOUND = 1e30  # a bound that turns no input away


def stability_bound(conf: torch.Tensor, conf_neighbour: torch.Tensor, y: torch.Tensor,
                    thresholds: torch.Tensor, mad_k: float | None, margin: float | None = None,
                    floor: float = STABILITY_FLOOR, quantile: float | None = None) -> torch.Tensor:
    """A 0-d bound on how far a head's own-class log-odds may fall from an input to its neighbour
    (the input plus the guard's fixed noise pattern; ``conf_neighbour`` ``[n, K]``, or ``[M, n, K]``
    for M patterns, whose mean fall counts): ``median + mad_k * 1.4826 * MAD`` (the paper's
    MAD rule, here on a difference, which may be negative), and with a ``margin`` at most ``max +
    margin * 1.4826 * MAD`` (the consistency bounds' ``"tail"`` rule), of the calibration samples whose own head passes its
    confidence threshold (the only inputs the test can turn away), pooled over classes (30 % of a
    2 % split is too few per class for a tail), at least the ``quantile`` of those falls (the MAD
    rule presumes a bell-shaped spread; on heavy-tailed falls it would refuse far more clean inputs
    than it means to) and at least ``floor``. ``mad_k=None`` drops the MAD rule: the bound is then
    the ``quantile`` alone (at least ``floor``), the rule for falls averaged over several
    neighbours, which are skewed (docs/method.md, "Several neighbours"). When no calibration sample
    is confident, :data:`NO_BOUND` (finite, so that it can be saved)."""
    i = torch.arange(len(y))
    own = conf[i, y]
    keep = own >= thresholds.to(own.device)[y]
    drop = stability_falls(own, conf_neighbour[..., i, y])[keep]  # [M, n] neighbours: their mean fall
    if not len(drop):
        return torch.tensor(NO_BOUND)
    if mad_k is None:
        if quantile is None:
            raise ValueError("stability_bound: the quantile rule (mad_k=None) needs a quantile")
        bound = torch.quantile(drop, quantile)
    else:
        med = drop.median()
        mad = MAD_SCALE * (drop - med).abs().median()
        bound = med + mad_k * mad
        if margin is not None:
            bound = torch.minimum(bound, drop.max() + margin * mad)
        if quantile is not None:
            bound = torch.maximum(bound, torch.quantile(drop, quantile))
    return bound.clamp_min(floor).float()
