"""Where LinkBreaker looks inside an arbitrary ``nn.Module`` classifier, and the batched forward that
runs the N class-restricted predictions there.

* **masked layers**: any number of modules whose outputs are masked per head, or ``"input"`` for
  the pixels. A *neuron* (the unit a salient set keeps or drops) is a pixel at the input, a channel
  at a hidden conv layer (its whole feature map: a backdoor channel fires wherever the trigger is,
  and per-position masks of a 32x32 map leave the heads no stable evidence), and an element of a
  flat hidden layer;
* **the late layer**: always the input of the final ``nn.Linear``, one neuron per element. Its
  masking, the class heads and the vote run in the fused ``guard_head`` op, which needs that
  Linear's weights.

The guard works on its own frozen copy of the model (:class:`TappedModel`), so hooks never touch the
user's model: it stays callable from other threads while the guard runs.
"""
from __future__ import annotations

import copy
import threading

import torch
from torch import nn

INPUT = "input"
LATE = "late"


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


def check_layers(model: nn.Module, names) -> list[str]:
    """Validate a list of masked-layer names (module names or ``"input"``); keeps their order."""
    if isinstance(names, str):
        names = [names]
    names = list(names)
    if not names:
        raise ValueError("layers must name at least one masked layer (a module name or 'input')")
    modules = dict(model.named_modules())
    for n in names:
        if n != INPUT and n not in modules:
            raise ValueError(f"unknown layer {n!r}; use 'input' or one of: {_names(model)}")
    if len(set(names)) != len(names):
        raise ValueError(f"layers must be distinct, got {names}")
    return names


def auto_layers(model: nn.Module, example: torch.Tensor, count: int = 4) -> list[str]:
    """The paper's choice for deeper networks (Sec. VI-D): ``count`` hidden layers spread uniformly
    over the network, here the outputs of its activation modules (ReLU & co.) that produce feature
    maps, found by one forward of ``example``. Models without such modules fall back to ``"input"``."""
    acts = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Hardswish, nn.PReLU)
    seen = []
    handles = [m.register_forward_hook(lambda mod, i, out, name=n: seen.append((name, out.dim())))
               for n, m in model.named_modules() if isinstance(m, acts)]
    try:
        with torch.no_grad():
            model(example[:1])
    finally:
        for h in handles:
            h.remove()
    maps = []
    for name, dim in seen:  # a module reused in forward counts once, at its first call
        if dim == 4 and name not in maps:
            maps.append(name)
    if not maps:
        return [INPUT]
    if len(maps) <= count:
        return maps
    # evenly spaced, the last feature map included (closest to the late layer)
    picks = [round(i * (len(maps) - 1) / (count - 1)) for i in range(count)] if count > 1 else [len(maps) - 1]
    return [maps[i] for i in picks]


def frozen_copy(model: nn.Module) -> nn.Module:
    """The guard's own copy of a model: float32 (an fp16/bf16 model is measured in float32), eval
    mode, no gradients, and none of the user's hooks (they would run on every guarded forward)."""
    net = copy.deepcopy(model).float().eval()
    for m in net.modules():
        for d in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
                  "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs",
                  "_forward_hooks_always_called"):
            if isinstance(getattr(m, d, None), dict):
                getattr(m, d).clear()
    for p in net.parameters():
        p.requires_grad_(False)
    return net


def logits_of(out) -> torch.Tensor:
    """The logits in a model's output: the tensor itself, the first element of a tuple/list, or the
    ``"logits"`` entry of a dict; anything else is refused by name."""
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    if isinstance(out, dict) and isinstance(out.get("logits"), torch.Tensor):
        return out["logits"]
    if isinstance(out, torch.Tensor):
        return out
    raise ValueError(f"cannot find the logits in the model's output of type {type(out).__name__}: "
                     f"return a tensor, a tuple whose first element is the logits, or a dict with "
                     f"'logits'")


def _names(model: nn.Module) -> list[str]:
    return [n for n, _ in model.named_modules() if n]


