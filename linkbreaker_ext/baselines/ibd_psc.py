"""IBD-PSC (Hou et al., ICML 2024): amplifying the parameters of the last layers of a backdoored model
leaves its confidence in the target label of a triggered input high, while clean inputs lose
confidence in their label: "parameter-oriented scaling consistency" (PSC)."""
from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call

from .base import InputDetector, logits


def scalable_layers(model: nn.Module):
    """The layers IBD-PSC amplifies, in forward (module) order: the BatchNorm layers if the model has
    any (the paper); otherwise every Conv/Linear layer except the last Linear (the classifier).

    Why that generalisation: in eval mode a BatchNorm after a conv is an affine map folded into that
    conv, and multiplying the BN's weight and bias by w multiplies the folded conv's weight and bias by
    w. Scaling a BN-free conv/linear layer's weight and bias is therefore the same operation on a net
    without BatchNorm. The classifier is excluded because scaling it only sharpens the softmax (no
    BatchNorm sits after the classifier in the paper's models either)."""
    bns = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if bns:
        return bns
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    last_linear = max((i for i, (_, m) in enumerate(layers) if isinstance(m, nn.Linear)), default=None)
    return [nl for i, nl in enumerate(layers) if i != last_linear]


class IBDPSC(InputDetector):
    """``PSC(x)``: the confidence of ``n_models`` amplified copies ``f_i`` in ``y_hat``, the original
    model's label (``1 + n_models`` forwards per input), averaged over the copies. Higher = suspicious.

    The paper averages the softmax probability; this averages its **log-odds**, ``log(p / (1 - p))``,
    computed from the logits (``z_y - logsumexp(z_others)``). In float32 the probability of a
    confident prediction rounds to exactly 1: on the CIFAR-10 models most clean and triggered inputs
    then tie at PSC = 1, the 99th percentile of clean scores is 1 and nothing can score above it
    (measured: 0 % flagged at 1 % FRR, though the AUROC was 0.89-0.97). The log-odds keep the order
    the probability would have with exact arithmetic, per copy.

    Adaptive layer selection (the paper's): amplify the last ``k`` scalable layers by ``omega`` for
    k = 1, 2, ... and take the first ``k*`` at which the clean error rate reaches ``xi``; the models then
    amplify the last ``k*``, ``k* + 1``, ..., ``k* + n_models - 1`` layers. A small net has fewer layers
    than that (the MNIST net has 3 scalable layers): the list stops at all layers, and when no ``k``
    reaches ``xi`` the last ``n_models`` depths are used, so there are ``min(n_models, L)`` models.
    See :func:`scalable_layers` for models without BatchNorm.

    Amplified parameters go through ``torch.func.functional_call``: the user's model is untouched and
    no copies are made."""

    name = "ibd-psc"

    def __init__(self, omega: float = 1.5, n_models: int = 5, xi: float = 0.6, frr: float = 0.01,
                 holdout: float = 0.5, batch_size: int = 512, seed: int = 0):
        super().__init__(frr, holdout, batch_size, seed)
        if omega <= 0:
            raise ValueError(f"omega must be > 0, got {omega}")
        if n_models < 1:
            raise ValueError(f"n_models must be >= 1, got {n_models}")
        self.omega, self.n_models, self.xi = float(omega), int(n_models), float(xi)
        self.depths: list[int] = []
        self.clean_error_by_depth: list[float] = []

    def _params(self, depth: int):
        scaled = {f"{n}.{p}" for n, _ in self._layers[len(self._layers) - depth:]
                  for p in ("weight", "bias")}
        return {k: (v * self.omega if k in scaled else v) for k, v in self._base.items()}

    def _fit_detector(self, model, x_fit, y_fit, num_classes):
        self._layers = scalable_layers(model)
        if not self._layers:
            raise ValueError("IBD-PSC needs BatchNorm, Conv2d or (non-final) Linear layers to amplify")
        self._base = dict(model.named_parameters())
        self._base.update(dict(model.named_buffers()))
        device = next(model.parameters()).device
        x, y = x_fit.to(device), y_fit.to(device)
        big = len(self._layers)
        errors = []
        with torch.no_grad():
            for k in range(1, big + 1):
                pred = self._forward(k, x).argmax(1)
                errors.append(float((pred != y).float().mean()))
        self.clean_error_by_depth = errors
        first = next((k for k, e in enumerate(errors, 1) if e >= self.xi), None)
        if first is None:
            first = max(1, big - self.n_models + 1)
        self.depths = list(range(first, min(big, first + self.n_models - 1) + 1))

    def _forward(self, depth, x):
        out = []
        for i in range(0, len(x), self.batch_size):
            out.append(functional_call(self.model, self._params(depth), (x[i:i + self.batch_size],)))
        return torch.cat(out).float()

    def _score(self, xb):
        y_hat = logits(self.model, xb).argmax(1)[:, None]
        odds = []
        for d in self.depths:
            z = functional_call(self.model, self._params(d), (xb,)).float()
            others = z.scatter(1, y_hat, float("-inf")).logsumexp(1)
            odds.append(z.gather(1, y_hat)[:, 0] - others)
        return torch.stack(odds).mean(0)
