"""Adversarial examples of the robustness study (Sec. V-E): FGSM, BIM and DeepFool, untargeted."""
from __future__ import annotations

import functools

import torch
from torch import nn

from .base import _check_images


def _batched_attack(step_fn):
    """Run ``step_fn(model, xb, yb, **kw)`` per batch on the model's device with the model in eval mode
    (restored afterwards); returns a new tensor on ``x``'s device."""

    @functools.wraps(step_fn)
    def run(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *args, batch_size: int = 256, **kw):
        _check_images(x)
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        try:
            out = [step_fn(model, x[i:i + batch_size].to(device), y[i:i + batch_size].to(device),
                           *args, **kw).to(x.device)
                   for i in range(0, len(x), batch_size)]
        finally:
            model.train(was_training)
        return torch.cat(out) if out else x.clone()

    return run


def _input_grad(model, x, y):
    x = x.detach().clone().requires_grad_(True)
    loss = nn.functional.cross_entropy(model(x), y)
    (grad,) = torch.autograd.grad(loss, x)
    return grad


@_batched_attack
def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    """Untargeted FGSM (Goodfellow et al.): ``x + eps * sign(grad loss)``, clamped to [0, 1]."""
    return (x + eps * _input_grad(model, x, y).sign()).clamp(0.0, 1.0).detach()


@_batched_attack
def bim(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, alpha: float = 0.01,
        steps: int = 10) -> torch.Tensor:
    """Untargeted BIM / iterative FGSM (Kurakin et al.): ``steps`` signed steps of size ``alpha``, kept in
    the L-inf ``eps`` ball around ``x`` and in [0, 1]."""
    adv = x.detach().clone()
    for _ in range(steps):
        adv = adv + alpha * _input_grad(model, adv, y).sign()
        adv = torch.min(torch.max(adv, x - eps), x + eps).clamp(0.0, 1.0).detach()
    return adv


@_batched_attack
def deepfool(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int = 50,
             overshoot: float = 0.02, num_classes: int = 10) -> torch.Tensor:
    """Untargeted DeepFool (Moosavi-Dezfooli et al., L2): per sample, step to the nearest linearised
    decision boundary among the ``num_classes`` top classes until the label changes; clamped to
    [0, 1]. ``y`` is unused (the attack starts from the model's own prediction)."""
    x0 = x.detach()
    with torch.no_grad():
        logits = model(x0)
    k = min(num_classes, logits.shape[1])
    classes = logits.argsort(1, descending=True)[:, :k]  # [N, k], column 0 = original label
    orig = classes[:, 0]
    r_tot = torch.zeros_like(x0)
    active = torch.ones(len(x0), dtype=torch.bool, device=x0.device)
    for _ in range(steps):
        xa = (x0 + (1 + overshoot) * r_tot).clamp(0, 1).requires_grad_(True)
        out = model(xa)
        active = active & (out.argmax(1) == orig)
        if not bool(active.any()):
            break
        f = out.gather(1, classes)  # [N, k]
        grads = [torch.autograd.grad(f[:, j].sum(), xa, retain_graph=j < k - 1)[0]
                 for j in range(k)]
        g0 = grads[0]
        best = torch.full((len(x0),), float("inf"), device=x0.device)
        best_r = torch.zeros_like(x0)
        for j in range(1, k):
            w = grads[j] - g0
            fd = (f[:, j] - f[:, 0]).detach().abs()
            wn = w.flatten(1).norm(dim=1) + 1e-8
            dist = fd / wn
            better = dist < best
            best = torch.where(better, dist, best)
            step = ((dist + 1e-4) / wn).view(-1, 1, 1, 1) * w
            best_r[better] = step[better]
        r_tot = r_tot + best_r * active.view(-1, 1, 1, 1)
    return (x0 + (1 + overshoot) * r_tot).clamp(0, 1).detach()