def units(a: torch.Tensor, layer: str, stat: str = "mean") -> torch.Tensor:
    """``[B, D]`` neuron values of a layer output: pixels at the input, one value per channel at hidden
    conv layers (``stat``: the feature map's ``"mean"`` or spatial ``"max"``), elements otherwise."""
    if layer != INPUT and a.dim() == 4:
        return a.float().amax((2, 3)) if stat == "max" else a.float().mean((2, 3))
    return a.flatten(1).float()


def unit_views(a: torch.Tensor, layer: str, stat: str = "mean") -> dict:
    """``{evidence name: [B, D]}``: :func:`units` of one layer output in every view that ``stat``
    names (``"mean"``, ``"max"`` or both, ``"mean+max"``). A hidden conv layer read in several views
    gives one entry per view, ``"<layer>@<view>"`` (each is judged against its own bound); any other
    layer, or a single view, gives one entry named after the layer."""
    views = stat.split("+")
    if len(views) > 1 and layer != INPUT and a.dim() == 4:
        return {f"{layer}@{v}": units(a, layer, v) for v in views}
    return {layer: units(a, layer, views[0])}


def evidence_names(layers, stat: str, present) -> list:
    """The consistency check's evidence names in a fixed order: every masked layer (per view, when
    ``present("<layer>@<view>")`` says the layer was read in several), then ``"late"``."""
    views = stat.split("+")
    names = []
    for layer in layers:
        per_view = [f"{layer}@{v}" for v in views]
        names += per_view if len(views) > 1 and present(per_view[0]) else [layer]
    return [*names, LATE]


def rank_evidence(names: list) -> str:
    """The evidence the neighbourhood rank test reads among :func:`evidence_names`' ``names``: the
    last masked layer in its last view (a conv layer's channel maxima by default), or the late layer
    when no layer is masked."""
    return names[-2] if len(names) > 1 else names[-1]


def evidence_layer(name: str, stat: str = "mean") -> tuple:
    """``(layer, view)`` of an evidence name (:func:`unit_views`); a plain layer name is read in the
    first view ``stat`` names."""
    layer, at, view = name.rpartition("@")
    return (layer, view) if at else (name, stat.split("+")[0])


def expand_mask(m: torch.Tensor, a_shape, layer: str) -> torch.Tensor:
    """A unit-level mask ``[N, D_unit]`` broadcast to the element layout of one head's output."""
    if layer != INPUT and len(a_shape) == 4:
        return m.reshape(m.shape[0], a_shape[1], 1, 1)
    return m.reshape(m.shape[0], *a_shape[1:])


