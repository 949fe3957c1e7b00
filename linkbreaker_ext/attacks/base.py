"""The :class:`Attack` base class and the helpers every attack family shares.

Images are float ``[N, C, H, W]`` in ``[0, 1]``; labels int64. An attack is an all-to-one backdoor
with a target class. Each one answers the same five questions, so experiments treat them alike:

* :meth:`Attack.apply`: what a triggered input looks like;
* :meth:`Attack.triggered_eval_set`: the ASR population (non-target inputs, triggered);
* :meth:`Attack.batch_transform`: how a training batch is poisoned (what
  ``training.train_classifier(..., batch_transform=...)`` calls per batch);
* :meth:`Attack.train_backdoored`: train a backdoored model;
* :meth:`Attack.to_dict` / :meth:`Attack.from_dict`: JSON-safe settings, seed included, so a report
  says exactly what was used and the trigger can be rebuilt.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import training


def _check_images(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"expected a batch of images [N, C, H, W], got shape {shape}")


def _check_rate(value: float, what: str) -> float:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{what} must be in [0, 1], got {value}")
    return float(value)


def _nested(t: torch.Tensor | None):
    return None if t is None else t.detach().cpu().tolist()


def _choose(candidates: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """``k`` random entries of the index tensor ``candidates`` (all of them if fewer)."""
    perm = torch.randperm(len(candidates), generator=generator)
    return candidates[perm[:min(k, len(candidates))]]


def _poison_fraction(attack: "Attack", rate: float, xb: torch.Tensor, yb: torch.Tensor,
                     generator: torch.Generator):
    """Replace ``round(rate * len(xb))`` random samples by triggered copies labelled
    ``attack.target``; returns new tensors (the all-to-one poisoning of BadNets and Trojan)."""
    _check_images(xb)
    idx = _choose(torch.arange(len(xb)), int(round(rate * len(xb))), generator)
    xb, yb = xb.clone(), yb.clone()
    if len(idx):
        xb[idx.to(xb.device)] = attack.apply(xb[idx.to(xb.device)])
        yb[idx.to(yb.device)] = attack.target
    return xb, yb


class Attack:
    """Base class: an all-to-one backdoor with a fixed trigger (``mask``, ``pattern``) and a target class.

    Patch-like subclasses implement :meth:`trigger` for an image shape and the base class stamps it;
    attacks whose trigger is not a stamp (blend, sinusoid, warp) override :meth:`apply`. The base class
    builds the ASR evaluation set, trains through :meth:`batch_transform` and serialises the settings.
    """

    name = "attack"

    def __init__(self, target: int = 0):
        self.target = int(target)

    # --- trigger -------------------------------------------------------------------------------
    def trigger(self, image_shape) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mask [H, W] bool, pattern [C or 1, H, W] float)`` for images of shape ``(C, H, W)``."""
        raise NotImplementedError(f"{type(self).__name__} has no stamped trigger; use apply")

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Stamp the trigger on a batch ``[N, C, H, W]``; returns a new tensor (``x`` is untouched)."""
        _check_images(x)
        mask, pattern = self.trigger(tuple(x.shape[1:]))
        if pattern.shape[0] not in (1, x.shape[1]):
            raise ValueError(f"trigger pattern has {pattern.shape[0]} channels but images of shape "
                             f"{tuple(x.shape)} have {x.shape[1]}")
        return self._stamp(x, mask.to(x.device), pattern.to(device=x.device, dtype=x.dtype))

    def _stamp(self, x: torch.Tensor, mask: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
        """The pattern written over the masked pixels (an opaque stamp)."""
        return torch.where(mask, pattern, x)

    def eval_population(self, y: torch.Tensor) -> torch.Tensor:
        """``[n]`` bool: which inputs of true labels ``y`` the ASR is measured on (here every
        non-target one)."""
        return y != self.target

    def triggered_eval_set(self, x: torch.Tensor, y: torch.Tensor):
        """The ASR population (:meth:`eval_population`), stamped with the trigger.
        Returns ``(x_triggered, y_true)``; ASR = fraction predicted as ``target``."""
        _check_images(x)
        keep = self.eval_population(y)
        return self.apply(x[keep]), y[keep]

    # --- training ------------------------------------------------------------------------------
    def batch_transform(self, xb: torch.Tensor, yb: torch.Tensor, generator: torch.Generator):
        """Poison one training batch; returns new ``(xb, yb)`` (the inputs are not modified)."""
        raise NotImplementedError

    def poison_dataset(self, x: torch.Tensor, y: torch.Tensor, seed: int = 0):
        """A poisoned copy ``(x, y)`` of a whole data set, for users who train elsewhere
        (the inputs are not modified)."""
        return self.batch_transform(x, y, torch.Generator().manual_seed(seed))

    def train_backdoored(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, **train_kwargs):
        """Train ``model`` from scratch on clean data with poisoned samples mixed into every batch
        (``train_kwargs`` go to :func:`training.train_classifier`). Returns the model."""
        train_kwargs.setdefault("desc", self.name)
        return training.train_classifier(model, x, y, batch_transform=self.batch_transform,
                                         **train_kwargs)

    # --- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """JSON-safe settings (trigger as nested lists) for reports; :meth:`from_dict` inverts it."""
        return {"name": self.name, "target": self.target}

    @classmethod
    def from_dict(cls, d: dict) -> "Attack":
        """Rebuild an attack from :meth:`to_dict` output (dispatching on ``d["name"]`` from the base)."""
        d = dict(d)
        if "name" not in d:
            raise ValueError(f"attack settings need a 'name'; got keys {sorted(d)}")
        name = d.pop("name")
        if cls is Attack:
            from . import _lookup  # the registry lives in the package, which imports this module
            return _lookup(name).from_dict({"name": name, **d})
        return cls._from_settings(name, d)

    @classmethod
    def _from_settings(cls, name: str, d: dict) -> "Attack":
        return cls(**d)

    def __repr__(self):
        items = ", ".join(f"{k}={v!r}" for k, v in self.to_dict().items()
                          if k not in ("name", "pattern", "mask", "neuron_scores", "noise"))
        return f"{type(self).__name__}({items})"
