"""Fine-Pruning (Liu et al., RAID 2018): backdoor behaviour lives in last-layer conv channels that stay
dormant on clean data; prune them, then fine-tune on clean data to recover accuracy."""
from __future__ import annotations

import copy

import torch
from torch import nn

from .base import ModelDefense, eval_mode, logits, model_device

ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Hardswish)


def pruning_point(model: nn.Module) -> str:
    """The activation that follows the last ``Conv2d`` (module order), or the conv itself when none
    does: where a channel's clean activity is measured and where it is pruned."""
    names = list(dict(model.named_modules()))
    modules = dict(model.named_modules())
    convs = [i for i, n in enumerate(names) if isinstance(modules[n], nn.Conv2d)]
    if not convs:
        raise ValueError("Fine-Pruning needs an nn.Conv2d layer; pass layer=<module name>")
    for n in names[convs[-1] + 1:]:
        if isinstance(modules[n], ACTIVATIONS):
            return n
        if isinstance(modules[n], (nn.Conv2d, nn.Linear)):
            break
    return names[convs[-1]]


class ChannelMask:
    """Forward hook zeroing pruned channels (a fixed 0/1 vector): the pruned model stays an ordinary
    module, and fine-tuning cannot revive the pruned channels."""

    def __init__(self, keep: torch.Tensor):
        self.keep = keep

    def __call__(self, module, inputs, output):
        return output * self.keep.view(1, -1, *([1] * (output.dim() - 2))).to(output.dtype)


class FinePruning(ModelDefense):
    """Step 1 (``pruned``): on a copy, prune the channels of ``layer`` (default :func:`pruning_point`)
    in increasing order of their mean activation on the clean validation set, either a fixed
    ``prune_ratio`` or, by default, as many as possible while clean validation accuracy stays within
    ``max_acc_drop`` of the original (the paper's stopping rule, 4 points). Step 2 (``repaired``):
    fine-tune a copy of the pruned model on the clean validation set for ``epochs``.
    Both steps are reported (``report``), as the LinkBreaker paper's Sec. V-C does. No verdict:
    ``flagged`` stays None.

    Simplification: the fine-tuning data is the clean validation set (the defender's only clean data
    here); the paper fine-tunes on its clean training data."""

    name = "fine-pruning"

    def __init__(self, layer: str | None = None, prune_ratio: float | None = None,
                 max_acc_drop: float = 0.04, epochs: int = 5, lr: float = 1e-3,
                 batch_size: int = 64, seed: int = 0):
        super().__init__(seed)
        if prune_ratio is not None and not 0.0 <= prune_ratio < 1.0:
            raise ValueError(f"prune_ratio must be in [0, 1), got {prune_ratio}")
        self.layer, self.prune_ratio, self.max_acc_drop = layer, prune_ratio, float(max_acc_drop)
        self.epochs, self.lr, self.batch_size = int(epochs), float(lr), int(batch_size)
        self.pruned: nn.Module | None = None

    def _fit(self, model, x_val, y_val, num_classes):
        from .. import training

        name = self.layer or pruning_point(model)
        net = copy.deepcopy(model).eval()
        module = dict(net.named_modules()).get(name)
        if module is None:
            raise ValueError(f"model has no module named {name!r}")
        device = model_device(net)
        acts = []
        h = module.register_forward_hook(lambda m, i, o: acts.append(
            o.detach().float().transpose(0, 1).flatten(1).mean(1) * len(o)))
        with torch.no_grad(), eval_mode(net):
            z = logits(net, x_val)
        h.remove()
        mean_act = torch.stack(acts).sum(0) / len(x_val)
        order = mean_act.argsort()  # most dormant first
        y_d = y_val.to(device)
        acc0 = float((z.argmax(1) == y_d).float().mean())

        keep = torch.ones(len(order), device=device)
        mask_hook = module.register_forward_hook(ChannelMask(keep))
        accs = [acc0]
        if self.prune_ratio is not None:
            n = int(round(self.prune_ratio * len(order)))
            keep[order[:n]] = 0
        else:
            n = 0
            for i in range(len(order) - 1):  # never prune every channel
                keep[order[i]] = 0
                acc = float((logits(net, x_val).argmax(1) == y_d).float().mean())
                accs.append(acc)
                if acc0 - acc > self.max_acc_drop:
                    keep[order[i]] = 1
                    break
                n = i + 1
        acc_pruned = float((logits(net, x_val).argmax(1) == y_d).float().mean())
        self.pruned = net
        tuned = copy.deepcopy(net)
        training.train_classifier(tuned, x_val, y_val, epochs=self.epochs, batch_size=self.batch_size,
                                  lr=self.lr, seed=self.seed, progress=False, desc="fine-tune")
        self.repaired = tuned.eval()
        acc_tuned = float((logits(tuned, x_val).argmax(1) == y_d).float().mean())
        del mask_hook  # the hook stays registered on the copies; the handle is not needed
        self.report = {"layer": name, "channels": len(order), "pruned": n,
                       "pruned_channels": order[:n].tolist(), "mean_activation": mean_act.tolist(),
                       "val_acc_original": acc0, "val_acc_pruned": acc_pruned,
                       "val_acc_fine_tuned": acc_tuned, "val_acc_by_pruned_count": accs}
