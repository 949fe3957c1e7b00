"""Serving-grade guarded inference: a fitted :class:`~linkbreaker_ext.guard.LinkBreaker` as one
self-contained, stateless ``nn.Module``.

    m = GuardedModule(guard)                 # (guard.as_module() once the guard exposes it)
    labels, verdict, confidences = m(x)      # the same tensors as guard(x)
    ep = torch.export.export(m, (x,))        # deployable; torch.export.save / load round-trips
    torch.compile(m)                         # works too

What it holds
    Its own frozen copy of the guarded model, rewritten once with ``torch.fx`` into a pure function
    ``rows -> (late features, masked layers' outputs)``: a masking stage (``m * a + (1 - m) * fill``)
    sits right after every masked layer (or on the input pixels), the graph stops at the input of the
    final ``nn.Linear``, and the masked layers' raw outputs are graph outputs. Masks, fills,
    thresholds, the final Linear's weights and the consistency profile are buffers. Nothing is
    hooked, nothing is written during ``forward``: calls from several threads are independent, and
    the user's model is never touched (it is not even referenced).

The call
    Each chunk of inputs runs as one batch of ``R`` rows per input, one per distinct set of masks
    over the masked layers (:func:`linkbreaker_ext.layers.head_rows`): heads whose masks agree
    share a row, and the consistency veto reads each head's values from its row. R = N when every
    head masks differently; R is 1-4 on the guards fitted so far (docs/method.md, "Online phase"),
    and 1 for a guard fitted with ``use_early=False``. With R = 1 the fused op shares one row's late
    features between the heads (``[B, D]`` features): one model forward plus the op. With the
    stability test on (the default), each input's M neighbours (the input plus each of the guard's
    ``stability_draws`` fixed noise patterns, resampled first through its fixed displacement grids
    with ``stability_jitter``) run in the same batch: (1 + M)R rows per input. The late masking, heads, softmax and
    confidence test run in the fused ``torch.ops.linkbreaker.guard_head``; the consistency and
    stability vetoes and the OOD hint are :func:`linkbreaker_ext.verdict.decide`, as in ``guard(x)``.
    With the neighbourhood rank test (``neighbourhood_quantile``, on by default since session 35), every head's view
    of the last masked layer is ranked against the guard's R_v validation references
    (:func:`linkbreaker_ext.verdict.neighbourhood_scores`, ``[V, chunk, R_v]`` distances per chunk, one per distinct view).

Memory
    Rows are processed in chunks of ``batch_rows`` (the guard's setting; 256 on CPU, 8192 on GPU),
    i.e. ``max(1, batch_rows // R)`` inputs per forward (``batch_rows // (1 + M)R`` with the stability test), so the peak is the model's activations for
    ``batch_rows`` rows plus the ``[B, N]`` outputs, for any batch size.

Export
    ``torch.export`` specialises the chunk loop to the example's batch size (an exported program
    takes that batch size; export one per serving batch size, or pad). Input value checks (NaN/Inf)
    need a host sync and run in eager mode only (``check_inputs=True``, the default); under
    ``torch.compile``/``torch.export`` only the static shape checks remain. The exported graph calls
    ``linkbreaker::guard_head``: a process that runs it must ``import linkbreaker_ext`` first.
"""
from __future__ import annotations


import torch
from torch import fx, nn

from . import ops  # noqa: F401  (registers torch.ops.linkbreaker.guard_head and its fake kernel)
from .verdict import (check_input, combined_ratio, decide, gated, median_filter, neighbour, neighbourhood_scores,
                      stability_ratio)
from .salient import reduce_layers
from .layers import INPUT, LATE, evidence_layer, frozen_copy, head_rows, units

__all__ = ["GuardedModule", "GraphedGuard"]

_TEMP = 1 << 16  # elements per temporary of the consistency deviation (256 KiB in float32)


