"""Backdoor attacks and adversarial examples that the LinkBreaker experiments defend against.

The paper (Sec. III-B, V-A/B/C/E) evaluates two ways of planting a backdoor:

* **data poisoning** (:class:`BadNets`, Gu et al.): a random square trigger (~1% of the image,
  bottom-right) stamped on a fraction of the training samples, relabelled to the target class;
* **model poisoning** (:class:`TrojanAttack`, Liu et al. NDSS 2018): the attacker picks internal
  neurons strongly connected to a fixed trigger mask (a ~3% "Trojan square" or a ~7% "Trojan
  watermark"), reverse-engineers the trigger pixels so those neurons fire hard, then fine-tunes the
  model so the trigger maps to the target;

plus a **source-specific** backdoor (:class:`SourceSpecific`, STRIP/TaCT style), three triggers that
cover the whole image (:class:`Blended`, the clean-label :class:`SIG` and the warping :class:`WaNet`,
whose ``wanet-noise`` variant trains through noise to evade the guard's stability test),
an **adaptive** backdoor that knows the defense (:class:`AdaptivePatch`, the paper's Sec. VI-G),
and the adversarial examples of the robustness study (:func:`fgsm`, :func:`bim`, :func:`deepfool`).

One module per family: ``base`` (the :class:`Attack` interface), ``patch``, ``trojan``, ``blended``,
``sig``, ``wanet``, ``adaptive`` (a patch trained with the model to evade the guard's check,
Sec. VI-G), ``adversarial``. This module holds the registry: :data:`ATTACKS`,
:func:`make_attack`, and the name dispatch behind ``Attack.from_dict``. Defaults and their sources:
``docs/attacks.md``.
"""
from __future__ import annotations

import functools

from .adaptive import AdaptivePatch
from .adversarial import bim, deepfool, fgsm
from .base import Attack
from .blended import Blended
from .patch import BadNets, SourceSpecific, square_mask, square_side, watermark_mask
from .sig import SIG
from .trojan import TrojanAttack
from .wanet import WaNet

__all__ = ["Attack", "AdaptivePatch", "BadNets", "Blended", "TrojanAttack", "SourceSpecific", "SIG", "WaNet",
           "ATTACKS", "make_attack", "fgsm", "bim", "deepfool", "square_side", "square_mask",
           "watermark_mask"]

# name -> constructor (what make_attack and the CLI's --attack use)
ATTACKS = {
    "badnets": BadNets,
    "blended": Blended,
    "trojan-square": functools.partial(TrojanAttack, shape="square"),
    "trojan-watermark": functools.partial(TrojanAttack, shape="watermark"),
    "source-specific": SourceSpecific,
    "sig": SIG,
    "wanet": WaNet,
    "wanet-noise": functools.partial(WaNet, noise_std=0.03),  # knows the stability test (issue #6)
    "adaptive": AdaptivePatch,
}
# name -> class (what Attack.from_dict dispatches on; to_dict()["name"] is one of these)
_CLASSES = {"badnets": BadNets, "blended": Blended, "trojan-square": TrojanAttack,
            "trojan-watermark": TrojanAttack, "source-specific": SourceSpecific, "sig": SIG,
            "wanet": WaNet, "wanet-noise": WaNet, "adaptive": AdaptivePatch}


def _lookup(name: str):
    try:
        return _CLASSES[name]
    except KeyError:
        raise ValueError(f"unknown attack {name!r}; known: {sorted(ATTACKS)}") from None


def make_attack(name: str, **kwargs) -> Attack:
    """Build a registered attack by name, e.g. ``make_attack("badnets", target=0, poison_rate=0.1)``."""
    _lookup(name)
    return ATTACKS[name](**kwargs)
