"""The LinkBreaker guard: offline ``fit`` (Alg. 1 + 2 + MAD thresholds) and online ``__call__``
(Alg. 3), plus ``save``/``load``.

Online, every input runs N class-restricted predictions: head k keeps class k's salient neurons in the
early layer and in the late layer (the input of the final Linear) and fills every other neuron with
the clean reference activation (plus optional fixed noise). Head k's confidence in its own class is
compared with its threshold; exactly one credible head gives a label, two or more a trigger alarm,
none an out-of-distribution verdict (labelled with the most confident head, as the paper's Fig. 9).
The early masking runs the N heads as one batched forward; the late masking, the heads, the softmax
and the vote run in one call of the fused ``torch.ops.linkbreaker.guard_head`` op.
"""
from __future__ import annotations

import dataclasses
import hashlib
import time
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from . import ops, safefiles, salient
from .data import stratified_split
from .layers import HookedModel, early_layer, final_linear
from .neighbours import generate_neighbours

FORMAT = "linkbreaker-guard"
FORMAT_VERSION = 1

ACCEPT, ALARM, OOD = 0, 1, 2


@dataclass
class GuardConfig:
    """Every setting of the offline phase; recorded in saved guards. ``docs/method.md`` says why."""
    neighbours: int = 4             # Alg. 1 neighbours per validation sample (0 = off)
    neighbour_noise: float = 0.2    # std of the Gaussian noise mixed in by Alg. 1
    neighbour_lambda: float = 0.01  # L1 weight on the mask c
    neighbour_step: float = 5.0     # forward-backward splitting step alpha
    neighbour_iters: int = 30
    fractions: tuple = (0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
    search_on_neighbours: bool = False  # judge reliability on the neighbours too (measured: worse)
    reliability_measure: str = "confidence"  # "confidence": mean conf; "rate": share with conf >= 0.5
    tolerance_in: float = 0.002     # head k may be this much less sure of class k than the whole layer
    tolerance_out: float = 0.0005   # ... and this much more sure of the other classes
    min_importance: float = 0.0     # importance at or below this is never salient
    min_active: float = 0.03        # neurons active on fewer clean samples than this are dormant
    use_early: bool = True
    use_late: bool = True
    fill: str = "blank"             # reference for non-salient neurons: "blank" input's activations or "mean"
    noise_amplitude: float = 0.0    # fill = reference + amplitude * class-pooled std * N(0,1)
    mad_k: float = 3.0              # threshold = median - mad_k * 1.4826 * MAD of logit(conf)
    out_quantile: float | None = 0.995  # ... and at least this quantile of other classes' confidences
    threshold_floor: float = 0.5    # thresholds never below this (two heads can't both pass 0.5 easily)
    calibration_fraction: float = 0.3  # share of the validation set kept apart for thresholds
    min_per_class: int = 5
    seed: int = 0
    batch_rows: int | None = None   # rows (inputs x heads) per batched forward; None: 256 on CPU
                                    # (large conv batches fall out of cache: measured 2x slower), 8192 on GPU


@dataclass
class GuardResult:
    labels: torch.Tensor       # int64 [B]; -1 for a trigger alarm
    verdict: torch.Tensor      # int64 [B]; 0 accept, 1 trigger alarm, 2 out-of-distribution
    confidences: torch.Tensor  # float32 [B, N]; T(x)_k
    thresholds: torch.Tensor   # float32 [N]


def _fingerprint(model: nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
                 if t.numel() else b"")
    return h.hexdigest()


def _as_tensors(x, y):
    """Accept tensors, a Dataset or a DataLoader of (x, y) pairs."""
    if isinstance(x, torch.Tensor):
        if y is None:
            raise ValueError("y_val is required when x_val is a tensor")
        return x, torch.as_tensor(y)
    if y is not None:
        raise ValueError("give y_val only with a tensor x_val; a Dataset/DataLoader carries labels")
    if isinstance(x, torch.utils.data.Dataset):
        x = torch.utils.data.DataLoader(x, batch_size=512)
    xs, ys = zip(*[(xb, torch.as_tensor(yb)) for xb, yb in x])
    return torch.cat(xs), torch.cat(ys)


class LinkBreaker:
    """A fitted guard around ``model``. Build with :meth:`fit` or :meth:`load`; call like the model."""

    def __init__(self, model, early, late, early_masks, late_masks, early_fill, late_fill,
                 thresholds, config: GuardConfig, input_shape, diagnostics=None):
        self.model = model.eval()
        self.config = config
        self.hooked = HookedModel(model, early, late)
        self.early_layer, self.late_layer = early, self.hooked.late_name
        self.input_shape = tuple(input_shape)
        device = next(model.parameters()).device
        self.early_masks = early_masks.float().to(device)
        self.late_masks = late_masks.float().to(device)
        self.early_fill = early_fill.float().to(device)
        self.late_fill = late_fill.float().to(device)
        self.thresholds = thresholds.float().to(device)
        self.diagnostics = diagnostics or {}

    @property
    def num_heads(self) -> int:
        return self.thresholds.numel()

    # ------------------------------------------------------------------ online
    def head_confidences(self, x, early_masks=None, late_masks=None, thresholds=None):
        """Run the N heads; returns the op's ``(conf, labels, verdict)``."""
        em = self.early_masks if early_masks is None else early_masks
        lm = self.late_masks if late_masks is None else late_masks
        th = self.thresholds if thresholds is None else thresholds
        w, b = self.hooked.late.weight, self.hooked.late.bias
        if b is None:
            b = torch.zeros(w.shape[0], device=w.device, dtype=w.dtype)
        n = em.shape[0]
        chunk = max(1, self._batch_rows() // n)
        outs = []
        for start in range(0, len(x), chunk):
            feats = self.hooked.features(x[start:start + chunk], em, self.early_fill)
            # Inputs are validated once in __call__ and masks/thresholds at fit time, so skip the
            # op wrapper's value checks (a host sync on CUDA); a NaN the model itself produces still
            # comes back as conf NaN / label -1 / verdict 2, never as a silent label.
            outs.append(ops.guard_head(feats, w, b, lm, self.late_fill, th, check_values=False))
        if not outs:
            return ops.guard_head(torch.empty(0, n, w.shape[1], device=w.device), w, b, lm,
                                  self.late_fill, th)
        return tuple(torch.cat(parts) for parts in zip(*outs))

    def _batch_rows(self) -> int:
        if self.config.batch_rows:
            return self.config.batch_rows
        return 256 if self.thresholds.device.type == "cpu" else 8192

    def _check_input(self, x):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"input must be a torch.Tensor, got {type(x).__name__}")
        if tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"input shape {tuple(x.shape)} does not match the fitted input shape "
                             f"[B, {', '.join(map(str, self.input_shape))}]")
        if not x.is_floating_point():
            raise TypeError(f"input must be a floating tensor, got {x.dtype}")
        device = self.thresholds.device
        if x.device != device:
            raise ValueError(f"input is on {x.device} but the guard and model are on {device}")
        if not torch.isfinite(x).all():
            raise ValueError("input contains NaN or Inf")

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> GuardResult:
        self._check_input(x)
        conf, labels, verdict = self.head_confidences(x)
        return GuardResult(labels, verdict, conf, self.thresholds)

    # ------------------------------------------------------------------ offline
    @classmethod
    def fit(cls, model: nn.Module, x_val, y_val=None, num_classes: int | None = None,
            layers: tuple | None = None, config: GuardConfig | None = None, progress: bool = True,
            **overrides) -> "LinkBreaker":
        """Fit a guard from a small clean validation set (tensors, a Dataset or a DataLoader).

        ``layers`` = ``(early, late)`` module names (``early`` may be ``"input"``; either may be None
        for the automatic choice); ``overrides`` set :class:`GuardConfig` fields.
        """
        t0 = time.perf_counter()
        cfg = dataclasses.replace(config or GuardConfig(), **overrides)
        x, y = _as_tensors(x_val, y_val)
        device = next(model.parameters()).device
        model.eval()
        layers = (None, None) if layers is None else tuple(layers)
        if len(layers) != 2:
            raise ValueError(f"layers must be (early, late) module names, got {layers!r}")
        early, late = layers
        early = early_layer(model, early)
        late_name, _ = final_linear(model, late)
        if x.dim() < 2 or len(x) != len(y):
            raise ValueError(f"x_val {tuple(x.shape)} and y_val {tuple(y.shape)} do not match")
        if not x.is_floating_point() or not torch.isfinite(x).all():
            raise ValueError("x_val must be a floating tensor without NaN or Inf")
        num_classes = int(num_classes if num_classes is not None else y.max().item() + 1)
        if y.is_floating_point() or y.dtype == torch.bool or y.dim() != 1:
            raise ValueError(f"y_val must be a 1-D integer tensor of class labels, got {y.dtype} "
                             f"{tuple(y.shape)}")
        if len(y) and (y.min() < 0 or y.max() >= num_classes):
            raise ValueError(f"labels must lie in [0, {num_classes})")
        counts = torch.bincount(y, minlength=num_classes)
        if counts.min() < cfg.min_per_class:
            raise ValueError(f"too few validation samples: class {int(counts.argmin())} has "
                             f"{int(counts.min())}, need at least {cfg.min_per_class} per class")
        hooked = HookedModel(model, early, late_name)

        calib_idx, fit_idx = stratified_split(y, cfg.calibration_fraction, seed=cfg.seed)
        x_fit, y_fit = x[fit_idx], y[fit_idx]
        x_nb, y_nb = generate_neighbours(
            model, x_fit, y_fit, cfg.neighbours, cfg.neighbour_noise, cfg.neighbour_lambda,
            cfg.neighbour_step, cfg.neighbour_iters, seed=cfg.seed, progress=progress)
        x_aug, y_aug = torch.cat([x_fit, x_nb]), torch.cat([y_fit, y_nb])

        def activations(xs):
            rows = cfg.batch_rows or (256 if device.type == "cpu" else 8192)
            parts = [hooked.activations(xs[i:i + rows].to(device)) for i in range(0, len(xs), rows)]
            return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

        a_early, a_late = activations(x_aug)
        y_aug = y_aug.to(device)
        g = torch.Generator().manual_seed(cfg.seed)
        layer_stats = []
        blank = cls._blank_input(x).to(device)
        for acts, blank_acts in zip((a_early, a_late), hooked.activations(blank)):
            mu, sd, mean = salient.class_statistics(acts, y_aug, num_classes)
            score = salient.importance(mu, sd, mean)
            # Dormancy is judged on the real clean samples only: the neighbours' noise touches every
            # pixel, including the ones a trigger uses.
            clean = acts[: len(x_fit)]
            typical = clean.median(0).values
            dormant = salient.dormant(clean, typical, cfg.min_active)
            score = score * ~dormant
            fill = mean if cfg.fill == "mean" else blank_acts[0]
            # A dormant neuron is filled with the value clean data gives it, so masking it changes
            # nothing for clean inputs and erases whatever a trigger does to it.
            fill = torch.where(dormant, typical, fill)
            noise = torch.randn(fill.shape, generator=g).to(device) * sd.mean(0)
            layer_stats.append((score, fill + cfg.noise_amplitude * noise))
        (score_e, fill_e), (score_l, fill_l) = layer_stats

        guard = cls(model, early, late_name, torch.ones_like(score_e), torch.ones_like(score_l),
                    fill_e, fill_l, torch.full((num_classes,), 0.5), cfg, x.shape[1:])
        x_search, y_search = (x_aug, y_aug) if cfg.search_on_neighbours else (x_fit, y_fit)
        masks_e, masks_l, table = guard._search_masks(score_e, score_l, x_search.to(device),
                                                      y_search.to(device), progress)
        guard.early_masks, guard.late_masks = masks_e, masks_l
        x_cal, y_cal = x[calib_idx].to(device), y[calib_idx].to(device)
        guard.thresholds = guard._calibrate(x_cal, y_cal)
        guard.diagnostics = {
            "fit_s": time.perf_counter() - t0, "mask_search": table,
            "early_kept": masks_e.mean(1).tolist(), "late_kept": masks_l.mean(1).tolist(),
            "n_fit": len(x_fit), "n_neighbours": len(x_nb), "n_calibration": len(calib_idx),
        }
        return guard

    @staticmethod
    def _blank_input(x):
        """A content-free input: every pixel at its channel's median value over the validation set
        (black for MNIST). Its activations are the reference that non-salient neurons fall back to."""
        med = x.transpose(0, 1).flatten(1).median(dim=1).values if x.dim() > 2 else x.median(0).values
        shape = (1, x.shape[1]) + (1,) * (x.dim() - 2)
        return med.reshape(shape).expand(1, *x.shape[1:]).contiguous().float()

    def _search_masks(self, score_e, score_l, x_fit, y_fit, progress):
        """Alg. 2 line 6: per class, the smallest top fraction whose head is reliable, i.e. accepts its
        own class (conf >= 0.5) and refuses the others about as well as the whole layer does, measured
        on the fit split (never on test data). The early layer is
        searched first with every eligible late neuron kept, then the late layer with the chosen
        early sets."""
        cfg = self.config
        n = score_e.shape[0]
        half = torch.full((n,), 0.5, device=score_e.device)
        own = torch.nn.functional.one_hot(y_fit, n).bool()

        def masks(score, fractions, use):
            if not use:
                return torch.ones_like(score)
            return salient.top_fraction_masks(score, fractions, cfg.min_importance)

        def rates(me, ml):
            # Mean own-class confidence on class k and on the other classes: a smooth version of the
            # accept/refuse rates that still resolves differences on ~100 samples per class.
            conf = self.head_confidences(x_fit, me, ml, half)[0]
            if cfg.reliability_measure == "rate":
                conf = (conf >= 0.5).float()
            in_rate = (conf * own).sum(0) / own.sum(0).clamp_min(1)
            out_rate = (conf * ~own).sum(0) / (~own).sum(0).clamp_min(1)
            return in_rate.cpu(), out_rate.cpu()

        def choose(rows):
            # "Reliable" is relative to the whole layer (the last, largest fraction): the salient set
            # must accept its own class and refuse the others about as well as every neuron does.
            _, in_all, out_all = rows[-1]
            chosen = torch.empty(n)
            for k in range(n):
                ok = [q for q, i, o in rows
                      if i[k] >= in_all[k] - cfg.tolerance_in and o[k] <= out_all[k] + cfg.tolerance_out]
                chosen[k] = ok[0]
            return chosen

        everything = torch.ones(n)
        tables = {}
        stages = [("early", cfg.use_early), ("late", cfg.use_late)]
        chosen = {"early": everything, "late": everything}
        for layer, use in stages:
            if not use:
                continue
            rows = []
            for q in tqdm(cfg.fractions, desc=f"salient sets ({layer})", disable=not progress, leave=False):
                trial = dict(chosen, **{layer: torch.full((n,), q)})
                rows.append((q, *rates(masks(score_e, trial["early"], cfg.use_early),
                                       masks(score_l, trial["late"], cfg.use_late))))
            chosen[layer] = choose(rows)
            tables[layer] = [{"fraction": q, "in_rate": i.tolist(), "out_rate": o.tolist()}
                             for q, i, o in rows]
        me = masks(score_e, chosen["early"], cfg.use_early)
        ml = masks(score_l, chosen["late"], cfg.use_late)
        return me, ml, {"tables": tables, "chosen": {k: v.tolist() for k, v in chosen.items()}}

    def _calibrate(self, x_cal, y_cal):
        """Per-class MAD lower bound of clean in-class confidences, in log-odds where confidences
        near 1 spread out (on the probability scale the MAD of 0.999-ish values is ~0)."""
        cfg = self.config
        n = self.early_masks.shape[0]
        conf, _, _ = self.head_confidences(x_cal, thresholds=torch.full((n,), 0.5, device=x_cal.device))
        logit = torch.logit(conf.clamp(1e-7, 1 - 1e-7).double())
        th = torch.empty(n, dtype=torch.float64)
        for k in range(n):
            s = logit[y_cal == k, k]
            med = s.median()
            mad = (s - med).abs().median()
            th[k] = torch.sigmoid(med - cfg.mad_k * 1.4826 * mad)
            if cfg.out_quantile is not None:  # no lower than what other classes' inputs reach ...
                other = logit[y_cal != k, k]
                if len(other):
                    raised = torch.quantile(other, cfg.out_quantile)
                    # ... unless that would refuse more than (1 - out_quantile) of the head's own
                    # class: with a handful of calibration samples one outlier must not close a head
                    cap = torch.quantile(s, 1 - cfg.out_quantile)
                    th[k] = torch.maximum(th[k], torch.sigmoid(torch.minimum(raised, cap)))
        self.diagnostics["calibration_conf"] = conf.cpu()
        self.diagnostics["calibration_labels"] = y_cal.cpu()
        return th.clamp_min(cfg.threshold_floor).float().to(x_cal.device)

    # ------------------------------------------------------------------ persistence
    def save(self, path):
        """Write a safetensors file: masks, fills, thresholds and, as metadata, the settings, layer
        names, input shape and a SHA-256 fingerprint of the model's weights."""
        meta = {"format": FORMAT, "version": FORMAT_VERSION, "early_layer": self.early_layer,
                "late_layer": self.late_layer, "input_shape": list(self.input_shape),
                "model_sha256": _fingerprint(self.model),
                "fit_s": self.diagnostics.get("fit_s"),
                "config": {k: list(v) if isinstance(v, tuple) else v
                           for k, v in dataclasses.asdict(self.config).items()}}
        tensors = {"early_masks": self.early_masks, "late_masks": self.late_masks,
                   "early_fill": self.early_fill, "late_fill": self.late_fill,
                   "thresholds": self.thresholds}
        safefiles.write(path, tensors, FORMAT, meta)

    @classmethod
    def load(cls, path, model: nn.Module, check_model: bool = True) -> "LinkBreaker":
        """Load a guard saved by :meth:`save` for ``model``; refuses a different model."""
        tensors, meta = safefiles.read(path, FORMAT, "LinkBreaker guard", "guard")
        if meta.get("version") != FORMAT_VERSION:
            raise ValueError(f"{path}: guard format version {meta.get('version')} is not supported "
                             f"(this build reads version {FORMAT_VERSION})")
        if check_model and meta["model_sha256"] != _fingerprint(model):
            raise ValueError(f"{path} was fitted for a different model (weights fingerprint "
                             f"{meta['model_sha256'][:12]}... does not match this model's)")
        fields = {f.name for f in dataclasses.fields(GuardConfig)}
        raw = {k: tuple(v) if isinstance(v, list) else v for k, v in meta["config"].items() if k in fields}
        return cls(model, meta["early_layer"], meta["late_layer"], tensors["early_masks"],
                   tensors["late_masks"], tensors["early_fill"], tensors["late_fill"],
                   tensors["thresholds"], GuardConfig(**raw), meta["input_shape"],
                   diagnostics={"fit_s": meta.get("fit_s") or float("nan")})
