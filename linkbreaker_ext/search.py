"""Alg. 2 line 6, "top m neurons with reliable prediction": how many of its most important neurons
each class keeps.

The paper grows the set "until the class-restricted head predicts the ground truth". We measure a
head by two mean confidences on the fit split (never test data): ``in`` (head k's confidence in class
k on class-k inputs) and ``out`` (its confidence in class k on other classes' inputs). A fraction is
*acceptable* for class k when the head loses at most ``budget_in`` of ``in`` and gains at most
``budget_out`` of ``out`` against the whole layer; the smallest acceptable fraction wins. With tiny
budgets (MNIST's defaults) this is "as reliable as the whole layer"; on natural images no smaller
set is quite that reliable, so a budget is what makes the heads restricted at all (issue #6).
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
