"""Blended full-image trigger (Chen et al. 2017, "Targeted Backdoor Attacks on Deep Learning Systems
Using Data Poisoning"; BackdoorBench's ``blended``)."""
from __future__ import annotations

import torch
from torch import nn

from .. import training
from .base import Attack, _check_images, _nested, _poison_fraction


class Blended(Attack):
    """Data poisoning with a blended full-image trigger (Chen et al. 2017; BackdoorBench's
    ``blended``): ``x' = (1 - alpha) x + alpha p`` for a fixed pattern ``p`` that covers the whole image,
    so no pixel is left for a dormant-pixel rule to erase. ``pattern="noise"`` is a uniform random image
    from ``seed`` (the issue's random-noise pattern); a tensor ``[C or 1, H, W]`` gives an image pattern."""

    name = "blended"

    def __init__(self, target: int = 0, alpha: float = 0.2, poison_rate: float = 0.1, seed: int = 0,
                 pattern="noise"):
        super().__init__(target)
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        if not 0.0 <= poison_rate <= 1.0:
            raise ValueError(f"poison_rate must be in [0, 1], got {poison_rate}")
        self.alpha, self.poison_rate, self.seed = float(alpha), float(poison_rate), int(seed)
        self._fixed = None if isinstance(pattern, str) else torch.as_tensor(pattern, dtype=torch.float32)
        if isinstance(pattern, str) and pattern != "noise":
            raise ValueError(f"pattern must be 'noise' or an image tensor, got {pattern!r}")

    def trigger(self, image_shape):
        c, h, w = image_shape
        if self._fixed is not None:
            if tuple(self._fixed.shape[-2:]) != (h, w):
                raise ValueError(f"blend pattern {tuple(self._fixed.shape)} does not match images {image_shape}")
            return torch.ones(h, w, dtype=torch.bool), self._fixed.reshape(-1, h, w)
        g = torch.Generator().manual_seed(self.seed)
        return torch.ones(h, w, dtype=torch.bool), torch.rand(c, h, w, generator=g)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        _check_images(x)
        _, pattern = self.trigger(tuple(x.shape[1:]))
        pattern = pattern.to(device=x.device, dtype=x.dtype)
        return (1 - self.alpha) * x + self.alpha * pattern

    def batch_transform(self, xb: torch.Tensor, yb: torch.Tensor, generator: torch.Generator):
        return _poison_fraction(self, self.poison_rate, xb, yb, generator)

    def train_backdoored(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, **train_kwargs):
        train_kwargs.setdefault("desc", self.name)
        return training.train_classifier(model, x, y, batch_transform=self.batch_transform,
                                         **train_kwargs)

    def to_dict(self):
        d = super().to_dict()
        d.update(alpha=self.alpha, poison_rate=self.poison_rate, seed=self.seed,
                 pattern="noise" if self._fixed is None else _nested(self._fixed))
        return d
