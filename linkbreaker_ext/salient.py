"""Algorithm 2: per-class neuron importance, dormant neurons and salient-set masks.

Importance of neuron i for class k is ``|mu_ki - ref_i| / (sigma_ki + sigma_pooled_i)``: the paper's
mean over deviation, with the mean measured from the class-balanced clean mean ``ref``. The paper's
raw ``mu/sigma`` ranks neurons that are constant on clean data (a background pixel, a ReLU stuck at
its bias, a dormant backdoor unit) as infinitely important; measured from the reference they score
zero. Taking the absolute value keeps neurons that are consistently *lower* for class k than
elsewhere, which is what makes a head refuse other classes' inputs. Neurons that clean data (almost)
never moves are excluded outright (:func:`dormant`).
"""
from __future__ import annotations

import torch


def class_statistics(acts: torch.Tensor, labels: torch.Tensor, num_classes: int):
    """Per-class mean and standard deviation ``[K, D]`` and the class-balanced reference ``[D]``."""
    mu = torch.stack([acts[labels == k].mean(0) for k in range(num_classes)])
    sd = torch.stack([acts[labels == k].std(0, unbiased=False) for k in range(num_classes)])
    return mu, sd, mu.mean(0)


def importance(mu: torch.Tensor, sd: torch.Tensor, ref: torch.Tensor, rel_eps: float = 1e-3):
    """``[K, D]`` importance ``|mu_k - ref| / (sigma_k + sigma_pooled)``.

    The class's own deviation is the paper's "stability"; adding the pooled within-class deviation
    keeps a neuron that is constant for class k but rarely active elsewhere (a corner pixel that a
    few digits touch) from scoring ``x / 0``: such a neuron is weak evidence, and it is exactly where
    a trigger hides."""
    pooled = sd.mean(0, keepdim=True)
    eps = rel_eps * sd.mean().clamp_min(1e-12) + 1e-12
    score = (mu - ref).abs() / (sd + pooled + eps)
    # A neuron whose class mean equals the reference to float precision carries no evidence.
    tiny = (mu - ref).abs() <= 1e-6 * (ref.abs() + sd.mean())
    return score.masked_fill(tiny, 0.0)


def dormant(acts: torch.Tensor, typical: torch.Tensor, min_active: float = 0.01) -> torch.Tensor:
    """``[D]`` bool: neurons that leave their typical clean value (the median) on fewer than
    ``min_active`` of the clean samples ``acts`` ``[M, D]``, constant ones included. Fine-Pruning's
    observation, made per neuron: what clean data (almost) never uses is where a trigger or a backdoor
    unit lives, so it is never salient."""
    dev = (acts - typical).abs()
    tol = 1e-3 * dev.max().clamp_min(1e-12)
    return (dev > tol).float().mean(0) < min_active


def top_fraction_masks(scores: torch.Tensor, fractions: torch.Tensor, min_score: float = 0.0):
    """Binary masks ``[K, D]``: for class k the ``fractions[k]`` share of neurons with the highest
    score, never a neuron whose score is zero or below ``min_score``."""
    k, d = scores.shape
    counts = (fractions.to(scores.device).clamp(0, 1) * d).round().long().clamp(1, d)
    order = scores.argsort(dim=1, descending=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(d, device=scores.device).expand(k, d).contiguous())
    return ((rank < counts[:, None]) & (scores > 0) & (scores >= min_score)).float()


def robust_class_profile(acts: torch.Tensor, labels: torch.Tensor, num_classes: int,
                         floor: float = 0.1):
    """Per-class median ``[K, D]`` and robust scale ``1.4826 * MAD`` ``[K, D]`` of clean activations,
    the class-conditional statistics the consistency check scores against (Beatrix's robust
    statistics, per neuron). The scale is floored at ``floor`` times the layer's median scale, so a
    neuron that is constant within a class (a MAD of 0) does not turn a tiny wobble into an outlier."""
    center = torch.stack([acts[labels == k].median(0).values for k in range(num_classes)])
    mad = torch.stack([(acts[labels == k] - center[k]).abs().median(0).values
                       for k in range(num_classes)])
    scale = 1.4826 * mad
    positive = scale[scale > 0]
    ref = positive.median() if positive.numel() else scale.new_tensor(1.0)
    return center, scale.clamp_min(floor * ref + 1e-12)


