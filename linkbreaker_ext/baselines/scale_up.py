"""SCALE-UP (Guo et al., ICLR 2023): multiplying all pixel values of a triggered image by n (and
clipping to the valid range) keeps the backdoor prediction, while a clean image's prediction drifts:
"scaled prediction consistency" (SPC)."""
from __future__ import annotations

import torch

from .base import InputDetector


class ScaleUp(InputDetector):
    """``SPC(x) = mean_n 1[argmax f(clip(n * x, 0, 1)) == argmax f(x)]`` over ``scales`` (default
    3, 5, 7, 9, 11: six forwards per input with the original), all copies in one batch.

    Data-limited SCALE-UP (the paper's variant when a few clean samples are available, which is our
    setting): the score is SPC standardised by the mean and standard deviation of the clean SPC of the
    predicted class, ``(SPC - mu_c) / sigma_c``, which removes classes whose clean images are scale
    invariant anyway. ``normalise=False`` gives the raw SPC.

    The amplification is in pixel space: inputs must be images in ``[lo, hi]`` (default [0, 1], the
    project's convention; any normalisation belongs inside the model). Scaling and clipping an already
    normalised tensor (a known pitfall of a public implementation) clips at the wrong values, so inputs
    outside the range raise instead of being silently clipped."""

    name = "scale-up"

    def __init__(self, scales=(3, 5, 7, 9, 11), normalise: bool = True, value_range=(0.0, 1.0),
                 min_std: float = 0.05, frr: float = 0.01, holdout: float = 0.5,
                 batch_size: int = 512, seed: int = 0):
        super().__init__(frr, holdout, batch_size, seed)
        scales = [float(s) for s in scales]
        if not scales or min(scales) <= 0:
            raise ValueError(f"scales must be positive numbers, got {scales}")
        lo, hi = (float(v) for v in value_range)
        if not lo < hi:
            raise ValueError(f"value_range must be (lo, hi) with lo < hi, got {value_range}")
        self.scales, self.normalise, self.value_range = scales, bool(normalise), [lo, hi]
        self.min_std = float(min_std)

    def spc(self, xb: torch.Tensor):
        """``(spc [B], predicted label [B])`` for a batch on the model's device."""
        lo, hi = self.value_range
        if float(xb.min()) < lo - 1e-6 or float(xb.max()) > hi + 1e-6:
            raise ValueError(f"SCALE-UP amplifies pixel values: inputs must lie in [{lo}, {hi}] "
                             f"(got [{float(xb.min()):.3g}, {float(xb.max()):.3g}]); pass "
                             f"un-normalised images and put the normalisation inside the model")
        s = torch.tensor(self.scales, device=xb.device, dtype=xb.dtype).view(1, -1, 1, 1, 1)
        scaled = torch.cat([xb[:, None], (xb[:, None] * s).clamp(lo, hi)], 1)  # [B, 1 + S, ...]
        pred = self.model(scaled.flatten(0, 1)).argmax(1).view(len(xb), -1)
        return (pred[:, 1:] == pred[:, :1]).float().mean(1), pred[:, 0]

    def _fit_detector(self, model, x_fit, y_fit, num_classes):
        device = next(model.parameters()).device
        self._mu = torch.zeros(num_classes, device=device)
        self._sigma = torch.ones(num_classes, device=device)
        if not self.normalise:
            return
        with torch.no_grad():
            parts = [self.spc(x_fit[i:i + self.batch_size].to(device))
                     for i in range(0, len(x_fit), self.batch_size)]
        spc = torch.cat([p[0] for p in parts])
        pred = torch.cat([p[1] for p in parts])
        for c in range(num_classes):
            v = spc[pred == c]
            if len(v):  # a class the model never predicts on clean data keeps (0, 1)
                self._mu[c] = v.mean()
                self._sigma[c] = v.std(unbiased=False) if len(v) > 1 else 0.0
        self._sigma.clamp_(min=self.min_std)  # a class with constant clean SPC would divide by 0

    def _score(self, xb):
        spc, pred = self.spc(xb)
        return (spc - self._mu[pred]) / self._sigma[pred]
