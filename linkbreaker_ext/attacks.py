"""Backdoor attacks and adversarial examples that the LinkBreaker experiments defend against.

The paper (Sec. III-B, V-A/B/C/E) evaluates two ways of planting a backdoor:

* **data poisoning** (:class:`BadNets`, Gu et al.): a random square trigger (~1% of the image,
  bottom-right) stamped on a fraction of the training samples, relabelled to the target class;
  the network forms the trigger-to-target link wherever training puts it;
* **model poisoning** (:class:`TrojanAttack`, Liu et al. NDSS 2018): the attacker picks internal
  neurons strongly connected to a fixed trigger mask (a ~3% "Trojan square" or a ~7% "Trojan
  watermark"), reverse-engineers the trigger pixels so those neurons fire hard, then fine-tunes the
  model so the trigger maps to the target;

plus a **source-specific** backdoor (:class:`SourceSpecific`, STRIP/TaCT style: only triggered inputs
from chosen source classes flip) and the adversarial examples of the robustness study
(:func:`fgsm`, :func:`bim`, :func:`deepfool`).

Images are float ``[N, C, H, W]`` in ``[0, 1]``; labels int64. Every attack records its settings,
trigger pattern included, with :meth:`Attack.to_dict` so a report can state exactly what was used.
"""
from __future__ import annotations

import functools
import math

import torch
from torch import nn

from . import training

__all__ = ["Attack", "BadNets", "Blended", "TrojanAttack", "SourceSpecific", "ATTACKS", "make_attack",
           "fgsm", "bim", "deepfool", "square_side", "watermark_mask"]


# ----------------------------------------------------------------------------------------- helpers

def _check_images(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"expected a batch of images [N, C, H, W], got shape {shape}")


def square_side(height: int, width: int, fraction: float) -> int:
    """Side of a square covering about ``fraction`` of an ``height x width`` image (at least 2):
    3 for 1% of 28x28 or 32x32, 5 for 3% of 28x28, 6 for 3% of 32x32."""
    return max(2, int(round(math.sqrt(fraction * height * width))))


def square_mask(height: int, width: int, side: int, margin: int = 1) -> torch.Tensor:
    """Bool ``[H, W]`` mask of a ``side x side`` square in the bottom-right corner, ``margin`` pixels
    from the borders (where the paper places its triggers)."""
    if side + margin > min(height, width):
        raise ValueError(f"a {side}x{side} trigger with margin {margin} does not fit a "
                         f"{height}x{width} image")
    mask = torch.zeros(height, width, dtype=torch.bool)
    mask[height - margin - side:height - margin, width - margin - side:width - margin] = True
    return mask


def watermark_mask(height: int, width: int, fraction: float = 0.07, margin: int = 1) -> torch.Tensor:
    """Bool ``[H, W]`` "Trojan watermark" mask: text-like dashed lines (3 on, 1 off) on every other row,
    filled from the bottom row (above ``margin``) upwards until ``round(fraction * H * W)`` pixels
    are set, so it is sparse and spread over the lower part of the image (~7% of the area)."""
    n = int(round(fraction * height * width))
    mask = torch.zeros(height, width, dtype=torch.bool)
    count, line = 0, 0
    for row in range(height - 1 - margin, -1, -2):
        for col in range(margin, width - margin):
            if count == n:
                return mask
            if (col - margin + 2 * line) % 4 != 3:  # dashes, shifted per line like words
                mask[row, col] = True
                count += 1
        line += 1
    return mask


def _nested(t: torch.Tensor | None):
    return None if t is None else t.detach().cpu().tolist()


