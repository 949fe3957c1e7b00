"""Baseline defenses compared with LinkBreaker (issue #7): the paper's STRIP, Neural Cleanse, ABS and
Fine-Pruning, and the newer input-level detectors SCALE-UP and IBD-PSC. One class per method, one
shared interface (:mod:`.base`); ``make_defense(name, **kw)`` builds one by name.

    d = make_defense("strip").fit(model, x_val, y_val, num_classes=10)
    d.score(x)   # input-level detectors: float [B], higher = more likely triggered
    d.detect(x)  # bool [B] at the threshold set for 1 % false rejection on held-out clean data
    d.flagged, d.report, d.repaired   # model-level defenses
"""
from __future__ import annotations

from .abs import ABS
from .base import Defense, InputDetector, ModelDefense, roc_auc
from .fine_pruning import FinePruning
from .ibd_psc import IBDPSC
from .neural_cleanse import NeuralCleanse
from .scale_up import ScaleUp
from .strip import STRIP

DEFENSES = {cls.name: cls for cls in (STRIP, NeuralCleanse, ABS, FinePruning, ScaleUp, IBDPSC)}

__all__ = ["Defense", "InputDetector", "ModelDefense", "STRIP", "NeuralCleanse", "ABS", "FinePruning",
           "ScaleUp", "IBDPSC", "DEFENSES", "make_defense", "roc_auc"]


def make_defense(name: str, **kwargs) -> Defense:
    """Build a baseline by name (``strip``, ``neural-cleanse``, ``abs``, ``fine-pruning``,
    ``scale-up``, ``ibd-psc``); ``kwargs`` go to its constructor."""
    try:
        cls = DEFENSES[name]
    except KeyError:
        raise ValueError(f"unknown defense {name!r}; known: {sorted(DEFENSES)}") from None
    return cls(**kwargs)
