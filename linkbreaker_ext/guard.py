"""The LinkBreaker guard: its fitted state, the online call (Alg. 3) and ``save``/``load``. The
offline phase that produces the state lives in :mod:`linkbreaker_ext.fitting`.

Online, every input runs N class-restricted predictions: head k keeps class k's salient neurons in
every masked layer and in the late layer (the input of the final Linear) and fills every other neuron
with a clean reference activation (plus optional fixed noise). Head k is *credible* when

* its confidence in class k reaches its MAD threshold (the paper's criterion), and
* the input's own activations on class k's salient neurons are consistent with class k's clean
  profile in every masked layer (the neurons consistency check, scored with robust median/MAD
  deviations; ``docs/method.md`` says why and what it adds on natural images).

Exactly one credible head gives a label, two or more a trigger alarm, none an out-of-distribution
verdict (labelled with the most confident head as a hint, the paper's Fig. 9). The masked layers run
the N heads as one batched forward; the late masking, the heads, the softmax and the confidence test
run in one call of the fused ``torch.ops.linkbreaker.guard_head`` op, and the consistency veto is
applied to its credible set.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math

import torch
from torch import nn

from . import ops, safefiles, salient
from .config import LEGACY_CONFIG, GuardConfig, with_legacy
from .fitting import check_median_inputs, fit_guard, recalibrate_guard
from .layers import LATE, TappedModel, evidence_layer, evidence_names, head_rows, rank_evidence, units
from .serving import GuardedModule
from .verdict import (GuardResult, check_input, decide, median_filter, neighbour, neighbourhood_scores,
                      score_from_result, stability_ratio)

FORMAT = "linkbreaker-guard"
FORMAT_VERSION = 2


def fingerprint(model: nn.Module) -> str:
    """SHA-256 of a model's state (names, shapes, bytes): a guard is only valid for these weights."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
                 if t.numel() else b"")
    return h.hexdigest()


@contextlib.contextmanager
def explain_out_of_memory(what: str, rows: int | None):
    """Re-raise a device out-of-memory error with the setting that bounds the guard's memory: the
    rows (inputs x heads) of one batched forward, ``GuardConfig.batch_rows`` (None: 8192 on a GPU)."""
    try:
        yield
    except torch.OutOfMemoryError as e:
        lower = max(1, (rows or 8192) // 4)
        raise torch.OutOfMemoryError(
            f"{what} ran out of device memory with batch_rows={rows or 'None (8192 on a GPU)'} rows "
            f"(inputs x heads) per batched forward: lower GuardConfig.batch_rows, e.g. "
            f"LinkBreaker.fit(..., batch_rows={lower}) or guard.config.batch_rows = {lower} on a "
            f"fitted guard; peak memory follows batch_rows, not the batch size. Original error: {e}") from e


def _range(value):
    """A saved ``input_range``: two finite numbers, low <= high, or None."""
    if value is None:
        return None
    if (not isinstance(value, list) or len(value) != 2
            or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in value) or value[0] > value[1]):
        raise ValueError(f"input_range must be [low, high], got {value!r}")
    return value



def readings(evidence, peak: str = "off") -> list:
    """``[(evidence, how)]``: every evidence read as its salient neurons' mean robust z-score, then,
    with ``peak`` ("max": the channel-maximum views ``<layer>@max``; "all": every evidence), again as
    their largest (:func:`salient.deviation`), each reading within its own bound."""
    peaks = [n for n in evidence if peak == "all" or (peak == "max" and n.endswith("@max"))]
    return [(n, "mean") for n in evidence] + [(n, "peak") for n in peaks]

