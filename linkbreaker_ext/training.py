"""Plain supervised training and batched prediction, shared by the attacks, the CLI and the tests."""
from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm


def train_classifier(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int = 5,
                     batch_size: int = 128, lr: float = 3e-3, seed: int = 0,
                     batch_transform=None, progress: bool = True, desc: str = "train") -> nn.Module:
    """Train ``model`` with Adam, a one-cycle learning-rate schedule and cross-entropy. ``batch_transform(xb, yb, generator) -> (xb, yb)``
    lets an attack poison each batch on the fly (how BadNets mixes trigger samples in)."""
    if len(x) != len(y):
        raise ValueError(f"x has {len(x)} samples but y has {len(y)}")
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    steps = epochs * ((len(x) + batch_size - 1) // batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1))
    with tqdm(total=steps, desc=desc, disable=not progress, leave=False) as bar:
        for _ in range(epochs):
            order = torch.randperm(len(x), generator=g)
            for start in range(0, len(x), batch_size):
                idx = order[start:start + batch_size]
                xb, yb = x[idx], y[idx]
                if batch_transform is not None:
                    xb, yb = batch_transform(xb, yb, g)
                loss = nn.functional.cross_entropy(model(xb.to(device)), yb.to(device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                schedule.step()
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    model.eval()
    return model


@torch.no_grad()
def predict_logits(model: nn.Module, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    device = next(model.parameters()).device
    model.eval()
    return torch.cat([model(x[i:i + batch_size].to(device)).float().cpu()
                      for i in range(0, len(x), batch_size)]) if len(x) else torch.empty(0)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return (predict_logits(model, x).argmax(1) == y).float().mean().item()
