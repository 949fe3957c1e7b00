"""Plain supervised training and batched prediction, shared by the attacks, the CLI and the tests."""
from __future__ import annotations

import os

import torch
from torch import nn
from tqdm.auto import tqdm


def crop_flip(xb: torch.Tensor, generator: torch.Generator, pad: int = 4, flip: bool = True) -> torch.Tensor:
    """The standard CIFAR augmentation, batched: a random ``pad``-pixel shift (zero padding) and a
    random horizontal flip per image (``flip=False``: the shift only, for traffic signs, where a
    mirrored "keep left" is "keep right")."""
    b, _, h, w = xb.shape
    padded = nn.functional.pad(xb, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None].expand(b, xb.shape[1], h, w + 2 * pad)
    out = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :].expand(b, xb.shape[1], h, w)
    out = out.gather(3, cols)
    if flip:
        mirrored = torch.rand(b, generator=generator) < 0.5
        out[mirrored] = out[mirrored].flip(3)
    return out


# Optimisers a model can be trained with, each under a one-cycle schedule to its peak learning rate
# (issue #6). "adam": the project's recipe since the start. "sgd": the recipe of the ResNet papers and
# of BackdoorBench's CIFAR-10 models, Nesterov momentum 0.9 and weight decay 5e-4 (not on BatchNorm
# and biases, which weight decay only pushes towards 0). "sgd-bf16": the same under bfloat16 autocast
# (mixed precision: the weights, the optimiser state and BatchNorm's running statistics stay float32),
# which halves a CPU epoch where the processor has bfloat16 instructions (AVX512-BF16, AMX) and
# speeds up a GPU's.
_SGD = {"optimizer": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4}
RECIPES = {"adam": {"optimizer": "adam", "lr": 3e-3}, "sgd": _SGD,
           "sgd-bf16": {**_SGD, "autocast": torch.bfloat16}}


def make_optimizer(model: nn.Module, recipe: str = "adam", lr: float | None = None):
    """``(optimiser, peak learning rate)`` of ``recipe`` (a key of :data:`RECIPES`) for ``model``'s
    parameters; ``lr`` overrides the recipe's peak."""
    if recipe not in RECIPES:
        raise ValueError(f"unknown training recipe {recipe!r}; choose from {sorted(RECIPES)}")
    settings = RECIPES[recipe]
    lr = settings["lr"] if lr is None else lr
    params = [p for p in model.parameters() if p.requires_grad]
    if settings["optimizer"] == "adam":
        return torch.optim.Adam(params, lr=lr), lr
    decayed = [p for p in params if p.dim() > 1]
    rest = [p for p in params if p.dim() <= 1]
    groups = [{"params": decayed, "weight_decay": settings["weight_decay"]},
              {"params": rest, "weight_decay": 0.0}]
    return torch.optim.SGD(groups, lr=lr, momentum=settings["momentum"], nesterov=True), lr


def train_classifier(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int = 5,
                     batch_size: int = 128, lr: float | None = None, seed: int = 0,
                     batch_transform=None, augment: bool | str = False, progress: bool = True,
                     desc: str = "train", checkpoint=None, recipe: str = "adam") -> nn.Module:
    """Train ``model`` with ``recipe``'s optimiser (:data:`RECIPES`; ``lr``: another peak), a one-cycle
    learning-rate schedule and cross-entropy. ``batch_transform(xb, yb, generator) -> (xb, yb)``
    lets an attack poison each batch on the fly (how BadNets mixes trigger samples in); ``augment``
    adds :func:`crop_flip` after poisoning (natural images), as a poisoned data set would be trained
    (``"crop"``: without the flip).
    ``checkpoint`` (a path) saves model, optimiser and schedule after every epoch and resumes from it,
    so a long run that is cut off continues where it stopped."""
    if len(x) != len(y):
        raise ValueError(f"x has {len(x)} samples but y has {len(y)}")
    if augment not in (False, True, "crop", "crop_flip"):
        raise ValueError(f"augment must be False, True, 'crop' or 'crop_flip', got {augment!r}")
    device = next(model.parameters()).device
    convs = [p for p in model.parameters() if p.dim() == 4]
    layout = (torch.channels_last if convs and convs[0].is_contiguous(memory_format=torch.channels_last)
              and not convs[0].is_contiguous() else torch.contiguous_format)
    g = torch.Generator().manual_seed(seed)
    opt, lr = make_optimizer(model, recipe, lr)
    low_precision = RECIPES[recipe].get("autocast")
    steps = epochs * ((len(x) + batch_size - 1) // batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1))
    first = 0
    made_with = {"recipe": recipe, "epochs": epochs, "lr": lr, "batch_size": batch_size}
    if checkpoint is not None and os.path.isfile(checkpoint):
        state = torch.load(checkpoint, weights_only=True)  # tensors and plain containers only
        _check_resumable(checkpoint, state, made_with)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        schedule.load_state_dict(state["schedule"])
        g.set_state(state["generator"])
        first = int(state["epoch"])
    model.train()
    with tqdm(total=steps, initial=first * (steps // max(epochs, 1)), desc=desc,
              disable=not progress, leave=False) as bar:
        for epoch in range(first, epochs):
            order = torch.randperm(len(x), generator=g)
            for start in range(0, len(x), batch_size):
                idx = order[start:start + batch_size]
                xb, yb = x[idx], y[idx]
                if batch_transform is not None:
                    xb, yb = batch_transform(xb, yb, g)
                if augment:
                    xb = crop_flip(xb, g, flip=augment != "crop")
                xb = xb.to(device).contiguous(memory_format=layout) if xb.dim() == 4 else xb.to(device)
                with torch.autocast(device.type, dtype=low_precision, enabled=low_precision is not None):
                    logits = model(xb)
                loss = nn.functional.cross_entropy(logits.float(), yb.to(device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                schedule.step()
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
            if checkpoint is not None:
                tmp = f"{checkpoint}.tmp"
                torch.save({"model": model.state_dict(), "opt": opt.state_dict(),
                            "schedule": schedule.state_dict(), "generator": g.get_state(),
                            "epoch": epoch + 1, "made_with": made_with}, tmp)
                os.replace(tmp, checkpoint)
    model.eval()
    return model


def _check_resumable(path, state: dict, made_with: dict) -> None:
    """Refuse to resume a checkpoint of another run: another recipe's optimiser state, or another
    length, whose one-cycle schedule would stop early or overrun. Checkpoints from before the
    record are judged by their optimiser (Adam has one parameter group, SGD two)."""
    saved = state.get("made_with")
    if saved is None:
        groups = len(state["opt"].get("param_groups", []))
        saved = {"recipe": "adam" if groups == 1 else "sgd"}  # sgd-bf16 came with the record
    diff = {k: (saved[k], made_with[k]) for k in saved if k in made_with and saved[k] != made_with[k]}
    if diff:
        what = ", ".join(f"{k}={a!r} there, {b!r} here" for k, (a, b) in diff.items())
        raise ValueError(f"checkpoint {path} belongs to another training run ({what}): resume it with "
                         f"its own settings, or delete it (or use another --work) to train afresh")


@torch.no_grad()
def predict_logits(model: nn.Module, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    device = next(model.parameters()).device
    model.eval()
    return torch.cat([model(x[i:i + batch_size].to(device)).float().cpu()
                      for i in range(0, len(x), batch_size)]) if len(x) else torch.empty(0)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return (predict_logits(model, x).argmax(1) == y).float().mean().item()
