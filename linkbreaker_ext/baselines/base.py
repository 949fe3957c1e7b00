"""The interface every baseline defense shares, and the small helpers they reuse.

Two kinds of defense, as the LinkBreaker paper's Tables II-VI compare them:

* :class:`InputDetector` (STRIP, SCALE-UP, IBD-PSC): ``score(x)`` gives one float per input, higher =
  more likely triggered; ``detect(x)`` compares it with a threshold chosen at a requested false
  rejection rate (FRR) on a held-out part of the clean validation set (never test data).
* :class:`ModelDefense` (Neural Cleanse, ABS, Fine-Pruning): ``fit`` returns a verdict on the model
  (``flagged``, ``report``) and/or a ``repaired`` copy of it.

The user's model is never changed: anything that changes parameters works on a ``copy.deepcopy``,
and a model's train/eval mode is restored after use.
"""
from __future__ import annotations

import copy
import time

import torch
from torch import nn

from .. import metrics


def model_device(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        raise ValueError("model has no parameters") from None


def check_images(x, what: str = "x") -> torch.Tensor:
    """A float ``[B, C, H, W]`` tensor without NaN/Inf, or a clear error."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{what} must be a batch of images [B, C, H, W], got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{what} must be a floating tensor, got {x.dtype}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{what} contains NaN or Inf")
    return x


def check_fit_inputs(model, x_val, y_val, num_classes: int, min_per_class: int = 1):
    """Validate ``fit``'s arguments; returns ``(x_val, y_val)`` as CPU tensors."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    model_device(model)
    check_images(x_val, "x_val")
    if not isinstance(y_val, torch.Tensor) or y_val.dim() != 1 or y_val.is_floating_point():
        raise ValueError("y_val must be a 1-D integer tensor of class labels")
    if len(x_val) != len(y_val):
        raise ValueError(f"x_val has {len(x_val)} samples but y_val has {len(y_val)}")
    if int(num_classes) < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    if len(y_val) and (int(y_val.min()) < 0 or int(y_val.max()) >= num_classes):
        raise ValueError(f"y_val labels must lie in [0, {num_classes - 1}]")
    counts = torch.bincount(y_val.cpu(), minlength=num_classes)
    if int(counts.min()) < min_per_class:
        raise ValueError(f"too few validation samples: class {int(counts.argmin())} has "
                         f"{int(counts.min())}, need at least {min_per_class} per class")
    return x_val.detach().cpu(), y_val.detach().cpu()


class eval_mode:
    """Context manager: the model in eval mode, its previous mode restored afterwards."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self):
        self.was_training = self.model.training
        self.model.eval()
        return self.model

    def __exit__(self, *exc):
        self.model.train(self.was_training)


@torch.no_grad()
def logits(model: nn.Module, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """Batched logits on the model's device (returned there)."""
    device = model_device(model)
    with eval_mode(model):
        outs = [model(x[i:i + batch_size].to(device)).float() for i in range(0, len(x), batch_size)]
    return torch.cat(outs) if outs else torch.empty(0, device=device)


def holdout_split(y: torch.Tensor, fraction: float, seed: int = 0):
    """``(fit_idx, holdout_idx)``: a per-class random ``fraction`` held out for threshold calibration,
    so the threshold is never set on the samples a detector was fitted on."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"holdout fraction must be in (0, 1), got {fraction}")
    g = torch.Generator().manual_seed(seed)
    fit, hold = [], []
    for c in torch.unique(y):
        idx = (y == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        k = min(len(idx) - 1, max(1, int(round(fraction * len(idx))))) if len(idx) > 1 else 0
        hold.append(idx[:k])
        fit.append(idx[k:])
    return torch.cat(fit).sort().values, torch.cat(hold).sort().values


# ROC AUC of a detector score (clean, triggered): the project's one implementation.
roc_auc = metrics.auroc


class Defense:
    """Base class: ``fit(model, x_val, y_val, num_classes)`` on the clean validation set."""

    name = "defense"
    kind = "model"  # "input" or "model"

    def __init__(self, seed: int = 0):
        self.seed = int(seed)
        self.fit_s = float("nan")
        self.fitted = False

    def fit(self, model: nn.Module, x_val: torch.Tensor, y_val: torch.Tensor, num_classes: int):
        x_val, y_val = check_fit_inputs(model, x_val, y_val, num_classes, self.min_per_class())
        start = time.perf_counter()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            self._fit(model, x_val, y_val, int(num_classes))
        self.fit_s = time.perf_counter() - start
        self.fitted = True
        return self

    def min_per_class(self) -> int:
        return 1

    def _fit(self, model, x_val, y_val, num_classes):  # pragma: no cover - abstract
        raise NotImplementedError

    def _check_fitted(self):
        if not self.fitted:
            raise RuntimeError(f"{type(self).__name__} is not fitted: call fit(model, x_val, y_val, "
                               f"num_classes) first")

    def settings(self) -> dict:
        """JSON-safe settings for reports."""
        return {k: v for k, v in vars(self).items()
                if not k.startswith("_") and isinstance(v, (int, float, str, bool, list, tuple))
                and k not in ("fit_s", "fitted", "threshold")}

    def __repr__(self):
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.settings().items())})"


class InputDetector(Defense):
    """An input-level detector: a continuous score and a threshold at ``frr`` false rejection.

    ``fit`` holds out ``holdout`` of the clean validation set (per class); :meth:`_fit_detector` sees
    the rest, and the threshold is the ``1 - frr`` quantile of the held-out clean scores."""

    kind = "input"

    def __init__(self, frr: float = 0.01, holdout: float = 0.5, batch_size: int = 256, seed: int = 0):
        super().__init__(seed)
        if not 0.0 <= frr < 1.0:
            raise ValueError(f"frr must be in [0, 1), got {frr}")
        self.frr = float(frr)
        self.holdout = float(holdout)
        self.batch_size = int(batch_size)
        self.threshold: float | None = None
        self.model: nn.Module | None = None

    def min_per_class(self) -> int:
        return 2  # one to fit on, one to hold out

    def _fit(self, model, x_val, y_val, num_classes):
        self.model, self.num_classes = model, num_classes
        fit_idx, hold_idx = holdout_split(y_val, self.holdout, self.seed)
        with eval_mode(model):
            self._fit_detector(model, x_val[fit_idx], y_val[fit_idx], num_classes)
        self.fitted = True  # score() below needs it
        self.calibrate(x_val[hold_idx])

    def calibrate(self, x_clean: torch.Tensor, frr: float | None = None) -> float:
        """Set the threshold so that a fraction ``frr`` of ``x_clean`` (clean, never test data) is
        rejected: the ``1 - frr`` quantile of their scores (inputs scoring above it are flagged)."""
        if frr is not None:
            self.frr = float(frr)
        s = self.score(x_clean).double().cpu()
        if not len(s):
            raise ValueError("calibration needs at least one clean sample")
        self.threshold = float(torch.quantile(s, 1.0 - self.frr)) if self.frr > 0 else float(s.max())
        return self.threshold

    def score(self, x: torch.Tensor) -> torch.Tensor:
        """Float ``[B]`` on the model's device; higher = more likely triggered."""
        self._check_fitted()
        check_images(x)
        device = model_device(self.model)
        with eval_mode(self.model), torch.no_grad():
            outs = [self._score(x[i:i + self.batch_size].to(device))
                    for i in range(0, len(x), self.batch_size)]
        return torch.cat(outs).float() if outs else torch.empty(0, device=device)

    def detect(self, x: torch.Tensor) -> torch.Tensor:
        """Bool ``[B]``: True where the input is flagged as triggered."""
        if self.threshold is None:
            raise RuntimeError(f"{type(self).__name__} has no threshold: fit() or calibrate() first")
        return self.score(x) > self.threshold

    def _fit_detector(self, model, x_fit, y_fit, num_classes):
        """Per-method offline work on the non-held-out clean samples (default: nothing)."""

    def _score(self, xb: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class ModelDefense(Defense):
    """A model-level defense: after ``fit``, ``flagged`` (bool or None when the method gives no
    verdict), ``report`` (JSON-safe details) and ``repaired`` (a repaired copy, or None)."""

    kind = "model"

    def __init__(self, seed: int = 0):
        super().__init__(seed)
        self.flagged: bool | None = None
        self.report: dict = {}
        self.repaired: nn.Module | None = None

    def predict(self, x: torch.Tensor, model: nn.Module | None = None) -> torch.Tensor:
        """Labels of the repaired model (or of ``model`` when nothing was repaired), on CPU."""
        self._check_fitted()
        check_images(x)
        net = self.repaired if self.repaired is not None else model
        if net is None:
            raise ValueError(f"{type(self).__name__} repaired nothing; pass the original model")
        return logits(net, x).argmax(1).cpu()


def frozen_copy(model: nn.Module) -> nn.Module:
    """A deep copy in eval mode with ``requires_grad`` off: used for input-gradient searches so the
    user's parameters never receive gradients."""
    net = copy.deepcopy(model).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net


def unlearn(model: nn.Module, x: torch.Tensor, y: torch.Tensor, stamp, rate: float = 0.2,
            epochs: int = 5, lr: float = 1e-3, batch_size: int = 64, seed: int = 0) -> nn.Module:
    """Neural Cleanse's mitigation: fine-tune a copy of ``model`` on clean data where a ``rate``
    fraction of every batch carries the reverse-engineered trigger (``stamp(xb) -> xb``) but keeps its
    true label, so the trigger-to-target link is unlearned. Returns the copy."""
    from .. import training  # local import: training pulls in tqdm

    net = copy.deepcopy(model)

    def mix(xb, yb, g):
        k = int(round(rate * len(xb)))
        if k:
            idx = torch.randperm(len(xb), generator=g)[:k]
            xb = xb.clone()
            xb[idx] = stamp(xb[idx]).to(xb.dtype)
        return xb, yb

    return training.train_classifier(net, x, y, epochs=epochs, batch_size=batch_size, lr=lr,
                                     seed=seed, batch_transform=mix, progress=False,
                                     desc="unlearn").eval()
