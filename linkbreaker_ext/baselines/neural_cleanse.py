"""Neural Cleanse (Wang et al., IEEE S&P 2019): a backdoor target label needs a much smaller trigger
to flip every input to it than a clean label does. Reverse-engineer the smallest trigger per class,
flag the classes whose trigger norm is an outlier (MAD anomaly index > 2), unlearn the trigger."""
from __future__ import annotations

import torch
from torch import nn

from .base import ModelDefense, frozen_copy, model_device, unlearn


def stamp(x: torch.Tensor, mask: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
    """``(1 - m) x + m p`` with ``mask [1, H, W]`` and ``pattern [C, H, W]`` in [0, 1]."""
    return (1 - mask) * x + mask * pattern


def anomaly_index(norms: torch.Tensor) -> torch.Tensor:
    """Neural Cleanse's anomaly index per class: ``(median - norm) / (1.4826 * MAD)``; positive for
    classes with a smaller-than-median trigger (the only direction that indicates a backdoor)."""
    med = norms.median()
    mad = 1.4826 * (norms - med).abs().median()
    return (med - norms) / mad.clamp_min(1e-12)


class NeuralCleanse(ModelDefense):
    """For every class k at once (all classes in one batch: ``K x batch_size`` images per step),
    optimise a mask ``m_k`` and pattern ``p_k`` (tanh-parametrised, so in [0, 1]) to minimise
    ``CE(f((1 - m_k) x + m_k p_k), k) + lambda_k |m_k|_1`` on the clean validation set. ``lambda_k``
    follows the paper's schedule: starts at ``init_cost``; after ``patience`` epochs with attack success
    >= ``success`` it is multiplied by 1.5, after ``patience`` epochs below it divided by 1.5^1.5. The
    smallest mask reaching ``success`` is kept per class.

    Verdict: the classes with anomaly index > ``anomaly_threshold``; ``flagged`` when there is one.
    Mitigation (only when flagged): :func:`base.unlearn` on a copy with the most anomalous class's
    trigger stamped on ``unlearn_rate`` of every batch, true labels kept.

    Simplification: a fixed number of ``epochs`` over the validation set (the paper runs until the
    cost schedule converges) and no early stopping."""

    name = "neural-cleanse"

    def __init__(self, epochs: int = 20, batch_size: int = 32, lr: float = 0.1,
                 init_cost: float = 1e-3, success: float = 0.99, patience: int = 2,
                 anomaly_threshold: float = 2.0, unlearn_rate: float = 0.2, unlearn_epochs: int = 10,
                 unlearn_lr: float = 3e-3, seed: int = 0):
        super().__init__(seed)
        if epochs < 1 or batch_size < 1:
            raise ValueError("epochs and batch_size must be >= 1")
        self.epochs, self.batch_size, self.lr = int(epochs), int(batch_size), float(lr)
        self.init_cost, self.success, self.patience = float(init_cost), float(success), int(patience)
        self.anomaly_threshold = float(anomaly_threshold)
        self.unlearn_rate, self.unlearn_epochs = float(unlearn_rate), int(unlearn_epochs)
        self.unlearn_lr = float(unlearn_lr)
        self.masks = self.patterns = None

    def reverse_engineer(self, model: nn.Module, x: torch.Tensor, num_classes: int):
        """``(masks [K, 1, H, W], patterns [K, C, H, W], success [K])`` on CPU."""
        net = frozen_copy(model)
        device = model_device(net)
        k, (c, h, w) = num_classes, x.shape[1:]
        mask_raw = torch.zeros(k, 1, h, w, device=device, requires_grad=True)
        pat_raw = torch.zeros(k, c, h, w, device=device, requires_grad=True)
        opt = torch.optim.Adam([mask_raw, pat_raw], lr=self.lr, betas=(0.5, 0.9))
        cost = torch.full((k,), self.init_cost, device=device)
        up = torch.zeros(k, dtype=torch.long, device=device)
        down = torch.zeros_like(up)
        targets = torch.arange(k, device=device)
        best_norm = torch.full((k,), float("inf"), device=device)
        best_mask = torch.ones(k, 1, h, w, device=device)
        best_pat = torch.zeros(k, c, h, w, device=device)
        best_acc = torch.zeros(k, device=device)
        g = torch.Generator().manual_seed(self.seed)
        for _ in range(self.epochs):
            order = torch.randperm(len(x), generator=g)
            hits = torch.zeros(k, device=device)
            seen = 0
            for start in range(0, len(x), self.batch_size):
                xb = x[order[start:start + self.batch_size]].to(device)
                mask = (torch.tanh(mask_raw) + 1) / 2
                pat = (torch.tanh(pat_raw) + 1) / 2
                adv = stamp(xb[None], mask[:, None], pat[:, None])           # [K, B, C, H, W]
                out = net(adv.flatten(0, 1)).float()
                tgt = targets.repeat_interleave(len(xb))
                ce = nn.functional.cross_entropy(out, tgt, reduction="none").view(k, -1).mean(1)
                l1 = mask.flatten(1).sum(1)
                loss = (ce + cost * l1).sum()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                with torch.no_grad():
                    hits += (out.argmax(1) == tgt).view(k, -1).float().sum(1)
                seen += len(xb)
            with torch.no_grad():
                acc = hits / seen
                mask = (torch.tanh(mask_raw) + 1) / 2
                norm = mask.flatten(1).sum(1)
                ok = acc >= self.success
                better = ok & (norm < best_norm)
                best_norm = torch.where(better, norm, best_norm)
                best_mask[better] = mask[better]
                best_pat[better] = ((torch.tanh(pat_raw) + 1) / 2)[better]
                best_acc = torch.where(better, acc, best_acc)
                up = torch.where(ok, up + 1, torch.zeros_like(up))
                down = torch.where(ok, torch.zeros_like(down), down + 1)
                cost = torch.where(up >= self.patience, cost * 1.5, cost)
                cost = torch.where(down >= self.patience, cost / 1.5 ** 1.5, cost)
                up = torch.where(up >= self.patience, torch.zeros_like(up), up)
                down = torch.where(down >= self.patience, torch.zeros_like(down), down)
        # a class that never reached the success rate keeps its last mask (a large norm)
        with torch.no_grad():
            never = torch.isinf(best_norm)
            best_mask[never] = ((torch.tanh(mask_raw) + 1) / 2)[never]
            best_pat[never] = ((torch.tanh(pat_raw) + 1) / 2)[never]
        return best_mask.detach().cpu(), best_pat.detach().cpu(), best_acc.cpu()

    def _fit(self, model, x_val, y_val, num_classes):
        masks, patterns, acc = self.reverse_engineer(model, x_val, num_classes)
        self.masks, self.patterns = masks, patterns
        norms = masks.flatten(1).sum(1)
        index = anomaly_index(norms)
        flagged = [int(i) for i in (index > self.anomaly_threshold).nonzero().flatten()]
        self.flagged = bool(flagged)
        self.report = {"mask_l1": norms.tolist(), "anomaly_index": index.tolist(),
                       "attack_success": acc.tolist(), "flagged_classes": flagged,
                       "model_anomaly_index": float(index.max())}
        self.repaired = None
        if flagged:
            t = max(flagged, key=lambda i: float(index[i]))
            self.report["unlearned_class"] = t
            m, p = masks[t], patterns[t]
            self.repaired = unlearn(model, x_val, y_val, lambda xb: stamp(xb, m, p),
                                    rate=self.unlearn_rate, epochs=self.unlearn_epochs,
                                    lr=self.unlearn_lr, seed=self.seed)
