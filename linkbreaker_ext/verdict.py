"""Alg. 3's decision on the heads' outputs, shared by ``guard(x)`` (:mod:`linkbreaker_ext.guard`) and the
serving module (:mod:`linkbreaker_ext.serving`): the input contract, the one-label vote with the
consistency veto, the result type and its continuous trigger score."""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

ACCEPT, ALARM, OOD = 0, 1, 2


@dataclass
class GuardResult:
    labels: torch.Tensor       # int64 [B]; -1 for a trigger alarm
    verdict: torch.Tensor      # int64 [B]; 0 accept, 1 trigger alarm, 2 out-of-distribution
    confidences: torch.Tensor  # float32 [B, N]; T(x)_k
    thresholds: torch.Tensor   # float32 [N]
    consistency: torch.Tensor | None = None  # float32 [B, N]; deviation / bound (<= 1: consistent)
    stability: torch.Tensor | None = None    # float32 [B, N]; log-odds fall to the neighbour / bound
    stability_gate: torch.Tensor | None = None  # 0-d; the stability test judges only heads whose
    #                                             consistency ratio exceeds it (None: every head)
    neighbourhood: torch.Tensor | None = None  # float32 [B, N]; neighbourhood rank score / bound
    neighbourhood_gate: torch.Tensor | None = None  # 0-d; the rank test's gate, as stability_gate's
    filtered: torch.Tensor | None = None  # float32 [B, N]; log-odds fall to the median-filtered
    #                                       input / its bound (stability_median; None without it)
    filtered_gate: torch.Tensor | None = None  # 0-d; the filtered neighbour's own gate, as
    #                                            stability_gate's (stability_median_gate)

    @property
    def credibility(self) -> torch.Tensor | None:
        """``[B, N]``: the ratio the veto judges, the larger of the consistency ratio and the
        stability ratios (the jittered and the filtered neighbours', each where its gate lets it
        judge) (<= 1: credible if confident); None when the guard has neither."""
        return combined_ratio(self.consistency, gated(self.stability, self.consistency, self.stability_gate),
                              self.filtered_judged)

    @property
    def filtered_judged(self) -> torch.Tensor | None:
        """``[B, N]``: the filtered neighbour's ratios where its gate lets it judge (0 under it): the
        veto's and the OOD hint rule's; None without ``stability_median``."""
        return gated(self.filtered, self.consistency, self.filtered_gate)

    @property
    def rank_ratio(self) -> torch.Tensor | None:
        """``[B, N]``: the neighbourhood ratios the rank test judges (0 under its gate); None
        without the test. An accepted answer whose head's ratio exceeds 1 raises the alarm."""
        return gated(self.neighbourhood, self.consistency, self.neighbourhood_gate)


def gated(stability: torch.Tensor | None, consistency: torch.Tensor | None,
          gate: torch.Tensor | None) -> torch.Tensor | None:
    """The stability ratios the veto judges: 0 (stable) for a head whose consistency ratio is at or
    under ``gate``, whose evidence sits where most clean inputs' does. Noise makes some clean inputs'
    answers fall whatever their neurons (GTSRB's dark signs); the warp the test is there for also
    moves the neurons towards their bounds (docs/method.md, "Gating the stability test"). Unchanged
    without a gate or a consistency ratio."""
    if stability is None or consistency is None or gate is None:
        return stability
    return stability.masked_fill(consistency <= gate.to(consistency.device, consistency.dtype), 0.0)


def combined_ratio(*ratios):
    """The element-wise maximum of the ratios that are not None (None if all are)."""
    present = [r for r in ratios if r is not None]
    if not present:
        return None
    out = present[0]
    for r in present[1:]:
        out = torch.maximum(out, r)
    return out


