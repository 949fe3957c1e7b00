"""SIG, the clean-label sinusoidal-signal backdoor (Barni, Kallas & Tondi, "A new backdoor attack in
CNNs by training set corruption without label poisoning", ICIP 2019)."""
from __future__ import annotations

import math

import torch

from .base import Attack, _check_images, _check_rate, _choose


class SIG(Attack):
    """Clean-label backdoor: a horizontal sinusoid ``v(j) = delta/255 * sin(2 pi j f / W)`` (``j`` the
    column, the same on every row and channel) is added to images and the result clamped to [0, 1].

    Only samples of the ``target`` class are poisoned, and they keep their (correct) label: the model
    learns the signal as a feature of the target class because no label looks wrong, which is what
    makes the attack hard to spot by inspecting the training set. At test time the signal is added to
    non-target inputs. ``delta`` is on the 0-255 scale as in the paper and BackdoorBench.

    ``poison_rate`` is a fraction of each batch (BackdoorBench: of the whole training set), drawn only
    from the target-class samples and capped at their number: with 10 balanced classes and 0.1,
    every target-class sample carries the signal. The trigger does not depend on ``seed``; it is
    recorded so every attack's settings carry one.
    """

    name = "sig"

    def __init__(self, target: int = 0, delta: float = 40.0, f: float = 6.0, poison_rate: float = 0.1,
                 seed: int = 0):
        super().__init__(target)
        if not delta > 0:
            raise ValueError(f"delta must be > 0 (0-255 scale), got {delta}")
        if not f > 0:
            raise ValueError(f"f (periods across the image width) must be > 0, got {f}")
        self.delta, self.f, self.seed = float(delta), float(f), int(seed)
        self.poison_rate = _check_rate(poison_rate, "poison_rate")

    def signal(self, width: int) -> torch.Tensor:
        """The additive signal as a ``[W]`` row in [0, 1] units (broadcast over rows and channels)."""
        j = torch.arange(width, dtype=torch.float64)
        return (self.delta / 255.0 * torch.sin(2 * math.pi * j * self.f / width)).float()

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """``clamp(x + v, 0, 1)`` on a batch ``[N, C, H, W]``; returns a new tensor."""
        _check_images(x)
        v = self.signal(x.shape[-1]).to(device=x.device, dtype=x.dtype)
        return (x + v).clamp(0.0, 1.0)

    def batch_transform(self, xb: torch.Tensor, yb: torch.Tensor, generator: torch.Generator):
        """Add the signal to up to ``round(poison_rate * B)`` target-class samples; labels unchanged."""
        _check_images(xb)
        candidates = (yb == self.target).nonzero().flatten().cpu()
        idx = _choose(candidates, int(round(self.poison_rate * len(xb))), generator).to(xb.device)
        xb = xb.clone()
        if len(idx):
            xb[idx] = self.apply(xb[idx])
        return xb, yb.clone()

    def to_dict(self):
        d = super().to_dict()
        d.update(delta=self.delta, f=self.f, poison_rate=self.poison_rate, seed=self.seed)
        return d