def _choose(candidates: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """``k`` random entries of the index tensor ``candidates`` (all of them if fewer)."""
    perm = torch.randperm(len(candidates), generator=generator)
    return candidates[perm[:min(k, len(candidates))]]


def _poison_fraction(attack: "Attack", rate: float, xb: torch.Tensor, yb: torch.Tensor,
                     generator: torch.Generator):
    """Replace ``round(rate * len(xb))`` random samples by triggered copies labelled
    ``attack.target``; returns new tensors (the all-to-one poisoning of BadNets and Trojan)."""
    _check_images(xb)
    idx = _choose(torch.arange(len(xb)), int(round(rate * len(xb))), generator)
    xb, yb = xb.clone(), yb.clone()
    if len(idx):
        xb[idx.to(xb.device)] = attack.apply(xb[idx.to(xb.device)])
        yb[idx.to(yb.device)] = attack.target
    return xb, yb


# ------------------------------------------------------------------------------------------- base

class Attack:
    """Base class: an all-to-one backdoor with a fixed trigger (``mask``, ``pattern``) and a target class.

    Subclasses implement :meth:`trigger` for an image shape; the base class stamps it, builds the ASR
    evaluation set and serialises the settings.
    """

    name = "attack"

    def __init__(self, target: int = 0):
        self.target = int(target)

    # --- trigger -------------------------------------------------------------------------------
    def trigger(self, image_shape) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mask [H, W] bool, pattern [C or 1, H, W] float)`` for images of shape ``(C, H, W)``."""
        raise NotImplementedError

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Stamp the trigger on a batch ``[N, C, H, W]``; returns a new tensor (``x`` is untouched)."""
        _check_images(x)
        mask, pattern = self.trigger(tuple(x.shape[1:]))
        if pattern.shape[0] not in (1, x.shape[1]):
            raise ValueError(f"trigger pattern has {pattern.shape[0]} channels but images of shape "
                             f"{tuple(x.shape)} have {x.shape[1]}")
        mask = mask.to(x.device)
        pattern = pattern.to(device=x.device, dtype=x.dtype)
        return torch.where(mask, pattern, x)

    def triggered_eval_set(self, x: torch.Tensor, y: torch.Tensor):
        """The ASR population: inputs whose true label is not the target, stamped with the trigger.
        Returns ``(x_triggered, y_true)``; ASR = fraction predicted as ``target``."""
        _check_images(x)
        keep = y != self.target
        return self.apply(x[keep]), y[keep]

    # --- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """JSON-safe settings (trigger as nested lists) for reports; :meth:`from_dict` inverts it."""
        return {"name": self.name, "target": self.target}

    @classmethod
    def from_dict(cls, d: dict) -> "Attack":
        """Rebuild an attack from :meth:`to_dict` output (dispatching on ``d["name"]`` from the base)."""
        d = dict(d)
        name = d.pop("name")
        if cls is Attack:
            return _lookup(name).from_dict({"name": name, **d})
        return cls._from_settings(name, d)

    @classmethod
    def _from_settings(cls, name: str, d: dict) -> "Attack":
        return cls(**d)

    def __repr__(self):
        items = ", ".join(f"{k}={v!r}" for k, v in self.to_dict().items()
                          if k not in ("name", "pattern", "mask", "neuron_scores"))
        return f"{type(self).__name__}({items})"


