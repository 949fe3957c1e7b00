"""Alg. 2 line 6, "top m neurons with reliable prediction": how many of its most important neurons
each class keeps.

The paper grows the set "until the class-restricted head predicts the ground truth". We measure a
head by two mean confidences on the fit split (never test data): ``in`` (head k's confidence in class
k on class-k inputs) and ``out`` (its confidence in class k on other classes' inputs). A fraction is
*acceptable* for class k when the head loses at most ``budget_in`` of ``in`` and gains at most
``budget_out`` of ``out`` against the whole layer; the smallest acceptable fraction wins. With tiny
budgets (MNIST's defaults) this is "as reliable as the whole layer"; on natural images no smaller
set is quite that reliable, so a budget is what makes the heads restricted at all (issue #6).

With ``GuardConfig.image_margins``, the same budgets also decide which bands along an image's edges
no class needs (:func:`search_margins`): their pixels are then non-salient for every head.
"""
from __future__ import annotations

import torch
from tqdm.auto import tqdm


def choose_fractions(rows, budget_in: float, budget_out: float) -> torch.Tensor:
    """``rows`` = ``[(fraction, in [K], out [K]), ...]`` ascending, the last being the whole layer.
    Returns ``[K]``: per class the smallest fraction within the budgets (the whole layer always is)."""
    _, in_all, out_all = rows[-1]
    chosen = torch.empty(len(in_all))
    for k in range(len(in_all)):
        ok = [q for q, i, o in rows if i[k] >= in_all[k] - budget_in and o[k] <= out_all[k] + budget_out]
        chosen[k] = ok[0]
    return chosen


def head_rates(conf: torch.Tensor, y: torch.Tensor, measure: str = "confidence"):
    """Mean own-class confidence of every head on its class (``in``) and on the others (``out``)."""
    n = conf.shape[1]
    own = torch.nn.functional.one_hot(y, n).bool()
    if measure == "rate":
        conf = (conf >= 0.5).float()
    in_rate = (conf * own).sum(0) / own.sum(0).clamp_min(1)
    out_rate = (conf * ~own).sum(0) / (~own).sum(0).clamp_min(1)
    return in_rate.cpu(), out_rate.cpu()


def search_sets(evaluate, stages, fractions, budget_in: float, budget_out: float, num_classes: int,
                progress: bool = True):
    """Stage by stage (``stages`` = ``[(name, [layers])]``), choose per class the fraction kept in those
    layers, with every later stage still whole. ``evaluate({layer: fractions [K]}) -> (in, out)``.
    Returns ``({layer: fractions [K]}, table)``."""
    chosen, table = {}, {}
    for name, layers in stages:
        rows = []
        for q in tqdm(fractions, desc=f"salient sets ({name})", disable=not progress, leave=False):
            trial = dict(chosen)
            trial.update({layer: torch.full((num_classes,), float(q)) for layer in layers})
            rows.append((float(q), *evaluate(trial)))
        pick = choose_fractions(rows, budget_in, budget_out)
        chosen.update({layer: pick for layer in layers})
        table[name] = [{"fraction": q, "in": i.tolist(), "out": o.tolist()} for q, i, o in rows]
    return chosen, table


SIDES = ("top", "bottom", "left", "right")


def margin_mask(size, widths: dict) -> torch.Tensor:
    """``[H, W]`` float: 1 where a pixel is kept, 0 in the bands ``widths`` (pixels per side)."""
    h, w = size
    keep = torch.ones(h, w)
    keep[:widths.get("top", 0)] = 0
    keep[h - widths.get("bottom", 0):] = 0
    keep[:, :widths.get("left", 0)] = 0
    keep[:, w - widths.get("right", 0):] = 0
    return keep


def search_margins(evaluate, size, budget_in: float, budget_out: float, max_share: float = 0.25):
    """The widest bands along an image's edges that the model does not need, for every class at once:
    the dormant-neuron rule's question (what does clean data leave unused?) asked of the model's
    answers rather than of the pixels' values, whose background varies. ``evaluate(keep [H, W]) ->
    (in [K], out [K])`` as in :func:`head_rates`, with the band pixels at their fill. Greedily widens
    one side by a pixel at a time, the one that costs least, while every class stays within the set
    search's budgets against the whole image; each side at most ``max_share`` of its axis. Returns
    ``({side: width}, keep [H, W])``."""
    h, w = size
    limit = {side: int((h if side in ("top", "bottom") else w) * max_share) for side in SIDES}
    widths = dict.fromkeys(SIDES, 0)
    in_all, out_all = evaluate(margin_mask(size, widths))
    while True:
        best = None
        for side in SIDES:
            if widths[side] >= limit[side]:
                continue
            trial = dict(widths, **{side: widths[side] + 1})
            i, o = evaluate(margin_mask(size, trial))
            if bool(((i >= in_all - budget_in) & (o <= out_all + budget_out)).all()):
                loss = float((in_all - i).sum())
                if best is None or loss < best[0]:
                    best = (loss, trial)
        if best is None:
            return widths, margin_mask(size, widths)
        widths = best[1]