def class_medians(d: torch.Tensor, y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``[K]``: each class's median of its samples' own-class deviations ``d`` ``[n]`` (at least
    1e-6): the typical deviation a layer's deviations are taken relative to."""
    return torch.stack([d[y == k].median() for k in range(num_classes)]).clamp_min(1e-6)


def deviation(u: torch.Tensor, center: torch.Tensor, scale: torch.Tensor, weights: torch.Tensor,
              how: str = "mean"):
    """``[B, K]`` mean robust z-score ``|u - center_k| / scale_k`` of each input over class k's
    neurons (``weights`` ``[K, D]``, the salient set): how far an input's evidence for class k is from
    what class k's clean inputs show in this layer. ``u`` is ``[B, D]`` (one view for every class) or
    ``[B, K, D]`` (head k's own view of the input for class k). ``how="peak"``: the largest z-score
    among the salient neurons instead of their weighted mean (a few neurons driven far)."""
    z = ((u[:, None, :] if u.dim() == 2 else u) - center[None]).abs() / scale[None]  # [B, K, D]
    if how == "peak":
        return z.masked_fill(weights[None] <= 0, 0.0).amax(-1)
    w = weights / weights.sum(1, keepdim=True).clamp_min(1e-12)
    return (z * w[None]).sum(-1)


def reduce_layers(dev: torch.Tensor, how: str) -> torch.Tensor:
    """``[..., L]`` per-layer deviations (each relative to its layer's norm) to one per head: the
    maximum (consistent in every layer; under ``per_layer`` calibration each norm already is that
    layer's bound) or, as an ablation, the mean."""
    return dev.mean(-1) if how == "mean" else dev.amax(-1)


def out_of_fold_deviations(own: dict, y: torch.Tensor, weights: dict, num_classes: int,
                           folds: int = 5, seed: int = 0, readings=None):
    """``([n, L] deviations, [n] used)``: each fit sample's :func:`deviation` from its own class's
    profile computed without it (``folds`` folds, drawn within each class), relative to that
    profile's typical own-class deviation (its median on the samples it was computed from), per
    evidence. ``own``: ``{evidence: [n, D]}``, each sample as its own class's head sees it;
    ``weights``: ``{evidence: [K, D]}``, the salient, live neurons. The fit split's in-sample
    deviations are smaller than new inputs' (the profile was computed on them); out of fold they are
    not, so the consistency bounds can be calibrated on them too. A sample whose class has no other
    fit sample has no out-of-fold profile and is not ``used``. ``readings``: ``[(evidence, how)]``,
    the columns (default: every evidence of ``own``, its mean deviation; see :func:`deviation`)."""
    y_cpu = y.cpu()
    n, g = len(y_cpu), torch.Generator().manual_seed(seed)
    fold = torch.full((n,), -1, dtype=torch.long)
    for k in range(num_classes):
        idx = (y_cpu == k).nonzero().flatten()
        if len(idx) >= 2:
            fold[idx[torch.randperm(len(idx), generator=g)]] = torch.arange(len(idx)) % min(folds, len(idx))
    readings = list(readings or [(k, "mean") for k in own])
    units_ = {k: own[k].cpu().float() for k, _ in readings}
    weights_ = {k: weights[k].cpu().float() for k, _ in readings}
    out = torch.ones(n, len(readings))
    for j in range(folds):
        test = fold == j
        if not test.any():
            continue
        train = ~test
        present = torch.bincount(y_cpu[train], minlength=num_classes) > 0
        remap = torch.cumsum(present.long(), 0) - 1  # class -> row among the present classes
        rows_tr, rows_te = remap[y_cpu[train]], remap[y_cpu[test]]
        for i, (name, how) in enumerate(readings):
            u, w = units_[name], weights_[name][present]
            center, scale = robust_class_profile(u[train], rows_tr, int(present.sum()))
            d_tr = deviation(u[train], center, scale, w, how)[torch.arange(len(rows_tr)), rows_tr]
            norm = class_medians(d_tr, rows_tr, len(center))
            d_te = deviation(u[test], center, scale, w, how)[torch.arange(len(rows_te)), rows_te]
            out[test, i] = d_te / norm[rows_te]
    return out, fold >= 0