class _Mask(nn.Module):
    """``m * a + (1 - m) * fill`` per head, on ``R`` rows per input: ``mask`` ``[R, *shape]`` (a
    channel mask broadcasts as ``[R, C, 1, 1]``), ``offset = (1 - m) * fill`` precomputed."""

    def __init__(self, mask: torch.Tensor, offset: torch.Tensor):
        super().__init__()
        self.register_buffer("mask", mask)
        self.register_buffer("offset", offset)

    def forward(self, a):
        heads = a.reshape(-1, self.mask.shape[0], *a.shape[1:])
        # one fused pass; for the guard's binary masks bit-identical to m * a + (1 - m) * fill
        out = torch.addcmul(self.offset.to(a.dtype), heads, self.mask.to(a.dtype))
        return out.reshape(a.shape)


class _Units(nn.Module):
    """Each head's neuron values ``[B, rows, D_unit]`` of a (masked) layer output on ``rows`` rows per
    input (``[B, D_unit]`` for one shared row): :func:`linkbreaker_ext.layers.units`. Computed inside
    the graph, so the layer's full output is freed as soon as the forward moves on."""

    def __init__(self, rows: int, layer: str, stat: str = "mean"):
        super().__init__()
        self.rows, self.layer, self.stat = rows, layer, stat

    def forward(self, a):
        u = units(a, self.layer, self.stat)
        return u.reshape(-1, self.rows, u.shape[1]) if self.rows > 1 else u


class _LeafTracer(fx.Tracer):
    """Keeps the masked layers and the final Linear as single call_module nodes."""

    def __init__(self, leaves):
        super().__init__()
        self.leaves = set(leaves)

    def is_leaf_module(self, m, qualname):
        return qualname in self.leaves or super().is_leaf_module(m, qualname)


def _body(net: nn.Module, layers, late_name: str, stages: dict | None,
          unit_stages: list | None) -> fx.GraphModule:
    """``net`` as a graph module ``x -> (late_features, *unit values)``, with ``stages[name]`` (a
    :class:`_Mask`) applied right after each masked layer when ``stages`` is given, and each of
    ``unit_stages``' ``(layer, _Units)`` pairs reading that layer's output as the heads see it
    (after its mask), in order (no ``unit_stages``: only the late features come out)."""
    hidden = [n for n in layers if n != INPUT]
    tracer = _LeafTracer([*hidden, late_name])
    try:
        graph = tracer.trace(net)
    except Exception as e:  # data-dependent control flow, ...
        raise ValueError(f"GuardedModule needs a model that torch.fx can trace ({type(e).__name__}: "
                         f"{e}); call the LinkBreaker guard itself for this model") from e
    nodes = {}
    for node in graph.nodes:
        if node.op == "call_module" and node.target in (*hidden, late_name):
            if node.target in nodes:
                raise ValueError(f"layer {node.target!r} runs more than once per forward; mask a "
                                 f"module that is called once (e.g. a block's own activation)")
            nodes[node.target] = node
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    missing = [n for n in (*hidden, late_name) if n not in nodes]
    if missing or len(placeholders) != 1:
        raise ValueError(f"the model's traced forward must take one input and call the layers "
                         f"{missing or hidden} once each")
    nodes[INPUT] = placeholders[0]
    seen = dict(nodes)  # each layer's output as the heads see it (after its mask, if any)
    if stages:
        for i, name in enumerate(layers):
            if name not in stages:  # a layer every head keeps whole: nothing to mask
                continue
            net.add_module(f"lb_mask{i}", stages[name])
            src = nodes[name]
            with graph.inserting_after(src):
                masked = graph.call_module(f"lb_mask{i}", (src,))
            src.replace_all_uses_with(masked, delete_user_cb=lambda user, m=masked: user is not m)
            seen[name] = masked
    late_in = nodes[late_name].args[0]
    out = next(n for n in graph.nodes if n.op == "output")
    unit_nodes = []
    for i, (name, stage) in enumerate(unit_stages or []):
        net.add_module(f"lb_units{i}", stage)
        with graph.inserting_after(seen[name]):
            unit_nodes.append(graph.call_module(f"lb_units{i}", (seen[name],)))
    with graph.inserting_before(out):
        graph.output((late_in, *unit_nodes))
    graph.erase_node(out)
    gm = fx.GraphModule(net, graph, class_name="GuardBody")
    gm.graph.eliminate_dead_code()  # everything after the final Linear's input
    gm.graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()
    return gm


