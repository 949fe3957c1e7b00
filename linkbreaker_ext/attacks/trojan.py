"""Model poisoning after Liu et al., "Trojaning Attack on Neural Networks" (NDSS 2018): the trigger
is reverse-engineered from the model inside a fixed mask, then the model is fine-tuned on it."""
from __future__ import annotations

import torch
from torch import nn

from .. import training
from .base import Attack, _check_images, _nested, _poison_fraction
from .patch import square_mask, square_side, watermark_mask


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
       ``size_fraction`` overrides the share (Fig. 11 varies the square from 1% to 15%);
       ``transparency`` t blends it in, ``(1 - t) * pattern + t * x`` on the masked pixels (Fig. 12
       plants the square at 30-90 %), in trigger generation, retraining and :meth:`apply` alike;
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
                 margin: int = 1, seed: int = 0, freeze_before_layer: bool = False,
                 size_fraction: float | None = None, transparency: float = 0.0):
        super().__init__(target)
        if not 0.0 <= transparency < 1.0:
            raise ValueError(f"transparency must be in [0, 1) (1 would be no trigger), got {transparency}")
        if shape not in self.SHAPES:
            raise ValueError(f"unknown Trojan trigger shape {shape!r}; known: {sorted(self.SHAPES)}")
        if size_fraction is not None and not 0.0 < size_fraction < 1.0:
            raise ValueError(f"size_fraction must be in (0, 1), got {size_fraction}")
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
        self.size_fraction = self.SHAPES[shape] if size_fraction is None else float(size_fraction)
        self.transparency = float(transparency)
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
            return square_mask(h, w, square_side(h, w, self.size_fraction), self.margin)
        return watermark_mask(h, w, self.size_fraction, self.margin)

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
        """The pattern over the masked pixels, blended with the image at ``transparency``."""
        if not self.transparency:
            return super()._stamp(x, mask, pattern)
        return torch.where(mask, pattern + self.transparency * (x - pattern), x)

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

    def train_backdoored(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int = 5,
                         poison_epochs: int | None = None, **train_kwargs) -> nn.Module:
        """Train ``model`` clean for ``epochs``, then :meth:`poison_model` for ``poison_epochs``
        (default ``max(1, epochs // 4)``): the trigger can only be reverse-engineered from a trained
        model. ``train_kwargs`` go to both phases (``checkpoint`` and ``desc`` to the clean one only)."""
        clean_kwargs = {"desc": "train clean", **train_kwargs}
        training.train_classifier(model, x, y, epochs=epochs, **clean_kwargs)
        poison_kwargs = {k: v for k, v in train_kwargs.items() if k not in ("checkpoint", "desc")}
        epochs_p = max(1, epochs // 4) if poison_epochs is None else poison_epochs
        return self.poison_model(model, x, y, epochs=epochs_p, **poison_kwargs)

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
                 freeze_before_layer=self.freeze_before_layer, size_fraction=self.size_fraction,
                 selected_neurons=list(self.selected_neurons),
                 neuron_scores=list(self.neuron_scores),
                 neuron_targets=list(self.neuron_targets),
                 neuron_trigger_activations=list(self.neuron_trigger_activations),
                 mask=_nested(self.trigger_mask), pattern=_nested(self.pattern))
        if self.transparency:  # only when set: the settings of every opaque Trojan stay as saved
            d["transparency"] = self.transparency
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
