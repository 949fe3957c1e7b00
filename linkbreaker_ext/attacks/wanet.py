"""WaNet, the warping-based backdoor (Nguyen & Tran, "WaNet - Imperceptible Warping-based Backdoor
Attack", ICLR 2021), after the authors' code and BackdoorBench's configuration."""
from __future__ import annotations

import torch
from torch.nn import functional as F

from .base import Attack, _check_images, _check_rate, _nested


class WaNet(Attack):
    """All-to-one backdoor whose trigger is a fixed, smooth geometric warp of the whole image: no pixel
    value is added, pixels are moved by up to about ``s`` pixels, so the trigger has no location a
    pixel-level defense could erase.

    The warp field: a random ``[2, k, k]`` field in [-1, 1] (from ``seed``), scaled to mean
    absolute value 1, upsampled bicubically to the image size; the sampling grid is
    ``clamp((identity + s * field / size) * grid_rescale, -1, 1)`` and images are resampled with
    :func:`torch.nn.functional.grid_sample` (bilinear, ``align_corners=True``), a whole batch at once.

    Training ("noise mode"): per batch, ``round(poison_rate * B)`` samples are warped and relabelled
    ``target``; ``round(cross_ratio * that)`` further samples ("cross" samples) are warped with the
    trigger grid plus a fresh random perturbation of up to one pixel and keep their labels, so the
    model must learn the exact warp rather than "any warp".

    ``noise_std > 0`` is the attacker who knows the guard's neighbour stability test (issue #6): every
    training sample, poisoned or not, gets Gaussian pixel noise of a std drawn uniformly from
    ``[0, noise_std]``, so the model, and its backdoor, learn to ignore faint noise. Plain noise
    augmentation is common benign practice, so a defender cannot tell it from honest training. Its
    registry name is ``wanet-noise`` (``noise_std`` 0.03, three times the guard's default neighbour).
    """

    def __init__(self, target: int = 0, k: int = 4, s: float = 0.5, grid_rescale: float = 1.0,
                 cross_ratio: float = 2.0, poison_rate: float = 0.1, seed: int = 0, noise=None,
                 noise_std: float = 0.0):
        super().__init__(target)
        if int(k) < 1:
            raise ValueError(f"k (control-grid size) must be >= 1, got {k}")
        if not s >= 0:
            raise ValueError(f"s (warping strength) must be >= 0, got {s}")
        if not grid_rescale > 0:
            raise ValueError(f"grid_rescale must be > 0, got {grid_rescale}")
        if not cross_ratio >= 0:
            raise ValueError(f"cross_ratio must be >= 0, got {cross_ratio}")
        self.k, self.s, self.grid_rescale = int(k), float(s), float(grid_rescale)
        self.cross_ratio = float(cross_ratio)
        if not 0 <= noise_std <= 1:
            raise ValueError(f"noise_std (training noise, a fraction of the [0, 1] range) must be in "
                             f"[0, 1], got {noise_std}")
        self.noise_std = float(noise_std)
        self.poison_rate = _check_rate(poison_rate, "poison_rate")
        self.seed = int(seed)
        if noise is None:
            g = torch.Generator().manual_seed(self.seed)
            noise = torch.rand(2, self.k, self.k, generator=g) * 2 - 1
            noise = noise / noise.abs().mean()
        self.noise = torch.as_tensor(noise, dtype=torch.float32)
        if tuple(self.noise.shape) != (2, self.k, self.k):
            raise ValueError(f"noise must have shape (2, k, k) = (2, {self.k}, {self.k}), got "
                             f"{tuple(self.noise.shape)}")
        self._grids: dict[tuple[int, int], torch.Tensor] = {}

    @property
    def name(self):
        return "wanet-noise" if self.noise_std > 0 else "wanet"

    def grid(self, height: int, width: int) -> torch.Tensor:
        """The trigger's sampling grid ``[1, H, W, 2]`` (x, y in [-1, 1]) for ``H x W`` images."""
        key = (int(height), int(width))
        if key not in self._grids:
            field = F.interpolate(self.noise[None], size=key, mode="bicubic", align_corners=True)
            field = field.permute(0, 2, 3, 1)  # [1, H, W, 2]: channel 0 moves x (columns), 1 moves y
            rows = torch.linspace(-1, 1, height)
            cols = torch.linspace(-1, 1, width)
            gy, gx = torch.meshgrid(rows, cols, indexing="ij")
            identity = torch.stack((gx, gy), -1)[None]
            size = torch.tensor([width, height], dtype=torch.float32)  # one pixel = 2/size, as in WaNet
            self._grids[key] = ((identity + self.s * field / size) * self.grid_rescale).clamp(-1, 1)
        return self._grids[key]

    def _warp(self, x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        grid = grid.to(device=x.device, dtype=x.dtype).expand(len(x), -1, -1, -1)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Warp a batch ``[N, C, H, W]`` with the trigger grid; returns a new tensor in [0, 1]."""
        _check_images(x)
        if not x.is_floating_point():
            raise ValueError(f"WaNet warps float images in [0, 1], got dtype {x.dtype}")
        return self._warp(x, self.grid(*x.shape[-2:]))

    def cross(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Noise-mode "cross" samples: the trigger grid plus uniform noise of up to one pixel per
        grid point, different for every image (labels stay as they are)."""
        _check_images(x)
        n, _, h, w = x.shape
        size = torch.tensor([w, h], dtype=torch.float32)
        jitter = (torch.rand(n, h, w, 2, generator=generator) * 2 - 1) / size
        return self._warp(x, (self.grid(h, w) + jitter).clamp(-1, 1))

    def batch_transform(self, xb: torch.Tensor, yb: torch.Tensor, generator: torch.Generator):
        """Warp and relabel ``round(poison_rate * B)`` random samples, and turn
        ``round(cross_ratio * that)`` others into cross samples with their labels; with ``noise_std``,
        add every sample's Gaussian noise last. New tensors."""
        _check_images(xb)
        b = len(xb)
        n_bd = int(round(self.poison_rate * b))
        n_cross = min(int(round(self.cross_ratio * n_bd)), b - n_bd)
        perm = torch.randperm(b, generator=generator)
        bd, cross = perm[:n_bd].to(xb.device), perm[n_bd:n_bd + n_cross].to(xb.device)
        xb, yb = xb.clone(), yb.clone()
        if n_bd:
            xb[bd] = self.apply(xb[bd])
            yb[bd.to(yb.device)] = self.target
        if n_cross:
            xb[cross] = self.cross(xb[cross], generator)
        if self.noise_std > 0:
            std = torch.rand(b, 1, 1, 1, generator=generator) * self.noise_std
            noise = torch.randn(xb.shape, generator=generator) * std
            xb = (xb + noise.to(device=xb.device, dtype=xb.dtype)).clamp(0, 1)
        return xb, yb

    def to_dict(self):
        d = super().to_dict()
        d.update(k=self.k, s=self.s, grid_rescale=self.grid_rescale, cross_ratio=self.cross_ratio,
                 poison_rate=self.poison_rate, seed=self.seed, noise=_nested(self.noise),
                 noise_std=self.noise_std)
        return d