def _unit_mask(m: torch.Tensor, shape, layer: str) -> torch.Tensor:
    """:func:`linkbreaker_ext.layers.expand_mask` for ``R`` heads."""
    if layer != INPUT and len(shape) == 4:
        return m.reshape(m.shape[0], shape[1], 1, 1)
    return m.reshape(m.shape[0], *shape[1:])


def _profile_terms(center, scale, weight, dense: bool = False):
    """:func:`linkbreaker_ext.salient.deviation` as ``sum_j coef[k, j] * |u[index[k, j]] - center[k, j]|``
    over class k's salient neurons only (``index`` None: all neurons, dense, with zero ``coef`` off
    the salient set), ``coef = w / sum(w) / scale``. Same terms as the guard's (zero weights dropped);
    the sum order differs (float ulps). ``dense``: never gather (one row shared by every head: a
    per-class mat-vec over all neurons beats gathering ``[B, K, D_k]`` from it; with the broadcast
    below for few neurons, the late-only MNIST guard went from 1.25x to 1.19-1.22x the plain net at
    batch 256, bench/results/cpu-2026-11-27*.json)."""
    center, scale, weight = center.float(), scale.float(), weight.float()
    coef = weight / weight.sum(1, keepdim=True).clamp_min(1e-12) / scale
    live = weight > 0
    width = int(live.sum(1).max()) if live.numel() else 0
    if dense or width == 0 or width > 0.75 * weight.shape[1]:  # a gather would not save work
        return None, center.contiguous(), coef.contiguous()
    order = torch.sort((~live).to(torch.int8), dim=1, stable=True).indices[:, :width]  # live first
    keep = live.gather(1, order)
    return (order.contiguous(), (center.gather(1, order) * keep).contiguous(),
            (coef.gather(1, order) * keep).contiguous())


