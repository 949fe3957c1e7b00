"""Algorithm 1: neighbour samples that look like a validation sample and keep its confidence.

For each sample x with label t a soft mask c (initialised to 1, i.e. "keep everything") mixes the
sample with Gaussian noise, P(x, c) = c*x + (1-c)*n, and c is optimised by forward-backward
splitting on ``|g(P(x,c))[t] - g(x)[t]| + lam*||c||_1``: a gradient step on the confidence term,
then the paper's shrinkage ``c / (1 + lam*alpha)``, then projection onto [0, 1]. Pixels the
prediction depends on keep c near 1, the rest become noise. All samples and all their neighbours are
optimised together as one batch; there is no per-sample Python loop.

:func:`perturbed_samples` is the baseline the paper's Table VIII compares Alg. 1 with: the sample
plus random noise, without the optimisation.
"""
from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from .layers import logits_of


def perturbed_samples(x: torch.Tensor, y: torch.Tensor, per_sample: int = 4, noise_std: float = 0.2,
                      seed: int = 0):
    """``(x + N(0, noise_std), y)``, ``per_sample`` copies of every sample, clamped to the value range
    of ``x``: plain perturbation samples (Table VIII), no model involved."""
    if per_sample <= 0 or len(x) == 0:
        return x[:0], y[:0]
    g = torch.Generator(device="cpu").manual_seed(seed)
    xs = x.cpu().repeat_interleave(per_sample, 0)
    noisy = xs + torch.randn(xs.shape, generator=g) * noise_std
    return noisy.clamp(x.min().item(), x.max().item()), y.cpu().repeat_interleave(per_sample, 0)


def generate_neighbours(model: nn.Module, x: torch.Tensor, y: torch.Tensor, per_sample: int = 4,
                        noise_std: float = 0.2, lam: float = 0.05, step: float = 0.5, iters: int = 60,
                        batch_size: int = 4096, seed: int = 0, progress: bool = True):
    """Return ``(x_neighbours, y_neighbours)`` with ``per_sample`` neighbours of every sample.

    The noise is clamped to the value range of ``x`` so neighbours stay valid images.
    """
    if per_sample <= 0 or len(x) == 0:
        return x[:0], y[:0]
    device = next(model.parameters()).device
    g = torch.Generator(device="cpu").manual_seed(seed)
    lo, hi = x.min().item(), x.max().item()
    xs = x.repeat_interleave(per_sample, 0)
    ys = y.repeat_interleave(per_sample, 0)
    out = []
    was_training = model.training
    model.eval()
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        chunks = range(0, len(xs), batch_size)
        bar = tqdm(total=len(chunks) * iters, desc="neighbours", disable=not progress, leave=False)
        for start in chunks:
            xb = xs[start:start + batch_size].to(device)
            yb = ys[start:start + batch_size].to(device)
            noise = (torch.randn(xb.shape, generator=g) * noise_std).to(device).clamp(lo, hi)
            with torch.no_grad():
                ref = logits_of(model(xb)).softmax(1).gather(1, yb[:, None])
            c = torch.ones_like(xb)
            for _ in range(iters):
                c.requires_grad_(True)
                mixed = c * xb + (1 - c) * noise
                conf = logits_of(model(mixed)).softmax(1).gather(1, yb[:, None])
                grad, = torch.autograd.grad((conf - ref).abs().sum(), c)
                with torch.no_grad():
                    c = ((c - step * grad) / (1 + lam * step)).clamp_(0, 1)
                bar.update(1)
            out.append((c * xb + (1 - c) * noise).detach().cpu())
        bar.close()
    finally:
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)
        model.train(was_training)
    return torch.cat(out), ys.cpu()
