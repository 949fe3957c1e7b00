"""Every setting of a LinkBreaker guard's offline phase (:class:`GuardConfig`), recorded in saved
guards, and the values older files were fitted with (:data:`LEGACY_CONFIG`). Its own room so that the
fit (:mod:`linkbreaker_ext.fitting`) and the guard (:mod:`linkbreaker_ext.guard`) both read it without
importing each other."""
from __future__ import annotations

import math
from dataclasses import dataclass

# The stability test's noise std (a share of the value range) where the default geometric neighbour
# cannot apply, because the inputs are not images [C, H, W]: session 35's default neighbour.
NON_IMAGE_NOISE = 0.05


@dataclass
class GuardConfig:
    """Every setting of the offline phase; recorded in saved guards. ``docs/method.md`` says why."""
    neighbours: int = 4             # Alg. 1 neighbours per validation sample (0 = off)
    neighbour_noise: float = 0.2    # std of the Gaussian noise mixed in by Alg. 1
    neighbour_lambda: float = 0.01  # L1 weight on the mask c
    neighbour_step: float = 5.0     # forward-backward splitting step alpha
    neighbour_iters: int = 30
    neighbour_mode: str = "alg1"    # "alg1": Alg. 1's optimised neighbours; "perturb": x + noise (Table VIII)
    drop_misclassified: bool = False  # fit only on validation samples the model labels correctly
    #                                   (resists triggered samples in the "clean" set: results/poisoned-validation.md)
    hidden_layers: int = 4          # automatic choice: this many hidden layers, plus the input pixels
    fractions: tuple = (0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
    search_on_neighbours: bool = False  # judge reliability on the neighbours too (measured: worse)
    search_per_class: int | None = 100  # fit samples per class the set search evaluates (None: all)
    reliability_measure: str = "confidence"  # "confidence": mean conf; "rate": share with conf >= 0.5
    tolerance_in: float = 0.002     # head k may be this much less sure of class k than the whole layer
    tolerance_out: float = 0.0005   # ... and this much more sure of the other classes
    min_importance: float = 0.0     # importance at or below this is never salient
    min_active: float = 0.03        # neurons active on fewer clean samples than this are dormant
    image_margins: bool = False     # images: the widest bands along the edges that the model does
    #                                 not need (blanked, every class within tolerance_in/_out on the
    #                                 fit split) are non-salient for every head, as dormant pixels
    #                                 are. Needs "input" among the masked layers. Measured on GTSRB's
    #                                 watermark (seed 0, dev): it blanked 2 of the bottom rows, cut
    #                                 the trigger instead of erasing it and let 33.75 % through
    #                                 against 3.00 % (docs/method.md, "Margins the model does not
    #                                 need"); an option, off by default
    use_early: bool = True          # mask the masked layers (False: only the late layer)
    use_late: bool = True
    fill: str = "blank"             # reference for non-salient neurons: "blank" input's activations or "mean"
    noise_amplitude: float = 0.0    # fill = reference + amplitude * class-pooled std * N(0,1)
    mad_k: float = 3.0              # threshold = median - mad_k * 1.4826 * MAD of logit(conf)
    out_quantile: float | None = 0.995  # ... and at least this quantile of other classes' confidences
    threshold_floor: float = 0.5    # thresholds never below this (two heads can't both pass 0.5 easily)
    threshold_split: str = "all"    # the samples the confidence thresholds are calibrated on: "all"
    #                                 the validation set, or its "calibration" split (30 %: 3-14 samples
    #                                 per GTSRB class, so the per-class MAD was rough and 10-14 % of
    #                                 clean signs were refused; the fit split's confidences, which
    #                                 chose the salient sets, measured no higher: docs/method.md,
    #                                 "Thresholds from the whole validation set")
    consistency: bool = True        # the neurons consistency check (veto on inconsistent heads)
    consistency_mad_k: float = 4.25  # bound = median + k * 1.4826 * MAD of log deviation (at most)
    #                                 (chosen on the dev half with the "tail" rule: docs/method.md,
    #                                 "A bound per layer's tail"; 5 with "mad" before)
    consistency_units: str = "mean+max"  # a channel's value at a hidden conv layer: its spatial
    #                                 "max" (sees a small trigger), its "mean" (sees a warp), or both,
    #                                 each view within its own bound (docs/method.md, "Two views")
    consistency_peak: str = "off"   # evidences also read as the largest robust z-score among class
    #                                 k's salient neurons, each within its own bound: "max" the hidden
    #                                 conv layers' channel-maximum views, "all" every evidence, "off";
    #                                 a trigger that drives a few neurons far is diluted in the mean
    #                                 over all of them (docs/method.md, "The most deviant neuron")
    consistency_reduce: str = "per_layer"  # across layers: "per_layer" (every layer within its own
    #                                 bound), "max" (one bound on the max of normalised deviations) or "mean"
    consistency_center: str = "pooled"  # each bound's center: the median over every class ("pooled":
    #                                 deviations are already relative to each class's typical one),
    #                                 class k's own ("class") or "shrunk" towards the pooled one
    #                                 (chosen on the dev half: docs/method.md, "Where the bound sits")
    consistency_bound: str = "tail"  # each bound: "tail" (the lower of "mad" and the calibration
    #                                 split's largest deviation + consistency_margin MADs: each layer
    #                                 bounded just past a short clean tail), "mad" (center +
    #                                 consistency_mad_k MADs, robust to a few bad calibration
    #                                 samples) or "max" (the calibration split's largest deviation)
    consistency_margin: float = 0.75  # "tail": MADs (log space) past the calibration split's largest
    consistency_split: str = "all"  # the samples the consistency bounds are set on: "all" the
    #                                 validation set (the fit split joins the calibration split, each
    #                                 fit sample's deviation taken from a class profile computed
    #                                 without it, 5 folds: in-sample its deviations are too small) or
    #                                 the "calibration" split alone (the default until session 31).
    #                                 The tail rule's reach grows with the sample count
    #                                 (docs/method.md, "Which samples set the consistency bounds")
    consistency_quantile: float | None = 0.995  # each bound at least this quantile of the own-class
    #                                 deviations of those samples whose own head is confident (as the
    #                                 stability bound is of its falls): a layer with a heavy clean
    #                                 tail (GTSRB's relu1@max) then refuses at most about 1 - q of
    #                                 them. None: off (the default until session 31)
    stability_noise: float = 0.0    # neighbour stability test: std of fixed Gaussian patterns added
    #                                 to every input (after its jitter), as a share of the validation
    #                                 set's value range; a head whose own-class log-odds fall further
    #                                 on that neighbour than clean inputs' do (the consistency bounds'
    #                                 rule) is not credible. 0 = no noise (the default since session
    #                                 36: the jitter below is the neighbour; 0.05 until then, and the
    #                                 fallback where inputs are not images); the test is off when
    #                                 stability_jitter is 0 too (docs/method.md, "A warp that noise undoes")
    stability_draws: int = 4        # fixed neighbours (each a jitter grid and a noise pattern); a
    #                                 head's fall is the mean over them (one neighbour's fall is
    #                                 noisy: docs/method.md, "Several neighbours"); each costs one
    #                                 more forward per head mask
    stability_jitter: float = 0.5   # > 0: each neighbour is resampled through a fixed random
    #                                 displacement of up to this many pixels per pixel and axis:
    #                                 a trigger that needs exact geometry (WaNet's warp, a faint
    #                                 pattern) breaks where clean content holds (docs/method.md, "A
    #                                 geometric neighbour", "With a geometric neighbour"; the default
    #                                 since session 36, 0 until then). Images [C, H, W] only: on other
    #                                 inputs the fit uses noise of std NON_IMAGE_NOISE instead, warns,
    #                                 and the fitted config records it. 0 = noise only
    stability_median: int = 0       # > 0 (odd, >= 3): one more neighbour, the input through a
    #                                 median filter of this side per channel, with its own bound
    #                                 (the same rule and floor) on the head's fall, judged like the
    #                                 jitter's (under its own gate, below), and an OOD verdict does
    #                                 not name a head that fails the filter while another passes. A
    #                                 thin, sparse trigger (GTSRB's Trojan watermark) does not
    #                                 survive it where the sign does (docs/method.md, "A filtered
    #                                 neighbour"). Images only; one more forward per head mask.
    #                                 0 = off (the default: unmeasured on CIFAR-10)
    stability_median_gate: float | None = 0.9  # ... and the filter judges (its veto and its OOD
    #                                 hint rule) only a head whose consistency ratio exceeds this
    #                                 quantile of the validation set's confident, consistent
    #                                 samples' ratios, the rank test's gate: the watermark's escapes
    #                                 sit at the bounds, the clean answers a median filter takes
    #                                 away mostly near the median (docs/method.md, "A filtered
    #                                 neighbour", "Its own gate"; session 41, the stability gate
    #                                 until then). None: every head
    stability_contrast: float = 0.0  # > 0: the patterns shrink, for an input of lower contrast
    #                                 (pixel std) than this quantile of the validation set's, by
    #                                 the ratio of the two, never grow. 0 = the same noise for every
    #                                 input (measured on the dev halves, not adopted: a little less
    #                                 WaNet, no cheaper on GTSRB; docs/method.md, "Noise to the
    #                                 input's contrast")
    stability_bound: str = "tail"   # its bound over the calibration falls: "tail" (the lower of
    #                                 "mad" and the largest fall + consistency_margin MADs; chosen on
    #                                 the dev half with 4 draws at 0.05), "mad" (median +
    #                                 consistency_mad_k MADs; the default with one pattern at 0.01) or
    #                                 "quantile" (stability_quantile of the falls alone: stronger
    #                                 against a noise-trained warp, 0.5 points costlier on CIFAR-10)
    stability_floor: float = 2.0    # ... and never below this many log-odds (where most clean falls
    #                                 are near 0, as on MNIST, the MAD is ~0 and the tail short: a
    #                                 fall of a factor e^2 in odds is not evidence; docs/method.md,
    #                                 "MNIST, and float32 near 1" and "Several neighbours")
    stability_quantile: float | None = 0.995  # ... nor below this quantile of the confident
    #                                 calibration falls, so the test refuses at most about 1 - q of
    #                                 clean inputs the model is sure of, whatever the falls' shape
    #                                 (heavy-tailed on GTSRB, where the MAD rule alone refused 6 %:
    #                                 docs/method.md, "Heavy-tailed falls"); None: the MAD rule alone
    stability_gate: float | None = 0.5  # the test judges only a head whose consistency ratio (its
    #                                 largest evidence against its bound) exceeds this quantile of the
    #                                 validation set's confident, consistent samples' ratios: noise
    #                                 refuses clean inputs whose neurons are typical (fragile answers,
    #                                 GTSRB's dark signs), where the warp it is there for also moves
    #                                 the neurons towards their bounds (docs/method.md, "Gating the
    #                                 stability test"; the median: the largest quantile that let no
    #                                 WaNet model of the dev halves 1 point further). None: every
    #                                 head (the rule until session 33)
    neighbourhood_quantile: float | None = 0.999  # the neighbourhood rank test (after TED, S&P
    #                                 2024): an accepted answer raises the alarm instead when, in its
    #                                 head's view of the last masked layer, more validation samples of
    #                                 other classes sit nearer than the nearest of its class than this
    #                                 quantile of the validation set's own ranks allows (leave one
    #                                 out). A faint trigger fires the target head with every neuron
    #                                 inside its bound, while the input's neighbours there are still
    #                                 its source class. 0.999 with the jittered neighbour (the
    #                                 default since session 36; 0.995 with session 35's noise
    #                                 neighbour): on the dev halves it keeps every CIFAR-10 and GTSRB
    #                                 drop within its target (docs/method.md, "A faint trigger's
    #                                 neighbourhood", "With a geometric neighbour"). None: off (the
    #                                 rule until session 35)
    neighbourhood_gate: float | None = 0.9  # ... and it judges only an answer whose head's
    #                                 consistency ratio exceeds this quantile of the validation set's
    #                                 confident, consistent samples' ratios, as the stability gate
    #                                 does (None: every answer)
    neighbourhood_alarm: bool = True  # False: the rank test only reorders an OOD verdict's hints
    #                                 (a head whose class's neighbourhood the input is not in is named
    #                                 last) and never raises the alarm: GTSRB's clean cost without the
    #                                 faint-trigger catches, which on CIFAR-10 cost clean answers
    inconsistent_verdict: str = "alarm"  # no credible head but a confident, inconsistent one: "alarm" or "ood"
    ood_hint: str = "nearest"       # an OOD verdict's label hint when no head is consistent with its
    #                                 class: "nearest" (the head nearest to its bounds, smallest veto
    #                                 ratio) or "confident" (the most confident, which hands a trigger
    #                                 its target: docs/method.md, "Which head an OOD verdict names")
    alarm_margin: float = 1.5       # with the alarm verdict: an input with no head consistent with its
    #                                 class raises the alarm also when a head comes within this many
    #                                 log-odds of its confidence threshold (0: only a confident one);
    #                                 chosen on GTSRB's dev half, docs/method.md, "A nearly confident
    #                                 head that nothing supports"
    calibration_fraction: float = 0.3  # share of the validation set kept apart for thresholds
    min_per_class: int = 5
    seed: int = 0
    batch_rows: int | None = None   # rows (inputs x heads) per batched forward; None: 256 on CPU
                                    # (large conv batches fall out of cache: measured 2x slower), 8192 on GPU

    @property
    def stability_test(self) -> bool:
        """Whether the neighbour stability test runs: its neighbours differ from the input."""
        return self.stability_noise > 0 or self.stability_jitter > 0

    def __post_init__(self):
        """Refuse settings that would fit silently wrong, naming the field."""
        def bad(name, why):
            raise ValueError(f"GuardConfig.{name}={getattr(self, name)!r}: {why}")
        for name in ("neighbours", "neighbour_iters", "hidden_layers", "min_per_class", "seed"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                bad(name, "must be a non-negative integer")
        for name in ("use_early", "use_late", "consistency", "search_on_neighbours", "drop_misclassified",
                     "neighbourhood_alarm", "image_margins"):
            if not isinstance(getattr(self, name), bool):
                bad(name, "must be True or False")
        fr = self.fractions
        if (not isinstance(fr, (tuple, list)) or not fr
                or not all(isinstance(q, (int, float)) and 0 < q <= 1 for q in fr)
                or list(fr) != sorted(fr) or fr[-1] != 1):
            bad("fractions", "must be an ascending sequence in (0, 1] ending with 1.0")
        for name in ("neighbour_noise", "neighbour_step", "tolerance_in", "tolerance_out",
                     "min_active", "noise_amplitude", "mad_k", "consistency_mad_k", "consistency_margin",
                     "stability_noise", "stability_floor", "stability_jitter", "alarm_margin"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                bad(name, "must be a finite number >= 0")
        if not isinstance(self.stability_draws, int) or isinstance(self.stability_draws, bool) \
                or self.stability_draws < 1:
            bad("stability_draws", "must be a positive integer")
        m = self.stability_median
        if not isinstance(m, int) or isinstance(m, bool) or m < 0 or (m and (m < 3 or m % 2 == 0)):
            bad("stability_median", "must be 0 (off) or an odd integer >= 3 (the filter's side)")
        if m and not self.stability_test:
            bad("stability_median", "needs the stability test (stability_jitter or stability_noise > 0)")
        if not isinstance(self.stability_contrast, (int, float)) or isinstance(self.stability_contrast, bool) \
                or not 0 <= self.stability_contrast <= 1:
            bad("stability_contrast", "must lie in [0, 1] (a quantile; 0 = off)")
        if self.stability_bound == "quantile" and self.stability_quantile is None:
            bad("stability_quantile", 'must be set with stability_bound="quantile" (it is the bound)')
        if not 0 < self.calibration_fraction < 1:
            bad("calibration_fraction", "must lie in (0, 1)")
        if not 0 <= self.threshold_floor < 1:
            bad("threshold_floor", "must lie in [0, 1)")
        if self.out_quantile is not None and not 0 < self.out_quantile < 1:
            bad("out_quantile", "must lie in (0, 1) or be None")
        for name in ("stability_quantile", "consistency_quantile", "stability_gate", "stability_median_gate",
                     "neighbourhood_quantile", "neighbourhood_gate"):
            q = getattr(self, name)
            if q is not None and (isinstance(q, bool) or not isinstance(q, (int, float)) or not 0 < q <= 1):
                bad(name, "must lie in (0, 1] or be None")
        choices = {"fill": ("blank", "mean"), "reliability_measure": ("confidence", "rate"),
                   "consistency_reduce": ("per_layer", "max", "mean"),
                   "consistency_units": ("max", "mean", "mean+max"), "inconsistent_verdict": ("ood", "alarm"),
                   "consistency_peak": ("off", "max", "all"),
                   "ood_hint": ("nearest", "confident"),
                   "consistency_center": ("class", "pooled", "shrunk"), "consistency_bound": ("mad", "max", "tail"),
                   "neighbour_mode": ("alg1", "perturb"), "stability_bound": ("mad", "tail", "quantile"),
                   "threshold_split": ("all", "calibration"), "consistency_split": ("calibration", "all")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                bad(name, f"must be one of {allowed}")
        if self.search_per_class is not None and (not isinstance(self.search_per_class, int)
                                                  or self.search_per_class < 1):
            bad("search_per_class", "must be a positive integer or None")
        if self.batch_rows is not None and (not isinstance(self.batch_rows, int) or self.batch_rows < 1):
            bad("batch_rows", "must be a positive integer or None")


# Settings whose default changed after guards were first saved: a file that lacks the field was
# fitted (and its profile computed) with this value.
LEGACY_CONFIG = {"consistency_units": "mean", "consistency_center": "class", "consistency_bound": "mad",
                 "consistency_mad_k": 5.0, "stability_noise": 0.0, "stability_bound": "tail",
                 "stability_floor": 0.1, "stability_quantile": None, "ood_hint": "confident",
                 "stability_draws": 1, "threshold_split": "calibration",
                 "stability_jitter": 0.0, "consistency_split": "calibration", "consistency_quantile": None,
                 "alarm_margin": 0.0, "stability_gate": None,
                 "neighbourhood_quantile": None}


def with_legacy(stored: dict) -> dict:
    """``stored`` (a saved guard's or a report's settings) with the meaning each missing field had
    when it was written: :data:`LEGACY_CONFIG`, and a filtered neighbour from before its own gate
    (session 40) judged under the stability test's gate."""
    out = {**LEGACY_CONFIG, **stored}
    if "stability_median_gate" not in stored and stored.get("stability_median"):
        out["stability_median_gate"] = out["stability_gate"]
    return out