class GuardedModule(nn.Module):
    """A fitted guard as a stateless module: ``forward(x) -> (labels, verdict, confidences)``, equal
    to ``guard(x)``'s ``labels``, ``verdict`` and ``confidences`` (see the module docstring).

    ``batch_rows``: rows (inputs x heads) per batched forward; default the guard's setting (256 on
    CPU, 8192 on GPU, chosen by the input's device at call time). ``check_inputs``: eager-mode input
    validation as ``guard(x)`` does it (shape, dtype, device, NaN/Inf; the last one syncs on CUDA).
    """

    def __init__(self, guard, batch_rows: int | None = None, check_inputs: bool = True):
        super().__init__()
        cfg = guard.config
        device = guard.device
        self.layers = list(guard.layers)
        self.input_shape = tuple(guard.input_shape)
        self.input_range = guard.input_range
        self.num_heads = int(guard.num_heads)
        self.consistency = bool(cfg.consistency and guard.profile)
        self.peak = []  # consistency_peak: the evidences read again as their peak (set below)
        self.stable = guard.stability is not None and cfg.stability_test
        self.draws = cfg.stability_draws  # neighbours per input (stability test)
        # stability_median: one more neighbour per input, the input median-filtered
        self.median = int(cfg.stability_median) if self.stable and "median_bound" in guard.stability else 0
        self.reduce = cfg.consistency_reduce
        self.inconsistent_verdict = cfg.inconsistent_verdict
        self.ood_hint = cfg.ood_hint
        self.alarm_margin = float(cfg.alarm_margin)
        self.rank_alarm = bool(cfg.neighbourhood_alarm)
        self.batch_rows = batch_rows or cfg.batch_rows
        self.check_inputs = check_inputs
        # rows per input: one per distinct set of head masks (the veto reads each head's own row);
        # a guard fitted with use_early=False keeps every hidden neuron for every head: one row
        first, row = head_rows({name: guard.masks[name] for name in self.layers})
        self.rows = first.numel()
        self.register_buffer("head_row", row.to(device))

        net = frozen_copy(guard.tapped.net)  # no hooks a call in flight could have left
        shapes = self._probe_shapes(net, guard, device)
        stages = {}
        for name in self.layers:
            m = guard.masks[name].float().to(device)[first.to(device)]
            if bool((m == 1).all()):  # kept whole by every head (m * a + 0 * fill == a)
                continue
            m = _unit_mask(m, shapes[name], name)
            fill = guard.fills[name].float().to(device).reshape(shapes[name][1:])
            stages[name] = _Mask(m.contiguous(), ((1 - m) * fill).contiguous())
        unit_stages = None
        evidence = guard._profile_layers()  # the profile's order: masked layers (per view), late
        if self.consistency:  # one reading per evidence name: a layer, or one view of it
            reads = [evidence_layer(e, cfg.consistency_units) for e in evidence[:-1]]
            unit_stages = [(layer, _Units(self.rows, layer, view)) for layer, view in reads]
        self.body = _body(net, self.layers, guard.late_layer, stages, unit_stages)

        late = guard.tapped.late
        w = late.weight.detach().float().clone()
        b = late.bias.detach().float().clone() if late.bias is not None else torch.zeros(w.shape[0])
        self.register_buffer("late_weight", w.to(device))
        self.register_buffer("late_bias", b.to(device))
        self.register_buffer("late_mask", guard.masks[LATE].float().to(device).contiguous())
        self.register_buffer("late_fill", guard.fills[LATE].float().to(device).contiguous())
        self.register_buffer("thresholds", guard.thresholds.float().to(device).contiguous())
        if self.consistency:
            p = guard.profile
            self.sparse = []
            for i, name in enumerate(evidence):
                index, center, coef = _profile_terms(p[f"center.{name}"], p[f"scale.{name}"],
                                                     p[f"weight.{name}"], dense=self.rows == 1)
                self.sparse.append(index is not None)
                if index is not None:
                    self.register_buffer(f"index{i}", index.to(device))
                self.register_buffer(f"center{i}", center.to(device))
                self.register_buffer(f"coef{i}", coef.to(device))
            # consistency_peak: each evidence read again as its salient neurons' largest z-score,
            # |u - center| times 1 / scale on the salient set (0 elsewhere)
            self.peak = [evidence.index(n) for n, how in guard.readings() if how == "peak"]
            for i, name in enumerate(evidence[j] for j in self.peak):
                inv = (p[f"weight.{name}"] > 0).float() / p[f"scale.{name}"].float()
                self.register_buffer(f"peak_center{i}", p[f"center.{name}"].float().to(device).contiguous())
                self.register_buffer(f"peak_inv{i}", inv.to(device).contiguous())
            self.register_buffer("norms", p["norms"].float().to(device))
            self.register_buffer("bounds", p["bounds"].float().to(device))
        self.ranked = self.consistency and guard.neighbourhood is not None
        if self.ranked:  # the neighbourhood rank test reads one evidence's values
            nb = guard.neighbourhood
            self.rank_index = evidence.index(guard.neighbourhood_evidence())
            self.register_buffer("rank_references", nb["references"].float().to(device).contiguous())
            self.register_buffer("rank_labels", nb["labels"].long().to(device))
            self.register_buffer("rank_bound", nb["bound"].float().to(device))
            gate = nb.get("gate")  # None: the test judges every head
            self.register_buffer("rank_gate", None if gate is None else gate.float().to(device))
        if self.stable:
            self.register_buffer("stability_noise", guard.stability["noise"].float().to(device).contiguous())
            self.register_buffer("stability_bound", guard.stability["bound"].float().to(device))
            contrast = guard.stability.get("contrast")  # None: the same noise for every input
            self.register_buffer("stability_contrast", None if contrast is None else contrast.float().to(device))
            jitter = guard.stability.get("jitter")  # None: the noise alone makes the neighbours
            self.register_buffer("stability_jitter", None if jitter is None else jitter.float().to(device))
            if self.median:
                self.register_buffer("stability_median_bound", guard.stability["median_bound"].float().to(device))
            gate = guard.stability.get("gate")  # None: the test judges every head
            self.register_buffer("stability_gate", None if gate is None else gate.float().to(device))
            gate = guard.stability.get("median_gate") if self.median else None  # the filter's own
            self.register_buffer("stability_median_gate", None if gate is None else gate.float().to(device))

    @staticmethod
    @torch.no_grad()
    def _probe_shapes(net, guard, device):
        """Output shapes of the masked layers for one input (to lay the masks out)."""
        x = torch.zeros(1, *guard.input_shape, device=device)
        shapes = {INPUT: tuple(x.shape)}
        modules = dict(net.named_modules())

        def grab(name, out):
            shapes.setdefault(name, tuple(out.shape))  # returns None: the output is kept

        handles = [modules[n].register_forward_hook(lambda mod, i, out, n=n: grab(n, out))
                   for n in guard.layers if n != INPUT]
        try:
            net(x)
        finally:
            for h in handles:
                h.remove()
        return shapes

    # ------------------------------------------------------------------ call
    def _check(self, x):
        check_input(x, self.input_shape, self.thresholds.device, self.input_range,
                    finite=not torch.compiler.is_compiling())

    def chunk_inputs(self, device: torch.device | None = None) -> int:
        """Inputs per batched forward: ``max(1, batch_rows // rows_per_input)`` (an input and its
        stability neighbour are two)."""
        device = device or self.thresholds.device
        rows = self.batch_rows or (256 if device.type == "cpu" else 8192)
        return max(1, rows // (self.rows * self._copies()))

    def _copies(self) -> int:
        """Forwards per input and head mask: the input, and with the stability test its neighbours
        (``stability_draws``, and the filtered one with ``stability_median``)."""
        return 1 + self.draws + (1 if self.median else 0) if self.stable else 1

    def cuda_graph(self, batch_size: int, warmup: int = 3) -> "GraphedGuard":
        """This module captured as one CUDA graph for inputs of exactly ``batch_size``: each call is a
        copy into a static input and one graph replay, without the dozens of kernel launches and the
        Python of an eager call (what dominates at batch 1). See :class:`GraphedGuard`."""
        return GraphedGuard(self, batch_size, warmup)

    def forward(self, x: torch.Tensor):
        if self.check_inputs:
            self._check(x)
        x = x.float()  # the private copy is float32, as the guard's
        n = self.num_heads
        if x.shape[0] == 0:
            return (torch.empty(0, dtype=torch.int64, device=x.device),
                    torch.empty(0, dtype=torch.int64, device=x.device),
                    torch.empty(0, n, dtype=torch.float32, device=x.device))
        chunk = self.chunk_inputs(x.device)
        parts = [self._chunk(x[s:s + chunk]) for s in range(0, x.shape[0], chunk)]
        if len(parts) == 1:
            return parts[0]
        return tuple(torch.cat(p) for p in zip(*parts))

    def _chunk(self, x):
        b, r = x.shape[0], self.rows
        if self.stable:  # the input and its neighbour(s) (stability test) in one forward
            x = torch.cat([x, neighbour(x, self.stability_noise, self.input_range, self.stability_contrast,
                                        self.stability_jitter),
                           *([median_filter(x, self.median)] if self.median else [])])
        rows = x.repeat_interleave(r, dim=0) if r > 1 else x
        late, *acts = self.body(rows)
        late = late.reshape(x.shape[0], r, -1)
        feats = late[:, 0] if r == 1 else self._spread(late)  # [B, D]: one row shared by every head
        conf, labels, verdict = torch.ops.linkbreaker.guard_head(
            feats.contiguous(), self.late_weight, self.late_bias, self.late_mask, self.late_fill, self.thresholds)
        if not (self.consistency or self.stable):
            return labels, verdict, conf
        deviation = unstable = filtered = None
        if self.stable:
            m = self.draws * b
            unstable = stability_ratio(conf[:b], conf[b:b + m].reshape(self.draws, b, -1), self.stability_bound)
            if self.median:  # the filtered neighbour, against its own bound
                filtered = stability_ratio(conf[:b], conf[b + m:], self.stability_median_bound)
            # a copy: a view of the first b rows would keep the neighbours' rows alive in the outputs
            conf, feats, acts = conf[:b].clone(), feats[:b], [a[:b] for a in acts]
        row_acts = acts  # each row's values, before they are spread over the heads (the rank test)
        if self.consistency:
            acts = [a if r == 1 else self._spread(a) for a in acts]
            deviation = self._deviations([*acts, feats.float()]) / self.bounds
        if self.stable:  # each neighbour judges only the heads its gate lets through
            unstable = gated(unstable, deviation, self.stability_gate)
            filtered = gated(filtered, deviation, self.stability_median_gate)
        near = None
        if self.ranked:  # the views per row, as read before they were spread over the heads
            u = [*row_acts, (late[:b] if r > 1 else feats).float()][self.rank_index]
            u = u[:, None] if u.dim() == 2 else u  # one shared row: [B, 1, D]
            near = gated(neighbourhood_scores(u, self.rank_references, self.rank_labels, self.head_row)
                         / self.rank_bound, deviation, self.rank_gate)
        labels, verdict = decide(conf, self.thresholds, combined_ratio(deviation, unstable, filtered),
                                 self.inconsistent_verdict, self.ood_hint, self.alarm_margin, near,
                                 self.rank_alarm, filtered)
        return labels, verdict, conf

    def _inputs_per_pass(self, u, center) -> int:
        """Inputs per pass of a deviation's ``[rows, K, D]`` temporaries: on CPU at most _TEMP
        elements, on GPU ``batch_rows // K`` inputs (see :meth:`_deviations`)."""
        return (max(1, (self.batch_rows or 8192) // center.shape[0]) if u.is_cuda
                else max(1, _TEMP // center.numel()))

    def _spread(self, v):
        """``[B, R, ...]`` row values to ``[B, N, ...]``: the row each head reads."""
        return v if self.rows == self.num_heads else v[:, self.head_row]

    def _deviations(self, units):
        """``LinkBreaker.deviations_from_units`` from the heads' unit values per layer (the masked
        layers, then the late layer): ``[B, N, D_unit]`` (head k's own row) or ``[B, D_unit]``."""
        per_layer = []
        for i, u in enumerate(units):
            center, coef = getattr(self, f"center{i}"), getattr(self, f"coef{i}")
            if not u.is_cuda and u.dim() == 2 and not self.sparse[i] and u.shape[1] >= 64:
                # one shared row, many neurons: per class one [B, D] pass and a BLAS mat-vec, instead
                # of [B, K, D] temporaries reduced over D (the late-only MNIST guard at batch 256 on
                # CPU: 1.25x the plain net against 1.33x, bench/results/cpu-2026-11-2{6,7}.json);
                # a few neurons (a conv layer's channels): the broadcast below is faster
                d = torch.stack([torch.mv((u - center[k]).abs_(), coef[k])
                                 for k in range(center.shape[0])], 1)
                per_layer.append(d / self.norms[:, i])
                continue
            # CPU: [rows, K, D] temporaries of at most _TEMP elements: they stay in cache and in the
            # allocator's free lists (fresh multi-MB buffers cost more in page faults than the math).
            # GPU: batch_rows // K inputs per pass ([batch_rows, D] temporaries, the bound of the
            # rows themselves); small chunks there cost a launch each (40 chunks at batch 256 on an
            # H100, measured)
            step = self._inputs_per_pass(u, center)
            parts = []
            for s in range(0, u.shape[0], step):
                v = u[s:s + step]
                # class k's salient neurons only ([rows, K, D_k max]) or all of them
                if self.sparse[i]:
                    idx = getattr(self, f"index{i}")
                    v = v[:, idx] if v.dim() == 2 else v.gather(2, idx.expand(v.shape[0], -1, -1))
                elif v.dim() == 2:
                    v = v[:, None, :]
                parts.append((v - center).abs_().mul_(coef).sum(-1))
            d = parts[0] if len(parts) == 1 else torch.cat(parts)
            per_layer.append(d / self.norms[:, i])
        for i, u in enumerate(units[j] for j in self.peak):  # the peak readings' columns follow
            center, inv = getattr(self, f"peak_center{i}"), getattr(self, f"peak_inv{i}")
            step = self._inputs_per_pass(u, center)
            parts = [((v[:, None, :] if v.dim() == 2 else v) - center).abs_().mul_(inv).amax(-1)
                     for v in (u[s:s + step] for s in range(0, u.shape[0], step))]
            d = parts[0] if len(parts) == 1 else torch.cat(parts)
            per_layer.append(d / self.norms[:, len(units) + i])
        return reduce_layers(torch.stack(per_layer, -1), self.reduce)


class GraphedGuard:
    """A :class:`GuardedModule` replayed as one captured CUDA graph for a fixed batch size (the
    small-batch serving path: launch overhead, not arithmetic, bounds a guarded call at batch 1).

    The forward has no host sync (no NaN/Inf scan, no data-dependent shapes), so it captures whole,
    the fused ``guard_head`` op included. Calls copy ``x`` into the graph's static input, replay the
    graph and return clones of its static outputs (a later call cannot overwrite a returned result).
    Shapes, dtype and device are checked on every call; values are not (no sync). One graph is one
    stream's work: calls from several threads must not share a ``GraphedGuard`` (give each its own)."""

    def __init__(self, module: GuardedModule, batch_size: int, warmup: int = 3):
        device = module.thresholds.device
        if device.type != "cuda":
            raise ValueError(f"cuda_graph needs the module on a CUDA device, it is on {device}: "
                             f"move it first (module.cuda())")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self.module, self.batch_size, self.device = module, batch_size, device
        self.static_x = torch.zeros(batch_size, *module.input_shape, device=device)
        check = module.check_inputs
        module.check_inputs = False  # the NaN/Inf scan syncs with the host: not capturable
        try:
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.no_grad(), torch.cuda.stream(side):
                for _ in range(max(1, warmup)):  # allocator pools and lazy inits before capture
                    module(self.static_x)
            torch.cuda.current_stream(device).wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.no_grad(), torch.cuda.graph(self.graph):
                self.static_out = module(self.static_x)
        finally:
            module.check_inputs = check

    def __call__(self, x: torch.Tensor):
        expected = (self.batch_size, *self.module.input_shape)
        if not isinstance(x, torch.Tensor) or tuple(x.shape) != expected:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"this CUDA graph was captured for inputs of shape {expected}, got {got}: "
                             f"capture one per serving batch size, or pad the batch")
        if not x.is_floating_point():
            raise TypeError(f"input must be a floating tensor, got {x.dtype}")
        if x.device != self.device:
            raise ValueError(f"input is on {x.device} but the graph runs on {self.device}")
        self.static_x.copy_(x)
        self.graph.replay()
        return tuple(t.clone() for t in self.static_out)