def check_input(x, input_shape, device, value_range=None, finite: bool = True) -> None:
    """The guard's input contract: a floating ``[B, *input_shape]`` tensor on ``device``, without
    NaN/Inf (``finite``; a host sync on CUDA). Values far outside the validation set's ``value_range``
    (0-255 images given to a model fitted on 0-1 images) are almost surely a preprocessing mistake:
    warned about, since a guard cannot vouch for inputs unlike anything it was fitted on."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(x).__name__}")
    if tuple(x.shape[1:]) != tuple(input_shape):
        raise ValueError(f"input shape {tuple(x.shape)} does not match the fitted input shape "
                         f"[B, {', '.join(map(str, input_shape))}]")
    if not x.is_floating_point():
        raise TypeError(f"input must be a floating tensor, got {x.dtype}")
    if x.device != device:
        raise ValueError(f"input is on {x.device} but the guard and model are on {device}")
    if not finite or not x.numel():
        return
    # one pass and one host sync for both checks: NaN propagates into aminmax, Inf is an extreme
    x_min, x_max = (float(v) for v in torch.stack(torch.aminmax(x)).tolist())
    if not (math.isfinite(x_min) and math.isfinite(x_max)):
        raise ValueError("input contains NaN or Inf")
    if value_range is not None:
        lo, hi = value_range
        span = max(hi - lo, 1e-6)
        if x_min < lo - span or x_max > hi + span:
            warnings.warn(f"input values span [{x_min:.3g}, {x_max:.3g}] but the guard "
                          f"was fitted on values in [{lo:.3g}, {hi:.3g}]: check the preprocessing "
                          f"(e.g. 0-255 images given to a model of 0-1 images)", stacklevel=3)


def vote(conf: torch.Tensor, credible: torch.Tensor, consistent: torch.Tensor | None = None,
         confident: torch.Tensor | None = None, nearest: torch.Tensor | None = None):
    """Alg. 3's one-label rule on a credible set ``[B, N]``: (labels, verdict), the op's semantics
    (accept the one credible head, -1 for an alarm, the most confident head as the hint of an OOD
    verdict; NaN rows OOD). With ``consistent`` ``[B, N]`` the OOD hint is the most confident head
    among those consistent with their class, where there is one: a head whose confidence comes
    from evidence its class never shows is the last one to trust. Where there is none, the most
    confident head, or with ``nearest`` ``[B, N]`` (the veto ratios) the head nearest to
    consistency: a trigger's target head is confident and far from its bounds. With ``confident`` ``[B, N]`` (the
    confidence test alone), an input without a credible head but with a confident one is an alarm:
    confidence that its class's neurons do not support is the trigger's signature."""
    count = credible.sum(1)
    # masked_fill, not boolean indexing: no host sync, so the vote also runs in a captured CUDA graph
    verdict = torch.full_like(count, OOD).masked_fill(count == 1, ACCEPT).masked_fill(count >= 2, ALARM)
    if confident is not None:
        verdict = verdict.masked_fill((count == 0) & confident.any(1), ALARM)
    ranked = torch.nan_to_num(conf, nan=-1.0)
    if consistent is not None:
        some = consistent.any(1, keepdim=True)
        ranked = ranked + 2.0 * some * consistent  # conf lies in [0, 1]
        if nearest is not None:  # no consistent head: the smallest ratio ranks first (NaN last)
            ranked = torch.where(some, ranked, -torch.nan_to_num(nearest.float(), nan=float("inf")))
    best = ranked.argmax(1)
    labels = torch.where(verdict == ACCEPT, credible.long().argmax(1),
                         torch.where(verdict == ALARM, torch.full_like(best, -1), best))
    bad = ~torch.isfinite(conf).all(1)
    return labels.masked_fill(bad, -1), verdict.masked_fill(bad, OOD)


def decide(conf: torch.Tensor, thresholds: torch.Tensor, ratio: torch.Tensor | None = None,
           inconsistent_verdict: str = "alarm", ood_hint: str = "nearest", alarm_margin: float = 0.0,
           ranks: torch.Tensor | None = None, rank_alarm: bool = True,
           hint_filter: torch.Tensor | None = None):
    """``(labels, verdict)`` of Alg. 3 with the consistency veto: a head is credible when it passes
    its confidence threshold and, given its consistency ``ratio`` ``[B, N]``, is consistent
    (``ratio <= 1``); a confident but inconsistent head gets ``inconsistent_verdict``; ``ood_hint``
    (``"nearest"`` or ``"confident"``) picks the hint of an OOD verdict without a consistent head.
    With ``alarm_margin`` > 0 (log-odds) and the alarm verdict, an input with no consistent head at
    all also raises the alarm when some head comes within that margin of its threshold: a nearly
    sure answer that nothing in the network supports is the trigger's signature, and its hint would
    be that answer (docs/method.md, "A nearly confident head that nothing supports"). Without
    ``ratio``: the paper's confidence test alone. With ``ranks`` ``[B, N]`` (the neighbourhood
    rank test's judged ratios, :attr:`GuardResult.rank_ratio`), an accepted answer whose head's
    ratio exceeds 1 raises the alarm instead, and an OOD verdict's hint weighs them with the veto
    ratios (``rank_alarm=False``: only the hint); the test never changes which heads are credible
    (docs/method.md, "A faint trigger's neighbourhood"). With ``hint_filter`` ``[B, N]`` (the
    filtered neighbour's judged ratios, :attr:`GuardResult.filtered_judged`), an OOD verdict never names
    a head that fails it (ratio > 1) while another head passes: a head whose answer the median
    filter takes away rests on thin lines or dots, not on the object (docs/method.md, "A filtered
    neighbour"); verdicts are unchanged."""
    confident = conf >= thresholds
    if ratio is None:
        return alarm_on_failed_ranks(*vote(conf, confident), ranks if rank_alarm else None)
    consistent = ratio <= 1
    alarm = None
    if inconsistent_verdict == "alarm":
        alarm = confident
        if alarm_margin > 0:
            near = log_odds(conf) >= log_odds(thresholds) - alarm_margin
            alarm = confident | (near & ~consistent.any(1, keepdim=True))
    # the OOD hint also weighs the rank test: a head whose class's neighbourhood the input is not in
    # is named last (the verdicts are the same either way)
    hint = ratio if ranks is None else combined_ratio(ratio, ranks)
    if hint_filter is not None:  # named only where no head that passes the filter is left
        fails = hint_filter > 1
        hint = hint.masked_fill(fails & (~fails).any(1, keepdim=True), float("inf"))
    return alarm_on_failed_ranks(*vote(conf, confident & consistent, hint <= 1, alarm,
                             hint if ood_hint == "nearest" else None), ranks if rank_alarm else None)


def alarm_on_failed_ranks(labels, verdict, ranks):
    """``(labels, verdict)`` with every accepted answer whose head fails the rank test (``ranks``
    > 1 at its label) turned into an alarm; unchanged without ``ranks``."""
    if ranks is None:
        return labels, verdict
    failed = (verdict == ACCEPT) & (ranks.gather(1, labels.clamp_min(0)[:, None])[:, 0] > 1)
    return labels.masked_fill(failed, -1), verdict.masked_fill(failed, ALARM)


def log_odds(conf: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Confidences in log-odds (float64), clamped to ``[eps, 1 - eps]`` (float32 saturates at 0 and 1)."""
    return torch.logit(conf.double().clamp(eps, 1 - eps))


# float32 confidences near 1 move in steps of 6e-8: two saturated confidences one step apart differ
# by log 2 in log-odds, a "fall" that is rounding, not evidence. Falls are measured on log-odds
# capped at 1 - 1e-5 (0.6 % rounding at the cap), where a clean MNIST head's odds never fall
# (docs/method.md, "A warp that noise undoes").
STABILITY_EPS = 1e-5


def stability_falls(conf: torch.Tensor, conf_neighbour: torch.Tensor) -> torch.Tensor:
    """``[B, N]`` (float64): how far each head's own-class log-odds (capped at
    :data:`STABILITY_EPS`) fall from the input to its neighbour; with several neighbours
    (``conf_neighbour`` of shape ``[M, B, N]``), the mean of the M falls."""
    near = log_odds(conf_neighbour, STABILITY_EPS)
    if conf_neighbour.dim() == conf.dim() + 1:
        near = near.mean(0)
    return log_odds(conf, STABILITY_EPS) - near


def neighbour(x: torch.Tensor, noise: torch.Tensor, value_range=None,
              contrast: torch.Tensor | None = None, jitter: torch.Tensor | None = None) -> torch.Tensor:
    """The input's neighbour for the stability test: ``x``, resampled through the guard's fixed
    displacement grid where it has one (the default for images), plus its fixed noise pattern (zero
    by default; the neighbour itself for inputs that are not images), kept inside the validation
    set's value range. With M patterns (``noise`` of shape ``[M,
    *input_shape]``), the M neighbours of every input, pattern-major: ``[M * B, ...]``. With a
    reference ``contrast`` (0-d), an input whose own contrast (:func:`input_contrast`) is lower gets the
    pattern scaled down by their ratio: a dark, flat image is not drowned by noise that a
    well-lit one shrugs off (docs/method.md, "Noise to the input's contrast"). With ``jitter``
    (``[M, H, W, 2]`` sampling grids), the m-th neighbour is the input resampled through the m-th
    grid (bilinear, edges repeated), then its noise added (docs/method.md, "A geometric neighbour")."""
    if noise.dim() == x.dim():  # M patterns, [M, 1, *input_shape] against the batch
        noise = noise.unsqueeze(1)
    if contrast is not None:
        noise = noise * (input_contrast(x) / contrast).clamp(max=1.0).view(-1, *([1] * (x.dim() - 1)))
    base = x
    if jitter is not None:  # [M, B, *input_shape], pattern-major like the noise
        m, b = jitter.shape[0], x.shape[0]
        grids = jitter.to(x.dtype).unsqueeze(1).expand(m, b, *jitter.shape[1:]).flatten(0, 1)
        base = F.grid_sample(x.repeat(m, 1, 1, 1), grids, mode="bilinear", padding_mode="border",
                             align_corners=True).view(m, *x.shape)
    xn = base + noise
    xn = xn.flatten(0, 1) if xn.dim() > x.dim() else xn
    return xn if value_range is None else xn.clamp(value_range[0], value_range[1])


def median_filter(x: torch.Tensor, size: int) -> torch.Tensor:
    """``x`` ``[B, C, H, W]`` through a ``size`` x ``size`` median filter per channel (edges
    repeated): the stability test's filtered neighbour (``stability_median``). A median keeps edges
    and flat regions, what a sign or an object is made of, and removes lines and dots thinner than
    half the window, what a sparse trigger is made of (docs/method.md, "A filtered neighbour").
    The 3x3 filter, the one the guard uses, runs as a selection network (:func:`_median3`): the
    same values, 4-16x faster on one CPU thread than sorting every window
    (``bench/bench_median_filter.py``); other sizes take :func:`median_filter_reference`."""
    return _median3(x) if size == 3 else median_filter_reference(x, size)


def median_filter_reference(x: torch.Tensor, size: int) -> torch.Tensor:
    """:func:`median_filter` by the definition: every window unfolded, its median taken."""
    b, c, h, w = x.shape
    r = size // 2
    windows = F.unfold(F.pad(x, (r, r, r, r), mode="replicate"), size)  # [B, C * size^2, H * W]
    return windows.view(b, c, size * size, h * w).median(2).values.view(b, c, h, w)


# Compare-exchange pairs that leave the median of nine values in position 4 (a known
# 19-comparator selection network for the 3x3 median: sort the rows, then the columns, then the
# diagonal through the middle). Correct for every input because it is for every 0/1 input (the
# 0-1 principle; the tests run all 512).
_MEDIAN9 = ((1, 2), (4, 5), (7, 8), (0, 1), (3, 4), (6, 7), (1, 2), (4, 5), (7, 8), (0, 3), (5, 8),
            (4, 7), (3, 6), (1, 4), (2, 5), (4, 7), (4, 2), (6, 4), (4, 2))


def _median3(x: torch.Tensor) -> torch.Tensor:
    """The 3x3 median of every pixel as 19 elementwise min/max pairs over the nine shifted copies:
    no sort, no data-dependent control flow (exportable), and exact, since a median of nine
    values is one of them."""
    h, w = x.shape[-2:]
    padded = F.pad(x, (1, 1, 1, 1), mode="replicate")
    v = [padded[..., i:i + h, j:j + w] for i in range(3) for j in range(3)]
    for a, b in _MEDIAN9:
        v[a], v[b] = torch.minimum(v[a], v[b]), torch.maximum(v[a], v[b])
    return v[4]


def input_contrast(x: torch.Tensor) -> torch.Tensor:
    """``[B]``: each input's contrast, the standard deviation of all its values (pixels and
    channels)."""
    return x.flatten(1).std(1)


def stability_ratio(conf: torch.Tensor, conf_neighbour: torch.Tensor, bound: torch.Tensor) -> torch.Tensor:
    """``[B, N]``: how far each head's own-class log-odds fall from the input to its neighbour(s)
    (``[B, N]`` or ``[M, B, N]``: :func:`stability_falls`), relative to the calibrated bound (<= 1:
    as stable as clean inputs; float32)."""
    return (stability_falls(conf, conf_neighbour) / bound.double()).float()


def neighbourhood_scores(units: torch.Tensor, references: torch.Tensor, labels: torch.Tensor,
                         row: torch.Tensor | None = None, leave_out: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, N]``: TED's rank (S&P 2024) in each head's view, as ``log(1 + r)``: r is how many
    references of other classes are nearer to head k's view of the input than the nearest reference
    of class k. ``units`` ``[B, V, D]``: the input in each of V distinct views (heads that share a
    row of masks see the same); ``references`` ``[V, R, D]``: the R validation samples in the same
    views, L2-normalised like the input here; ``labels`` ``[R]`` their classes; ``row`` ``[N]``: the
    view head k reads (None: V = N, one per head). ``leave_out`` ``[B]``: the reference each input
    is (itself, on the validation set; -1: none)."""
    f = F.normalize(units.float(), dim=-1).transpose(0, 1)  # [V, B, D]
    d = torch.cdist(f, references)  # [V, B, R]: one distance matrix per distinct view
    if leave_out is not None:
        own = leave_out[None, :, None] == torch.arange(references.shape[1], device=d.device)
        d = d.masked_fill(own, float("inf"))
    n = d.shape[0] if row is None else row.numel()
    # per view, each class's nearest reference [V, B, N]; no reference of class k is nearer than
    # it, so the rank is how many references are: one comparison per view and class, without
    # copying the distances per head or masking them per class
    nearest = d.new_full((*d.shape[:2], n), float("inf")).scatter_reduce(
        2, labels.expand(*d.shape[:2], -1), d, "amin")
    rank = (d.unsqueeze(2) < nearest.unsqueeze(-1)).sum(-1)  # [V, B, N]
    k = torch.arange(n, device=d.device)
    rank = rank[k if row is None else row, :, k]  # [N, B]: head k, its view, class k
    return rank.transpose(0, 1).float().log1p()


def score_from_result(r: GuardResult) -> torch.Tensor:
    """``[B]`` continuous trigger score of a guard's result: how far the input is from being credible
    for its most confident head, in the guard's own units (that head's consistency ratio over its
    confidence margin, in log), plus one for every extra credible head (several credible heads is
    the paper's trigger signature). ``docs/method.md`` defines it."""
    margin = (r.confidences / r.thresholds).clamp_min(1e-6)
    ratio = combined_ratio(r.credibility, r.rank_ratio)
    ratio = ratio if ratio is not None else torch.ones_like(margin)
    k = margin.argmax(1, keepdim=True)
    top = (ratio.gather(1, k).clamp_min(1e-6) / margin.gather(1, k)).squeeze(1)
    credible = ((margin >= 1) & (ratio <= 1)).sum(1)
    return top.log() + (credible - 1).clamp_min(0)
