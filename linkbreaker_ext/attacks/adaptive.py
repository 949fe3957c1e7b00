"""An adaptive backdoor (the paper's Sec. VI-G, in the spirit of Tan & Shokri's adversarial
embedding): the attacker knows the defense and the layers it masks and checks, and trains the model
**and** the trigger together so that triggered inputs look like the target class's clean inputs in
those layers, not only at the output.

:class:`AdaptivePatch` is a square patch in the bottom-right corner (as BadNets), whose pixels are
learned. Every training batch has a ``poison_rate`` share stamped with the current trigger and
relabelled to the target; the loss adds, to the cross-entropy, ``feature_weight`` times the excess
over ``tolerance`` of the triggered samples' deviation from the target class's clean neuron values
(the mean |z|, each capped at :data:`Z_CAP`, against running means and spreads of the clean target
samples of past batches: the guard's kind of deviation), in every named layer read as the guard
reads it: pixels at the input, each channel's mean and maximum at a conv layer,
elements otherwise, and the final Linear's input. The gradient of that loss trains the model and
moves the trigger pixels at once. ``feature_weight=0`` is the control: a learned patch with no
evasion term.
"""
from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import training
from ..layers import INPUT, final_linear
from .patch import BadNets, square_mask, square_side


Z_CAP = 10.0  # largest |z| a single neuron contributes to the evasion loss


def _views(a: torch.Tensor) -> list:
    """The guard's neurons of one layer output: channel means and maxima of a conv map, else the
    flattened values."""
    if a.dim() == 4:
        return [a.mean((2, 3)), a.amax((2, 3))]
    return [a.flatten(1)]


