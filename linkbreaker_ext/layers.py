"""Finding the two LinkBreaker layers in an arbitrary ``nn.Module`` and running the N class-restricted
passes through them with forward hooks, so the guarded model's code is never edited.

* the *early* (input-close) layer is a module whose output is masked, or ``"input"`` for the pixels;
* the *late* (output-close) layer is always the input of the final ``nn.Linear``: its masking, the
  class heads and the vote run in the fused ``guard_head`` op, which needs that Linear's weights.
"""
from __future__ import annotations

import torch
from torch import nn

INPUT = "input"


def final_linear(model: nn.Module, name: str | None = None) -> tuple[str, nn.Linear]:
    """The classifier's last ``nn.Linear`` (in registration order), or the one called ``name``."""
    modules = dict(model.named_modules())
    if name is not None:
        if name not in modules:
            raise ValueError(f"unknown layer {name!r}; the model has: {_names(model)}")
        if not isinstance(modules[name], nn.Linear):
            raise ValueError(f"late layer {name!r} must be an nn.Linear (the classifier), "
                             f"got {type(modules[name]).__name__}")
        return name, modules[name]
    linears = [(n, m) for n, m in modules.items() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("the model has no nn.Linear layer to use as the classifier head")
    return linears[-1]


def early_layer(model: nn.Module, name: str | None = None) -> str:
    """The module name of the input-close layer, or ``"input"`` (the pixels themselves, the default:
    the most input-close neurons there are, and the ones a patch trigger lands on directly)."""
    if name is None or name == INPUT:
        return INPUT
    if name not in dict(model.named_modules()):
        raise ValueError(f"unknown layer {name!r}; use 'input' or one of: {_names(model)}")
    return name


def _names(model: nn.Module) -> list[str]:
    return [n for n, _ in model.named_modules() if n]


class HookedModel:
    """Runs ``model`` with the early layer's output replaced per head and the late features captured.

    ``features(x, masks, fill)`` returns ``[B, N, D]``: for every input and head k the input of the
    final Linear when the early layer's activation ``a`` is replaced by ``masks[k]*a + (1-masks[k])*fill``.
    The N heads run as one batched forward of ``B*N`` rows, not a Python loop.
    """

    def __init__(self, model: nn.Module, early: str, late: str):
        self.model = model
        self.early = early
        self.late_name, self.late = final_linear(model, late)
        self._early_module = None if early == INPUT else dict(model.named_modules())[early]

    @torch.no_grad()
    def activations(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(early activations [B, De], late features [B, Dl]) of an unmasked forward."""
        store = {}
        handles = [self.late.register_forward_pre_hook(lambda m, inp: store.__setitem__("late", inp[0]))]
        if self._early_module is not None:
            handles.append(self._early_module.register_forward_hook(
                lambda m, inp, out: store.__setitem__("early", out)))
        try:
            self.model(x)
        finally:
            for h in handles:
                h.remove()
        early = x if self._early_module is None else store.get("early")
        if early is None or "late" not in store:
            raise RuntimeError("the hooked layers were not reached by the model's forward")
        return early.flatten(1).float(), store["late"].flatten(1).float()

    @torch.no_grad()
    def features(self, x: torch.Tensor, masks: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
        b, n = x.shape[0], masks.shape[0]
        store = {}

        def mask(a: torch.Tensor) -> torch.Tensor:
            flat = a.reshape(b, n, -1)
            m = masks.to(flat.dtype)
            return (m * flat + (1 - m) * fill.to(flat.dtype)).reshape(a.shape)

        handles = [self.late.register_forward_pre_hook(lambda mod, inp: store.__setitem__("late", inp[0]))]
        xr = x.repeat_interleave(n, dim=0)
        if self._early_module is None:
            xr = mask(xr)
        else:
            handles.append(self._early_module.register_forward_hook(lambda mod, inp, out: mask(out)))
        try:
            self.model(xr)
        finally:
            for h in handles:
                h.remove()
        return store["late"].reshape(b, n, -1)
