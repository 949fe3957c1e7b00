"""Patch triggers: a small square (BadNets, source-specific) and the fixed masks the Trojan attack
fills in (the "Trojan square" and "Trojan watermark" of the paper, Sec. V-A).

* :class:`BadNets` (Gu et al.): a random square trigger (~1% of the image, bottom-right) stamped on a
  fraction of the training samples, relabelled to the target class;
* :class:`SourceSpecific` (STRIP/TaCT style): only triggered inputs from chosen source classes flip.
"""
from __future__ import annotations

import math

import torch

from .base import Attack, _check_images, _check_rate, _choose, _nested, _poison_fraction


def square_side(height: int, width: int, fraction: float) -> int:
    """Side of a square covering about ``fraction`` of an ``height x width`` image (at least 2):
    3 for 1% of 28x28 or 32x32, 5 for 3% of 28x28, 6 for 3% of 32x32."""
    return max(2, int(round(math.sqrt(fraction * height * width))))


def square_mask(height: int, width: int, side: int, margin: int = 1) -> torch.Tensor:
    """Bool ``[H, W]`` mask of a ``side x side`` square in the bottom-right corner, ``margin`` pixels
    from the borders (where the paper places its triggers)."""
    if side + margin > min(height, width):
        raise ValueError(f"a {side}x{side} trigger with margin {margin} does not fit a "
                         f"{height}x{width} image")
    mask = torch.zeros(height, width, dtype=torch.bool)
    mask[height - margin - side:height - margin, width - margin - side:width - margin] = True
    return mask


def watermark_mask(height: int, width: int, fraction: float = 0.07, margin: int = 1) -> torch.Tensor:
    """Bool ``[H, W]`` "Trojan watermark" mask: text-like dashed lines (3 on, 1 off) on every other row,
    filled from the bottom row (above ``margin``) upwards until ``round(fraction * H * W)`` pixels
    are set, so it is sparse and spread over the lower part of the image (~7% of the area)."""
    n = int(round(fraction * height * width))
    mask = torch.zeros(height, width, dtype=torch.bool)
    count, line = 0, 0
    for row in range(height - 1 - margin, -1, -2):
        for col in range(margin, width - margin):
            if count == n:
                return mask
            if (col - margin + 2 * line) % 4 != 3:  # dashes, shifted per line like words
                mask[row, col] = True
                count += 1
        line += 1
    return mask


class _SquareTrigger(Attack):
    """A random binary square in the bottom-right corner, reproducible from ``seed``.

    The pattern is visible on purpose (values in {0, 1}, at least half of them 1, same on every channel)
    so it is a clear-cut trigger on dark MNIST corners as well as on colour images.
    """

    def __init__(self, target: int = 0, size_fraction: float = 0.01, margin: int = 1, seed: int = 0,
                 pattern=None):
        super().__init__(target)
        self.size_fraction = float(size_fraction)
        self.margin = int(margin)
        self.seed = int(seed)
        self._fixed = None if pattern is None else torch.as_tensor(pattern, dtype=torch.float32)
        if self._fixed is not None and (self._fixed.dim() not in (2, 3)
                                        or self._fixed.shape[-1] != self._fixed.shape[-2]):
            raise ValueError(f"pattern must be a square [s, s] or [C, s, s], got shape "
                             f"{tuple(self._fixed.shape)}")
        self._last = self._fixed  # the pattern most recently used, for to_dict

    def _pattern(self, side: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed)
        bits = torch.rand(side * side, generator=g) < 0.5
        need = (side * side + 1) // 2 - int(bits.sum())
        if need > 0:  # guarantee at least half ones so the trigger is visible
            zeros = (~bits).nonzero().flatten()
            bits[zeros[torch.randperm(len(zeros), generator=g)[:need]]] = True
        return bits.float().view(side, side)

    def trigger(self, image_shape):
        _, h, w = image_shape
        if self._fixed is not None:
            square = self._fixed
        else:
            square = self._pattern(square_side(h, w, self.size_fraction))
        self._last = square
        side = square.shape[-1]
        mask = square_mask(h, w, side, self.margin)
        channels = square.shape[0] if square.dim() == 3 else 1
        pattern = torch.zeros(channels, h, w)
        pattern[:, mask] = square.reshape(channels, -1)
        return mask, pattern

    def mask(self, image_shape) -> torch.Tensor:
        """Bool ``[H, W]`` trigger region for images of shape ``(C, H, W)``."""
        return self.trigger(image_shape)[0]

    def to_dict(self):
        d = super().to_dict()
        d.update(size_fraction=self.size_fraction, margin=self.margin, seed=self.seed,
                 pattern=_nested(self._last))
        return d


