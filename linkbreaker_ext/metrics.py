"""The paper's metrics (CDA, ASR) and the guard's own rates, all fractions in [0, 1].

ASR counts triggered inputs whose true class is not the target and that end up labelled as the
target; a trigger alarm (label -1) or a correct label is not a success for the attacker.

An out-of-distribution verdict carries the most confident head's label as a hint (the paper's
Fig. 9). Two readings follow, and reports carry both:

* ``cda`` / ``asr`` count the hint as the guard's answer (a refused clean input can still be right,
  a refused triggered input still counts for the attacker);
* ``cda_strict`` / ``asr_strict`` count only accepted answers, Alg. 3's literal reading ("if the
  number of labels is 1 return it, else return the trigger signal").
"""
from __future__ import annotations

import torch


def _mean(mask: torch.Tensor) -> float:
    return mask.float().mean().item() if mask.numel() else float("nan")


def undefended(pred_clean, y_clean, pred_trigger, target: int) -> dict:
    """CDA and ASR of the bare model from its predicted labels."""
    return {"cda": _mean(pred_clean.cpu() == y_clean.cpu()), "asr": _mean(pred_trigger.cpu() == target)}


def defended(clean, y_clean, trig, y_trig_true, target: int) -> dict:
    """Metrics of a guard from its results on clean inputs and on triggered non-target inputs."""
    lc, vc = clean.labels.cpu(), clean.verdict.cpu()
    lt, vt = trig.labels.cpu(), trig.verdict.cpu()
    return {
        "cda": _mean(lc == y_clean.cpu()),
        "asr": _mean(lt == target),
        "cda_strict": _mean((lc == y_clean.cpu()) & (vc == 0)),
        "asr_strict": _mean((lt == target) & (vt == 0)),
        "r_acc": _mean(lt == y_trig_true.cpu()),
        "alarm_rate_clean": _mean(vc == 1),
        "alarm_rate_trigger": _mean(vt == 1),
        "ood_rate_clean": _mean(vc == 2),
        "ood_rate_trigger": _mean(vt == 2),
        "accept_accuracy_clean": _mean((lc == y_clean.cpu())[vc == 0]),
    }


def paired_drop(pred_bare, labels_guard, y_clean) -> dict:
    """The CDA drop as a paired count on the same clean inputs: answers the guard ``lost`` (the bare
    model right, the guard not) and ``gained``, and the drop's standard error from those pairs
    (``se``, a fraction). A drop on n inputs is (lost - gained) / n, so a few tens of flips carry
    visible sampling noise: 2,000 inputs with 40 flips give about 0.3 points."""
    right_bare = pred_bare.cpu() == y_clean.cpu()
    right_guard = labels_guard.cpu() == y_clean.cpu()
    d = right_bare.double() - right_guard.double()  # 1 lost, -1 gained, 0 unchanged
    n = len(d)
    se = (d.std() / n ** 0.5).item() if n > 1 else float("nan")
    return {"lost": int((right_bare & ~right_guard).sum()), "gained": int((~right_bare & right_guard).sum()),
            "n": n, "se": se}


def auroc(clean_scores: torch.Tensor, trigger_scores: torch.Tensor) -> float:
    """Area under the ROC curve of a detector score (higher = triggered): the probability that a
    triggered input outscores a clean one, ties counted half (Mann-Whitney U)."""
    c, t = clean_scores.double().flatten().cpu(), trigger_scores.double().flatten().cpu()
    if not len(c) or not len(t):
        return float("nan")
    both = torch.cat([c, t])
    ordered = both.sort().values
    lo = torch.searchsorted(ordered, both, right=False)
    hi = torch.searchsorted(ordered, both, right=True)
    ranks = (lo + hi + 1).double() / 2  # 1-based ranks, ties averaged
    u = ranks[len(c):].sum() - len(t) * (len(t) + 1) / 2
    return (u / (len(c) * len(t))).item()