class LinkBreaker:
    """A fitted guard around ``model``. Build with :meth:`fit` or :meth:`load`; call like the model.

    The guard runs a frozen private copy of the model, so the user's model is never hooked or changed.
    """

    def __init__(self, model, layers, late, masks, fills, thresholds, profile, config: GuardConfig,
                 input_shape, diagnostics=None, tapped: TappedModel | None = None, input_range=None,
                 stability=None, neighbourhood=None):
        device = next(model.parameters()).device
        self.model = model
        self.tapped = tapped or TappedModel(model, layers, late)
        self.layers, self.late_layer = self.tapped.layers, self.tapped.late_name
        self.config = config
        self.input_shape = tuple(input_shape)
        self.input_range = None if input_range is None else tuple(float(v) for v in input_range)
        self.masks = {k: v.float().to(device) for k, v in masks.items()}
        self.fills = {k: v.float().to(device) for k, v in fills.items()}
        self.thresholds = thresholds.float().to(device)
        # consistency profile: per layer center/scale [K, D_unit], norms [K, L], bounds [K]
        # (per_layer: each layer's own bound is folded into its norm, and bounds are 1)
        self.profile = {k: v.float().to(device) for k, v in (profile or {}).items()}
        # the neighbour stability test: {"noise": [*input_shape] or [M, *input_shape], "bound": 0-d,
        # "contrast": 0-d, the reference contrast (absent: the same noise for every input)} (None: off)
        self.stability = None if stability is None else {k: v.float().to(device) for k, v in stability.items()}
        # the neighbourhood rank test: {"references": [V, R, D], the R validation samples at
        # neighbourhood_evidence() in each of the V distinct views of the heads (one per row of
        # masks), L2-normalised; "labels": [R]; "bound": 0-d; "gate": 0-d, absent without a gate}
        # (None: off)
        self.neighbourhood = None if neighbourhood is None else {
            k: v.to(device, torch.long if k == "labels" else torch.float32) for k, v in neighbourhood.items()}
        self.diagnostics = diagnostics or {}
        # the weights this guard was fitted for, fixed now: a model changed later does not match
        self.model_sha256 = fingerprint(model)
        self.data_sha256 = None  # the validation set's fingerprint (fitting.data_fingerprint), once fitted

    @property
    def num_heads(self) -> int:
        return self.thresholds.numel()

    @property
    def device(self) -> torch.device:
        return self.thresholds.device

    # ------------------------------------------------------------------ online
    def head_features(self, x, masks=None):
        """``[B, N, D_late]`` late features of the N heads (masked layers masked, late layer not)."""
        hidden, rows = self._hidden_masks(masks)
        chunk = self._inputs_per_forward(rows)
        return torch.cat([self.tapped.features(x[i:i + chunk].to(self.device), hidden, self.fills, rows=rows)
                          for i in range(0, len(x), chunk)])

    def _hidden_masks(self, masks=None):
        """The masked layers' masks (``masks`` overriding some) and their :func:`head_rows`: the
        guard's own masks' rows are computed once."""
        merged = dict(self.masks, **(masks or {}))
        hidden = {n: merged[n] for n in self.layers}
        if masks:
            return hidden, head_rows(hidden)
        # keyed on the tensors and their in-place version counters: masks replaced or edited
        # after the fit (the set search assigns them) are seen
        key = tuple((n, id(m), m._version) for n, m in hidden.items())
        cached = getattr(self, "_rows", None)
        if cached is None or cached[0] != key:
            self._rows = cached = (key, tuple(t.to(self.device) for t in head_rows(hidden)))
        return hidden, cached[1]

    def _inputs_per_forward(self, rows) -> int:
        """Inputs per batched forward: ``batch_rows`` rows of the model, and the heads' ``[B, N, D]``
        outputs bounded the same way (shared single rows are views, not copies)."""
        distinct = rows[0].numel()
        return max(1, self._batch_rows() // (1 if distinct == 1 else self.num_heads))

    def head_confidences(self, x, masks=None, thresholds=None, features=None, with_units=False):
        """Run the N class-restricted heads; returns the op's ``(conf, labels, verdict)`` (the
        confidence test only, no consistency veto), plus with ``with_units`` the heads' neuron values
        ``{layer: [B, N, D_unit]}`` (masked layers and the late layer) for the consistency check.
        ``masks`` overrides some layers' masks; ``features`` (from :meth:`head_features`) skips the
        forward through the masked layers."""
        hidden, rows = self._hidden_masks(masks)
        masks = dict(self.masks, **(masks or {}))
        th = self.thresholds if thresholds is None else thresholds
        late = self.tapped.late
        w, b = late.weight, late.bias
        if b is None:
            b = torch.zeros(w.shape[0], device=w.device, dtype=w.dtype)
        n = th.shape[0]
        shared = rows[0].numel() == 1
        chunk = self._inputs_per_forward(rows)
        total = len(x) if features is None else len(features)
        out, seen = None, []
        for start in range(0, total, chunk):
            if features is not None:
                feats = features[start:start + chunk]
            elif with_units:
                feats, u = self.tapped.features(x[start:start + chunk].to(self.device), hidden,
                                                self.fills, with_units=True,
                                                unit_stat=self.config.consistency_units, rows=rows)
                seen.append(dict(u, **{LATE: feats.float()}))
            else:
                feats = self.tapped.features(x[start:start + chunk].to(self.device), hidden, self.fills,
                                             rows=rows)
            if shared and features is None:
                feats = feats[:, 0]  # one row shared by every head: the op's [B, D] form, no copy
            # Inputs are validated once in __call__ and masks/thresholds at fit time, so skip the
            # op wrapper's value checks (a host sync on CUDA); a NaN the model itself produces is
            # never a silent label: conf NaN / label -1 / verdict 2 on CUDA, an error on CPU.
            res = ops.guard_head(feats, w, b, masks[LATE], self.fills[LATE], th, check_values=False)
            if out is None:  # outputs allocated once (see _heads_with_deviations: heap fragmentation)
                out = tuple(r.new_empty((total, *r.shape[1:])) for r in res)
            for dst, src in zip(out, res):
                dst[start:start + len(src)] = src
        if out is None:
            out = ops.guard_head(torch.empty(0, n, w.shape[1], device=w.device), w, b, masks[LATE],
                                 self.fills[LATE], th)
        if not with_units:
            return out
        if len(seen) == 1:  # one chunk: keep shared rows as views
            units_ = seen[0]
        else:
            units_ = {k: torch.cat([u[k] for u in seen]) for k in seen[0]} if seen else {}
        return (*out, units_)

    def unit_activations(self, x) -> dict:
        """``{layer: [B, D_unit]}`` neuron values of an unmasked forward, for every masked layer and
        the late layer (what the statistics of the fit are computed on)."""
        parts = []
        rows = self._batch_rows()
        for start in range(0, len(x), rows):
            acts = self.tapped.activations(x[start:start + rows].to(self.device))
            parts.append({k: units(v, k) for k, v in acts.items()})
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]} if parts else {}

    def deviations_from_units(self, units_: dict, by_layer: bool = False) -> torch.Tensor:
        """``[B, N]``: for each head k, the robust deviation of the neuron values head k's prediction
        rests on (``units_`` ``{layer: [B, N, D_unit]}``, after its masking) from class k's clean
        profile on class k's salient neurons, relative to the layer's norm for class k, reduced over
        layers (:func:`salient.reduce_layers`); ``by_layer``: ``[B, N, L]``, not reduced."""
        layers = []
        for i, (layer, how) in enumerate(self.readings()):
            d = salient.deviation(units_[layer], self.profile[f"center.{layer}"],
                                  self.profile[f"scale.{layer}"], self.profile[f"weight.{layer}"], how)
            layers.append(d / self.profile["norms"][:, i])
        stacked = torch.stack(layers, -1)
        return stacked if by_layer else salient.reduce_layers(stacked, self.config.consistency_reduce)

    def neighbourhood_evidence(self) -> str:
        """The evidence the neighbourhood rank test reads (:func:`~linkbreaker_ext.layers.rank_evidence`)."""
        return rank_evidence(self._profile_layers())

    def neighbourhood_ratios(self, units_: dict) -> torch.Tensor:
        """``[B, N]``: each head's :func:`neighbourhood_scores` relative to the calibrated bound
        (<= 1: as near its class as clean validation samples are), from the heads' neuron values."""
        nb = self.neighbourhood
        first, row = self._hidden_masks()[1]
        views = units_[self.neighbourhood_evidence()][:, first]  # [B, V, D]
        return neighbourhood_scores(views, nb["references"], nb["labels"], row) / nb["bound"]

    def _heads_with_deviations(self, x, by_layer: bool = False, ranks: bool = False):
        """``(conf, deviations)`` ``[B, N]`` each (``by_layer``: deviations ``[B, N, L]``), chunk by
        chunk so the heads' neuron values stay bounded in memory for any batch size; ``ranks``: the
        :meth:`neighbourhood_ratios` ``[B, N]`` too, from the same forwards."""
        step = self._inputs_per_forward(self._hidden_masks()[1])  # one head_confidences chunk
        if len(x) == 0:
            conf = self.head_confidences(x)[0]
            out = conf, (conf.new_empty(0, self.num_heads, len(self.readings())) if by_layer
                         else conf.clone())
            return (*out, conf.clone()) if ranks else out
        # The outputs are allocated once, up front: small per-chunk results kept alive between the
        # chunks' large temporaries fragment the CPU heap, and the process's memory then grows with
        # the batch (100,000 MNIST inputs: 1.85 GiB added, 0.52 GiB now;
        # results/memory-scale*.json) although live tensors do not.
        conf = torch.empty(len(x), self.num_heads, device=self.device)
        dev = torch.empty(len(x), self.num_heads, *([len(self.readings())] if by_layer else []),
                          device=self.device)
        near = torch.empty(len(x), self.num_heads, device=self.device) if ranks else None
        # deviations' [inputs, N, D_unit] temporaries: at most batch_rows // N inputs at a time
        sub = max(1, self._batch_rows() // self.num_heads)
        for i in range(0, len(x), step):
            c, _, _, u = self.head_confidences(x[i:i + step], with_units=True)
            conf[i:i + step] = c
            for j in range(0, len(c), sub):
                part = {k: v[j:j + sub] for k, v in u.items()}
                dev[i + j:i + min(j + sub, len(c))] = self.deviations_from_units(part, by_layer)
                if ranks:
                    near[i + j:i + min(j + sub, len(c))] = self.neighbourhood_ratios(part)
        return (conf, dev, near) if ranks else (conf, dev)

    def deviations(self, x, by_layer: bool = False) -> torch.Tensor:
        """``[B, N]`` :meth:`deviations_from_units` of inputs ``x`` (the heads' batched forward);
        ``by_layer``: ``[B, N, L]``, every layer's deviation relative to its norm."""
        if not self.profile or len(x) == 0:
            shape = (len(x), self.num_heads, *([len(self.readings())] if by_layer else []))
            return torch.zeros(shape, device=self.device)
        return self._heads_with_deviations(x, by_layer)[1]

    def readings(self) -> list:
        """:func:`readings` of this guard's evidences: the columns of the profile's norms and of
        ``by_layer`` deviations."""
        return readings(self._profile_layers(), self.config.consistency_peak)

    def _profile_layers(self, available=None):
        """The consistency check's evidence, in the order of the profile's norms: every masked layer
        (a conv layer read in several views once per view, ``"<layer>@<view>"``), then the late
        layer. ``available``: the evidence names a forward produced (at fit time, before the
        profile exists)."""
        have = (set(available) if available is not None
                else {k[len("center."):] for k in self.profile if k.startswith("center.")})
        return evidence_names(self.layers, self.config.consistency_units, have.__contains__)

    def _batch_rows(self) -> int:
        if self.config.batch_rows:
            return self.config.batch_rows
        return 256 if self.device.type == "cpu" else 8192

    def _check_input(self, x):
        check_input(x, self.input_shape, self.device, self.input_range)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> GuardResult:
        self._check_input(x)
        with explain_out_of_memory("guard(x)", self._batch_rows()):
            return self._guard(x.float())  # the guard's copy of the model is float32

    def _guard(self, x: torch.Tensor) -> GuardResult:
        consistency = self.config.consistency and self.profile
        stable = self.stability is not None and self.config.stability_test
        if not (consistency or stable):
            conf, labels, verdict = self.head_confidences(x)
            return GuardResult(labels, verdict, conf, self.thresholds)
        ranked = bool(consistency) and self.neighbourhood is not None
        near = near_gate = None
        if ranked:
            conf, dev, near = self._heads_with_deviations(x, ranks=True)
            ratio = dev / self.profile["bounds"]
            near_gate = self.neighbourhood.get("gate")
        elif consistency:
            conf, dev = self._heads_with_deviations(x)
            ratio = dev / self.profile["bounds"]
        else:
            conf, ratio = self.head_confidences(x)[0], None
        unstable, filtered = self._stability_parts(x, conf) if stable else (None, None)
        gate = self.stability.get("gate") if stable else None
        median_gate = self.stability.get("median_gate") if stable else None
        result = GuardResult(None, None, conf, self.thresholds, ratio, unstable, gate, near, near_gate, filtered,
                             median_gate)
        result.labels, result.verdict = decide(conf, self.thresholds, result.credibility,
                                               self.config.inconsistent_verdict, self.config.ood_hint,
                                               self.config.alarm_margin, result.rank_ratio,
                                               self.config.neighbourhood_alarm, result.filtered_judged)
        return result

    def neighbour(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (resampled through the guard's fixed displacement grids, with ``stability_jitter``,
        the default for images) plus the guard's fixed noise pattern (zero by default), inside the validation set's value range
        (``[M * B, ...]``, pattern-major, with ``stability_draws`` = M > 1)."""
        return neighbour(x.to(self.device), self.stability["noise"], self.input_range,
                         self.stability.get("contrast"), self.stability.get("jitter"))

    def stability_ratios(self, x: torch.Tensor, conf: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, N]``: how far each head's own-class log-odds fall from ``x`` to its neighbour,
        relative to the calibrated bound (<= 1: as stable as clean inputs); with ``stability_median``
        the larger of that and the filtered neighbour's ratio. ``conf``: the heads' confidences on
        ``x``, when the caller has them."""
        jitter, filtered = self._stability_parts(x, conf)
        return jitter if filtered is None else torch.maximum(jitter, filtered)

    def _stability_parts(self, x: torch.Tensor, conf: torch.Tensor | None = None):
        """``(jittered, filtered)`` ``[B, N]`` ratios of :meth:`stability_ratios`; ``filtered`` is
        None without ``stability_median``."""
        if conf is None:
            conf = self.head_confidences(x)[0]
        # neighbours made chunk by chunk (never a second copy of the whole batch), into one output
        m = self.config.stability_draws
        near = torch.empty(m, len(x), self.num_heads, device=self.device)
        step = max(1, self._inputs_per_forward(self._hidden_masks()[1]) // m)
        filtered = "median_bound" in self.stability  # stability_median: one more neighbour
        near_m = torch.empty(len(x), self.num_heads, device=self.device) if filtered else None
        for i in range(0, len(x), step):
            xs = x[i:i + step]
            near[:, i:i + step] = self.head_confidences(self.neighbour(xs))[0].reshape(m, len(xs), -1)
            if filtered:
                xm = median_filter(xs.to(self.device), self.config.stability_median)
                near_m[i:i + step] = self.head_confidences(xm)[0]
        ratio = stability_ratio(conf, near, self.stability["bound"])
        # the filtered neighbour, against its own bound
        return ratio, stability_ratio(conf, near_m, self.stability["median_bound"]) if filtered else None

    @torch.no_grad()
    def score(self, x: torch.Tensor) -> torch.Tensor:
        """``[B]`` continuous trigger score, higher = more suspicious (for ROC curves); see
        :func:`score_from_result`."""
        return score_from_result(self(x))

    def as_module(self, batch_rows=None, check_inputs=True):
        """This guard as a self-contained, stateless ``nn.Module`` whose ``forward(x)`` returns
        ``(labels, verdict, confidences)``: exportable (``torch.export``), compilable and safe to call
        from several threads. It holds its own copy of the model and the fitted state as buffers."""
        return GuardedModule(self, batch_rows=batch_rows, check_inputs=check_inputs)

    # ------------------------------------------------------------------ offline
    @classmethod
    def fit(cls, model: nn.Module, x_val, y_val=None, num_classes: int | None = None,
            layers=None, config: GuardConfig | None = None, progress: bool = True,
            **overrides) -> "LinkBreaker":
        """Fit a guard from a small clean validation set (tensors, a Dataset or a DataLoader).

        ``layers``: the masked layers, a list of module names and/or ``"input"`` (None: the input
        pixels plus ``config.hidden_layers`` hidden layers spread over the network). The late layer is
        always the input of the final Linear. ``overrides`` set :class:`GuardConfig` fields. The whole
        fit runs on the model's device; the validation data is moved there chunk by chunk.
        """
        rows = overrides.get("batch_rows", getattr(config, "batch_rows", None))
        with explain_out_of_memory("LinkBreaker.fit", rows):
            return fit_guard(cls, model, x_val, y_val, num_classes, layers, config, progress, **overrides)

    def recalibrate(self, x_val, y_val=None, **overrides) -> "LinkBreaker":
        """A new guard with other settings of the last offline stage (thresholds, consistency
        bounds, verdict: ``fitting.CALIBRATION_FIELDS``), recalibrated on the validation set this
        guard was fitted on. Equal to a refit with those settings, without its cost; this guard is
        unchanged."""
        return recalibrate_guard(self, x_val, y_val, **overrides)

    # ------------------------------------------------------------------ persistence
    def save(self, path, key=None):
        """Write a safetensors file: masks, fills, thresholds, the consistency profile and, as
        metadata, the settings, layer names, input shape and a fingerprint of the model's weights.
        A content digest is always stored; ``key`` (bytes or str) adds an HMAC so that :meth:`load`
        with the same key refuses a file that anyone without the key has changed."""
        meta = {"format": FORMAT, "version": FORMAT_VERSION, "layers": self.layers,
                "late_layer": self.late_layer, "input_shape": list(self.input_shape),
                "model_sha256": self.model_sha256, "input_range": self.input_range,
                "data_sha256": self.data_sha256,
                "fit_s": self.diagnostics.get("fit_s"),
                "config": {k: list(v) if isinstance(v, tuple) else v
                           for k, v in dataclasses.asdict(self.config).items()}}
        tensors = {"thresholds": self.thresholds}
        tensors.update({f"masks.{k}": v for k, v in self.masks.items()})
        tensors.update({f"fill.{k}": v for k, v in self.fills.items()})
        tensors.update({f"profile.{k}": v for k, v in self.profile.items()})
        tensors.update({f"stability.{k}": v for k, v in (self.stability or {}).items()})
        tensors.update({f"neighbourhood.{k}": v for k, v in (self.neighbourhood or {}).items()})
        safefiles.write(path, tensors, FORMAT, meta, key=key)

    @classmethod
    def load(cls, path, model: nn.Module, check_model: bool = True, key=None) -> "LinkBreaker":
        """Load a guard saved by :meth:`save` for ``model``. Refuses (``safefiles.GuardFileError``) a
        file that is corrupt, edited, out of range, inconsistent, unsigned or wrongly signed when
        ``key`` is given, or fitted for a different model. Nothing in the file is executed."""
        Err = safefiles.GuardFileError
        tensors, meta = safefiles.read(path, FORMAT, "LinkBreaker guard", "guard", key=key)
        if meta.get("version") != FORMAT_VERSION:
            raise Err(f"{path}: guard format version {meta.get('version')} is not supported "
                      f"(this build reads version {FORMAT_VERSION})")
        layers, late, shape = meta.get("layers"), meta.get("late_layer"), meta.get("input_shape")
        if (not isinstance(layers, list) or not layers or not all(isinstance(n, str) for n in layers)
                or not isinstance(late, str) or not isinstance(meta.get("config"), dict)
                or not isinstance(shape, list) or not all(isinstance(d, int) and d > 0 for d in shape)):
            raise Err(f"{path}: malformed guard metadata (layers, late_layer, input_shape or config)")
        if check_model and meta.get("model_sha256") != fingerprint(model):
            raise Err(f"{path} was fitted for a different model (weights fingerprint "
                      f"{str(meta.get('model_sha256'))[:12]}... does not match this model's)")
        names = [*layers, LATE]
        expected = {"thresholds": ("N",)}
        for n in names:
            expected.update({f"masks.{n}": ("N", f"U:{n}"), f"fill.{n}": (f"E:{n}",)})
        profile = {k for k in tensors if k.startswith("profile.")}
        evidence = []
        if profile:
            # the evidence names (a conv layer read in several views has one entry per view)
            stat = str(meta["config"].get("consistency_units", LEGACY_CONFIG["consistency_units"]))
            evidence = evidence_names(layers, stat, lambda n: f"profile.center.{n}" in tensors)
            for n in evidence:
                expected.update({f"profile.{p}.{n}": ("N", f"U:{evidence_layer(n)[0]}")
                                 for p in ("center", "scale", "weight")})
            # one norm per reading: every evidence's mean, then with consistency_peak its peak too
            peak = str(meta["config"].get("consistency_peak", "off"))
            expected.update({"profile.norms": ("N", len(readings(evidence, peak))),
                             "profile.bounds": ("N",)})
        ranked = any(k.startswith("neighbourhood.") for k in tensors)
        if ranked:  # head k's view of R validation samples at the last masked layer's last view
            if not evidence:
                raise Err(f"{path}: the neighbourhood rank test's tensors need the consistency profile")
            read = evidence_layer(rank_evidence(evidence))[0]
            expected.update({"neighbourhood.references": (None, "R", f"U:{read}"),
                             "neighbourhood.labels": ("R",), "neighbourhood.bound": ()})
            if "neighbourhood.gate" in tensors:
                expected["neighbourhood.gate"] = ()
        stable = "stability.noise" in tensors or "stability.bound" in tensors
        if stable:
            draws = meta["config"].get("stability_draws", LEGACY_CONFIG["stability_draws"])
            draws = draws if isinstance(draws, int) and draws > 1 else None  # GuardConfig names a bad one
            expected.update({"stability.noise": (draws, *shape) if draws else tuple(shape), "stability.bound": ()})
            for name in ("contrast", "gate", "median_bound", "median_gate"):
                if f"stability.{name}" in tensors:
                    expected[f"stability.{name}"] = ()
            if "stability.jitter" in tensors:  # one sampling grid per neighbour, images only
                if len(shape) != 3:
                    raise Err(f"{path}: stability.jitter resamples images [C, H, W], but the guard's "
                              f"inputs are {shape}")
                expected["stability.jitter"] = (draws or 1, *shape[1:], 2)
        safefiles.check_shapes(tensors, expected, path)
        safefiles.check_tensor_ranges(tensors, path)
        for name in ("bound", "contrast", "median_bound"):  # a bound <= 0 would invert the test, a contrast <= 0 divide by 0
            if f"stability.{name}" in tensors and not float(tensors[f"stability.{name}"]) > 0:
                raise Err(f"{path}: stability.{name} must be > 0, got {float(tensors[f'stability.{name}']):g}")
        for name in ("gate", "median_gate"):  # a ratio's quantile
            if f"stability.{name}" in tensors and not float(tensors[f"stability.{name}"]) >= 0:
                raise Err(f"{path}: stability.{name} must be >= 0, got {float(tensors[f'stability.{name}']):g}")
        if "stability.jitter" in tensors and not bool((tensors["stability.jitter"].abs() <= 1).all()):
            raise Err(f"{path}: stability.jitter holds sampling grids, which must lie in [-1, 1]")
        if ranked:
            labels, n = tensors["neighbourhood.labels"], tensors["thresholds"].shape[0]
            if labels.dtype != torch.int64 or not bool(((labels >= 0) & (labels < n)).all()):
                raise Err(f"{path}: neighbourhood.labels must be int64 class indices in [0, {n})")
            if int(torch.bincount(labels, minlength=n).min()) == 0:  # a class without one: always refused
                raise Err(f"{path}: neighbourhood.labels must hold every class at least once")
            if not float(tensors["neighbourhood.bound"]) > 0:  # a bound <= 0 would refuse every head
                raise Err(f"{path}: neighbourhood.bound must be > 0, got {float(tensors['neighbourhood.bound']):g}")
            if "neighbourhood.gate" in tensors and not float(tensors["neighbourhood.gate"]) >= 0:
                raise Err(f"{path}: neighbourhood.gate must be >= 0, got {float(tensors['neighbourhood.gate']):g}")
        fields = {f.name for f in dataclasses.fields(GuardConfig)}
        raw = {k: tuple(v) if isinstance(v, list) else v for k, v in meta["config"].items() if k in fields}
        # settings a file from an earlier release does not record keep the meaning they had then
        raw = with_legacy(raw)
        if "stability_median_gate" not in meta["config"] and "stability.gate" in tensors \
                and "stability.median_bound" in tensors:  # session 40's filter: the stability gate's
            tensors["stability.median_gate"] = tensors["stability.gate"]
        pick = lambda prefix: {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}  # noqa: E731
        try:
            config = GuardConfig(**raw)
            if stable != config.stability_test:
                raise ValueError(f"stability_noise={config.stability_noise}, stability_jitter="
                                 f"{config.stability_jitter} but the file "
                                 f"{'has' if stable else 'lacks'} the stability test's tensors")
            jittered = "stability.jitter" in tensors
            if stable and jittered != (config.stability_jitter > 0):
                raise ValueError(f"stability_jitter={config.stability_jitter} but the file "
                                 f"{'has' if jittered else 'lacks'} the displacement grids")
            scaled = "stability.contrast" in tensors
            if stable and scaled != (config.stability_contrast > 0):
                raise ValueError(f"stability_contrast={config.stability_contrast} but the file "
                                 f"{'has' if scaled else 'lacks'} the reference contrast")
            filtered = "stability.median_bound" in tensors
            if stable and filtered != (config.stability_median > 0):
                raise ValueError(f"stability_median={config.stability_median} but the file "
                                 f"{'has' if filtered else 'lacks'} the filtered neighbour's bound")
            if filtered and not stable:
                raise ValueError("stability.median_bound needs the stability test's tensors")
            check_median_inputs(config, shape)
            gate = "stability.gate" in tensors  # set only where the consistency check gives a ratio
            if stable and gate != (config.stability_gate is not None and config.consistency and bool(profile)):
                raise ValueError(f"stability_gate={config.stability_gate} but the file "
                                 f"{'has' if gate else 'lacks'} the gate")
            gate = "stability.median_gate" in tensors
            if stable and gate != (filtered and config.stability_median_gate is not None
                                   and config.consistency and bool(profile)):
                raise ValueError(f"stability_median_gate={config.stability_median_gate} but the file "
                                 f"{'has' if gate else 'lacks'} the filtered neighbour's gate")
            # made only where the consistency check has a profile (its gate reads the ratio)
            if ranked != (config.neighbourhood_quantile is not None and config.consistency and bool(profile)):
                raise ValueError(f"neighbourhood_quantile={config.neighbourhood_quantile} but the file "
                                 f"{'has' if ranked else 'lacks'} the neighbourhood rank test's tensors")
            gated_ = "neighbourhood.gate" in tensors
            if ranked and gated_ != (config.neighbourhood_gate is not None):
                raise ValueError(f"neighbourhood_gate={config.neighbourhood_gate} but the file "
                                 f"{'has' if gated_ else 'lacks'} the gate")
            guard = cls(model, layers, late, pick("masks."), pick("fill."), tensors["thresholds"],
                        pick("profile."), config, shape,
                        diagnostics={"fit_s": meta.get("fit_s") or float("nan")},
                        input_range=_range(meta.get("input_range")),
                        stability=pick("stability.") or None, neighbourhood=pick("neighbourhood.") or None)
            if ranked and guard.neighbourhood["references"].shape[0] != guard._hidden_masks()[1][0].numel():
                raise ValueError(f"neighbourhood.references holds {guard.neighbourhood['references'].shape[0]} "
                                 f"views but the heads' masks make {guard._hidden_masks()[1][0].numel()}")
        except (TypeError, ValueError, RuntimeError) as e:  # layer names the model lacks, ...
            raise Err(f"{path}: guard does not fit this model: {e}") from None
        sha = meta.get("data_sha256")
        guard.data_sha256 = sha if isinstance(sha, str) else None
        return guard