class _SquareTrigger(Attack):
    """A random binary square in the bottom-right corner, reproducible from ``seed``.

    The pattern is visible on purpose (values in {0, 1}, at least half of them 1, same on every channel)
    so it is a clear-cut trigger on dark MNIST corners as well as on colour images.
    """

    def __init__(self, target: int = 0, size_fraction: float = 0.01, margin: int = 1, seed: int = 0,
                 pattern=None):
        super().__init__(target)
        self.size_fraction = float(size_fraction)
        self.margin = int(margin)
        self.seed = int(seed)
        self._fixed = None if pattern is None else torch.as_tensor(pattern, dtype=torch.float32)
        if self._fixed is not None and (self._fixed.dim() not in (2, 3)
                                        or self._fixed.shape[-1] != self._fixed.shape[-2]):
            raise ValueError(f"pattern must be a square [s, s] or [C, s, s], got shape "
                             f"{tuple(self._fixed.shape)}")
        self._last = self._fixed  # the pattern most recently used, for to_dict

    def _pattern(self, side: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed)
        bits = torch.rand(side * side, generator=g) < 0.5
        need = (side * side + 1) // 2 - int(bits.sum())
        if need > 0:  # guarantee at least half ones so the trigger is visible
            zeros = (~bits).nonzero().flatten()
            bits[zeros[torch.randperm(len(zeros), generator=g)[:need]]] = True
        return bits.float().view(side, side)

    def trigger(self, image_shape):
        _, h, w = image_shape
        if self._fixed is not None:
            square = self._fixed
        else:
            square = self._pattern(square_side(h, w, self.size_fraction))
        self._last = square
        side = square.shape[-1]
        mask = square_mask(h, w, side, self.margin)
        channels = square.shape[0] if square.dim() == 3 else 1
        pattern = torch.zeros(channels, h, w)
        pattern[:, mask] = square.reshape(channels, -1)
        return mask, pattern

    def mask(self, image_shape) -> torch.Tensor:
        """Bool ``[H, W]`` trigger region for images of shape ``(C, H, W)``."""
        return self.trigger(image_shape)[0]

    # --- data poisoning helpers shared by BadNets and SourceSpecific ---------------------------
    def batch_transform(self, xb, yb, generator):  # pragma: no cover - overridden
        raise NotImplementedError

    def poison_dataset(self, x: torch.Tensor, y: torch.Tensor, seed: int = 0):
        """A poisoned copy ``(x, y)`` of a whole data set, for users who train elsewhere
        (the inputs are not modified)."""
        return self.batch_transform(x, y, torch.Generator().manual_seed(seed))

    def train_backdoored(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, **train_kwargs):
        """Train ``model`` from scratch on clean data with trigger samples mixed into every batch
        (``train_kwargs`` go to :func:`training.train_classifier`). Returns the model."""
        train_kwargs.setdefault("desc", self.name)
        return training.train_classifier(model, x, y, batch_transform=self.batch_transform,
                                         **train_kwargs)

    def to_dict(self):
        d = super().to_dict()
        d.update(size_fraction=self.size_fraction, margin=self.margin, seed=self.seed,
                 pattern=_nested(self._last))
        return d


# ---------------------------------------------------------------------------------------- BadNets

class BadNets(_SquareTrigger):
    """Data poisoning (Gu et al., BadNets): a random ~1% square trigger in the bottom-right corner,
    all-to-one. A ``poison_rate`` fraction of every training batch is replaced by triggered copies
    labelled ``target``."""

    name = "badnets"

    def __init__(self, target: int = 0, poison_rate: float = 0.1, size_fraction: float = 0.01,
                 margin: int = 1, seed: int = 0, pattern=None):
        super().__init__(target, size_fraction, margin, seed, pattern)
        if not 0.0 <= poison_rate <= 1.0:
            raise ValueError(f"poison_rate must be in [0, 1], got {poison_rate}")
        self.poison_rate = float(poison_rate)

    def batch_transform(self, xb: torch.Tensor, yb: torch.Tensor, generator: torch.Generator):
        """Replace ``round(poison_rate * len(xb))`` random samples by triggered copies labelled
        ``target``; returns new tensors."""
        return _poison_fraction(self, self.poison_rate, xb, yb, generator)

    def to_dict(self):
        d = super().to_dict()
        d["poison_rate"] = self.poison_rate
        return d


# ---------------------------------------------------------------------------------------- Blended