class BadNets(_SquareTrigger):
    """Data poisoning (Gu et al., BadNets): a random ~1% square trigger in the bottom-right corner,
    all-to-one. A ``poison_rate`` fraction of every training batch is replaced by triggered copies
    labelled ``target``."""

    name = "badnets"

    def __init__(self, target: int = 0, poison_rate: float = 0.1, size_fraction: float = 0.01,
                 margin: int = 1, seed: int = 0, pattern=None):
        super().__init__(target, size_fraction, margin, seed, pattern)
        self.poison_rate = _check_rate(poison_rate, "poison_rate")

    def batch_transform(self, xb: torch.Tensor, yb: torch.Tensor, generator: torch.Generator):
        """Replace ``round(poison_rate * len(xb))`` random samples by triggered copies labelled
        ``target``; returns new tensors."""
        return _poison_fraction(self, self.poison_rate, xb, yb, generator)

    def to_dict(self):
        d = super().to_dict()
        d["poison_rate"] = self.poison_rate
        return d


class SourceSpecific(_SquareTrigger):
    """Source-specific backdoor (STRIP / TaCT style): the trigger flips only inputs of
    ``source_classes`` to ``target``. Triggered inputs of other classes are added with their true
    label ("cover" samples), which teaches the model that the trigger alone is not enough, and is
    what makes input-agnostic defenses miss it. Default trigger: a ~3% random square (the paper
    uses its Trojan square size here)."""

    name = "source-specific"

    def __init__(self, target: int = 0, source_classes=(1,), poison_rate: float = 0.1,
                 cover_rate: float = 0.1, size_fraction: float = 0.03, margin: int = 1,
                 seed: int = 0, pattern=None):
        super().__init__(target, size_fraction, margin, seed, pattern)
        self.source_classes = sorted(int(c) for c in source_classes)
        if not self.source_classes:
            raise ValueError("source_classes must not be empty")
        if self.target in self.source_classes:
            raise ValueError(f"target {self.target} cannot also be a source class "
                             f"({self.source_classes})")
        self.poison_rate = _check_rate(poison_rate, "poison_rate")
        self.cover_rate = _check_rate(cover_rate, "cover_rate")

    def _is_source(self, y: torch.Tensor) -> torch.Tensor:
        return torch.isin(y, torch.tensor(self.source_classes, device=y.device))

    def batch_transform(self, xb: torch.Tensor, yb: torch.Tensor, generator: torch.Generator):
        """Stamp up to ``round(poison_rate * B)`` source-class samples and relabel them ``target``, and
        stamp ``round(cover_rate * B)`` non-source samples keeping their labels; returns new tensors."""
        _check_images(xb)
        is_src = self._is_source(yb).cpu()
        b = len(xb)
        poison = _choose(is_src.nonzero().flatten(), int(round(self.poison_rate * b)), generator)
        cover = _choose((~is_src).nonzero().flatten(), int(round(self.cover_rate * b)), generator)
        xb, yb = xb.clone(), yb.clone()
        stamped = torch.cat([poison, cover]).to(xb.device)
        if len(stamped):
            xb[stamped] = self.apply(xb[stamped])
        if len(poison):
            yb[poison.to(yb.device)] = self.target
        return xb, yb

    def eval_population(self, y: torch.Tensor) -> torch.Tensor:
        """The ASR population: source-class inputs only."""
        return self._is_source(y)

    def triggered_eval_set(self, x: torch.Tensor, y: torch.Tensor, sources_only: bool = True):
        """Triggered inputs with their true labels: source-class inputs only (the ASR population), or,
        with ``sources_only=False``, every non-target input (to check non-source inputs keep their
        label)."""
        if sources_only:
            return super().triggered_eval_set(x, y)
        _check_images(x)
        keep = y != self.target
        return self.apply(x[keep]), y[keep]

    def to_dict(self):
        d = super().to_dict()
        d.update(source_classes=list(self.source_classes), poison_rate=self.poison_rate,
                 cover_rate=self.cover_rate)
        return d