def head_rows(masks: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Which forward each head needs: heads whose masks agree in every masked layer see the same
    input and run as one row. Returns ``(first, row)``: ``first`` ``[R]`` one head per distinct row (in
    order of first appearance), ``row`` ``[N]`` the row head k reads. On natural images the heads keep
    (almost) every hidden neuron and on MNIST the same ones (docs/method.md, "Online phase"), so R is
    1-4 on the guards fitted so far: R forwards per input instead of N, with the same outputs."""
    if not masks:
        return torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long)
    n = next(iter(masks.values())).shape[0]
    flat = torch.cat([m.detach().reshape(n, -1).float().cpu() for m in masks.values()], 1)
    _, inverse = torch.unique(flat, dim=0, return_inverse=True)
    order: dict = {}
    row = [order.setdefault(u, len(order)) for u in inverse.tolist()]
    first = [row.index(r) for r in range(len(order))]
    return torch.tensor(first, dtype=torch.long), torch.tensor(row, dtype=torch.long)


class TappedModel:
    """A frozen private copy of the user's model that exposes the masked layers and the late features.

    ``activations(x)`` -> ``{layer: [B, D_elem]}`` element activations of an unmasked forward (and
    ``"late"``); ``features(x, masks, fills)`` -> ``[B, N, D_late]``: the late features when every masked
    layer's output ``a`` is replaced, per head k, by ``m_k * a + (1 - m_k) * fill``. The N heads run as
    one batched forward of ``B*R`` rows, one per distinct head mask (:func:`head_rows`; R = 1 when
    every head masks alike). A lock serialises calls on the copy (its hooks are per call).
    """

    def __init__(self, model: nn.Module, layers, late: str | None = None, private: bool = False):
        """``private=True``: ``model`` is already the guard's own copy (no second copy is made)."""
        self.net = model.eval() if private else frozen_copy(model)
        self.layers = check_layers(self.net, layers)
        self.late_name, self.late = final_linear(self.net, late)
        modules = dict(self.net.named_modules())
        self._modules = {n: modules[n] for n in self.layers if n != INPUT}
        self._lock = threading.Lock()

    def to(self, device):
        self.net.to(device)
        return self

    def _run(self, x, on_layer):
        """Forward ``x`` with ``on_layer(name, a) -> a'`` applied at every masked layer; returns the
        late features (the final Linear's input)."""
        store = {}
        with self._lock:  # hooks live only inside one call: concurrent calls take turns
            handles = [self.late.register_forward_pre_hook(
                lambda mod, inp: store.__setitem__(LATE, inp[0]))]
            for name, module in self._modules.items():
                handles.append(module.register_forward_hook(
                    lambda mod, inp, out, name=name: on_layer(name, out)))
            try:
                if INPUT in self.layers:
                    x = on_layer(INPUT, x)
                self.net(x)
            finally:
                for h in handles:
                    h.remove()
        if LATE not in store:
            raise RuntimeError("the model's forward never reached its final nn.Linear")
        return store[LATE]

    @torch.no_grad()
    def activations(self, x: torch.Tensor) -> dict:
        acts = {}

        def grab(name, a):
            if name in acts:
                raise RuntimeError(f"layer {name!r} runs more than once per forward; mask a module "
                                   f"that is called once (e.g. a block's own activation)")
            acts[name] = a.float()
            return None if name != INPUT else a  # forward hooks returning None keep the output

        late = self._run(x, grab)
        missing = [n for n in self.layers if n not in acts]
        if missing:
            raise RuntimeError(f"the model's forward never reached the layers {missing}")
        acts[LATE] = late.flatten(1).float()
        return acts

    @torch.no_grad()
    def features(self, x: torch.Tensor, masks: dict, fills: dict, with_units: bool = False,
                 unit_stat: str = "mean", rows: tuple | None = None):
        """Late features ``[B, N, D_late]`` of the N heads; with ``with_units`` also
        ``{layer: [B, N, D_unit]}``: every masked layer's neuron values *as head k sees them* (after
        its masking), the evidence the consistency check judges (:func:`unit_views` with ``unit_stat``).
        Heads with equal masks share one forward (:func:`head_rows`; ``rows`` passes its result, or
        ``(arange(N), arange(N))`` to run every head on its own row); with a single row the outputs
        are broadcast views (stride 0 along the heads), not copies."""
        b = x.shape[0]
        n = next(iter(masks.values())).shape[0] if masks else 1
        first, row = rows if rows is not None else head_rows(masks)
        r = first.numel()
        if r < n:
            masks = {name: m[first.to(m.device)] for name, m in masks.items()}
        if 1 < r < n:
            row = row.to(x.device)
        seen = {}

        def spread(v):  # [b, r, ...] -> [b, n, ...]: the row each head reads
            if r == n:
                return v
            return v.expand(b, n, *v.shape[2:]) if r == 1 else v[:, row]

        def mask(name, a):
            m, fill = masks[name], fills[name]
            heads = a.reshape(b, r, *a.shape[1:])
            m = expand_mask(m.to(a.dtype), a.shape, name)
            out = (m * heads + (1 - m) * fill.to(a.dtype).reshape(a.shape[1:])).reshape(a.shape)
            if with_units:
                for key, u in unit_views(out, name, unit_stat).items():
                    seen[key] = spread(u.reshape(b, r, -1))
            return out

        late = spread(self._run(x.repeat_interleave(r, dim=0) if r > 1 else x, mask).reshape(b, r, -1))
        return (late, seen) if with_units else late