class AdaptivePatch(BadNets):
    """BadNets' corner patch and poisoning (its ``batch_transform`` stamps the current trigger),
    with the patch's pixels learned to pass a consistency check on ``layers`` (module names;
    ``"input"``: the pixels). ``size_fraction``: the patch's share of the image (side rounded).
    Training is not resumable (``checkpoint`` is not supported)."""

    name = "adaptive"

    def __init__(self, target: int = 0, size_fraction: float = 0.1, margin: int = 1, seed: int = 0,
                 pattern=None, poison_rate: float = 0.1, layers=(INPUT, "relu1", "relu2"),
                 feature_weight: float = 1.0, tolerance: float = 1.0, trigger_lr: float = 0.05,
                 momentum: float = 0.9):
        super().__init__(target, poison_rate, size_fraction, margin, seed, pattern)
        self.layers = [str(n) for n in layers]
        if not feature_weight >= 0:
            raise ValueError(f"feature_weight must be >= 0, got {feature_weight!r}")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must lie in [0, 1), got {momentum!r}")
        self.feature_weight, self.trigger_lr = float(feature_weight), float(trigger_lr)
        self.tolerance = float(tolerance)
        self.momentum = float(momentum)

    def train_backdoored(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int = 5,
                         batch_size: int = 128, lr: float | None = None, seed: int = 0,
                         progress: bool = True, augment=False, checkpoint=None, desc: str | None = None,
                         recipe: str = "adam") -> nn.Module:
        """Train ``model`` (``recipe``'s optimiser, one-cycle, as :func:`training.train_classifier`) and the trigger
        (Adam at ``trigger_lr`` on its logits) jointly; the learned trigger is kept (``to_dict``
        saves it)."""
        if checkpoint is not None:
            raise ValueError("AdaptivePatch training is not resumable: pass checkpoint=None")
        if training.RECIPES.get(recipe, {}).get("autocast") is not None:
            # the trigger's own optimisation reads small feature deviations that bfloat16 rounds away
            raise ValueError(f"AdaptivePatch trains in float32 only: use the {recipe.split('-')[0]!r} "
                             f"recipe, not {recipe!r}")
        device = next(model.parameters()).device
        modules = dict(model.named_modules())
        missing = [n for n in self.layers if n != INPUT and n not in modules]
        if missing:
            raise ValueError(f"unknown layers {missing}; the model has: {[n for n in modules if n]}")
        _, head = final_linear(model)
        c, h, w = x.shape[1:]
        side = square_side(h, w, self.size_fraction)
        mask = square_mask(h, w, side, self.margin).to(device)
        start = self._fixed if self._fixed is not None else self._pattern(side)
        start = start.expand(c, side, side) if start.dim() == 2 else start
        theta = torch.logit(start.float().clamp(0.1, 0.9)).to(device).requires_grad_(True)
        g = torch.Generator().manual_seed(seed)
        opt, lr = training.make_optimizer(model, recipe, lr)
        opt_t = torch.optim.Adam([theta], lr=self.trigger_lr)
        steps = epochs * ((len(x) + batch_size - 1) // batch_size)
        schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1))
        stats = None  # running (mean, std) of the clean target class's neuron values, per view
        acts = {}
        hooks = [modules[n].register_forward_hook(lambda m, i, o, n=n: acts.__setitem__(n, o))
                 for n in self.layers if n != INPUT]
        hooks.append(head.register_forward_pre_hook(lambda m, i: acts.__setitem__("late", i[0])))
        model.train()
        try:
            with tqdm(total=steps, desc=desc or self.name, disable=not progress, leave=False) as bar:
                for _ in range(epochs):
                    order = torch.randperm(len(x), generator=g)
                    for s in range(0, len(x), batch_size):
                        idx = order[s:s + batch_size]
                        xb, yb = x[idx].to(device), y[idx].to(device)
                        n_p = int(round(self.poison_rate * len(xb)))

                        def stamp(images, pixels):
                            full = torch.zeros(c, h, w, device=device).masked_scatter(
                                mask.expand(c, h, w), pixels.reshape(-1))
                            return torch.where(mask, full, images)

                        # the model: cross-entropy on the batch poisoned with the current trigger
                        xp = torch.cat([stamp(xb[:n_p], torch.sigmoid(theta).detach()), xb[n_p:]])
                        yp = torch.cat([torch.full_like(yb[:n_p], self.target), yb[n_p:]])
                        if augment:
                            xp = training.crop_flip(xp, g, flip=augment not in ("crop",))
                        acts.clear()
                        loss = nn.functional.cross_entropy(model(xp), yp)
                        opt.zero_grad(set_to_none=True)
                        loss.backward()
                        opt.step()
                        schedule.step()
                        bar.update(1)
                        clean_t = yb == self.target
                        clean_t[:n_p] = False
                        if self.feature_weight > 0 and clean_t.sum() >= 2:
                            now = [(v[clean_t].detach().mean(0), v[clean_t].detach().std(0))
                                   for v in self._read(xp, acts)]
                            stats = now if stats is None else [
                                (self.momentum * m + (1 - self.momentum) * m1,
                                 self.momentum * sd + (1 - self.momentum) * sd1)
                                for (m, sd), (m1, sd1) in zip(stats, now)]
                        if not n_p:
                            continue
                        # the trigger: still the target, and as close to the target class's clean
                        # inputs as the guard reads them (the model is not moved by this loss)
                        xt = stamp(xb[:n_p], torch.sigmoid(theta))
                        acts.clear()
                        model.eval()  # a batch of triggered samples alone must not move BatchNorm's statistics
                        loss_t = nn.functional.cross_entropy(model(xt), yp[:n_p])
                        model.train()
                        if self.feature_weight > 0 and stats is not None:
                            # the guard's kind of deviation: mean |z| per view, each z capped so one
                            # hopeless unit does not drown the rest; only the excess over a typical
                            # clean deviation counts
                            dev = [((v - m) / sd.clamp_min(0.1 * sd.median() + 1e-3)).abs()
                                   .clamp_max(Z_CAP).mean(1) for v, (m, sd) in zip(self._read(xt, acts), stats)]
                            loss_t = loss_t + self.feature_weight * torch.relu(
                                torch.stack(dev, 1) - self.tolerance).mean()
                        grad, = torch.autograd.grad(loss_t, theta)
                        theta.grad = grad
                        opt_t.step()
        finally:
            for hk in hooks:
                hk.remove()
        model.eval()
        self._fixed = torch.sigmoid(theta).detach().cpu()
        self._last = self._fixed
        return model

    def _read(self, x, acts) -> list:
        """The neuron values the guard reads, per view, of the forward of ``x`` that filled ``acts``."""
        return ([x.flatten(1)] if INPUT in self.layers else []) + [
            v for n in self.layers if n != INPUT for v in _views(acts[n])] + [acts["late"].flatten(1)]

    def to_dict(self):
        d = super().to_dict()
        d.update(layers=list(self.layers), feature_weight=self.feature_weight,
                 tolerance=self.tolerance, trigger_lr=self.trigger_lr, momentum=self.momentum)
        return d