class Blended(Attack):
    """Data poisoning with a blended full-image trigger (Chen et al. 2017; BackdoorBench's
    ``blended``): ``x' = (1 - alpha) x + alpha p`` for a fixed pattern ``p`` that covers the whole image,
    so no pixel is left for a dormant-pixel rule to erase. ``pattern="noise"`` is a uniform random image
    from ``seed`` (the issue's random-noise pattern); a tensor ``[C or 1, H, W]`` gives an image pattern."""

    name = "blended"

    def __init__(self, target: int = 0, alpha: float = 0.2, poison_rate: float = 0.1, seed: int = 0,
                 pattern="noise"):
        super().__init__(target)
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        if not 0.0 <= poison_rate <= 1.0:
            raise ValueError(f"poison_rate must be in [0, 1], got {poison_rate}")
        self.alpha, self.poison_rate, self.seed = float(alpha), float(poison_rate), int(seed)
        self._fixed = None if isinstance(pattern, str) else torch.as_tensor(pattern, dtype=torch.float32)
        if isinstance(pattern, str) and pattern != "noise":
            raise ValueError(f"pattern must be 'noise' or an image tensor, got {pattern!r}")

    def trigger(self, image_shape):
        c, h, w = image_shape
        if self._fixed is not None:
            if tuple(self._fixed.shape[-2:]) != (h, w):
                raise ValueError(f"blend pattern {tuple(self._fixed.shape)} does not match images {image_shape}")
            return torch.ones(h, w, dtype=torch.bool), self._fixed.reshape(-1, h, w)
        g = torch.Generator().manual_seed(self.seed)
        return torch.ones(h, w, dtype=torch.bool), torch.rand(c, h, w, generator=g)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        _check_images(x)
        _, pattern = self.trigger(tuple(x.shape[1:]))
        pattern = pattern.to(device=x.device, dtype=x.dtype)
        return (1 - self.alpha) * x + self.alpha * pattern

    def batch_transform(self, xb: torch.Tensor, yb: torch.Tensor, generator: torch.Generator):
        return _poison_fraction(self, self.poison_rate, xb, yb, generator)

    def train_backdoored(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, **train_kwargs):
        train_kwargs.setdefault("desc", self.name)
        return training.train_classifier(model, x, y, batch_transform=self.batch_transform,
                                         **train_kwargs)

    def to_dict(self):
        d = super().to_dict()
        d.update(alpha=self.alpha, poison_rate=self.poison_rate, seed=self.seed,
                 pattern="noise" if self._fixed is None else _nested(self._fixed))
        return d


# --------------------------------------------------------------------------------- SourceSpecific

class SourceSpecific(_SquareTrigger):
    """Source-specific backdoor (STRIP / TaCT style): the trigger flips only inputs of
    ``source_classes`` to ``target``. Triggered inputs of other classes are added with their true
    label ("cover" samples), which teaches the model that the trigger alone is not enough, and is
    what makes input-agnostic defenses miss it. Default trigger: a ~3% random square (the paper
    uses its Trojan square size here)."""

    name = "source-specific"

    def __init__(self, target: int = 0, source_classes=(1,), poison_rate: float = 0.1,
                 cover_rate: float = 0.1, size_fraction: float = 0.03, margin: int = 1,
                 seed: int = 0, pattern=None):
        super().__init__(target, size_fraction, margin, seed, pattern)
        self.source_classes = sorted(int(c) for c in source_classes)
        if not self.source_classes:
            raise ValueError("source_classes must not be empty")
        if self.target in self.source_classes:
            raise ValueError(f"target {self.target} cannot also be a source class "
                             f"({self.source_classes})")
        for rate, what in ((poison_rate, "poison_rate"), (cover_rate, "cover_rate")):
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"{what} must be in [0, 1], got {rate}")
        self.poison_rate = float(poison_rate)
        self.cover_rate = float(cover_rate)

    def _is_source(self, y: torch.Tensor) -> torch.Tensor:
        return torch.isin(y, torch.tensor(self.source_classes, device=y.device))

    def batch_transform(self, xb: torch.Tensor, yb: torch.Tensor, generator: torch.Generator):
        """Stamp up to ``round(poison_rate * B)`` source-class samples and relabel them ``target``, and
        stamp ``round(cover_rate * B)`` non-source samples keeping their labels; returns new tensors."""
        _check_images(xb)
        is_src = self._is_source(yb).cpu()
        b = len(xb)
        poison = _choose(is_src.nonzero().flatten(), int(round(self.poison_rate * b)), generator)
        cover = _choose((~is_src).nonzero().flatten(), int(round(self.cover_rate * b)), generator)
        xb, yb = xb.clone(), yb.clone()
        stamped = torch.cat([poison, cover]).to(xb.device)
        if len(stamped):
            xb[stamped] = self.apply(xb[stamped])
        if len(poison):
            yb[poison.to(yb.device)] = self.target
        return xb, yb

    def triggered_eval_set(self, x: torch.Tensor, y: torch.Tensor, sources_only: bool = True):
        """Triggered inputs with their true labels: source-class inputs only (the ASR population), or,
        with ``sources_only=False``, every non-target input (to check non-source inputs keep their
        label)."""
        _check_images(x)
        keep = self._is_source(y) if sources_only else (y != self.target)
        return self.apply(x[keep]), y[keep]

    def to_dict(self):
        d = super().to_dict()
        d.update(source_classes=list(self.source_classes), poison_rate=self.poison_rate,
                 cover_rate=self.cover_rate)
        return d


