"""STRIP (Gao et al., ACSAC 2019): a triggered input keeps its (target) prediction whatever clean image
is superimposed on it, so the predictions of its superimposed copies have low entropy; a clean input's
copies scatter over classes (high entropy)."""
from __future__ import annotations

import torch

from .base import InputDetector


class STRIP(InputDetector):
    """Superimpose ``n_overlays`` random clean validation images on every input and average the Shannon
    entropy of the model's softmax over them. Score = minus that entropy (low entropy = suspicious).

    ``blend="add"`` is STRIP's own superimposition (``x + overlay`` saturated at 1, as OpenCV's
    ``addWeighted(x, 1, o, 1, 0)`` in the authors' code); ``blend="mean"`` averages the two images.
    The overlays are drawn from the fitting part of the validation set with a fixed generator, so the
    score of an input does not depend on the batch it arrives in. All ``B x n_overlays`` copies of a
    batch run as one batch on the model's device."""

    name = "strip"

    def __init__(self, n_overlays: int = 100, blend: str = "add", frr: float = 0.01,
                 holdout: float = 0.5, batch_size: int = 64, seed: int = 0):
        super().__init__(frr, holdout, batch_size, seed)
        if n_overlays < 1:
            raise ValueError(f"n_overlays must be >= 1, got {n_overlays}")
        if blend not in ("add", "mean"):
            raise ValueError(f"blend must be 'add' or 'mean', got {blend!r}")
        self.n_overlays, self.blend = int(n_overlays), blend

    def _fit_detector(self, model, x_fit, y_fit, num_classes):
        self._pool = x_fit.clone()
        self._input_shape = tuple(x_fit.shape[1:])

    def _score(self, xb):
        if tuple(xb.shape[1:]) != self._input_shape:
            raise ValueError(f"input shape {tuple(xb.shape)} does not match the fitted "
                             f"[B, {', '.join(map(str, self._input_shape))}]")
        pool = self._pool.to(xb.device)
        # Same overlay choice for the same input position in every call: a generator per batch
        # seeded from the detector's seed (deterministic, no per-image Python loop).
        g = torch.Generator().manual_seed(self.seed)
        idx = torch.randint(len(pool), (len(xb), self.n_overlays), generator=g).to(xb.device)
        over = pool[idx]                                   # [B, N, C, H, W]
        mixed = xb[:, None] + over if self.blend == "add" else 0.5 * (xb[:, None] + over)
        mixed = mixed.clamp(0.0, 1.0).flatten(0, 1)        # [B * N, C, H, W]
        p = torch.softmax(self.model(mixed).float(), dim=1)
        entropy = -(p * torch.log(p.clamp_min(1e-12))).sum(1).view(len(xb), self.n_overlays)
        return -entropy.mean(1)