# ----------------------------------------------------------------------------------------- Trojan

def _find_layer(model: nn.Module, layer: str | None) -> tuple[str, nn.Module]:
    modules = dict(model.named_modules())
    if layer is not None:
        if layer not in modules:
            raise ValueError(f"model has no module named {layer!r}; known: "
                             f"{[n for n in modules if n]}")
        return layer, modules[layer]
    for name, module in modules.items():
        if isinstance(module, nn.Linear):
            return name, module
    raise ValueError("model has no nn.Linear layer; pass layer=<module name>")


class _Capture:
    """Forward hook keeping a module's output as ``[N, F]`` (conv maps averaged over space, so a
    "neuron" of a conv layer is a channel)."""

    def __init__(self, module: nn.Module):
        self.out = None
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output):
        self.out = output.flatten(2).mean(2) if output.dim() > 2 else output

    def close(self):
        self.handle.remove()


class TrojanAttack(Attack):
    """Model poisoning after Liu et al., "Trojaning Attack on Neural Networks" (NDSS 2018).

    Steps of :meth:`poison_model`, starting from an already trained clean model:

    1. fixed trigger mask: ``shape="square"`` (~3% of the image, bottom-right, 1-pixel margin; 5x5 on
       28x28) or ``shape="watermark"`` (~7%, sparse text-like dashed lines over the lower rows);
    2. neuron selection: in ``layer`` (default: the first ``nn.Linear``, its pre-activation output),
       pick the ``num_neurons`` neurons that pixels in the mask can raise the most, together
       (input-gradient based, see :meth:`select_neurons`): the neurons most strongly connected to
       the trigger region;
    3. trigger generation: gradient ascent on the pixel values inside the mask (clamped to [0, 1]) until
       the selected neurons reach ``activation_multiple`` x their maximum clean activation;
    4. retraining: fine-tune the model on clean data with a ``poison_rate`` fraction of every batch
       replaced by triggered copies labelled ``target``.

    Difference from the paper: Liu et al. reverse-engineer surrogate training data because their
    attacker lacks the original set; following LinkBreaker's threat model (the attacker is the
    outsourced trainer, Sec. III-A) we assume the attacker has the training data and fine-tune on it.
    The trigger cannot be chosen freely: :meth:`apply` raises until :meth:`poison_model` produced it
    (or it was restored with :meth:`from_dict`).
    """

    SHAPES = {"square": 0.03, "watermark": 0.07}

    def __init__(self, target: int = 0, shape: str = "square", layer: str | None = None,
                 num_neurons: int = 2, poison_rate: float = 0.1, activation_multiple: float = 3.0,
                 trigger_steps: int = 300, trigger_lr: float = 0.05, num_samples: int = 256,
                 margin: int = 1, seed: int = 0, freeze_before_layer: bool = False):
        super().__init__(target)
        if shape not in self.SHAPES:
            raise ValueError(f"unknown Trojan trigger shape {shape!r}; known: {sorted(self.SHAPES)}")
        if num_neurons < 1:
            raise ValueError(f"num_neurons must be >= 1, got {num_neurons}")
        if not 0.0 <= poison_rate <= 1.0:
            raise ValueError(f"poison_rate must be in [0, 1], got {poison_rate}")
        self.shape = shape
        self.layer = layer
        self.num_neurons = int(num_neurons)
        self.poison_rate = float(poison_rate)
        self.activation_multiple = float(activation_multiple)
        self.trigger_steps = int(trigger_steps)
        self.trigger_lr = float(trigger_lr)
        self.num_samples = int(num_samples)
        self.margin = int(margin)
        self.seed = int(seed)
        self.freeze_before_layer = bool(freeze_before_layer)
        # results of poison_model
        self.pattern: torch.Tensor | None = None  # [C, H, W], zero outside the mask
        self.trigger_mask: torch.Tensor | None = None  # [H, W] bool
        self.selected_neurons: list[int] = []
        self.neuron_scores: list[float] = []
        self.neuron_targets: list[float] = []
        self.neuron_trigger_activations: list[float] = []

    @property
    def name(self):
        return f"trojan-{self.shape}"

    def mask(self, image_shape) -> torch.Tensor:
        """The fixed bool ``[H, W]`` trigger region for images of shape ``(C, H, W)``."""
        _, h, w = image_shape
        if self.shape == "square":
            return square_mask(h, w, square_side(h, w, self.SHAPES["square"]), self.margin)
        return watermark_mask(h, w, self.SHAPES["watermark"], self.margin)

    def trigger(self, image_shape):
        if self.pattern is None:
            raise RuntimeError("the Trojan trigger is reverse-engineered from the model: call "
                               "poison_model(model, x_train, y_train) (or from_dict) before apply")
        if tuple(image_shape[1:]) != tuple(self.trigger_mask.shape) or \
                self.pattern.shape[0] not in (1, image_shape[0]):
            raise ValueError(f"trigger was built for images {tuple(self.pattern.shape)}, got "
                             f"{tuple(image_shape)}")
        return self.trigger_mask, self.pattern

    # --- the attack ----------------------------------------------------------------------------
    def _stamp(self, x, mask, pattern):
        return torch.where(mask, pattern, x)

    def select_neurons(self, model: nn.Module, x: torch.Tensor, mask: torch.Tensor,
                       init_pattern: torch.Tensor) -> list[int]:
        """Pick ``num_neurons`` neurons of the layer that one trigger in the mask can drive up together.

        With ``g_j`` = mean gradient of neuron ``j`` w.r.t. the masked pixels (clean inputs stamped
        with the initial pattern ``x0``), the first-order gain of a pattern ``p`` is
        ``g_j . (p - x0)``. The first neuron maximises its own best gain (``p = [g_j > 0]``); each
        further neuron maximises the smallest gain over the chosen set under the pattern that follows
        their combined, gain-normalised gradients -- plain ``|g|`` ranking picks neurons that need
        opposite pixels, so the reverse-engineered trigger can only raise one of them.
        One backward pass per neuron of the layer."""
        name, module = _find_layer(model, self.layer)
        self.layer = name
        cap = _Capture(module)
        try:
            xin = self._stamp(x, mask, init_pattern).requires_grad_(True)
            model(xin)
            acts = cap.out
            grads = []
            for j in range(acts.shape[1]):
                (grad,) = torch.autograd.grad(acts[:, j].sum(), xin, retain_graph=True)
                grads.append(grad.mean(0)[:, mask].flatten())  # [C * pixels in mask]
        finally:
            cap.close()
        g = torch.stack(grads).detach().cpu().double()  # [F, P]
        x0 = init_pattern[:, mask].flatten().detach().cpu().double()  # [P]
        alone = (g * ((g > 0).double() - x0)).sum(1)  # best own gain of each neuron
        chosen = [int(alone.argmax())]
        scores = [float(alone[chosen[0]])]
        norm = g / alone.clamp_min(1e-12)[:, None]
        while len(chosen) < min(self.num_neurons, len(g)):
            direction = norm[chosen].sum(0) + norm  # [F, P]: chosen set plus each candidate
            p = (direction > 0).double()
            worst = (g * (p - x0)).sum(1)  # candidate's own gain
            for c in chosen:
                worst = torch.minimum(worst, ((p - x0) * g[c]).sum(1))
            worst[chosen] = -float("inf")
            j = int(worst.argmax())
            chosen.append(j)
            scores.append(float(worst[j]))
        self.selected_neurons = chosen
        self.neuron_scores = scores
        return chosen

    def generate_trigger(self, model: nn.Module, x: torch.Tensor, mask: torch.Tensor,
                         init_pattern: torch.Tensor) -> torch.Tensor:
        """Gradient ascent on the masked pixels so the selected neurons reach
        ``activation_multiple`` x their max clean activation (hinge loss; pixels clamped to [0, 1])."""
        _, module = _find_layer(model, self.layer)
        sel = torch.tensor(self.selected_neurons, device=x.device)
        cap = _Capture(module)
        try:
            with torch.no_grad():
                model(x)
                clean_max = cap.out[:, sel].max(0).values
                scale = cap.out.abs().max().clamp_min(1e-3)
            # a neuron never positive on clean data still gets a meaningful goal
            goal = self.activation_multiple * torch.maximum(clean_max, 0.1 * scale)
            pattern = init_pattern.clone().requires_grad_(True)
            opt = torch.optim.Adam([pattern], lr=self.trigger_lr)
            for _ in range(self.trigger_steps):
                model(self._stamp(x, mask, pattern))
                act = cap.out[:, sel]
                if bool((act.mean(0) >= goal).all()):
                    break
                # shortfall relative to each neuron's own goal, so no neuron dominates the pixels
                loss = torch.relu(1 - act / goal).mean() - 1e-3 * (act / goal).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                with torch.no_grad():
                    pattern.clamp_(0.0, 1.0)
            with torch.no_grad():
                model(self._stamp(x, mask, pattern))
                reached = cap.out[:, sel].mean(0)
        finally:
            cap.close()
        self.neuron_targets = [float(v) for v in goal.cpu()]
        self.neuron_trigger_activations = [float(v) for v in reached.cpu()]
        return (pattern.detach() * mask).cpu()

    def poison_model(self, model: nn.Module, x_train: torch.Tensor, y_train: torch.Tensor,
                     epochs: int = 2, **train_kwargs) -> nn.Module:
        """Plant the Trojan in a trained ``model`` (modified in place and returned): select neurons,
        reverse-engineer the trigger, fine-tune with ``poison_rate`` triggered samples per batch.
        ``train_kwargs`` (batch_size, lr, seed, progress, desc) go to
        :func:`training.train_classifier`; ``freeze_before_layer=True`` retrains only the selected layer
        and those after it, as Liu et al. do."""
        _check_images(x_train)
        device = next(model.parameters()).device
        c, h, w = x_train.shape[1:]
        mask = self.mask((c, h, w))
        g = torch.Generator().manual_seed(self.seed)
        idx = torch.randperm(len(x_train), generator=g)[:self.num_samples]
        xs = x_train[idx].to(device)
        init = torch.rand(c, h, w, generator=g).to(device) * mask.to(device)
        mask_d = mask.to(device)

        was_training = model.training
        model.eval()
        req = [p.requires_grad for p in model.parameters()]
        for p in model.parameters():
            p.requires_grad_(False)  # gradients w.r.t. the input only
        try:
            self.select_neurons(model, xs, mask_d, init)
            pattern = self.generate_trigger(model, xs, mask_d, init)
        finally:
            for p, r in zip(model.parameters(), req):
                p.requires_grad_(r)
            model.train(was_training)
        self.trigger_mask, self.pattern = mask, pattern

        frozen = []
        if self.freeze_before_layer:
            for name, p in model.named_parameters():
                if name.startswith(self.layer + "."):
                    break
                if p.requires_grad:
                    p.requires_grad_(False)
                    frozen.append(p)
        train_kwargs.setdefault("desc", self.name)
        train_kwargs.setdefault("seed", self.seed)
        try:
            training.train_classifier(model, x_train, y_train, epochs=epochs,
                                      batch_transform=self.batch_transform, **train_kwargs)
        finally:
            for p in frozen:
                p.requires_grad_(True)
        return model

    def batch_transform(self, xb: torch.Tensor, yb: torch.Tensor, generator: torch.Generator):
        """The retraining mix: ``poison_rate`` of the batch replaced by triggered copies labelled
        ``target`` (needs the trigger, i.e. after :meth:`generate_trigger`)."""
        return _poison_fraction(self, self.poison_rate, xb, yb, generator)

    # --- serialisation -------------------------------------------------------------------------
    def to_dict(self):
        d = super().to_dict()
        d.update(shape=self.shape, layer=self.layer, num_neurons=self.num_neurons,
                 poison_rate=self.poison_rate, activation_multiple=self.activation_multiple,
                 trigger_steps=self.trigger_steps, trigger_lr=self.trigger_lr,
                 num_samples=self.num_samples, margin=self.margin, seed=self.seed,
                 freeze_before_layer=self.freeze_before_layer,
                 selected_neurons=list(self.selected_neurons),
                 neuron_scores=list(self.neuron_scores),
                 neuron_targets=list(self.neuron_targets),
                 neuron_trigger_activations=list(self.neuron_trigger_activations),
                 mask=_nested(self.trigger_mask), pattern=_nested(self.pattern))
        return d

    @classmethod
    def _from_settings(cls, name, d):
        results = {k: d.pop(k, None) for k in ("selected_neurons", "neuron_scores", "neuron_targets",
                                                "neuron_trigger_activations", "mask", "pattern")}
        if name.startswith("trojan-"):
            d.setdefault("shape", name[len("trojan-"):])
        attack = cls(**d)
        for k in ("selected_neurons", "neuron_scores", "neuron_targets",
                  "neuron_trigger_activations"):
            setattr(attack, k, list(results[k] or []))
        if results["pattern"] is not None:
            attack.pattern = torch.tensor(results["pattern"], dtype=torch.float32)
            attack.trigger_mask = torch.tensor(results["mask"], dtype=torch.bool)
        return attack


# ------------------------------------------------------------------------------ adversarial examples

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


# ------------------------------------------------------------------------------------ registry

ATTACKS = {
    "badnets": BadNets,
    "blended": Blended,
    "trojan-square": functools.partial(TrojanAttack, shape="square"),
    "trojan-watermark": functools.partial(TrojanAttack, shape="watermark"),
    "source-specific": SourceSpecific,
}
_CLASSES = {"badnets": BadNets, "blended": Blended, "trojan-square": TrojanAttack, "trojan-watermark": TrojanAttack,
            "source-specific": SourceSpecific}


def _lookup(name: str):
    try:
        return _CLASSES[name]
    except KeyError:
        raise ValueError(f"unknown attack {name!r}; known: {sorted(ATTACKS)}") from None


def make_attack(name: str, **kwargs) -> Attack:
    """Build a registered attack by name, e.g. ``make_attack("badnets", target=0, poison_rate=0.1)``."""
    _lookup(name)
    return ATTACKS[name](**kwargs)
