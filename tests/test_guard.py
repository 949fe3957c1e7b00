"""LinkBreaker.fit / __call__ / score / save / load, and the offline stages (layer choice, set search,
calibration) on tiny synthetic models (see conftest.py)."""
import copy
import dataclasses
import json
import struct
import threading
import time
import zipfile

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from conftest import (ACTIVE, FAST, _train, NUM_CLASSES, SHAPE, add_trigger, make_deep_net, make_images,
                      make_net)
from linkbreaker_ext import (ACCEPT, ALARM, OOD, GuardConfig, GuardResult, LinkBreaker, calibrate,
                             data, fitting, guard_head, guard_head_reference, safefiles, salient,
                             search)
from linkbreaker_ext.fitting import blank_input
from linkbreaker_ext.guard import FORMAT, FORMAT_VERSION, readings
from linkbreaker_ext.verdict import neighbour, vote
from linkbreaker_ext.layers import INPUT, LATE, auto_layers

HAS_CUDA = torch.cuda.is_available()
GUARDS = ["guard_hidden", "guard_input", "guard_deep"]
# the stability test off; and its noise neighbour (session 35's default, the fallback where inputs
# are not images), where a test is about the noise rather than the default jittered neighbour
NO_STABILITY = dict(stability_noise=0.0, stability_jitter=0.0)
NOISE = dict(stability_noise=0.05, stability_jitter=0.0)


def fit(model, x, y=None, **kw):
    opts = dict(FAST, progress=False)
    opts.update(kw)
    num_classes = opts.pop("num_classes", NUM_CLASSES)
    return LinkBreaker.fit(model, x, y, num_classes, **opts)


def with_config(guard, **changes):
    """A shallow copy of ``guard`` whose config differs (e.g. the consistency veto off)."""
    g = copy.copy(guard)
    g.config = dataclasses.replace(guard.config, **changes)
    return g


def assert_same_result(a: GuardResult, b: GuardResult):
    assert torch.equal(a.confidences, b.confidences)
    assert torch.equal(a.labels, b.labels)
    assert torch.equal(a.verdict, b.verdict)
    assert torch.equal(a.thresholds, b.thresholds)
    assert (a.consistency is None) == (b.consistency is None)
    if a.consistency is not None:
        assert torch.equal(a.consistency, b.consistency)


def assert_same_state(a: LinkBreaker, b: LinkBreaker):
    assert (a.layers, a.late_layer) == (b.layers, b.late_layer)
    for name in ("masks", "fills", "profile"):
        da, db = getattr(a, name), getattr(b, name)
        assert da.keys() == db.keys(), name
        for k in da:
            assert torch.equal(da[k], db[k]), f"{name}[{k}]"
    assert torch.equal(a.thresholds, b.thresholds)


def hidden_masks(guard):
    return {n: guard.masks[n] for n in guard.layers}


def auc(neg, pos):
    """P(score of a positive > score of a negative), ties counted half."""
    wins = (pos[:, None] > neg[None]).float().mean()
    return (wins + 0.5 * (pos[:, None] == neg[None]).float().mean()).item()


# ------------------------------------------------------------------------------ online contract

@pytest.mark.parametrize("which", GUARDS)
def test_result_types_shapes_and_vote(which, request, synth):
    guard = request.getfixturevalue(which)
    x = torch.cat([synth["x_test"], add_trigger(synth["x_test"][:60])])
    r = guard(x)
    assert isinstance(r, GuardResult)
    b = len(x)
    assert r.labels.dtype == torch.int64 and r.labels.shape == (b,)
    assert r.verdict.dtype == torch.int64 and r.verdict.shape == (b,)
    assert r.confidences.dtype == torch.float32 and r.confidences.shape == (b, NUM_CLASSES)
    assert r.consistency.dtype == torch.float32 and r.consistency.shape == (b, NUM_CLASSES)
    assert r.stability.dtype == torch.float32 and r.stability.shape == (b, NUM_CLASSES)
    assert r.thresholds.shape == (NUM_CLASSES,)
    assert guard.num_heads == NUM_CLASSES
    assert set(r.verdict.unique().tolist()) <= {ACCEPT, ALARM, OOD}
    assert ((r.confidences >= 0) & (r.confidences <= 1)).all() and (r.consistency >= 0).all()
    # -1 exactly on trigger alarms
    assert torch.equal(r.labels == -1, r.verdict == ALARM)
    # the verdict follows the number of credible heads (confident AND consistent); an accepted label
    # is the unique credible head
    credible = (r.confidences >= r.thresholds) & (r.consistency <= 1) & (r.stability <= 1)
    count = credible.sum(1)
    assert (r.verdict[count == 1] == ACCEPT).all()
    assert (r.verdict[count >= 2] == ALARM).all()
    # no credible head: an alarm when some head is confident (confidence its class's neurons do not
    # support, the default inconsistent_verdict), else out-of-distribution
    confident = (r.confidences >= r.thresholds).any(1)
    assert guard.config.inconsistent_verdict == "alarm"
    assert (r.verdict[(count == 0) & confident] == ALARM).all()
    assert (r.verdict[(count == 0) & ~confident] == OOD).all()
    acc = r.verdict == ACCEPT
    assert torch.equal(r.labels[acc], credible[acc].int().argmax(1))
    # an OOD input is labelled with its most confident head (paper Fig. 9) among the heads
    # consistent with their class where there is one, else with the head nearest to its bounds
    # (ood_hint="nearest": the smallest veto ratio), not the most confident
    ood = r.verdict == OOD
    consistent = r.credibility <= 1
    some = consistent.any(1, keepdim=True)
    ranked = torch.where(some, torch.where(consistent, r.confidences, -1.0), -r.credibility)
    assert torch.equal(r.labels[ood], ranked[ood].argmax(1))
    assert (ood & some[:, 0]).any()  # the hint rule is exercised (the fallback: test_ood_hint_...)


@pytest.mark.parametrize("which", GUARDS)
def test_guard_keeps_clean_accuracy(which, request, synth):
    guard = request.getfixturevalue(which)
    r = guard(synth["x_test"])
    assert (r.labels == synth["y_test"]).float().mean().item() >= 0.9
    assert (r.verdict == ACCEPT).float().mean().item() >= 0.8
    # thresholds are calibrated probabilities, never below the configured floor
    assert (r.thresholds >= guard.config.threshold_floor).all() and (r.thresholds <= 1).all()
    # clean inputs are mostly consistent with their own class's profile
    own = r.consistency.gather(1, synth["y_test"][:, None]).squeeze(1)
    assert (own <= 1).float().mean().item() >= 0.8


@pytest.mark.parametrize("which", GUARDS)
def test_confidences_match_reference_head(which, request, synth):
    """With the consistency veto off, the guard is exactly the fused op on the features of the
    masked forward: ``guard_head_reference`` on ``tapped.features`` gives the same answers."""
    guard = with_config(request.getfixturevalue(which), consistency=False, **NO_STABILITY)
    x = torch.cat([synth["x_test"][:48], add_trigger(synth["x_test"][:16])])
    r = guard(x)
    assert r.consistency is None
    feats = guard.tapped.features(x, hidden_masks(guard), guard.fills)
    lin = guard.tapped.late
    assert feats.shape == (len(x), NUM_CLASSES, lin.in_features)
    conf, labels, verdict = guard_head_reference(feats, lin.weight, lin.bias, guard.masks[LATE],
                                                 guard.fills[LATE], guard.thresholds)
    torch.testing.assert_close(r.confidences, conf, atol=1e-5, rtol=0)
    clear = ((conf - guard.thresholds).abs() > 1e-5).all(1)  # rows no rounding can flip
    assert clear.float().mean() > 0.9
    assert torch.equal(r.verdict[clear], verdict[clear])
    assert torch.equal(r.labels[clear], labels[clear])
    # head_confidences is that same op call, veto or not
    hc = request.getfixturevalue(which).head_confidences(x)
    assert torch.equal(hc[0], r.confidences) and torch.equal(hc[2], r.verdict)


@pytest.mark.parametrize("which", GUARDS)
def test_consistency_is_deviation_over_bound_and_vetoes(which, request, synth):
    # the veto and the vote alone: without the rank test, which may turn accepted answers into
    # alarms and reorder OOD hints (its own test below)
    guard = request.getfixturevalue(which).recalibrate(synth["x_val"], synth["y_val"], neighbourhood_quantile=None)
    x = torch.cat([synth["x_test"][:60], add_trigger(synth["x_test"][:60])])
    r = guard(x)
    # the neurons consistency check and the stability test, each relative to its bound; the veto
    # judges the larger
    torch.testing.assert_close(r.consistency, guard.deviations(x) / guard.profile["bounds"], atol=0, rtol=0)
    torch.testing.assert_close(r.stability, guard.stability_ratios(x), atol=0, rtol=0)
    # the stability test judges only heads past its gate (a quantile of the consistency ratios)
    judged = torch.where(r.consistency > r.stability_gate, r.stability, torch.zeros_like(r.stability))
    ratio = torch.maximum(r.consistency, judged)
    assert torch.equal(r.credibility, ratio)
    confident = r.confidences >= r.thresholds
    labels, verdict = vote(r.confidences, confident & (ratio <= 1), ratio <= 1, confident, ratio)
    assert torch.equal(r.labels, labels) and torch.equal(r.verdict, verdict)
    ood_guard = with_config(guard, inconsistent_verdict="ood")(x)
    labels, verdict = vote(r.confidences, confident & (ratio <= 1), ratio <= 1, None, ratio)
    assert torch.equal(ood_guard.labels, labels) and torch.equal(ood_guard.verdict, verdict)
    # the veto only ever removes heads: with it, at most as many credible heads as without
    conf_only = (r.confidences >= r.thresholds).sum(1)
    both = ((r.confidences >= r.thresholds) & (ratio <= 1)).sum(1)
    assert (both <= conf_only).all()


def test_vote_matches_the_op_reference_on_random_inputs():
    g = torch.Generator().manual_seed(0)
    b, n, c, d = 400, 5, 7, 12
    feats = torch.randn(b, n, d, generator=g) * 3
    w, bias = torch.randn(c, d, generator=g), torch.randn(c, generator=g)
    masks = (torch.rand(n, d, generator=g) < 0.5).float()
    fill = torch.randn(d, generator=g)
    thr = torch.rand(n, generator=g) * 0.6
    conf, labels, verdict = guard_head_reference(feats, w, bias, masks, fill, thr)
    counts = (conf >= thr).sum(1)
    assert {0, 1, 2} <= set(counts.clamp(max=2).tolist())  # every verdict occurs
    mine = vote(conf, conf >= thr)
    assert torch.equal(mine[0], labels) and torch.equal(mine[1], verdict)
    op = guard_head(feats, w, bias, masks, fill, thr)
    clear = ((op[0] - thr).abs() > 1e-6).all(1)
    mine = vote(op[0], op[0] >= thr)
    assert torch.equal(mine[0][clear], op[1][clear]) and torch.equal(mine[1][clear], op[2][clear])
    # a non-finite row is OOD with label -1, like the op's
    feats[3, 1, 0] = float("inf")
    conf, labels, verdict = guard_head_reference(feats, w, bias, masks, fill, thr)
    mine = vote(conf, conf >= thr)
    assert torch.equal(mine[0], labels) and torch.equal(mine[1], verdict)
    assert (mine[0][3], mine[1][3]) == (-1, OOD)


@pytest.mark.parametrize("which", ["guard_hidden", "guard_deep"])
def test_consistency_veto_refuses_an_input_far_from_every_class(which, request):
    guard = request.getfixturevalue(which)
    far = torch.full((4, *SHAPE), 3.0)  # a saturated image, unlike any clean class
    no_veto = with_config(guard, consistency=False, **NO_STABILITY)(far)
    assert (no_veto.verdict == ACCEPT).all(), "precondition: the confidence test alone accepts it"
    r = guard(far)
    assert (r.consistency > 1).all()
    # confident heads without their class's evidence: a trigger alarm by default, OOD on request
    assert (r.verdict == ALARM).all() and (r.labels == -1).all()
    assert (with_config(guard, inconsistent_verdict="ood")(far).verdict == OOD).all()


def test_score_is_higher_on_trigger_inputs(backdoored_net, synth):
    """The score's semantics on hand-built results (confident + consistent: low; inconsistent: high;
    several credible heads: +1 each), and on a real backdoored net finite scores for every input.
    (This net's corner trigger sits on dormant pixels, which every head erases: its triggered inputs
    are answered with their true labels, not detected, so their scores equal the clean ones'.)"""
    from linkbreaker_ext.verdict import score_from_result
    th = torch.full((3,), 0.5)
    conf = torch.tensor([[0.9, 0.1, 0.1], [0.9, 0.1, 0.1], [0.9, 0.9, 0.1]])
    ratio = torch.tensor([[0.5, 2.0, 2.0], [4.0, 2.0, 2.0], [0.5, 0.5, 2.0]])
    s = score_from_result(GuardResult(torch.zeros(3, dtype=torch.long), torch.zeros(3, dtype=torch.long),
                                      conf, th, ratio))
    assert s[0] < 0 < s[1]                                   # consistent vs inconsistent top head
    assert s[2] == pytest.approx(s[0].item() + 1.0)          # a second credible head adds one
    x, y = synth["x_test"], synth["y_test"]
    xt = add_trigger(x[y != 0])
    guard = fit(backdoored_net, synth["x_val"], synth["y_val"])  # automatic layers
    sc, st = guard.score(x), guard.score(xt)
    assert sc.shape == (len(x),) and st.shape == (len(xt),)
    assert torch.isfinite(sc).all() and torch.isfinite(st).all()
    assert (guard(xt).labels == 0).float().mean() <= 0.1     # ... and the backdoor does not work

def test_empty_batch(guard_deep):
    r = guard_deep(torch.empty(0, *SHAPE))
    assert r.labels.shape == (0,) and r.verdict.shape == (0,)
    assert r.confidences.shape == (0, NUM_CLASSES) and r.consistency.shape == (0, NUM_CLASSES)
    assert guard_deep.score(torch.empty(0, *SHAPE)).shape == (0,)


@pytest.mark.parametrize("which", ["guard_hidden", "guard_deep"])
def test_batch_rows_chunking_does_not_change_results(which, request, synth):
    guard = request.getfixturevalue(which)
    x = synth["x_test"][:50]
    small = with_config(guard, batch_rows=NUM_CLASSES * 7)  # 7 inputs a chunk
    a, b = guard(x), small(x)
    torch.testing.assert_close(a.confidences, b.confidences, atol=1e-6, rtol=0)
    torch.testing.assert_close(a.consistency, b.consistency, atol=1e-5, rtol=1e-5)
    assert torch.equal(a.verdict, b.verdict) and torch.equal(a.labels, b.labels)


# ------------------------------------------------------------------------------ masked layers

def test_several_masked_layers_shapes(guard_deep):
    """A neuron is a pixel at the input, a channel at a hidden conv layer, an element at the late
    layer; masks are per unit, fills per element, the profile per unit."""
    g = guard_deep
    assert g.layers == ["input", "1", "3"] and g.late_layer == "8"
    units_per = {"input": 144, "1": 4, "3": 6, LATE: 16}
    elems_per = {"input": 144, "1": 4 * 144, "3": 6 * 144, LATE: 16}
    assert g.masks.keys() == g.fills.keys() == units_per.keys()
    for k, d in units_per.items():
        assert g.masks[k].shape == (NUM_CLASSES, d), k
        assert g.fills[k].shape == (elems_per[k],), k
    # the profile: per evidence (a conv layer once per view of its channels), per unit
    evidence = {"input": "input", "1@mean": "1", "1@max": "1", "3@mean": "3", "3@max": "3", LATE: LATE}
    assert g._profile_layers() == list(evidence)
    for e, layer in evidence.items():
        for stat in ("center", "scale", "weight"):
            assert g.profile[f"{stat}.{e}"].shape == (NUM_CLASSES, units_per[layer]), (stat, e)
        assert (g.profile[f"scale.{e}"] > 0).all()
    assert g.profile.keys() == {f"{s}.{e}" for s in ("center", "scale", "weight") for e in evidence} | {
        "norms", "bounds"}
    assert g.profile["norms"].shape == (NUM_CLASSES, 6) and (g.profile["norms"] > 0).all()
    assert g.profile["bounds"].shape == (NUM_CLASSES,) and torch.isfinite(g.profile["bounds"]).all()
    assert g.deviations(torch.zeros(2, *SHAPE)).shape == (2, NUM_CLASSES)
    # the profile weighs class k's salient neurons (a class with none is judged on every live one)
    for e, layer in evidence.items():
        m, w = g.masks[layer], g.profile[f"weight.{e}"]
        rows = m.sum(1) > 0
        assert torch.equal(w[rows], m[rows]), e


def test_hidden_conv_mask_is_per_channel(guard_deep, deep_net, synth):
    """Dropping channel c at conv layer "3" for head k replaces that channel's whole feature map by
    the fill; every other channel and every other head is untouched."""
    g = guard_deep
    x = synth["x_test"][:8]
    masks = {n: torch.ones_like(m) for n, m in hidden_masks(g).items()}
    masks["3"] = torch.ones(NUM_CLASSES, 6)
    masks["3"][1, [2, 4]] = 0.0  # head 1 drops channels 2 and 4
    got = g.tapped.features(x, masks, g.fills)
    with torch.no_grad():
        a = deep_net[:4](x)  # output of module "3"
        fill = g.fills["3"].reshape(6, 12, 12)
        heads = []
        for k in range(NUM_CLASSES):
            ak = a.clone()
            if k == 1:
                ak[:, [2, 4]] = fill[[2, 4]]
            heads.append(deep_net[4:8](ak))
        want = torch.stack(heads, 1)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got[:, 1], got[:, 0])


@pytest.mark.parametrize("which", GUARDS)
def test_masks_are_binary_and_skip_dormant_neurons(which, request, synth):
    """A neuron that no clean sample moves (a dormant neuron) is never salient, in any layer."""
    guard = request.getfixturevalue(which)
    u = guard.unit_activations(synth["x_val"])
    assert u.keys() == {*guard.layers, LATE}
    n_dormant = 0
    for k, a in u.items():
        m = guard.masks[k]
        assert m.shape == (NUM_CLASSES, a.shape[1])
        assert set(m.unique().tolist()) <= {0.0, 1.0}
        assert (m.sum(1) >= 1).all(), f"a head keeps nothing in {k}"
        constant = (a == a[:1]).all(0)
        n_dormant += int(constant.sum())
        assert (m[:, constant] == 0).all(), f"a dormant neuron was selected in {k}"
    if INPUT in guard.layers:
        assert n_dormant > 0  # the synthetic data does have dormant neurons to check


def _with_constant_pixel(x):
    """The clean data plus a pixel that is 1 in every image (a fixed bright mark): constant on the
    clean data, but not at its blank-input value (the blank input is black)."""
    x = x.clone()
    x[:, 0, 11, 0] = 1.0
    return x


CONSTANT_PIXEL = 11 * 12 + 0


@pytest.mark.parametrize("neighbours", [0, 1])
def test_constant_pixel_is_not_salient(shared_net, synth, neighbours):
    # fractions=(1.0,): every neuron with a positive importance is selected
    g = fit(shared_net, _with_constant_pixel(synth["x_val"]), synth["y_val"], layers=["input"],
            neighbours=neighbours, fractions=(1.0,))
    assert (g.masks["input"][:, CONSTANT_PIXEL] == 0).all(), "a pixel constant on clean data was selected"
    assert (g.masks["input"].sum(1) > 0).all()
    # a dormant pixel is filled with its clean value, so masking it changes nothing for clean inputs
    assert g.fills["input"][CONSTANT_PIXEL] == 1.0


def test_perturbation_samples_are_the_sample_plus_clamped_noise(shared_net, synth, monkeypatch):
    """Table VIII's baseline: x + N(0, sigma), clamped to the data's range, seeded, no model; the fit
    uses it instead of Alg. 1 with ``neighbour_mode="perturb"``."""
    from linkbreaker_ext.neighbours import perturbed_samples
    x, y = synth["x_val"][:20], synth["y_val"][:20]
    xn, yn = perturbed_samples(x, y, per_sample=3, noise_std=0.3, seed=1)
    assert xn.shape == (60, *x.shape[1:]) and torch.equal(yn, y.repeat_interleave(3))
    assert xn.min() >= x.min() and xn.max() <= x.max()
    src = x.repeat_interleave(3, 0)
    assert (xn - src).abs().mean() > 0.05 and (xn - src).abs().mean() < 0.3
    assert torch.equal(perturbed_samples(x, y, 3, 0.3, seed=1)[0], xn)
    assert not torch.equal(perturbed_samples(x, y, 3, 0.3, seed=2)[0], xn)
    assert len(perturbed_samples(x, y, 0)[0]) == 0

    def no_alg1(*a, **k):
        raise AssertionError("Alg. 1 ran in perturb mode")
    monkeypatch.setattr("linkbreaker_ext.fitting.generate_neighbours", no_alg1)
    g = fit(shared_net, synth["x_val"], synth["y_val"], layers=["input"], neighbour_mode="perturb",
            neighbours=2)
    assert g.diagnostics["n_neighbours"] == 2 * g.diagnostics["n_fit"]
    # the offline time is attributed to its stages, which together stay within the whole fit
    stages = g.diagnostics["stage_s"]
    assert set(stages) == {"neighbours", "statistics", "set_search", "profile_and_calibration"}
    assert all(v >= 0 for v in stages.values()) and sum(stages.values()) <= g.diagnostics["fit_s"]
    with pytest.raises(ValueError, match="neighbour_mode"):
        GuardConfig(neighbour_mode="random")


def test_drop_misclassified_fits_on_what_the_model_gets_right(backdoored_net, synth):
    """Triggered samples with their true labels in the "clean" set (a poisoned validation set): the
    backdoored model predicts the target for them, so ``drop_misclassified`` removes exactly those
    and the model's other mistakes, and the fit equals a fit on the filtered set."""
    x, y = synth["x_val"].clone(), synth["y_val"].clone()
    poisoned = (y != 0).nonzero().flatten()[:6]
    x[poisoned] = add_trigger(x[poisoned])
    pred = backdoored_net(x).argmax(1)
    assert (pred[poisoned] == 0).all(), "precondition: the backdoor fires on the poisoned samples"
    g = fit(backdoored_net, x, y, layers=["input"], drop_misclassified=True)
    assert g.diagnostics["n_dropped_misclassified"] == int((pred != y).sum()) >= 6
    ref = fit(backdoored_net, x[pred == y], y[pred == y], layers=["input"])
    assert_same_state(g, ref)
    with pytest.raises(ValueError, match="drop_misclassified"):
        GuardConfig(drop_misclassified=1)
    with pytest.raises(ValueError, match="after drop_misclassified removed .* too few validation samples"):
        fit(backdoored_net, add_trigger(synth["x_val"]), synth["y_val"], layers=["input"],
            drop_misclassified=True)


def test_always_zero_pixels_are_never_salient(guard_input, guard_deep, synth):
    assert (synth["x_val"][:, :, ACTIVE:, :] == 0).all() and (synth["x_val"][:, :, :, ACTIVE:] == 0).all()
    for g in (guard_input, guard_deep):
        masks = g.masks["input"].reshape(NUM_CLASSES, *SHAPE)
        assert (masks[:, :, ACTIVE:, :] == 0).all()
        assert (masks[:, :, :, ACTIVE:] == 0).all()
        # ... while the pixels the classes use are kept by some head
        assert masks[:, :, :ACTIVE, :ACTIVE].sum() > 0


@pytest.mark.parametrize("which", ["guard_input", "guard_deep"])
def test_trigger_on_dormant_pixels_is_erased_for_every_head(which, request, synth):
    guard = request.getfixturevalue(which)
    x = synth["x_test"][:60]
    xt = add_trigger(x)
    assert not torch.equal(x, xt)
    masks = hidden_masks(guard)
    assert torch.equal(guard.tapped.features(x, masks, guard.fills),
                       guard.tapped.features(xt, masks, guard.fills))
    for a, b in zip(guard.head_confidences(x), guard.head_confidences(xt)):
        assert torch.equal(a, b)
    no_veto = with_config(guard, consistency=False, **NO_STABILITY)
    assert_same_result(no_veto(x), no_veto(xt))


def test_fill_is_the_blank_input(guard_input, guard_deep, synth):
    # the reference for non-salient pixels is the per-channel median: black on this data
    assert torch.equal(guard_input.fills["input"], torch.zeros_like(guard_input.fills["input"]))
    # at a hidden layer, a live channel (salient for some head) is filled with the blank input's map
    blank = guard_deep.tapped.activations(blank_input(synth["x_val"]))
    for layer in ("1", "3"):
        live = guard_deep.masks[layer].bool().any(0)
        assert live.any()
        fill = guard_deep.fills[layer].reshape(len(live), -1)
        want = blank[layer][0].reshape(len(live), -1)
        assert torch.equal(fill[live], want[live]), layer
    torch.testing.assert_close(guard_deep.fills[LATE][guard_deep.masks[LATE].bool().any(0)],
                               blank[LATE][0][guard_deep.masks[LATE].bool().any(0)])


def test_fill_mean(shared_net, synth):
    g = fit(shared_net, synth["x_val"], synth["y_val"], layers=["input"], fill="mean", neighbours=0)
    live = g.masks["input"].bool().any(0)
    # the clean mean of a pixel the classes use is not black
    assert (g.fills["input"][live] > 0).all()


def test_use_early_false_runs_the_heads_on_whole_masked_layers(deep_net, synth):
    g = fit(deep_net, synth["x_val"], synth["y_val"], layers=["input", "1", "3"], neighbours=0,
            use_early=False)
    assert g.config.use_early is False
    x = synth["x_test"][:30]
    ones = {n: torch.ones_like(m) for n, m in hidden_masks(g).items()}
    masked_whole = with_config(g, use_early=True).head_confidences(x, masks=ones)
    for a, b in zip(g.head_confidences(x), masked_whole):
        assert torch.equal(a, b)
    # the late layer is still restricted per class
    assert (g.masks[LATE] == 0).any()
    assert "late" in g.diagnostics["chosen_fractions"]


def test_use_late_false_skips_the_late_search(deep_net, synth):
    kw = dict(layers=["input", "1"], neighbours=0)
    g = fit(deep_net, synth["x_val"], synth["y_val"], use_late=False, **kw)
    full = fit(deep_net, synth["x_val"], synth["y_val"], **kw)
    assert LATE not in g.diagnostics["chosen_fractions"]
    assert "late" in full.diagnostics["chosen_fractions"]
    assert (g.masks[LATE].sum(1) >= full.masks[LATE].sum(1)).all()


# ------------------------------------------------------------------------------ layer choice

class _Deep(nn.Module):
    """Five conv ReLUs (feature maps), a flat ReLU, and a ReLU module reused twice."""

    def __init__(self):
        super().__init__()
        self.convs = nn.ModuleList([nn.Conv2d(1 if i == 0 else 2, 2, 3, padding=1) for i in range(5)])
        self.acts = nn.ModuleList([nn.ReLU() for _ in range(5)])
        self.shared = nn.ReLU()
        self.fc1, self.flat_act, self.fc2 = nn.Linear(2 * 144, 4), nn.ReLU(), nn.Linear(4, 3)

    def forward(self, x):
        for conv, act in zip(self.convs, self.acts):
            x = self.shared(act(conv(x)))
        return self.fc2(self.flat_act(self.fc1(x.flatten(1))))


def test_auto_layers_rule():
    torch.manual_seed(0)
    model, x = _Deep().eval(), torch.rand(2, *SHAPE)
    maps = ["acts.0", "shared", "acts.1", "acts.2", "acts.3", "acts.4"]  # first-call order, once each
    assert auto_layers(model, x, 6) == maps
    assert auto_layers(model, x, 10) == maps
    # evenly spaced over the feature maps (indices round(i * 5 / (count - 1))), the last included
    assert auto_layers(model, x, 3) == [maps[0], maps[2], maps[5]]
    assert auto_layers(model, x, 4) == [maps[0], maps[2], maps[3], maps[5]]
    assert auto_layers(model, x, 2) == [maps[0], maps[5]]
    assert auto_layers(model, x, 1) == ["acts.4"]
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(144, 8), nn.ReLU(), nn.Linear(8, 3))
    assert auto_layers(mlp, x, 4) == [INPUT]  # no feature maps: the pixels
    assert not any(m._forward_hooks for m in model.modules())


def test_fit_default_layers(deep_net, shared_net, synth, guard_deep):
    x, y = synth["x_val"], synth["y_val"]
    auto = fit(deep_net, x, y)
    assert auto.layers == ["input", "1", "3"] and auto.late_layer == "8"
    assert_same_state(auto, guard_deep)  # automatic = the same layers given explicitly
    assert fit(deep_net, x, y, hidden_layers=1, neighbours=0).layers == ["input", "3"]
    small = fit(shared_net, x, y, neighbours=0)
    assert (small.layers, small.late_layer) == (["input", "1"], "6")
    assert_same_state(fit(deep_net, x, y), auto)  # deterministic


def test_named_layers(shared_net, synth):
    g = fit(shared_net, synth["x_val"], synth["y_val"], layers=["0", "5"])  # conv output, flat hidden
    assert (g.layers, g.late_layer) == (["0", "5"], "6")
    assert g.masks["0"].shape == (NUM_CLASSES, 4) and g.masks["5"].shape == (NUM_CLASSES, 16)
    assert g.fills["0"].shape == (4 * 144,) and g.fills["5"].shape == (16,)
    r = g(synth["x_test"])
    assert (r.labels == synth["y_test"]).float().mean().item() >= 0.9
    assert fit(shared_net, synth["x_val"], synth["y_val"], layers="1", neighbours=0).layers == ["1"]


def test_fit_rejects_bad_layers(shared_net, synth):
    x, y = synth["x_val"], synth["y_val"]
    with pytest.raises(ValueError, match="unknown layer 'nope'"):
        fit(shared_net, x, y, layers=["input", "nope"])
    with pytest.raises(ValueError, match="distinct"):
        fit(shared_net, x, y, layers=["1", "1"])
    with pytest.raises(ValueError, match="at least one"):
        fit(shared_net, x, y, layers=[])


def test_layer_that_runs_twice_is_refused(synth):
    torch.manual_seed(0)
    model = _Deep().eval()
    with pytest.raises(RuntimeError, match="more than once"):
        fit(model, synth["x_val"], synth["y_val"], layers=["shared"], neighbours=0)


# ------------------------------------------------------------------------------ the user's model

def _hooks(model):
    return [(n, dict(m._forward_hooks), dict(m._forward_pre_hooks), dict(m._backward_hooks))
            for n, m in model.named_modules()]


def test_user_model_is_never_modified_or_hooked(net, synth, tmp_path):
    net.train()  # a model in training mode stays in training mode
    state = {k: v.clone() for k, v in net.state_dict().items()}
    hooks = _hooks(net)
    g = fit(net, synth["x_val"], synth["y_val"])
    x = synth["x_test"][:20]
    g(x), g.score(x), g.deviations(x), g.unit_activations(x)
    g.save(tmp_path / "g.safetensors")
    LinkBreaker.load(tmp_path / "g.safetensors", net)(x)
    assert net.training and all(m.training for m in net.modules())
    assert _hooks(net) == hooks
    after = net.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)
    assert all(p.requires_grad for p in net.parameters())
    # the guard runs a private frozen copy
    assert g.tapped.net is not net
    mine = {p.data_ptr() for p in net.parameters()}
    assert not mine & {p.data_ptr() for p in g.tapped.net.parameters()}


class _Spy(nn.Module):
    """Records, at every forward of the user's model, its mode and whether any module is hooked."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.seen = []

    def forward(self, x):
        self.seen.append((self.training, any(m._forward_hooks or m._forward_pre_hooks
                                             for m in self.modules())))
        return self.inner(x)


def test_fit_never_hooks_or_switches_the_user_model(net, synth):
    spy = _Spy(net).train()
    fit(spy, synth["x_val"], synth["y_val"], neighbours=0)  # automatic layers
    assert all(seen == (True, False) for seen in spy.seen), spy.seen


def test_model_can_be_called_from_another_thread_while_the_guard_runs(guard_deep, deep_net, synth):
    x = synth["x_test"][:30]
    with torch.no_grad():
        want = deep_net(x[:5]).clone()
    stop, errors, calls = threading.Event(), [], [0]

    def guard_loop():
        try:
            while not stop.is_set():
                guard_deep(x)
                calls[0] += 1
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    t = threading.Thread(target=guard_loop)
    t.start()
    try:
        for _ in range(200):
            with torch.no_grad():
                got = deep_net(x[:5])
            assert got.shape == want.shape and torch.equal(got, want)
            if calls[0] >= 3:
                break
    finally:
        stop.set()
        t.join()
    assert not errors and calls[0] >= 1


def test_guard_calls_from_two_threads_agree(deep_net, synth):
    """Two threads share one guard, with different batch sizes. Every forward of the guard's copy
    is slowed down (2 ms) so that the calls really interleave."""
    g = fit(deep_net, synth["x_val"], synth["y_val"], layers=["input", "1", "3"], neighbours=0)
    inputs = [synth["x_test"][:10], synth["x_test"][20:27]]
    want = [g(x) for x in inputs]
    g.tapped.net[0].register_forward_pre_hook(lambda mod, inp: time.sleep(0.002))
    out, errors = [None, None], []

    def run(i):
        try:
            out[i] = [g(inputs[i]) for _ in range(10)]
        except Exception as e:
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for results, w in zip(out, want):
        for r in results:
            assert_same_result(r, w)


# ------------------------------------------------------------------------------ fitting inputs

def test_fit_accepts_dataset_and_dataloader(shared_net, synth, guard_input):
    x, y = synth["x_val"], synth["y_val"]
    from_ds = fit(shared_net, TensorDataset(x, y), layers=["input"])
    from_dl = fit(shared_net, DataLoader(TensorDataset(x, y), batch_size=32, shuffle=False),
                  layers=["input"])
    for g in (from_ds, from_dl):
        assert_same_state(g, guard_input)


def test_fit_state_lives_on_the_model_device(shared_net, synth):
    """The device rule: the whole fit runs on the model's device and the validation data is moved
    there (here CPU data for a CPU model; the CUDA combinations are tested below). Data that
    requires grad or is a strided view is accepted as well."""
    x = synth["x_val"].clone().requires_grad_(True)
    y = synth["y_val"]
    g = fit(shared_net, x[:, :, :, :], y, layers=["input", "1"], neighbours=0)
    device = next(shared_net.parameters()).device
    assert g.device == device
    tensors = [g.thresholds, *g.masks.values(), *g.fills.values(), *g.profile.values()]
    assert all(t.device == device and t.dtype == torch.float32 for t in tensors)
    view = synth["x_val"].transpose(2, 3).transpose(2, 3)  # same values, non-contiguous
    assert_same_state(fit(shared_net, view, y, layers=["input", "1"], neighbours=0), g)


def test_fit_rejects_too_few_samples(shared_net, synth):
    x, y = synth["x_val"], synth["y_val"]
    keep = torch.cat([torch.nonzero(y == k).flatten()[: (3 if k == 1 else 20)] for k in range(3)])
    with pytest.raises(ValueError, match="too few validation samples: class 1 has 3"):
        fit(shared_net, x[keep], y[keep])
    # a class that is missing altogether is too few as well
    keep = torch.nonzero(y != 2).flatten()
    with pytest.raises(ValueError, match="too few.*class 2 has 0"):
        fit(shared_net, x[keep], y[keep])


def test_fit_rejects_bad_labels(shared_net, synth):
    x, y = synth["x_val"], synth["y_val"]
    for bad in (5, -1):
        yb = y.clone()
        yb[0] = bad
        with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
            fit(shared_net, x, yb)
    with pytest.raises(ValueError, match="integer tensor of class labels"):
        fit(shared_net, x, y.float())
    with pytest.raises(ValueError, match="integer tensor of class labels"):
        fit(shared_net, x, y.bool())
    with pytest.raises(ValueError, match="1-D integer tensor"):
        fit(shared_net, x, y[:, None].expand(-1, 2))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
        fit(shared_net, x, y, num_classes=2)


def test_fit_rejects_mismatched_or_bad_data(shared_net, synth):
    x, y = synth["x_val"], synth["y_val"]
    with pytest.raises(ValueError, match="do not match"):
        fit(shared_net, x, y[:-1])
    with pytest.raises(ValueError, match="y_val is required"):
        fit(shared_net, x, None)
    with pytest.raises(ValueError, match="give y_val only"):
        fit(shared_net, TensorDataset(x, y), y)
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        fit(shared_net, bad, y)
    with pytest.raises(ValueError, match="floating"):
        fit(shared_net, (x * 255).to(torch.uint8), y)


def test_fit_rejects_model_without_linear(synth):
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with pytest.raises(ValueError, match="no nn.Linear"):
        fit(model, synth["x_val"], synth["y_val"])


def test_call_rejects_bad_inputs(guard_hidden):
    with pytest.raises(ValueError, match="shape"):
        guard_hidden(torch.zeros(2, 1, 10, 10))
    with pytest.raises(ValueError, match="shape"):
        guard_hidden(torch.zeros(1, 12, 12))
    x = torch.zeros(2, *SHAPE)
    x[1, 0, 3, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        guard_hidden(x)
    x[1, 0, 3, 3] = float("inf")
    with pytest.raises(ValueError, match="Inf"):
        guard_hidden(x)
    with pytest.raises(ValueError, match="NaN"):
        guard_hidden.score(x)
    with pytest.raises(TypeError, match="floating"):
        guard_hidden(torch.zeros(2, *SHAPE, dtype=torch.int64))
    with pytest.raises(TypeError, match="torch.Tensor"):
        guard_hidden(torch.zeros(2, *SHAPE).numpy())


# ------------------------------------------------------------------------------ set search

def test_choose_fractions_picks_the_smallest_within_budgets():
    t = torch.tensor
    rows = [  # (fraction, in [K], out [K]); the last row is the whole layer
        (0.1, t([0.50, 0.95, 0.90, 0.70]), t([0.10, 0.00, 0.30, 0.01])),
        (0.3, t([0.89, 0.94, 0.95, 0.89]), t([0.02, 0.00, 0.30, 0.01])),
        (0.6, t([0.90, 0.90, 0.95, 0.70]), t([0.01, 0.00, 0.30, 0.01])),
        (1.0, t([0.90, 0.95, 0.95, 0.90]), t([0.01, 0.00, 0.00, 0.01])),
    ]
    # class 0: 0.1 loses too much; 0.3 is within budget_in (0.01) but gains 0.01 of out > 0.005
    # class 1: already within both budgets at 0.1
    # class 2: its out rate only falls back at the whole layer
    # class 3: 0.3 fits; 0.6 (larger) would not, the smallest acceptable wins
    got = search.choose_fractions(rows, budget_in=0.01, budget_out=0.005)
    assert got.tolist() == pytest.approx([0.6, 0.1, 1.0, 0.3])
    # a looser out budget admits class 0 at 0.3; a zero budget keeps what equals the whole layer only
    assert search.choose_fractions(rows, 0.01, 0.02).tolist() == pytest.approx([0.3, 0.1, 1.0, 0.3])
    assert search.choose_fractions(rows, 0.0, 0.0).tolist() == pytest.approx([0.6, 0.1, 1.0, 1.0])


def test_search_sets_goes_stage_by_stage():
    calls = []
    good = {"a": 0.3, "b": 0.3, LATE: 0.6}  # per layer: from this fraction on, the head is as good

    def evaluate(fractions):
        calls.append({k: v.tolist() for k, v in fractions.items()})
        ok = all(v[0] >= good[k] for k, v in fractions.items())
        return torch.tensor([0.9 if ok else 0.5, 0.9]), torch.tensor([0.0, 0.0])

    chosen, table = search.search_sets(evaluate, [("masked layers", ["a", "b"]), ("late", [LATE])],
                                       (0.1, 0.3, 0.6, 1.0), 0.01, 0.01, 2, progress=False)
    assert chosen.keys() == {"a", "b", LATE}
    assert chosen["a"].tolist() == chosen["b"].tolist() == pytest.approx([0.3, 0.1])
    assert chosen[LATE].tolist() == pytest.approx([0.6, 0.1])
    assert list(table) == ["masked layers", "late"] and len(table["late"]) == 4
    # the first stage sees the late layer whole (absent); the late stage sees the chosen masked sets
    assert all(LATE not in c for c in calls[:4])
    assert all(c["a"] == pytest.approx([0.3, 0.1]) for c in calls[4:])


def test_search_margins_widens_only_what_no_class_needs():
    need = search.margin_mask((8, 10), {"bottom": 2, "left": 1}) == 0  # pixels the fake model ignores

    def evaluate(keep):  # each class loses confidence for every needed pixel blanked
        lost = float(((keep == 0) & ~need).sum())
        return torch.tensor([0.9 - 0.01 * lost, 0.8]), torch.tensor([0.0, 0.0 + 0.001 * lost])

    widths, keep = search.search_margins(evaluate, (8, 10), budget_in=0.002, budget_out=0.0005)
    assert widths == {"top": 0, "bottom": 2, "left": 1, "right": 0}
    assert torch.equal(keep, search.margin_mask((8, 10), widths)) and keep.sum() == 8 * 10 - 2 * 10 - 6
    # a side never grows past a quarter of its axis, even where nothing is needed
    widths, _ = search.search_margins(lambda k: (torch.ones(2), torch.zeros(2)), (8, 10), 0.0, 0.0)
    assert widths == {"top": 2, "bottom": 2, "left": 2, "right": 2}


class _IgnoresMargins(nn.Module):
    """``inner`` after zeroing the pixels outside the top-left ACTIVE x ACTIVE region: a model that
    provably never needs the bottom and right margins, whatever is drawn there."""

    def __init__(self, inner):
        super().__init__()
        self.inner = copy.deepcopy(inner)
        keep = torch.zeros(SHAPE)
        keep[:, :ACTIVE, :ACTIVE] = 1
        self.register_buffer("keep", keep)

    def forward(self, x):
        return self.inner(x * self.keep)


def test_image_margins_blank_what_the_model_never_needs_for_every_head(shared_net, synth, tmp_path):
    g = torch.Generator().manual_seed(0)
    def noisy(x):  # background noise in the margins: no pixel there is dormant any more
        out = x.clone()
        out[:, :, ACTIVE:, :] = torch.rand(out[:, :, ACTIVE:, :].shape, generator=g)
        out[:, :, :, ACTIVE:] = torch.rand(out[:, :, :, ACTIVE:].shape, generator=g)
        return out
    model = _IgnoresMargins(shared_net)
    guard = fit(model, noisy(synth["x_val"]), synth["y_val"], layers=["input"], image_margins=True)
    margins = guard.diagnostics["image_margins"]
    assert margins["bottom"] == margins["right"] == SHAPE[1] - ACTIVE  # the widest a side may be
    masks = guard.masks["input"].reshape(NUM_CLASSES, *SHAPE)
    assert (masks[:, :, ACTIVE:, :] == 0).all() and (masks[:, :, :, ACTIVE:] == 0).all()
    assert masks.sum() > 0
    # a trigger drawn in those margins never reaches a head
    x = noisy(synth["x_test"][:40])
    xt = add_trigger(x)
    assert not torch.equal(x, xt)
    hidden = hidden_masks(guard)
    assert torch.equal(guard.tapped.features(x, hidden, guard.fills), guard.tapped.features(xt, hidden, guard.fills))
    # the saved guard keeps the blanked margins and says it was fitted with them
    guard.save(tmp_path / "g.safetensors")
    loaded = LinkBreaker.load(tmp_path / "g.safetensors", model)
    assert loaded.config.image_margins is True and torch.equal(loaded.masks["input"], guard.masks["input"])
    assert_same_result(loaded(xt), guard(xt))


def test_image_margins_need_images_and_the_input_layer(shared_net, deep_net, synth):
    with pytest.raises(ValueError, match="image_margins"):
        GuardConfig(image_margins=1)
    with pytest.raises(ValueError, match="image_margins=True .* 'input' among the masked layers"):
        fit(deep_net, synth["x_val"], synth["y_val"], layers=["1"], image_margins=True)
    flat = nn.Sequential(nn.Linear(SHAPE[1] * SHAPE[2], 8), nn.ReLU(), nn.Linear(8, NUM_CLASSES))
    with pytest.raises(ValueError, match=r"image inputs \[C, H, W\] \(got \[144\]\)"):
        fit(flat, synth["x_val"].flatten(1), synth["y_val"], layers=["input"], image_margins=True)


def test_head_rates():
    conf = torch.tensor([[0.9, 0.2], [0.7, 0.4], [0.1, 0.6]])
    y = torch.tensor([0, 0, 1])
    i, o = search.head_rates(conf, y)
    assert i.tolist() == pytest.approx([0.8, 0.6]) and o.tolist() == pytest.approx([0.1, 0.3])
    i, o = search.head_rates(conf, y, "rate")
    assert i.tolist() == pytest.approx([1.0, 1.0]) and o.tolist() == pytest.approx([0.0, 0.0])


# ------------------------------------------------------------------------------ calibration

def _conf_from_logits(logits):
    return torch.sigmoid(torch.tensor(logits, dtype=torch.float64)).float()


def test_confidence_thresholds_mad_in_log_odds():
    own = [1.0, 2.0, 3.0, 4.0, 5.0]  # log-odds: median 3, MAD 1
    conf = torch.zeros(10, 2)
    conf[:5, 0] = _conf_from_logits(own)
    conf[5:, 1] = _conf_from_logits([4.0] * 5)  # MAD 0: the bound is the median itself
    conf[5:, 0] = _conf_from_logits([-3.0] * 5)
    conf[:5, 1] = _conf_from_logits([-3.0] * 5)
    y = torch.tensor([0] * 5 + [1] * 5)
    th = calibrate.confidence_thresholds(conf, y, mad_k=1.0, out_quantile=None, floor=0.0)
    assert th[0].item() == pytest.approx(torch.sigmoid(torch.tensor(3.0 - 1.4826)).item(), abs=1e-5)
    assert th[1].item() == pytest.approx(torch.sigmoid(torch.tensor(4.0)).item(), abs=1e-5)
    # the floor wins when it is higher
    assert calibrate.confidence_thresholds(conf, y, 1.0, None, 0.9)[0].item() == pytest.approx(0.9)
    # other classes' confidences raise the threshold to their quantile ...
    conf[5:, 0] = _conf_from_logits([2.5] * 5)
    th = calibrate.confidence_thresholds(conf, y, 1.0, 0.5, 0.0)
    assert th[0].item() == pytest.approx(torch.sigmoid(torch.tensor(2.5)).item(), abs=1e-5)
    # ... but never above the (1 - q) quantile of the class's own confidences
    conf[5:, 0] = _conf_from_logits([4.5] * 5)
    th = calibrate.confidence_thresholds(conf, y, 1.0, 0.5, 0.0)
    assert th[0].item() == pytest.approx(torch.sigmoid(torch.tensor(3.0)).item(), abs=1e-5)
    # a class without calibration samples gets the floor
    th = calibrate.confidence_thresholds(conf[:5], y[:5], 1.0, None, 0.6)
    assert th[1].item() == pytest.approx(0.6)


def test_confidence_thresholds_pool_the_spread_over_classes():
    """A class whose few samples agree (MAD 0) gets the spread of all classes' distances to their own
    medians, not a threshold at its median that refuses half of its next samples."""
    conf = torch.zeros(10, 2)
    conf[:5, 0] = _conf_from_logits([1.0, 2.0, 3.0, 4.0, 5.0])  # median 3, distances 2 1 0 1 2
    conf[5:, 1] = _conf_from_logits([3.0, 4.0, 4.0, 4.0, 5.0])  # median 4, distances 1 0 0 0 1
    y = torch.tensor([0] * 5 + [1] * 5)
    pooled = calibrate.confidence_thresholds(conf, y, 1.0, None, 0.0, pooled_spread=True)
    own = calibrate.confidence_thresholds(conf, y, 1.0, None, 0.0)
    # own MADs: 1 and 0; pooled over 2 1 0 1 2 1 0 0 0 1 (lower median): 1 for both classes
    assert own[1].item() == pytest.approx(torch.sigmoid(torch.tensor(4.0)).item(), abs=1e-5)
    for k, med in ((0, 3.0), (1, 4.0)):
        assert pooled[k].item() == pytest.approx(torch.sigmoid(torch.tensor(med - 1.4826)).item(), abs=1e-5)


def test_consistency_bounds_mad_in_log_space():
    dev = torch.ones(8, 3)
    dev[:5, 0] = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0]).exp()  # log: median 2, MAD 1
    dev[5:, 1] = 0.5  # MAD 0: the bound is the median
    y = torch.tensor([0] * 5 + [1] * 3)
    b = calibrate.consistency_bounds(dev, y, mad_k=2.0)
    assert b[0].item() == pytest.approx(torch.tensor(2.0 + 2 * 1.4826).exp().item(), rel=1e-5)
    assert b[1].item() == pytest.approx(0.5, rel=1e-6)
    assert b[2].item() == float("inf")  # no samples of class 2: never vetoed
    # zero deviations do not produce -inf
    zeros = calibrate.consistency_bounds(torch.zeros(4, 1), torch.zeros(4, dtype=torch.long), 3.0)
    assert torch.isfinite(zeros).all()


def test_consistency_bounds_pool_the_spread_over_classes():
    """Pooled: each class keeps its own median, the MAD comes from every class's distances to its own
    median; a class whose few samples happen to agree gets the layer's spread, not a zero-width bound."""
    logs = {0: [-1.0, 0.0, 1.0, 2.0, 3.0, 4.0, 5.0], 1: [5.0, 5.0, 5.0]}
    dev = torch.ones(10, 2)
    dev[:7, 0] = torch.tensor(logs[0]).exp()
    dev[7:, 1] = torch.tensor(logs[1]).exp()
    y = torch.tensor([0] * 7 + [1] * 3)
    own = calibrate.consistency_bounds(dev, y, mad_k=2.0)
    pooled = calibrate.consistency_bounds(dev, y, mad_k=2.0, pooled_spread=True)
    # own MADs: 2 (distances 3 2 1 0 1 2 3) and 0; pooled over 3 2 1 0 1 2 3 0 0 0: 1
    assert own[0].item() == pytest.approx(torch.tensor(2.0 + 2 * 1.4826 * 2).exp().item(), rel=1e-5)
    assert own[1].item() == pytest.approx(torch.tensor(5.0).exp().item(), rel=1e-5)
    for k, med in ((0, 2.0), (1, 5.0)):
        assert pooled[k].item() == pytest.approx(torch.tensor(med + 2 * 1.4826).exp().item(), rel=1e-5)


def test_consistency_bounds_center_rules():
    """``center``: the class's own median, the pooled median of every class's own deviations, or
    the class's median shrunk towards the pooled one by SHRINK_PRIOR pseudo-samples (a class with
    few calibration samples leans on the others)."""
    logs = {0: [-1.0, 0.0, 1.0, 2.0, 3.0, 4.0, 5.0], 1: [5.0, 5.0, 5.0]}
    dev = torch.ones(10, 2)
    dev[:7, 0] = torch.tensor(logs[0]).exp()
    dev[7:, 1] = torch.tensor(logs[1]).exp()
    y = torch.tensor([0] * 7 + [1] * 3)
    pooled_med = 3.0  # torch.median of the 10 own log deviations (the lower middle)
    b = {c: calibrate.consistency_bounds(dev, y, mad_k=2.0, center=c).log()
         for c in calibrate.CENTERS}
    mads = torch.tensor([2.0, 0.0])  # each class's own MAD (no pooled spread)
    n0 = calibrate.SHRINK_PRIOR
    expected = {"class": torch.tensor([2.0, 5.0]), "pooled": torch.tensor([pooled_med] * 2),
                "shrunk": torch.tensor([(7 * 2.0 + n0 * pooled_med) / (7 + n0),
                                        (3 * 5.0 + n0 * pooled_med) / (3 + n0)])}
    for c, med in expected.items():
        torch.testing.assert_close(b[c], (med + 2 * 1.4826 * mads).float(), rtol=1e-5, atol=1e-5)
    # shrinking moves the rare class (3 samples) further towards the pool than the common one
    assert (b["class"][1] - b["shrunk"][1]) / (5.0 - pooled_med) > (b["shrunk"][0] - b["class"][0]) / (pooled_med - 2.0)
    with pytest.raises(ValueError, match="center must be one of"):
        calibrate.consistency_bounds(dev, y, 2.0, center="mean")


def test_consistency_bounds_max_rule_is_the_largest_own_class_deviation():
    """``rule="max"``: every present class's bound is the largest calibration deviation at its own
    class (pooled), absent classes stay unbounded; k and center do not matter."""
    dev = torch.tensor([[1.0, 9.0, 0.5], [2.0, 0.1, 7.0], [0.3, 3.0, 50.0], [1.5, 0.2, 0.2]])
    y = torch.tensor([0, 0, 1, 1])  # own deviations 1.0, 2.0, 3.0, 0.2; class 2 absent
    b = calibrate.consistency_bounds(dev, y, 2.0, rule="max")
    assert b[:2].tolist() == [3.0, 3.0] and b[2] == float("inf")
    for center in calibrate.CENTERS:
        assert torch.equal(calibrate.consistency_bounds(dev, y, 9.0, center=center, rule="max"), b)
    assert calibrate.layer_bounds(torch.stack([dev, 2 * dev], -1), y, 2.0, rule="max")[:2].tolist() == [
        [3.0, 6.0], [3.0, 6.0]]
    with pytest.raises(ValueError, match="rule must be one of"):
        calibrate.consistency_bounds(dev, y, 2.0, rule="q99")
    with pytest.raises(ValueError, match="consistency_bound"):
        GuardConfig(consistency_bound="q99")


def test_consistency_bounds_tail_rule_sits_past_a_short_tail_and_keeps_k_mads_for_a_long_one():
    """``rule="tail"``: the lower of the k-MAD bound and the largest own deviation plus ``margin``
    MADs, in log space; it never exceeds the ``"mad"`` bound, and a large margin gives that bound."""
    short = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0])  # log: median 2, MAD 1, max 4
    long_ = torch.tensor([0.0, 1.0, 2.0, 3.0, 40.0])  # the same median and MAD, max 40
    y = torch.zeros(5, dtype=torch.long)
    for logs, expected in ((short, 4.0 + 0.5 * 1.4826), (long_, 2.0 + 5 * 1.4826)):
        dev = logs.exp()[:, None]
        tail = calibrate.consistency_bounds(dev, y, 5.0, rule="tail", margin=0.5)
        assert tail.log().item() == pytest.approx(expected, abs=1e-4)
        mad = calibrate.consistency_bounds(dev, y, 5.0)
        assert tail.item() <= mad.item()
        assert calibrate.consistency_bounds(dev, y, 5.0, rule="tail", margin=100.0).item() == mad.item()
    # per layer, each layer by its own tail
    both = torch.stack([short.exp(), long_.exp()], 1)[:, None, :]  # [n, K=1, L=2]
    b = calibrate.layer_bounds(both, y, 5.0, rule="tail", margin=0.5).log()[0]
    torch.testing.assert_close(b, torch.tensor([4.0 + 0.5 * 1.4826, 2.0 + 5 * 1.4826]), rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="margin must be a number >= 0"):
        calibrate.consistency_bounds(short.exp()[:, None], y, 5.0, rule="tail", margin=-1.0)
    with pytest.raises(ValueError, match="consistency_margin"):
        GuardConfig(consistency_margin=float("nan"))


def test_consistency_quantile_floor_caps_refusals_on_a_heavy_tail_and_ignores_unkept_samples():
    """``quantile``: a bound below that quantile of the kept own-class deviations is raised to it
    (so at most about 1 - q of them lie above), a higher one stays, and samples ``keep`` leaves
    out (those whose own head is not confident) cannot move it."""
    g = torch.Generator().manual_seed(0)
    logs = torch.randn(400, generator=g)
    logs[:40] += 8.0  # a heavy tail: 10 % far out, past k MADs of the bulk
    dev, y = logs.exp()[:, None], torch.zeros(400, dtype=torch.long)
    plain = calibrate.consistency_bounds(dev, y, 4.25, rule="tail", margin=0.75)
    assert (dev[:, 0] > plain).double().mean() > 0.09  # the tail rule refuses the whole tail
    floored = calibrate.consistency_bounds(dev, y, 4.25, rule="tail", margin=0.75, quantile=0.99)
    assert floored.item() == pytest.approx(torch.quantile(dev[:, 0].double(), 0.99).item(), rel=1e-5)
    assert (dev[:, 0] > floored).double().mean() <= 0.011
    # a floor below the rule's bound changes nothing
    low = calibrate.consistency_bounds(dev, y, 4.25, rule="tail", margin=0.75, quantile=0.5)
    assert low.item() == plain.item()
    # samples left out of the pool cannot raise it
    keep = torch.ones(400, dtype=torch.bool)
    keep[:40] = False
    assert calibrate.consistency_bounds(dev, y, 4.25, rule="tail", margin=0.75, quantile=0.99,
                                        keep=keep).item() == plain.item()
    # per layer, each layer's own floor; an absent class keeps no bound
    two = torch.stack([dev[:, 0], dev[:, 0] / 1e3], 1)[:, :, None].expand(-1, -1, 2)  # [n, K=2, L=2]
    b = calibrate.layer_bounds(two, y, 4.25, rule="tail", margin=0.75, quantile=0.99)
    assert b[0, 0].item() == pytest.approx(floored.item(), rel=1e-5) and torch.isinf(b[1]).all()
    with pytest.raises(ValueError, match="quantile must lie"):
        calibrate.consistency_bounds(dev, y, 4.25, quantile=0.0)
    with pytest.raises(ValueError, match="keep must flag"):
        calibrate.consistency_bounds(dev, y, 4.25, quantile=0.9, keep=keep[:10])
    with pytest.raises(ValueError, match="consistency_quantile"):
        GuardConfig(consistency_quantile=1.5)


def test_consistency_quantile_floor_pools_the_confident_calibration_samples(guard_deep, synth):
    """The fit's floor is taken over the calibration samples whose own head passes its threshold:
    the recalibrated bounds equal :func:`calibrate.layer_bounds` with that pool, and no layer's
    bound moves down."""
    q = 0.9
    # thresholds at each class's median confidence (mad_k=0), so about half the samples are left
    # out, and bounds at half a MAD, which the floor must raise
    tight = dict(mad_k=0.0, consistency_mad_k=0.5, consistency_split="calibration")
    base = guard_deep.recalibrate(synth["x_val"], synth["y_val"], **tight,
                                  consistency_quantile=None).diagnostics["layer_bounds"]
    g = guard_deep.recalibrate(synth["x_val"], synth["y_val"], **tight, consistency_quantile=q)
    d, cfg = g.diagnostics, g.config
    y = d["calibration_labels"]
    keep = d["calibration_conf"][torch.arange(len(y)), y] >= g.thresholds.cpu()[y]
    assert 0 < keep.sum() < len(y)  # some calibration samples are left out of the pool
    expected = calibrate.layer_bounds(d["calibration_deviations_by_layer"], y, cfg.consistency_mad_k,
                                      center=cfg.consistency_center, rule=cfg.consistency_bound,
                                      margin=cfg.consistency_margin, quantile=q, keep=keep)
    torch.testing.assert_close(d["layer_bounds"], expected)
    assert (d["layer_bounds"] >= base - 1e-6).all() and (d["layer_bounds"] > base + 1e-6).any()


def test_out_of_fold_deviations_leave_each_sample_out_of_its_own_profile():
    """With as many folds as a class has samples, each sample's deviation is measured against the
    profile of the others (leave one out), relative to their median deviation; out of fold the
    deviations are larger than in-sample ones, and a class with one sample is not used."""
    g = torch.Generator().manual_seed(0)
    y = torch.tensor([0] * 8 + [1])
    u = torch.randn(len(y), 7, generator=g)
    w = torch.rand(2, 7, generator=g)
    dev, used = salient.out_of_fold_deviations({"a": u}, y, {"a": w}, 2, folds=8)
    assert used.tolist() == [True] * 8 + [False]
    for i in range(8):
        others = torch.tensor([j for j in range(9) if j != i])  # the singleton class stays in
        center, scale = salient.robust_class_profile(u[others], y[others], 2)
        d_others = salient.deviation(u[others[:7]], center, scale, w)[:, 0]
        expected = salient.deviation(u[i:i + 1], center, scale, w)[0, 0] / d_others.median()
        assert dev[i, 0].item() == pytest.approx(expected.item(), rel=1e-5)
    center, scale = salient.robust_class_profile(u, y, 2)
    d_in = salient.deviation(u[:8], center, scale, w)[:, 0]
    assert dev[:8, 0].median() > (d_in / d_in.median()).median()


def test_consistency_split_all_adds_the_fit_splits_out_of_fold_deviations(guard_deep, synth):
    """``consistency_split="all"``: the bounds are set on the calibration split and the fit split's
    out-of-fold deviations together; with the ``"max"`` rule the bound is the larger of the
    calibration split's largest deviation and theirs."""
    cal = guard_deep.recalibrate(synth["x_val"], synth["y_val"], consistency_bound="max",
                                 consistency_split="calibration")
    both = guard_deep.recalibrate(synth["x_val"], synth["y_val"], consistency_bound="max",
                                  consistency_split="all")
    assert guard_deep.config.consistency_split == "all"  # the default
    x, y = synth["x_val"].float(), synth["y_val"].long()
    _, fit_idx = data.stratified_split(y, cal.config.calibration_fraction, seed=cal.config.seed)
    units, y_fit = fitting._own_units(cal, x[fit_idx], y[fit_idx])
    names = cal._profile_layers()
    oof, used = salient.out_of_fold_deviations({k: units[k] for k in names}, y_fit,
                                               {k: cal.profile[f"weight.{k}"] for k in names},
                                               NUM_CLASSES, seed=cal.config.seed)
    expected = torch.maximum(cal.diagnostics["layer_bounds"][0], oof[used].amax(0))
    torch.testing.assert_close(both.diagnostics["layer_bounds"], expected.expand_as(cal.diagnostics["layer_bounds"]))
    assert (expected > cal.diagnostics["layer_bounds"][0]).any()
    with pytest.raises(ValueError, match="consistency_split"):
        GuardConfig(consistency_split="fit")


def test_max_bound_admits_every_calibration_sample_and_one_sits_on_it(guard_deep, synth):
    g = guard_deep.recalibrate(synth["x_val"], synth["y_val"], consistency_bound="max")
    d = g.diagnostics
    own = d["calibration_deviations"][torch.arange(len(d["calibration_labels"])), d["calibration_labels"]]
    assert own.max().item() == pytest.approx(1.0, abs=1e-5) and (own <= 1 + 1e-5).all()
    calib_idx, _ = data.stratified_split(synth["y_val"], g.config.calibration_fraction, seed=g.config.seed)
    x_cal, y_cal = synth["x_val"][calib_idx], synth["y_val"][calib_idx]
    again = g.deviations(x_cal)[torch.arange(len(y_cal)), y_cal]
    assert (again <= 1 + 1e-4).all()


def test_fit_centers_its_bounds_as_configured(guard_deep, deep_net, synth):
    """``consistency_center`` changes only where the per-layer bounds sit: the same masks, profile
    and calibration deviations, and bounds equal to :func:`calibrate.layer_bounds` with that center."""
    assert guard_deep.config.consistency_center == "pooled"  # the default
    pooled = guard_deep
    guard_deep = LinkBreaker.fit(deep_net, synth["x_val"], synth["y_val"], NUM_CLASSES,
                                 layers=["input", "1", "3"], progress=False,
                                 **dict(FAST, consistency_center="class"))
    a, b = guard_deep.diagnostics, pooled.diagnostics
    for name, m in guard_deep.masks.items():
        assert torch.equal(m, pooled.masks[name])
    torch.testing.assert_close(a["calibration_deviations_by_layer"], b["calibration_deviations_by_layer"])
    cfg = pooled.config
    torch.testing.assert_close(b["layer_bounds"], calibrate.layer_bounds(
        b["bound_deviations"], b["bound_labels"], cfg.consistency_mad_k, center="pooled",
        rule=cfg.consistency_bound, margin=cfg.consistency_margin, quantile=cfg.consistency_quantile,
        keep=b["bound_confident"]))
    assert not torch.allclose(b["layer_bounds"], a["layer_bounds"])  # the classes' medians differ
    with pytest.raises(ValueError, match="consistency_center"):
        GuardConfig(consistency_center="mean")


def test_recalibrate_equals_a_refit_with_those_settings(guard_deep, deep_net, synth, tmp_path):
    """Recalibrating a fitted guard with new last-stage settings gives the guard a refit with them
    gives (same split, masks and profile; new thresholds, norms and bounds), also after a save and
    load, and leaves the original guard as it was."""
    settings = dict(consistency_center="class", consistency_mad_k=3.0, mad_k=2.0,
                    inconsistent_verdict="ood", consistency_bound="tail", consistency_margin=0.5,
                    stability_noise=0.03, stability_floor=0.7, stability_draws=2,
                    threshold_split="calibration", consistency_peak="all")
    refit = LinkBreaker.fit(deep_net, synth["x_val"], synth["y_val"], NUM_CLASSES,
                            layers=["input", "1", "3"], progress=False, **dict(FAST, **settings))
    before = {k: v.clone() for k, v in guard_deep.profile.items()}
    thresholds = guard_deep.thresholds.clone()
    path = tmp_path / "g.safetensors"
    guard_deep.save(path)
    loaded = LinkBreaker.load(path, deep_net)
    assert loaded.data_sha256 == guard_deep.data_sha256 is not None
    for source in (guard_deep, loaded):
        new = source.recalibrate(synth["x_val"], synth["y_val"], **settings)
        assert new.config == refit.config
        torch.testing.assert_close(new.thresholds, refit.thresholds)
        assert set(new.profile) == set(refit.profile)
        for k, v in refit.profile.items():
            torch.testing.assert_close(new.profile[k], v, rtol=1e-5, atol=1e-6)
        assert torch.equal(new.stability["noise"], refit.stability["noise"])
        torch.testing.assert_close(new.stability["bound"], refit.stability["bound"], rtol=1e-5, atol=1e-6)
        x = synth["x_test"][:64]
        a, b = new(x), refit(x)
        assert torch.equal(a.verdict, b.verdict) and torch.equal(a.labels, b.labels)
    # the source guard is untouched
    assert torch.equal(guard_deep.thresholds, thresholds)
    for k, v in before.items():
        assert torch.equal(guard_deep.profile[k], v)
    assert guard_deep.config.consistency_center == "pooled"


def test_confidence_thresholds_come_from_the_split_the_config_names(guard_deep, synth):
    """``threshold_split="all"`` (the default) sets each class's threshold from the confidences of
    the whole validation set, ``"calibration"`` from its calibration split alone (the paper's
    reading); the rest of the calibration follows the thresholds it is given."""
    assert guard_deep.config.threshold_split == "all"
    x, y = synth["x_val"].float(), synth["y_val"].long()
    cfg = guard_deep.config
    cal, fit = data.stratified_split(y, cfg.calibration_fraction, seed=cfg.seed)
    conf = guard_deep.head_confidences(x, thresholds=torch.full((NUM_CLASSES,), 0.5))[0]

    def expected(idx):
        return calibrate.confidence_thresholds(conf[idx], y[idx], cfg.mad_k, cfg.out_quantile,
                                               cfg.threshold_floor)
    torch.testing.assert_close(guard_deep.thresholds, expected(torch.cat([cal, fit])))
    paper = guard_deep.recalibrate(x, y, threshold_split="calibration")
    torch.testing.assert_close(paper.thresholds, expected(cal))
    assert not torch.allclose(paper.thresholds, guard_deep.thresholds)  # more samples, other MADs
    with pytest.raises(ValueError, match="threshold_split"):
        GuardConfig(threshold_split="fit")


def test_recalibrate_redraws_the_split_after_dropping_misclassified_samples(backdoored_net, synth):
    """A guard fitted with ``drop_misclassified`` recalibrates on the same reduced set a refit uses."""
    x, y = synth["x_val"].clone(), synth["y_val"].clone()
    x[:6] = add_trigger(x[:6])  # triggered samples with their true labels: the model says 0
    kw = dict(layers=["input", "1"], progress=False, drop_misclassified=True, **FAST)
    base = LinkBreaker.fit(backdoored_net, x, y, NUM_CLASSES, **kw)
    assert base.diagnostics["n_dropped_misclassified"] > 0
    refit = LinkBreaker.fit(backdoored_net, x, y, NUM_CLASSES, **dict(kw, consistency_mad_k=3.0))
    new = base.recalibrate(x, y, consistency_mad_k=3.0)
    torch.testing.assert_close(new.thresholds, refit.thresholds)
    torch.testing.assert_close(new.profile["norms"], refit.profile["norms"], rtol=1e-5, atol=1e-6)


def test_recalibrate_refuses_what_it_cannot_redo(guard_deep, synth):
    x, y = synth["x_val"], synth["y_val"]
    with pytest.raises(ValueError, match=r"\['neighbours'\] change the salient sets"):
        guard_deep.recalibrate(x, y, neighbours=7, mad_k=2.0)
    with pytest.raises(ValueError, match="unknown GuardConfig field"):
        guard_deep.recalibrate(x, y, madk=2.0)
    with pytest.raises(ValueError, match="not the validation set this guard was fitted on"):
        guard_deep.recalibrate(x[1:], y[1:], mad_k=2.0)
    with pytest.raises(ValueError, match="not the validation set"):
        guard_deep.recalibrate(x + 1e-3, y, mad_k=2.0)
    with pytest.raises(ValueError, match="consistency_center"):
        guard_deep.recalibrate(x, y, consistency_center="mean")
    # an unchanged refit field is no change
    same = guard_deep.recalibrate(x, y, neighbours=guard_deep.config.neighbours)
    torch.testing.assert_close(same.thresholds, guard_deep.thresholds)


def test_fit_keeps_the_calibration_deviations_behind_its_bounds(guard_deep, synth):
    """The fit's own calibration deviations give back its bounds, and other bounds from them are
    monotone in k (what ``scripts/dev_sweep.py --sweep-k`` relies on to study k without a refit).
    Per-layer bounds (the default) are folded into the layers' norms, so the reduced deviation is
    judged against 1."""
    d = guard_deep.diagnostics
    dev, y = d["calibration_deviations"], d["calibration_labels"]
    by_layer = d["calibration_deviations_by_layer"]
    assert dev.shape == (len(y), NUM_CLASSES)
    assert by_layer.shape == (len(y), NUM_CLASSES, len(guard_deep._profile_layers()))
    cfg = guard_deep.config
    k = cfg.consistency_mad_k
    assert cfg.consistency_reduce == "per_layer"
    # the bounds come from the calibration split and the fit split's out-of-fold deviations
    pool, y_pool, keep = d["bound_deviations"], d["bound_labels"], d["bound_confident"]
    assert cfg.consistency_split == "all" and len(y_pool) > len(y)
    torch.testing.assert_close(pool[:len(y)], by_layer)
    bounds = torch.stack([calibrate.consistency_bounds(pool[..., i], y_pool, k, pooled_spread=True,
                                                       center=cfg.consistency_center,
                                                       rule=cfg.consistency_bound,
                                                       margin=cfg.consistency_margin,
                                                       quantile=cfg.consistency_quantile, keep=keep)
                          for i in range(by_layer.shape[-1])], 1)
    torch.testing.assert_close(bounds, d["layer_bounds"])
    torch.testing.assert_close(dev, (by_layer / bounds).amax(-1))
    assert (guard_deep.profile["bounds"] == 1).all()
    # the guard's own deviations of the calibration inputs are the same numbers
    calib_idx, _ = data.stratified_split(synth["y_val"], guard_deep.config.calibration_fraction,
                                         seed=guard_deep.config.seed)
    torch.testing.assert_close(guard_deep.deviations(synth["x_val"][calib_idx]).cpu(), dev,
                               rtol=1e-4, atol=1e-5)
    looser = torch.stack([calibrate.consistency_bounds(pool[..., i], y_pool, k + 2, pooled_spread=True,
                                                       center=cfg.consistency_center,
                                                       rule=cfg.consistency_bound,
                                                       margin=cfg.consistency_margin + 2,
                                                       quantile=cfg.consistency_quantile, keep=keep)
                          for i in range(by_layer.shape[-1])], 1)
    assert (looser >= bounds).all()
    # one bound on the max of normalised deviations (consistency_reduce="max", the first default)
    one = fit(guard_deep.model, synth["x_val"], synth["y_val"], layers=["input", "1", "3"],
              consistency_reduce="max", neighbours=0)
    dev1, d1 = one.diagnostics["calibration_deviations"], one.diagnostics
    torch.testing.assert_close(calibrate.consistency_bounds(
        salient.reduce_layers(d1["bound_deviations"], "max"), d1["bound_labels"], k,
        center=cfg.consistency_center, rule=cfg.consistency_bound, margin=cfg.consistency_margin,
        quantile=cfg.consistency_quantile, keep=d1["bound_confident"]), one.profile["bounds"].cpu())
    torch.testing.assert_close(dev1, one.diagnostics["calibration_deviations_by_layer"].amax(-1))
    off = fit(guard_deep.model, synth["x_val"], synth["y_val"], layers=["input"], consistency=False,
              neighbours=0)
    assert off.diagnostics["calibration_deviations"] is None


def test_calibrated_guard_bounds_hold_on_calibration_like_data(guard_deep, synth):
    """Most clean inputs are inside their class's bound, a bound is above the class's median."""
    x, y = make_images(30, seed=11)
    ratio = guard_deep.deviations(x) / guard_deep.profile["bounds"]
    own = ratio.gather(1, y[:, None]).squeeze(1)
    assert (own <= 1).float().mean() >= 0.8
    for k in range(NUM_CLASSES):
        assert own[y == k].median() < 1


# ------------------------------------------------------------------------------ save / load

def test_save_load_round_trip(guard_deep, deep_net, synth, tmp_path):
    path = tmp_path / "guard.safetensors"
    guard_deep.save(path)
    fresh = make_deep_net(seed=123)
    fresh.load_state_dict(deep_net.state_dict())  # an independent copy of the same weights
    loaded = LinkBreaker.load(path, fresh)
    assert loaded.model is fresh
    assert_same_state(loaded, guard_deep)
    assert loaded.input_shape == guard_deep.input_shape == SHAPE
    assert loaded.config == guard_deep.config
    x = torch.cat([synth["x_test"][:40], add_trigger(synth["x_test"][:40]), torch.full((2, *SHAPE), 3.0)])
    assert_same_result(loaded(x), guard_deep(x))
    assert torch.equal(loaded.score(x), guard_deep.score(x))


def test_config_survives_round_trip(shared_net, synth, tmp_path):
    cfg = GuardConfig(mad_k=2.5, out_quantile=None, fill="mean", noise_amplitude=0.1, seed=7,
                      threshold_floor=0.6, min_per_class=4, consistency_reduce="mean",
                      consistency_mad_k=2.0, hidden_layers=2)
    g = LinkBreaker.fit(shared_net, synth["x_val"], synth["y_val"], NUM_CLASSES,
                        layers=["input", "1"], config=cfg, progress=False, **FAST)
    assert g.config == dataclasses.replace(cfg, **FAST)
    g.save(tmp_path / "g.safetensors")
    loaded = LinkBreaker.load(tmp_path / "g.safetensors", shared_net)
    assert loaded.config == g.config
    assert isinstance(loaded.config.fractions, tuple) and loaded.config.out_quantile is None
    assert_same_state(loaded, g)
    assert_same_result(loaded(synth["x_test"]), g(synth["x_test"]))


def test_guard_without_consistency_round_trips(shared_net, synth, tmp_path):
    g = fit(shared_net, synth["x_val"], synth["y_val"], layers=["input"], consistency=False,
            neighbours=0, **NO_STABILITY)
    assert g.profile == {} and g.stability is None and g(synth["x_test"][:5]).consistency is None
    # the rank test (on by default) needs the consistency profile: none is made, and the file loads
    assert g.config.neighbourhood_quantile is not None and g.neighbourhood is None
    g.save(tmp_path / "g.safetensors")
    loaded = LinkBreaker.load(tmp_path / "g.safetensors", shared_net)
    assert loaded.profile == {}
    assert_same_result(loaded(synth["x_test"]), g(synth["x_test"]))


def test_saved_file_is_plain_safetensors(guard_deep, tmp_path):
    from safetensors import safe_open

    path = tmp_path / "guard.safetensors"
    guard_deep.save(path)
    raw = path.read_bytes()
    assert not zipfile.is_zipfile(path) and raw[:1] != b"\x80"  # neither torch.save zip nor a raw pickle
    (n,) = struct.unpack("<Q", raw[:8])  # safetensors: u64 header length, JSON header, raw tensor bytes
    header = json.loads(raw[8:8 + n])
    names = ({"thresholds"} | {f"masks.{k}" for k in guard_deep.masks}
             | {f"fill.{k}" for k in guard_deep.fills} | {f"profile.{k}" for k in guard_deep.profile}
             | {"stability.noise", "stability.jitter", "stability.bound", "stability.gate"}
             | {f"neighbourhood.{k}" for k in guard_deep.neighbourhood})
    assert "masks.3" in names and "profile.bounds" in names and "neighbourhood.references" in names
    assert set(header) == names | {"__metadata__"}
    with safe_open(str(path), framework="pt") as f:
        assert set(f.keys()) == names
        meta = json.loads(f.metadata()[FORMAT])
        assert torch.equal(f.get_tensor("thresholds"), guard_deep.thresholds)
        assert torch.equal(f.get_tensor("masks.1"), guard_deep.masks["1"])
    assert meta["format"] == FORMAT and meta["version"] == FORMAT_VERSION == 2
    assert meta["layers"] == ["input", "1", "3"] and meta["late_layer"] == "8"
    assert meta["input_shape"] == list(SHAPE)
    assert len(meta["model_sha256"]) == 64


def test_load_refuses_a_different_model(guard_hidden, net, tmp_path):
    path = tmp_path / "guard.safetensors"
    guard_hidden.save(path)
    other = copy.deepcopy(net)
    with torch.no_grad():
        other[6].bias[0] += 1e-3
    with pytest.raises(ValueError, match="different model"):
        LinkBreaker.load(path, other)
    with pytest.raises(ValueError, match="different model"):
        LinkBreaker.load(path, make_net(seed=5))
    # explicitly opting out of the check loads it anyway
    loaded = LinkBreaker.load(path, other, check_model=False)
    assert torch.equal(loaded.masks["1"], guard_hidden.masks["1"])


def test_load_rejects_files_that_are_not_guards(net, tmp_path):
    from safetensors.torch import save_file

    rnd = tmp_path / "random.bin"
    rnd.write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8,
                                  generator=torch.Generator().manual_seed(0)).numpy().tobytes())
    with pytest.raises(ValueError, match="not a LinkBreaker guard"):
        LinkBreaker.load(rnd, net)

    pickled = tmp_path / "pickled.pt"
    torch.save({"masks.input": torch.ones(3, 4)}, pickled)
    with pytest.raises(ValueError, match="not a LinkBreaker guard"):
        LinkBreaker.load(pickled, net)

    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="not a LinkBreaker guard"):
        LinkBreaker.load(empty, net)

    plain = tmp_path / "plain.safetensors"
    save_file({"thresholds": torch.ones(3)}, str(plain))
    with pytest.raises(ValueError, match="safetensors file but not a LinkBreaker guard"):
        LinkBreaker.load(plain, net)

    foreign = tmp_path / "foreign.safetensors"
    save_file({"thresholds": torch.ones(3)}, str(foreign), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="not a LinkBreaker guard"):
        LinkBreaker.load(foreign, net)

    with pytest.raises(FileNotFoundError, match="no guard file"):
        LinkBreaker.load(tmp_path / "missing.safetensors", net)
    with pytest.raises(FileNotFoundError):
        LinkBreaker.load(tmp_path, net)  # a directory is not a guard file


@pytest.mark.parametrize("version", [1, 99])
def test_load_rejects_other_format_versions(guard_hidden, net, tmp_path, version):
    from safetensors import safe_open

    path = tmp_path / "guard.safetensors"
    guard_hidden.save(path)
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = json.loads(f.metadata()[FORMAT])
    meta["version"] = version
    safefiles.write(path, tensors, FORMAT, meta)  # a well-formed file of another version
    with pytest.raises(ValueError, match=f"version {version} is not supported"):
        LinkBreaker.load(path, net)


def test_load_keeps_the_unit_statistic_of_an_older_file(deep_net, synth, tmp_path):
    """A guard saved before ``consistency_units`` existed was profiled on channel means: it loads
    with ``"mean"``, so its profile is read as it was made, not with today's default."""
    from safetensors import safe_open

    g = LinkBreaker.fit(deep_net, synth["x_val"], synth["y_val"], NUM_CLASSES, layers=["input", "1", "3"],
                        progress=False, **dict(FAST, consistency_units="max"))
    path = tmp_path / "guard.safetensors"
    g.save(path)
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = json.loads(f.metadata()[FORMAT])
    del meta["config"]["consistency_units"]
    safefiles.write(path, tensors, FORMAT, meta)
    old = LinkBreaker.load(path, deep_net)
    assert old.config.consistency_units == "mean"
    x = synth["x_test"][:20]
    # its heads' units are channel means again: the deviations differ from the max-profiled guard's
    assert not torch.allclose(old.deviations(x), g.deviations(x))
    g.save(path)
    assert LinkBreaker.load(path, deep_net).config.consistency_units == "max"


def test_units_max_is_the_spatial_maximum_of_a_channel():
    from linkbreaker_ext.layers import units
    a = torch.zeros(2, 3, 4, 4)
    a[0, 1, 3, 3] = 5.0  # one hot position: the mean dilutes it 16 times, the max keeps it
    assert units(a, "conv", "max")[0, 1].item() == 5.0
    assert units(a, "conv", "mean")[0, 1].item() == pytest.approx(5.0 / 16)
    assert units(a, INPUT, "max").shape == (2, 48)  # pixels stay pixels


def test_both_views_judge_each_view_of_a_conv_layer_against_its_own_bound(
        guard_deep, deep_net, synth, tmp_path):
    """``consistency_units="mean+max"``: every hidden conv layer is read twice, and each reading is
    exactly the one a single-view guard makes (same heads, same per-layer bound). The served module
    and a saved-and-loaded guard decide as the guard does."""
    both = guard_deep
    assert both.config.consistency_units == "mean+max"  # the default
    mean, max_ = (LinkBreaker.fit(deep_net, synth["x_val"], synth["y_val"], NUM_CLASSES,
                                  layers=["input", "1", "3"], progress=False,
                                  **dict(FAST, consistency_units=view)) for view in ("mean", "max"))
    assert both._profile_layers() == ["input", "1@mean", "1@max", "3@mean", "3@max", "late"]
    x = torch.cat([synth["x_test"][:40], add_trigger(synth["x_test"][:40])])
    d_both, d_mean, d_max = (g.deviations(x, by_layer=True) for g in (both, mean, max_))
    assert torch.allclose(d_both[..., [0, 1, 3, 5]], d_mean, atol=1e-5)
    assert torch.allclose(d_both[..., [0, 2, 4, 5]], d_max, atol=1e-5)
    # a head is consistent only when both views are: the stricter of the two single-view guards
    ratio = both(x).consistency
    assert torch.allclose(ratio, torch.maximum(mean(x).consistency, max_(x).consistency), atol=1e-5)
    r = both(x)
    labels, verdict, _ = both.as_module()(x)
    assert torch.equal(labels, r.labels) and torch.equal(verdict, r.verdict)
    both.save(tmp_path / "both.safetensors")
    loaded = LinkBreaker.load(tmp_path / "both.safetensors", deep_net)
    assert dataclasses.asdict(loaded.config) == dataclasses.asdict(both.config)
    assert torch.equal(loaded(x).labels, r.labels) and torch.allclose(loaded(x).consistency, ratio)


# ------------------------------------------------------------------------------ CUDA

@pytest.mark.skipif(not HAS_CUDA, reason="CUDA is not available")
@pytest.mark.parametrize("data_on", ["cpu", "cuda"])
def test_guard_on_cuda(net, synth, guard_hidden, tmp_path, data_on):
    """CUDA model, validation data on either device: the fit runs on the model's device and gives
    the CPU guard's state; the CPU guard loaded onto the CUDA model gives its confidences."""
    model = net.to("cuda")
    g = fit(model, synth["x_val"].to(data_on), synth["y_val"].to(data_on), layers=["1"])
    tensors = [g.thresholds, *g.masks.values(), *g.fills.values(), *g.profile.values()]
    assert all(t.device.type == "cuda" for t in tensors)
    assert g.layers == guard_hidden.layers
    for k in g.masks:
        assert (g.masks[k].cpu() != guard_hidden.masks[k]).float().mean() <= 0.05, k
    x = synth["x_test"]
    r = g(x.cuda())
    assert r.labels.device.type == "cuda" and r.confidences.dtype == torch.float32
    assert (r.labels.cpu() == synth["y_test"]).float().mean().item() >= 0.9
    with pytest.raises(ValueError, match="is on cpu"):
        g(x)
    guard_hidden.save(tmp_path / "g.safetensors")
    on_cuda = LinkBreaker.load(tmp_path / "g.safetensors", model)
    assert on_cuda.thresholds.device.type == "cuda" and on_cuda.profile["bounds"].device.type == "cuda"
    rc, rr = on_cuda(x.cuda()), guard_hidden(x)
    torch.testing.assert_close(rc.confidences.cpu(), rr.confidences, atol=1e-4, rtol=0)
    torch.testing.assert_close(rc.consistency.cpu(), rr.consistency, atol=1e-3, rtol=1e-3)
    clear = (((rr.confidences - rr.thresholds).abs() > 1e-4).all(1)
             & ((rr.consistency - 1).abs() > 1e-2).all(1))
    assert torch.equal(rc.verdict.cpu()[clear], rr.verdict[clear])


@pytest.mark.skipif(not HAS_CUDA, reason="CUDA is not available")
def test_cuda_validation_data_with_a_cpu_model(shared_net, synth, guard_hidden):
    g = fit(shared_net, synth["x_val"].cuda(), synth["y_val"].cuda(), layers=["1"])
    assert g.device.type == "cpu"
    assert_same_state(g, guard_hidden)


def test_inputs_far_outside_the_fitted_range_warn(guard_hidden):
    """0-255 images given to a guard fitted on 0-1 images: a warning that names the ranges; values
    inside the range stay silent; the saved guard keeps the range."""
    import warnings
    x = torch.rand(3, *guard_hidden.input_shape)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        guard_hidden(x)
    with pytest.warns(UserWarning, match="fitted on values in"):
        guard_hidden(x * 255)
    assert guard_hidden.input_range is not None and guard_hidden.input_range[0] <= guard_hidden.input_range[1]


def test_confident_but_inconsistent_head_is_an_alarm_when_configured():
    """vote: no credible head but a confident one -> OOD by default, a trigger alarm with
    ``confident`` given; a credible head still wins; nothing confident stays OOD."""
    from linkbreaker_ext.verdict import ALARM, OOD, vote
    conf = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.2, 0.3]])
    confident = conf >= 0.5
    consistent = torch.tensor([[False, True], [True, True], [True, True]])
    credible = confident & consistent
    _, v = vote(conf, credible, consistent)
    assert v.tolist() == [OOD, ACCEPT, OOD]
    labels, v = vote(conf, credible, consistent, confident)
    assert v.tolist() == [ALARM, ACCEPT, OOD] and labels.tolist() == [-1, 0, 1]


def test_ood_hint_without_a_consistent_head_is_the_head_nearest_to_its_bounds():
    """vote/decide: an OOD verdict names the most confident consistent head; with none, the head
    with the smallest veto ratio (``ood_hint="nearest"``, the default) rather than the most
    confident one (``"confident"``: the trigger's target, confident and far past its bounds); NaN
    ratios rank last."""
    from linkbreaker_ext.verdict import decide
    conf = torch.tensor([[0.95, 0.30, 0.20], [0.95, 0.30, 0.20], [0.95, 0.30, 0.20]])
    thresholds = torch.tensor([0.99, 0.99, 0.99])  # nothing confident: every row is OOD
    ratio = torch.tensor([[3.0, 1.4, 2.0],            # none consistent: head 1 is nearest
                          [3.0, 0.9, 0.5],            # heads 1 and 2 consistent: the more confident
                          [3.0, float("nan"), 2.0]])  # NaN ranks last: head 2
    labels, verdict = decide(conf, thresholds, ratio)
    assert verdict.tolist() == [OOD, OOD, OOD] and labels.tolist() == [1, 1, 2]
    labels, _ = decide(conf, thresholds, ratio, ood_hint="confident")
    assert labels.tolist() == [0, 1, 0]
    # accepted answers and alarms do not depend on the hint rule
    thresholds = torch.tensor([0.9, 0.25, 0.99])  # head 0 confident everywhere, head 1 too
    for hint in ("nearest", "confident"):
        labels, verdict = decide(conf, thresholds, ratio, ood_hint=hint)
        assert verdict.tolist() == [ALARM, ACCEPT, ALARM] and labels.tolist() == [-1, 1, -1]


def test_an_ood_hint_skips_heads_that_fail_the_filtered_neighbour():
    """decide with ``hint_filter``: an OOD verdict does not name a head whose filtered-neighbour
    ratio exceeds 1 while another head passes (with no consistent head, the nearest of those that
    pass; with consistent heads, the most confident consistent one that passes); where every head
    fails, the rule without it; verdicts, alarms and accepted answers never change."""
    from linkbreaker_ext.verdict import decide
    conf = torch.tensor([[0.95, 0.30, 0.20]] * 4)
    thresholds = torch.tensor([0.99, 0.99, 0.99])     # nothing confident: every row is OOD
    ratio = torch.tensor([[1.2, 3.0, 2.0],            # none consistent: head 0 nearest, fails the filter
                          [0.5, 0.9, 3.0],            # heads 0 and 1 consistent: 0 the more confident, fails
                          [1.2, 3.0, 2.0],            # every head fails: the nearest all the same
                          [1.2, 3.0, 2.0]])           # head 0 passes: named as before
    filtered = torch.tensor([[1.5, 0.2, 0.1], [1.5, 0.2, 0.1], [1.5, 1.1, 2.0], [0.9, 0.2, 2.0]])
    labels, verdict = decide(conf, thresholds, ratio)
    assert labels.tolist() == [0, 0, 0, 0]
    labels, verdict = decide(conf, thresholds, ratio, hint_filter=filtered)
    assert verdict.tolist() == [OOD] * 4 and labels.tolist() == [2, 1, 0, 0]
    thresholds = torch.tensor([0.9, 0.5, 0.99])       # head 0 confident everywhere
    for f in (None, filtered):  # the filter's ratio is the veto's business (credibility), not the vote's
        labels, verdict = decide(conf, thresholds, ratio, hint_filter=f)
        assert verdict.tolist() == [ALARM, ACCEPT, ALARM, ALARM] and labels.tolist() == [-1, 0, -1, -1]


def test_alarm_margin_turns_a_nearly_confident_head_without_support_into_the_alarm():
    """decide: with no head consistent with its class, a head within ``alarm_margin`` log-odds of
    its threshold raises the alarm (its hint would be that head); beyond the margin, or when some
    head is consistent, the verdict is the OOD one as before; margin 0 is the rule without it."""
    from linkbreaker_ext.verdict import decide, log_odds
    thresholds = torch.tensor([0.99, 0.99, 0.99])
    just_under = torch.sigmoid(log_odds(thresholds[:1]) - 1.0).float().item()  # 1 log-odds below
    far_under = torch.sigmoid(log_odds(thresholds[:1]) - 3.0).float().item()
    conf = torch.tensor([[just_under, 0.30, 0.20],    # nothing consistent, head 0 nearly confident
                         [far_under, 0.30, 0.20],     # nothing consistent, head 0 far from sure
                         [just_under, 0.30, 0.20],    # head 2 consistent: OOD, its hint
                         [0.995, 0.30, 0.20]])        # confident and inconsistent: the alarm anyway
    ratio = torch.tensor([[1.5, 3.0, 2.0], [1.5, 3.0, 2.0], [1.5, 3.0, 0.8], [1.5, 3.0, 2.0]])
    labels, verdict = decide(conf, thresholds, ratio)
    assert verdict.tolist() == [OOD, OOD, OOD, ALARM] and labels.tolist() == [0, 0, 2, -1]
    labels, verdict = decide(conf, thresholds, ratio, alarm_margin=1.5)
    assert verdict.tolist() == [ALARM, OOD, OOD, ALARM] and labels.tolist() == [-1, 0, 2, -1]
    labels, verdict = decide(conf, thresholds, ratio, alarm_margin=3.5)
    assert verdict.tolist() == [ALARM, ALARM, OOD, ALARM]
    # the margin belongs to the alarm verdict: with inconsistent_verdict="ood" it changes nothing
    assert [t.tolist() for t in decide(conf, thresholds, ratio, "ood", alarm_margin=3.5)] == \
        [t.tolist() for t in decide(conf, thresholds, ratio, "ood")]


def test_alarm_margin_is_a_last_stage_setting(guard_deep, deep_net, synth, tmp_path):
    """A saved guard takes a new ``alarm_margin`` by recalibration (no refit), the guard and its
    serving module apply it alike, and a file written before the field existed reads as 0."""
    from linkbreaker_ext.serving import GuardedModule
    g = torch.Generator().manual_seed(5)
    x = torch.cat([synth["x_test"], torch.rand(24, *synth["x_test"].shape[1:], generator=g)])
    results = {}
    for m in (0.0, 40.0):
        gm = guard_deep.recalibrate(synth["x_val"], synth["y_val"], alarm_margin=m)
        assert torch.equal(gm.thresholds, guard_deep.thresholds)
        r = gm(x)
        labels, verdict, _ = GuardedModule(gm)(x)
        assert torch.equal(labels, r.labels) and torch.equal(verdict, r.verdict)
        results[m] = r
    moved = results[0.0].verdict != results[40.0].verdict
    assert moved.any(), "no input without a consistent head: the comparison is degenerate"
    assert (results[0.0].verdict[moved] == OOD).all() and (results[40.0].verdict[moved] == ALARM).all()
    path = tmp_path / "g.safetensors"
    guard_deep.save(path)
    tensors, meta = _file(path)
    del meta["config"]["alarm_margin"]
    safefiles.write(path, tensors, FORMAT, meta)
    old = LinkBreaker.load(path, deep_net)
    assert guard_deep.config.alarm_margin == 1.5 and old.config.alarm_margin == 0.0
    assert torch.equal(old(x).verdict, results[0.0].verdict)


def test_stability_gate_lets_the_test_judge_only_heads_near_their_bounds():
    """gated: a head whose consistency ratio is at or under the gate counts as stable, whatever its
    fall; one above it keeps its stability ratio; without a gate or a consistency ratio nothing
    changes, and the result's credibility applies the same rule."""
    from linkbreaker_ext.verdict import gated
    stability = torch.tensor([[3.0, 3.0, 0.5], [3.0, 0.25, 2.0]])
    consistency = torch.tensor([[0.375, 0.875, 0.875], [0.625, 0.75, 1.5]])
    gate = torch.tensor(0.625)  # at the gate: not judged
    assert gated(stability, consistency, gate).tolist() == [[0.0, 3.0, 0.5], [0.0, 0.25, 2.0]]
    assert torch.equal(gated(stability, consistency, None), stability)
    assert gated(stability, None, gate) is stability and gated(None, consistency, gate) is None
    r = GuardResult(None, None, torch.full((2, 3), 0.9), torch.full((3,), 0.5), consistency, stability, gate)
    assert r.credibility.tolist() == [[0.375, 3.0, 0.875], [0.625, 0.75, 2.0]]


def test_stability_gate_is_a_last_stage_setting(guard_deep, deep_net, synth, tmp_path):
    """A saved guard takes a new ``stability_gate`` by recalibration (no refit): the gate is a
    quantile of the validation pool's consistency ratios, so a higher quantile is a higher gate; it
    only ever makes heads credible (a verdict moves from a refusal towards acceptance, never back);
    the guard and its serving module apply it alike; a file written before the field existed reads
    as None (every head judged), and a file whose gate contradicts its settings is refused."""
    from linkbreaker_ext.serving import GuardedModule
    g = torch.Generator().manual_seed(6)
    x = torch.cat([synth["x_test"], (synth["x_test"] + 0.15 * torch.randn(synth["x_test"].shape, generator=g))
                   .clamp(0, 1)])
    # a strict stability bound (the median clean fall) so that many clean heads are unstable
    strict = dict(stability_bound="quantile", stability_quantile=0.5, stability_floor=0.0)
    guards = {q: guard_deep.recalibrate(synth["x_val"], synth["y_val"], stability_gate=q, **strict)
              for q in (None, 0.5, 1.0)}
    assert "gate" not in guards[None].stability
    assert 0 < float(guards[0.5].stability["gate"]) <= float(guards[1.0].stability["gate"]) <= 1
    results = {}
    for q, gq in guards.items():
        assert torch.equal(gq.thresholds, guard_deep.thresholds)
        assert torch.equal(gq.stability["bound"], guards[None].stability["bound"])
        r = gq(x)
        labels, verdict, _ = GuardedModule(gq)(x)
        assert torch.equal(labels, r.labels) and torch.equal(verdict, r.verdict)
        assert torch.equal(r.stability, results[None].stability) if q is not None else True
        results[q] = r
    credible = {q: (r.confidences >= r.thresholds) & (r.credibility <= 1) for q, r in results.items()}
    assert not (credible[None] & ~credible[0.5]).any() and not (credible[0.5] & ~credible[1.0]).any()
    assert (credible[1.0] & ~credible[None]).any(), "the gate judged no unstable head: degenerate"
    path = tmp_path / "g.safetensors"
    guard_deep.save(path)
    tensors, meta = _file(path)
    del meta["config"]["stability_gate"]
    safefiles.write(path, tensors, FORMAT, meta)
    with pytest.raises(ValueError, match="stability_gate=None but the file has the gate"):
        LinkBreaker.load(path, deep_net)
    del tensors["stability.gate"]
    safefiles.write(path, tensors, FORMAT, meta)
    old = LinkBreaker.load(path, deep_net)
    assert guard_deep.config.stability_gate == 0.5 and old.config.stability_gate is None
    every = guard_deep.recalibrate(synth["x_val"], synth["y_val"], stability_gate=None)
    assert torch.equal(old(x).verdict, every(x).verdict)
    tensors["stability.gate"] = torch.tensor(-1.0)
    meta["config"]["stability_gate"] = 0.75
    safefiles.write(path, tensors, FORMAT, meta)
    with pytest.raises(ValueError, match="stability.gate must be >= 0"):
        LinkBreaker.load(path, deep_net)


def test_neighbourhood_scores_rank_the_nearest_reference_of_each_head_class():
    """neighbourhood_scores: for head k, log(1 + how many references of other classes are nearer
    than class k's nearest), in head k's own view; a left-out reference never counts, and an input
    that is a reference finds itself only when it is not left out."""
    from linkbreaker_ext.verdict import neighbourhood_scores
    refs = nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]]), dim=-1)
    labels = torch.tensor([0, 0, 1, 1])
    views = torch.stack([refs, refs.flip(1)])  # head 1 sees the features mirrored
    u = torch.tensor([[[1.0, 0.05], [1.0, 0.05]]])  # head 0: among class 0; head 1 (mirrored): not
    assert (neighbourhood_scores(u, views, labels).exp() - 1).round().tolist() == [[0.0, 0.0]]
    u = torch.tensor([[[1.0, 0.05], [0.05, 1.0]]])  # both heads: among class 0
    assert (neighbourhood_scores(u, views, labels).exp() - 1).round().tolist() == [[0.0, 2.0]]
    own = refs[:, None].expand(4, 2, 2)  # the references themselves, head 0's view for both heads
    assert (neighbourhood_scores(own, views[:1].expand(2, 4, 2), labels).exp() - 1).round().tolist() == \
        [[0, 2], [0, 2], [2, 0], [2, 0]]
    left = neighbourhood_scores(own, views[:1].expand(2, 4, 2), labels, leave_out=torch.arange(4))
    assert (left.exp() - 1).round().tolist() == [[0, 1], [0, 1], [1, 0], [1, 0]]
    # two heads sharing one view: the same ranks from one distance matrix
    shared = neighbourhood_scores(own[:, :1], views[:1], labels, row=torch.zeros(2, dtype=torch.long),
                                  leave_out=torch.arange(4))
    assert torch.equal(shared, left)


def test_neighbourhood_scores_match_a_loop_over_heads_and_references():
    """The vectorised ranks (one scatter-min and one comparison per view) equal a plain loop over
    the same distances: for each input and head, count the other classes' references strictly nearer
    than the head's class's nearest, in the head's view; ties (integer features) and left-out
    references included."""
    from linkbreaker_ext.verdict import neighbourhood_scores
    g = torch.Generator().manual_seed(3)
    for trial in range(20):
        v, n, r, b = 1 + trial % 3, 2 + trial % 5, 12 + trial, 6
        labels = torch.cat([torch.arange(n), torch.randint(0, n, (r - n,), generator=g)])
        refs = nn.functional.normalize(torch.randint(-2, 3, (v, r, 3), generator=g).float(), dim=-1)
        units = torch.randint(-2, 3, (b, v, 3), generator=g).float()
        row = torch.randint(0, v, (n,), generator=g)
        left = torch.randint(-1, r, (b,), generator=g)
        # the same distances (cdist's arithmetic decides exact ties), counted one by one
        dist = torch.cdist(nn.functional.normalize(units, dim=-1).transpose(0, 1), refs)  # [v, b, r]
        expected = torch.zeros(b, n)
        for i in range(b):
            for k in range(n):
                d = [float("inf") if j == left[i] else float(dist[row[k], i, j]) for j in range(r)]
                nearest = min(d[j] for j in range(r) if labels[j] == k)
                expected[i, k] = sum(1 for j in range(r) if labels[j] != k and d[j] < nearest)
        got = neighbourhood_scores(units, refs, labels, row, left).exp() - 1
        assert torch.allclose(got, expected, atol=1e-3), trial


def test_rank_test_turns_only_accepted_answers_into_alarms():
    """decide with ``ranks``: an accepted answer whose head's rank ratio exceeds 1 becomes an alarm;
    alarms and answers whose head passes are left as they were; an OOD verdict stays one, its hint
    the most confident head that passes both the veto and the rank test. ``rank_alarm=False``: the
    hints alone."""
    from linkbreaker_ext.verdict import decide
    conf = torch.tensor([[0.9, 0.1, 0.1], [0.9, 0.9, 0.1], [0.2, 0.1, 0.3], [0.1, 0.9, 0.1]])
    th, ratio = torch.full((3,), 0.5), torch.zeros(4, 3)
    ranks = torch.tensor([[2.0, 0.0, 0.0], [2.0, 2.0, 0.0], [0.5, 2.0, 2.0], [3.0, 1.0, 3.0]])
    assert [t.tolist() for t in decide(conf, th, ratio)] == [[0, -1, 2, 1], [ACCEPT, ALARM, OOD, ACCEPT]]
    labels, verdict = decide(conf, th, ratio, ranks=ranks)
    assert labels.tolist() == [-1, -1, 0, 1] and verdict.tolist() == [ALARM, ALARM, OOD, ACCEPT]
    ranks[2] = torch.tensor([2.0, 1.5, 3.0])  # no head passes: the hint is the nearest of them all
    assert decide(conf, th, ratio, ranks=ranks)[0].tolist() == [-1, -1, 1, 1]
    labels, verdict = decide(conf, th, ratio, ranks=ranks, rank_alarm=False)  # the hint alone
    assert labels.tolist() == [0, -1, 1, 1] and verdict.tolist() == [ACCEPT, ALARM, OOD, ACCEPT]
    labels, verdict = decide(conf, th, None, ranks=ranks)  # the paper's test alone, then the rank test
    assert labels.tolist() == [-1, -1, 2, 1] and verdict.tolist() == [ALARM, ALARM, OOD, ACCEPT]


def test_a_fit_with_the_rank_test_equals_its_recalibration(guard_deep, deep_net, synth):
    """``LinkBreaker.fit(..., neighbourhood_quantile=q)`` and a default guard recalibrated with it
    hold the same references, labels, bound and gate, and answer alike (a recalibration is a refit)."""
    fitted = LinkBreaker.fit(deep_net, synth["x_val"], synth["y_val"], NUM_CLASSES, layers=["input", "1", "3"],
                             progress=False, neighbourhood_quantile=0.5, **FAST)
    recal = guard_deep.recalibrate(synth["x_val"], synth["y_val"], neighbourhood_quantile=0.5)
    assert fitted.neighbourhood.keys() == recal.neighbourhood.keys() == {"references", "labels", "bound", "gate"}
    for k in fitted.neighbourhood:
        assert torch.allclose(fitted.neighbourhood[k].float(), recal.neighbourhood[k].float(), atol=1e-6), k
    a, b = fitted(synth["x_test"]), recal(synth["x_test"])
    assert torch.equal(a.labels, b.labels) and torch.equal(a.verdict, b.verdict)


def test_neighbourhood_test_is_a_last_stage_setting(guard_deep, deep_net, synth, tmp_path):
    """The neighbourhood rank test comes by recalibration (no refit): references are every
    validation sample in each head's view, scored leave-one-out for the bound; it only ever turns
    an accepted answer whose head fails it into an alarm (credibility, hints and other verdicts
    stay), and its gate (a quantile of the consistency ratios, as the stability gate) lets more
    answers through; the guard, its serving module and a saved copy decide alike; a file whose
    rank-test tensors contradict its settings or are out of range is refused."""
    from linkbreaker_ext.serving import GuardedModule
    g = torch.Generator().manual_seed(7)
    x = torch.cat([synth["x_test"], (synth["x_test"] + 0.15 * torch.randn(synth["x_test"].shape, generator=g))
                   .clamp(0, 1)])
    xv, yv = synth["x_val"], synth["y_val"]
    # the default fit carries the test; the same guard without it is the baseline
    assert guard_deep.config.neighbourhood_quantile == 0.999 and guard_deep.neighbourhood is not None
    plain = guard_deep.recalibrate(xv, yv, neighbourhood_quantile=None)
    assert plain.neighbourhood is None
    guards = {gate: guard_deep.recalibrate(xv, yv, neighbourhood_quantile=0.5, neighbourhood_gate=gate)
              for gate in (None, 0.5, 1.0)}
    nb = guards[None].neighbourhood
    name = guard_deep.neighbourhood_evidence()
    assert name == guard_deep._profile_layers()[-2]
    views = guard_deep._hidden_masks()[1][0].numel()  # one per distinct row of head masks
    assert nb["references"].shape[:2] == (views, len(yv)) and "gate" not in nb
    assert torch.equal(torch.bincount(nb["labels"], minlength=NUM_CLASSES), torch.bincount(yv, minlength=NUM_CLASSES))
    assert torch.allclose(nb["references"].norm(dim=-1), torch.ones(()))
    assert float(nb["bound"]) >= 0.69 and guards[None].diagnostics["neighbourhood_scores"].shape == (len(yv),)
    # leave one out: a sample whose exact copy carries another label sits among that class (rank
    # >= 1); scored against itself it would be its own nearest reference (rank 0)
    from linkbreaker_ext.fitting import neighbourhood_state
    xx, yy = torch.cat([xv, xv[:5]]), torch.cat([yv, (yv[:5] + 1) % NUM_CLASSES])
    _, (own, _) = neighbourhood_state(guards[None], xx, yy, guards[None].config)
    assert (own[:5] >= 0.69).all() and (own[-5:] >= 0.69).all()
    assert 0 < float(guards[0.5].neighbourhood["gate"]) <= float(guards[1.0].neighbourhood["gate"])
    # the synthetic classes are far apart (every clean input ranks 0): references whose labels are
    # shifted by one class put each input among "other" classes, as a faint trigger's target head
    for gq in guards.values():
        gq.neighbourhood["labels"] = (gq.neighbourhood["labels"] + 1) % NUM_CLASSES
    base = plain(x)
    accepted = {"off": base.verdict == ACCEPT}
    assert base.rank_ratio is None
    for gate, gq in guards.items():
        assert torch.equal(gq.thresholds, plain.thresholds)
        r = gq(x)
        assert torch.equal(r.credibility, base.credibility) and torch.equal(r.confidences, base.confidences)
        labels, verdict, _ = GuardedModule(gq)(x)
        assert torch.equal(labels, r.labels) and torch.equal(verdict, r.verdict)
        # the test only refuses: a verdict it changes was an accepted answer and is now an alarm;
        # other answers stay, and only an OOD verdict's hint may name another head
        moved = r.verdict != base.verdict
        assert (base.verdict[moved] == ACCEPT).all() and (r.verdict[moved] == ALARM).all()
        kept = ~moved & (r.verdict != OOD)
        assert torch.equal(r.labels[kept], base.labels[kept]) and (r.labels[moved] == -1).all()
        failed = r.rank_ratio.gather(1, base.labels.clamp_min(0)[:, None])[:, 0] > 1
        assert torch.equal(moved, failed & (base.verdict == ACCEPT))
        accepted[gate] = r.verdict == ACCEPT
    assert not (accepted[None] & ~accepted[0.5]).any() and not (accepted[0.5] & ~accepted[1.0]).any()
    assert not (accepted[1.0] & ~accepted["off"]).any()
    assert (accepted["off"] & ~accepted[None]).any(), "the rank test refused no answer: degenerate"
    hints = guard_deep.recalibrate(xv, yv, neighbourhood_quantile=0.5, neighbourhood_gate=None,
                                   neighbourhood_alarm=False)
    hints.neighbourhood["labels"] = guards[None].neighbourhood["labels"]
    r = hints(x)
    assert torch.equal(r.verdict, base.verdict)  # no alarm: only OOD verdicts' hints may differ
    assert torch.equal(r.labels[r.verdict != OOD], base.labels[r.verdict != OOD])
    assert torch.equal(GuardedModule(hints)(x)[0], r.labels)
    path = tmp_path / "g.safetensors"
    guards[0.5].save(path)
    loaded = LinkBreaker.load(path, deep_net)
    assert torch.equal(loaded(x).verdict, guards[0.5](x).verdict)
    tensors, meta = _file(path)

    def refused(match, **changes):
        t = dict(tensors, **{k: v for k, v in changes.items() if v is not None})
        for k in [k for k, v in changes.items() if v is None]:
            del t[k]
        safefiles.write(path, t, FORMAT, meta)
        with pytest.raises(ValueError, match=match):
            LinkBreaker.load(path, deep_net)
    labels = tensors["neighbourhood.labels"]
    refused("labels must be int64 class indices", **{"neighbourhood.labels": labels + NUM_CLASSES})
    refused("labels must be int64 class indices", **{"neighbourhood.labels": labels.float()})
    refused("hold every class", **{"neighbourhood.labels": torch.zeros_like(labels)})
    refused("neighbourhood.bound must be > 0", **{"neighbourhood.bound": torch.tensor(0.0)})
    refused("neighbourhood.gate must be >= 0", **{"neighbourhood.gate": torch.tensor(-1.0)})
    refused("lacks the gate", **{"neighbourhood.gate": None})
    refused("neighbourhood.references has shape", **{"neighbourhood.references": tensors["neighbourhood.references"][:, :-1]})
    refs = tensors["neighbourhood.references"]
    refused("views but the heads' masks make", **{"neighbourhood.references": torch.cat([refs, refs])})
    meta["config"]["neighbourhood_quantile"] = None
    refused("neighbourhood_quantile=None but the file has")


# ---------------------------------------------------------------- the neighbour stability test
def _file(path):
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()[FORMAT])


def test_stability_ratio_is_the_fall_of_each_heads_log_odds_to_the_fixed_neighbour(guard_deep, synth):
    """By hand: the neighbour is ``x`` plus the fitted pattern (std ``stability_noise`` times the
    validation range, drawn from the seed), clamped to that range; the ratio is the fall of every
    head's own-class log-odds from ``x`` to it, over the calibrated bound."""
    from linkbreaker_ext.fitting import stability_pattern

    g = guard_deep.recalibrate(synth["x_val"], synth["y_val"], stability_draws=1, **NOISE)  # one pattern
    assert "contrast" not in g.stability  # the default: the same noise for every input
    lo, hi = g.input_range
    noise = g.stability["noise"]
    assert noise.shape == g.input_shape
    assert torch.equal(noise, stability_pattern(g.input_shape, g.config, g.input_range))
    assert noise.std().item() == pytest.approx(g.config.stability_noise * (hi - lo), rel=0.1)
    x = torch.cat([synth["x_test"][:40], add_trigger(synth["x_test"][:8])])
    conf = g.head_confidences(x)[0].double()
    conf_n = g.head_confidences((x + noise).clamp(lo, hi))[0].double()
    # log-odds capped at 1 - 1e-5, below float32's rounding near 1
    logit = lambda c: torch.log(c.clamp(1e-5, 1 - 1e-5)) - torch.log1p(-c.clamp(1e-5, 1 - 1e-5))  # noqa: E731
    want = (logit(conf) - logit(conf_n)) / g.stability["bound"].double()
    torch.testing.assert_close(g.stability_ratios(x).double(), want, rtol=1e-5, atol=1e-5)
    # a bound from the calibration split: clean inputs are (almost all) within it
    assert 0 < g.stability["bound"].item() < 1e30
    clean = g.stability_ratios(synth["x_test"])[torch.arange(len(synth["y_test"])), synth["y_test"]]
    assert (clean <= 1).float().mean() >= 0.9


def test_several_neighbours_judge_the_mean_fall_and_survive_save_and_export(guard_deep, deep_net, synth,
                                                                           tmp_path):
    """With ``stability_draws`` = M, the guard keeps M fixed patterns (the first is the single
    pattern's), a head's fall is the mean of its M falls (by hand), the bound is calibrated on that
    mean, and the saved file, ``as_module`` and a chunked call all give the same answers."""
    from linkbreaker_ext.fitting import stability_pattern
    from linkbreaker_ext.verdict import stability_falls

    one = guard_deep.recalibrate(synth["x_val"], synth["y_val"], stability_draws=1, **NOISE)
    g = guard_deep.recalibrate(synth["x_val"], synth["y_val"], stability_draws=3, **NOISE)
    lo, hi = g.input_range
    noise = g.stability["noise"]
    assert noise.shape == (3, *g.input_shape)
    torch.testing.assert_close(noise[0], stability_pattern(g.input_shape, one.config, g.input_range))
    assert not torch.equal(noise[1], noise[2])
    x = torch.cat([synth["x_test"][:40], add_trigger(synth["x_test"][:8])])
    conf = g.head_confidences(x)[0]
    falls = torch.stack([stability_falls(conf, g.head_confidences((x + n).clamp(lo, hi))[0]) for n in noise])
    want = falls.mean(0) / g.stability["bound"].double()
    ratio = g.stability_ratios(x)
    torch.testing.assert_close(ratio.double(), want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ratio, one.stability_ratios(x) * one.stability["bound"] / g.stability["bound"])
    # chunked (one input per forward: float sums may round differently), saved and loaded, and
    # exported: the same answers
    r = g(x)
    chunked = with_config(g, batch_rows=g.num_heads)(x)
    assert torch.equal(chunked.labels, r.labels) and torch.equal(chunked.verdict, r.verdict)
    torch.testing.assert_close(chunked.stability, r.stability, rtol=1e-4, atol=1e-4)
    path = tmp_path / "g.safetensors"
    g.save(path)
    loaded = LinkBreaker.load(path, deep_net)
    assert loaded.config.stability_draws == 3 and torch.equal(loaded.stability["noise"], noise)
    assert_same_result(loaded(x), r)
    labels, verdict, _ = g.as_module()(x)
    assert torch.equal(labels, r.labels) and torch.equal(verdict, r.verdict)
    # a pattern count that disagrees with the settings is refused, naming the tensor
    tensors, meta = _file(path)
    safefiles.write(path, dict(tensors, **{"stability.noise": noise[:2]}), FORMAT, meta)
    with pytest.raises(safefiles.GuardFileError, match="stability.noise has shape"):
        LinkBreaker.load(path, deep_net)
    with pytest.raises(ValueError, match="stability_draws"):
        GuardConfig(stability_draws=0)


def scaled_neighbour(g, x, noise):
    """By hand: ``x`` plus ``noise`` times min(1, x's pixel std / the guard's reference contrast),
    clamped to the validation range."""
    scale = (x.flatten(1).std(1) / g.stability["contrast"]).clamp(max=1).view(-1, 1, 1, 1)
    return (x + noise * scale).clamp(*g.input_range)


def test_the_neighbour_noise_shrinks_for_inputs_of_low_contrast_and_never_grows(guard_deep, synth):
    """With ``stability_contrast`` = q > 0, the reference contrast is the q quantile of the
    whole validation set's pixel stds; an input of lower contrast gets the patterns scaled down by
    the ratio (by hand), one of higher contrast gets them whole, and the bound is calibrated on
    those neighbours."""
    g = guard_deep.recalibrate(synth["x_val"], synth["y_val"], stability_contrast=0.5, **NOISE)
    fixed = guard_deep.recalibrate(synth["x_val"], synth["y_val"], stability_contrast=0.0, **NOISE)
    ref = torch.quantile(synth["x_val"].flatten(1).std(1), 0.5)
    torch.testing.assert_close(g.stability["contrast"].cpu(), ref)
    x = synth["x_test"][:20]
    flat = 0.5 + 0.2 * (x - x.mean())  # the same images at a fifth of their contrast
    assert (flat.flatten(1).std(1) < ref).all()
    m = g.config.stability_draws
    for xs in (x, flat):
        want = torch.cat([scaled_neighbour(g, xs, n) for n in g.stability["noise"]])
        torch.testing.assert_close(g.neighbour(xs), want)
    high = x[x.flatten(1).std(1) >= ref]
    assert len(high) and torch.equal(g.neighbour(high), fixed.neighbour(high))
    moved = lambda guard, xs: (guard.neighbour(xs).reshape(m, *xs.shape) - xs).abs().mean()  # noqa: E731
    assert moved(g, flat) < 0.5 * moved(fixed, flat)
    # calibrated on those neighbours: the calibration split's falls are the scaled ones'
    drops, fixed_drops = (h.diagnostics["calibration_stability_drops"] for h in (g, fixed))
    assert not torch.equal(drops, fixed_drops)
    assert "contrast" not in fixed.stability


def assert_neighbour_state_round_trips(g, name, path, net, synth):
    """``g.stability[name]`` (what shapes the stability neighbours) is saved and loaded unchanged, the
    loaded guard answers as ``g`` does, and ``as_module`` serves it as the buffer
    ``stability_<name>`` with the same answers."""
    g.save(path)
    loaded = LinkBreaker.load(path, net)
    assert torch.equal(loaded.stability[name], g.stability[name])
    r = g(synth["x_test"])
    assert_same_result(loaded(synth["x_test"]), r)
    module = g.as_module()
    assert torch.equal(getattr(module, f"stability_{name}"), g.stability[name])
    labels, verdict, _ = module(synth["x_test"])
    assert torch.equal(labels, r.labels) and torch.equal(verdict, r.verdict)


def assert_tampered_neighbour_state_is_refused(path, net, name, bad_value, bad_match, missing_match):
    """The saved guard at ``path`` with ``stability.<name>`` replaced by ``bad_value(tensor)``, and
    without it, is refused with errors matching ``bad_match`` and ``missing_match``."""
    tensors, meta = _file(path)
    key = f"stability.{name}"
    safefiles.write(path, dict(tensors, **{key: bad_value(tensors[key])}), FORMAT, meta)
    with pytest.raises(safefiles.GuardFileError, match=bad_match):
        LinkBreaker.load(path, net)
    safefiles.write(path, {k: v for k, v in tensors.items() if k != key}, FORMAT, meta)
    with pytest.raises(safefiles.GuardFileError, match=missing_match):
        LinkBreaker.load(path, net)


def test_a_saved_reference_contrast_round_trips_and_a_bad_one_is_refused(guard_deep, deep_net, synth,
                                                                        tmp_path):
    """The reference contrast is saved, loaded and served (``as_module``) with the same answers; a
    file whose reference is not positive, or that lacks it while its settings name one, is refused."""
    g = guard_deep.recalibrate(synth["x_val"], synth["y_val"], stability_contrast=0.5)
    path = tmp_path / "g.safetensors"
    assert_neighbour_state_round_trips(g, "contrast", path, deep_net, synth)
    assert_tampered_neighbour_state_is_refused(path, deep_net, "contrast", lambda t: torch.tensor(0.0),
                                               "stability.contrast must be > 0", "lacks the reference contrast")
    with pytest.raises(ValueError, match="stability_contrast"):
        GuardConfig(stability_contrast=1.5)


def test_median_filter_takes_each_windows_median_and_removes_thin_lines():
    """By hand: each output pixel is the median of its size x size window, edges repeated, per
    channel; a one-pixel line on a flat image disappears, a 3x3 block's inside stays."""
    from linkbreaker_ext.verdict import median_filter

    x = torch.rand(2, 3, 7, 9, generator=torch.Generator().manual_seed(0))
    for size in (3, 5):
        r = size // 2
        padded = torch.nn.functional.pad(x, (r, r, r, r), mode="replicate")
        want = torch.stack([torch.stack([padded[:, :, i:i + size, j:j + size].flatten(2).median(2).values
                                         for j in range(9)], -1) for i in range(7)], -2)
        torch.testing.assert_close(median_filter(x, size), want, rtol=0, atol=0)
    img = torch.zeros(1, 1, 8, 8)
    img[0, 0, 5, :] = 1.0           # a thin line
    img[0, 0, 0:3, 0:3] = 1.0       # a block
    out = median_filter(img, 3)
    assert out[0, 0, 5].abs().max() == 0 and out[0, 0, 1, 1] == 1


def test_the_3x3_selection_network_equals_the_sorted_median():
    """The guard's 3x3 filter is a network of min/max pairs; the reference sorts every window. They
    agree exactly on all 512 binary windows (which, by the 0-1 principle, proves the network for
    every input), on ties and on random images in each floating dtype, edges included."""
    from linkbreaker_ext.verdict import _median3, median_filter_reference

    bits = torch.arange(512)[:, None].bitwise_right_shift(torch.arange(9)).bitwise_and(1).float()
    windows = bits.view(512, 1, 3, 3)  # each pattern as a 3x3 image: its centre sees the whole window
    assert torch.equal(_median3(windows)[:, 0, 1, 1], bits.median(1).values)
    assert torch.equal(_median3(windows), median_filter_reference(windows, 3))
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        for x in (torch.rand(4, 3, 9, 11, generator=g), torch.randint(0, 3, (4, 1, 6, 5), generator=g) / 2.0):
            x = x.to(dtype)
            assert torch.equal(_median3(x), median_filter_reference(x, 3)), dtype


def test_the_filtered_neighbour_joins_the_stability_ratio_and_round_trips(guard_deep, deep_net, synth, tmp_path):
    """``stability_median=3`` adds one neighbour, the input through a 3x3 median filter, with its own
    bound from the calibration split by the jitter's rule: a head's stability ratio becomes the
    larger of its jitter ratio and its filtered fall over that bound (by hand), nothing else the
    recalibration sets changes, and the bound is saved, loaded and served (``as_module``) with the
    same answers. A file without it (or with a bound <= 0) is refused, and so are settings the
    filter cannot run with."""
    from linkbreaker_ext.verdict import decide, median_filter, stability_falls

    g = guard_deep.recalibrate(synth["x_val"], synth["y_val"], stability_median=3)
    assert "median_bound" not in guard_deep.stability
    assert torch.equal(g.thresholds, guard_deep.thresholds)
    assert torch.equal(g.stability["bound"], guard_deep.stability["bound"])
    assert g.stability["median_bound"].item() >= g.config.stability_floor
    assert g.diagnostics["calibration_median_drops"].shape == (len(g.diagnostics["calibration_labels"]), NUM_CLASSES)
    x = torch.cat([synth["x_test"][:40], add_trigger(synth["x_test"][:8])])
    conf = g.head_confidences(x)[0]
    filtered = stability_falls(conf, g.head_confidences(median_filter(x, 3))[0]) / g.stability["median_bound"].double()
    want = torch.maximum(guard_deep.stability_ratios(x), filtered.float())
    torch.testing.assert_close(g.stability_ratios(x), want, rtol=1e-6, atol=1e-6)
    assert (filtered.float() > guard_deep.stability_ratios(x)).any()  # the filter does judge some heads
    r = g(x)  # the result carries the filtered ratios apart, each neighbour under its own gate
    torch.testing.assert_close(r.filtered, filtered.float(), rtol=1e-6, atol=1e-6)
    assert guard_deep(x).filtered is None
    # the filter's gate: the rank test's quantile (0.9) of the same pool, above the jitter's (0.5)
    assert g.config.stability_median_gate == g.config.neighbourhood_gate == 0.9
    assert torch.equal(g.stability["median_gate"], g.neighbourhood["gate"])
    assert g.stability["median_gate"] > g.stability["gate"]
    judged = filtered.float().masked_fill(r.consistency <= g.stability["median_gate"], 0.0)
    torch.testing.assert_close(r.filtered_judged, judged)
    jitter = r.stability.masked_fill(r.consistency <= g.stability["gate"], 0.0)
    torch.testing.assert_close(r.credibility, torch.maximum(r.consistency, torch.maximum(jitter, judged)))
    assert ((filtered.float() > 0) & (judged == 0)).any() and (judged > 0).any()  # the gate acts
    labels, verdict = decide(r.confidences, r.thresholds, r.credibility, g.config.inconsistent_verdict,
                             g.config.ood_hint, g.config.alarm_margin, r.rank_ratio,
                             g.config.neighbourhood_alarm, judged)
    assert torch.equal(labels, r.labels) and torch.equal(verdict, r.verdict)  # the hint reads it gated
    every = g.recalibrate(synth["x_val"], synth["y_val"], stability_median_gate=None)
    assert "median_gate" not in every.stability
    torch.testing.assert_close(every(x).filtered_judged, r.filtered)  # None: the filter judges every head
    path = tmp_path / "g.safetensors"
    assert_neighbour_state_round_trips(g, "median_bound", path, deep_net, synth)
    assert LinkBreaker.load(path, deep_net).config.stability_median == 3
    assert_tampered_neighbour_state_is_refused(path, deep_net, "median_bound", lambda t: torch.tensor(0.0),
                                               "stability.median_bound must be > 0",
                                               "lacks the filtered neighbour's bound")
    assert_neighbour_state_round_trips(g, "median_gate", path, deep_net, synth)
    assert_tampered_neighbour_state_is_refused(path, deep_net, "median_gate", lambda t: torch.tensor(-1.0),
                                               "stability.median_gate must be >= 0",
                                               "lacks the filtered neighbour's gate")
    every.save(path)
    assert "stability.median_gate" not in _file(path)[0]
    assert_same_result(LinkBreaker.load(path, deep_net)(x), every(x))
    for bad, why in ((2, "odd integer"), (True, "odd integer"), (-3, "odd integer")):
        with pytest.raises(ValueError, match=f"stability_median.*{why}"):
            GuardConfig(stability_median=bad)
    with pytest.raises(ValueError, match="stability_median.*needs the stability test"):
        GuardConfig(stability_median=3, **NO_STABILITY)
    with pytest.raises(ValueError, match=r"stability_median=3 filters images .* these inputs are \[144\]"):
        fitting.check_median_inputs(GuardConfig(stability_median=3), (144,))
    with pytest.raises(ValueError, match="stability_median=15 filters images"):  # larger than 12x12
        guard_deep.recalibrate(synth["x_val"], synth["y_val"], stability_median=15)


def test_a_filtered_neighbour_saved_before_its_own_gate_loads_under_the_stability_gate(guard_deep, deep_net,
                                                                                      synth, tmp_path):
    """A file from session 40 (``stability_median`` without ``stability_median_gate`` or its tensor)
    keeps the meaning it had: the filter judged under the stability test's gate."""
    g = guard_deep.recalibrate(synth["x_val"], synth["y_val"], stability_median=3)
    path = tmp_path / "g.safetensors"
    g.save(path)
    tensors, meta = _file(path)
    del meta["config"]["stability_median_gate"]
    safefiles.write(path, {k: v for k, v in tensors.items() if k != "stability.median_gate"}, FORMAT, meta)
    old = LinkBreaker.load(path, deep_net)
    assert old.config.stability_median_gate == g.config.stability_gate
    assert torch.equal(old.stability["median_gate"], g.stability["gate"])
    then = g.recalibrate(synth["x_val"], synth["y_val"], stability_median_gate=g.config.stability_gate)
    assert_same_result(old(synth["x_test"]), then(synth["x_test"]))
    # a cached report from then is stale under today's gate, one without the filter is not
    from linkbreaker_ext.reproduce import recorded_config
    record = {k: v for k, v in meta["config"].items() if k != "seed"}
    assert recorded_config(record, 0)["stability_median_gate"] == g.config.stability_gate
    plain = dict(record, stability_median=0)
    assert recorded_config(plain, 0)["stability_median_gate"] == GuardConfig().stability_median_gate


def test_reports_ablate_the_filtered_neighbour_to_the_guard_without_it(guard_deep, deep_net, synth):
    """A report of a guard with ``stability_median`` carries ``after_without_filtered_neighbour``:
    the same forward passes decided without the filter's veto and hint rule, which is exactly the
    guard recalibrated without it (the same thresholds and bounds); a guard without the filter has
    no such row."""
    from linkbreaker_ext import experiment

    g = guard_deep.recalibrate(synth["x_val"], synth["y_val"], stability_median=3)
    args = (None, synth["x_test"], synth["y_test"], 80, 60)
    with_filter, _ = experiment.evaluate(deep_net, g, *args)
    without, _ = experiment.evaluate(deep_net, guard_deep, *args)
    assert "after_without_filtered_neighbour" not in without
    assert with_filter["after_without_filtered_neighbour"] == without["after"]
    assert with_filter["after_without_stability"] == without["after_without_stability"]


def test_jittered_neighbours_resample_the_input_through_fixed_grids(guard_deep, synth):
    """With ``stability_jitter`` = a > 0, the m-th neighbour is the input resampled (bilinear, edges
    repeated) through the m-th fixed grid, every pixel moved by at most a pixels per axis, then its
    noise pattern added (by hand, and a whole-pixel grid reproduces a shifted image); the grids come
    from the seed, and the bound is calibrated on these neighbours."""
    g = guard_deep.recalibrate(synth["x_val"], synth["y_val"], stability_jitter=0.5, stability_noise=0.05)
    plain = guard_deep.recalibrate(synth["x_val"], synth["y_val"], **NOISE)
    _, h, w = SHAPE
    m = g.config.stability_draws
    grids = g.stability["jitter"].cpu()
    assert grids.shape == (m, h, w, 2) and "jitter" not in plain.stability
    gy, gx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    moved = (grids - torch.stack([gx, gy], -1)) * torch.tensor([(w - 1) / 2, (h - 1) / 2])
    assert moved.abs().max() <= 0.5 + 1e-5 and moved.abs().mean() > 0.1  # pixels
    x = synth["x_test"][:20]
    want = torch.cat([(torch.nn.functional.grid_sample(x, grid.expand(len(x), -1, -1, -1), mode="bilinear",
                                                       padding_mode="border", align_corners=True)
                       + n).clamp(*g.input_range) for grid, n in zip(grids, g.stability["noise"].cpu())])
    torch.testing.assert_close(g.neighbour(x).cpu(), want)
    # a grid moving every pixel by exactly one to the right reads each pixel's left neighbour
    one = (torch.stack([gx, gy], -1) - torch.tensor([2 / (w - 1), 0.0])).clamp(-1, 1)
    shifted = neighbour(x, torch.zeros(1, *SHAPE), None, None, one[None])
    torch.testing.assert_close(shifted[..., 1:], x[..., :-1])
    assert torch.equal(g.stability["jitter"], guard_deep.stability["jitter"])  # from the seed
    assert not torch.equal(g.diagnostics["calibration_stability_drops"],
                           plain.diagnostics["calibration_stability_drops"])
    # the jitter alone makes a stability test, without noise: the default
    assert (guard_deep.config.stability_jitter, guard_deep.config.stability_noise) == (0.5, 0.0)
    assert guard_deep.config.stability_test and guard_deep(x).stability is not None
    assert not torch.equal(guard_deep.stability_ratios(x), g.stability_ratios(x))
    assert not guard_deep.recalibrate(synth["x_val"], synth["y_val"], **NO_STABILITY).config.stability_test


def test_jitter_grids_round_trip_and_bad_ones_are_refused(guard_deep, deep_net, synth, tmp_path):
    """The grids are saved, loaded and served (``as_module``) with the same answers; a file whose
    grids leave [-1, 1], or that lacks them while its settings name a jitter, is refused; inputs
    that are not images cannot be jittered."""
    g = guard_deep.recalibrate(synth["x_val"], synth["y_val"], stability_jitter=0.5)
    path = tmp_path / "g.safetensors"
    assert_neighbour_state_round_trips(g, "jitter", path, deep_net, synth)
    assert_tampered_neighbour_state_is_refused(path, deep_net, "jitter", lambda t: 1.5 * t,
                                               "must lie in \\[-1, 1\\]", "lacks the displacement grids")
    with pytest.raises(ValueError, match="stability_jitter"):
        GuardConfig(stability_jitter=-1.0)
    with pytest.raises(ValueError, match="stability_jitter=0.5 resamples images"):
        fitting.jitter_grids((10,), GuardConfig(stability_jitter=0.5))


def test_the_default_neighbour_falls_back_to_noise_on_inputs_that_are_not_images(synth, tmp_path):
    """The default jitter resamples images only: a guard fitted with the defaults on flat inputs
    warns, runs the stability test on the noise neighbour instead (std NON_IMAGE_NOISE, no grids),
    records that in its config, and saves and loads as such; images keep the jitter."""
    from linkbreaker_ext.config import NON_IMAGE_NOISE
    from linkbreaker_ext.fitting import neighbour_for_inputs

    flat_x = {k: synth[k].flatten(1) for k in ("x_train", "x_val", "x_test")}
    mlp = _train(lambda: nn.Sequential(nn.Linear(144, 16), nn.ReLU(), nn.Linear(16, NUM_CLASSES)),
                 flat_x["x_train"], synth["y_train"])
    with pytest.warns(UserWarning, match=r"resamples images \[C, H, W\]; these inputs are \[144\]"):
        g = fit(mlp, flat_x["x_val"], synth["y_val"])
    assert (g.config.stability_jitter, g.config.stability_noise) == (0.0, NON_IMAGE_NOISE)
    assert g.config.stability_test and "jitter" not in g.stability and g.stability["noise"].shape == (4, 144)
    r = g(flat_x["x_test"])
    assert r.stability is not None and (r.labels == synth["y_test"]).float().mean() >= 0.8
    g.save(tmp_path / "g.safetensors")
    loaded = LinkBreaker.load(tmp_path / "g.safetensors", mlp)
    assert loaded.config == g.config
    assert_same_result(loaded(flat_x["x_test"]), r)
    # a noise std the user set is kept; images, and a config without jitter, pass unchanged
    cfg = GuardConfig(stability_noise=0.02)
    with pytest.warns(UserWarning):
        assert neighbour_for_inputs(cfg, (144,)).stability_noise == 0.02
    for cfg, shape in ((GuardConfig(), SHAPE), (GuardConfig(**NOISE), (144,)), (GuardConfig(), (1, 1, 144))):
        if shape == (1, 1, 144):  # an image one pixel high cannot be resampled either
            with pytest.warns(UserWarning):
                assert neighbour_for_inputs(cfg, shape).stability_jitter == 0.0
        else:
            assert neighbour_for_inputs(cfg, shape) is cfg


def test_stability_test_turns_away_an_input_whose_neighbour_is_another_class(guard_deep, synth):
    """An input its head accepts is answered with the alarm once its neighbour (here: a pattern that
    moves it onto an image of another class) no longer supports that head, and only because of the
    stability test (the same guard with the test off accepts it)."""
    g = with_config(guard_deep, stability_draws=1, **NOISE)  # one noise pattern, set by hand below
    x, y = synth["x_test"], synth["y_test"]
    r = guard_deep(x)
    i = int(((r.verdict == ACCEPT) & (r.labels == y)).nonzero()[0])
    j = int((y != y[i]).nonzero()[0])
    g.stability = {"noise": (x[j] - x[i]).to(g.device), "bound": guard_deep.stability["bound"]}
    assert g(x[i:i + 1]).verdict.item() == ALARM
    assert g.stability_ratios(x[i:i + 1])[0, y[i]] > 1
    off = with_config(g, **NO_STABILITY)(x[i:i + 1])
    assert off.verdict.item() == ACCEPT and off.labels.item() == y[i]


def test_stability_test_round_trips_and_refuses_tampered_files(guard_deep, deep_net, synth, tmp_path):
    path = tmp_path / "g.safetensors"
    guard_deep.save(path)
    loaded = LinkBreaker.load(path, deep_net)
    assert torch.equal(loaded.stability["noise"], guard_deep.stability["noise"])
    assert_same_result(loaded(synth["x_test"][:32]), guard_deep(synth["x_test"][:32]))
    tensors, meta = _file(path)
    # a bound <= 0 would turn the test upside down
    safefiles.write(path, dict(tensors, **{"stability.bound": torch.tensor(-1.0)}), FORMAT, meta)
    with pytest.raises(safefiles.GuardFileError, match="stability.bound must be > 0"):
        LinkBreaker.load(path, deep_net)
    # settings that ask for the test, without its tensors
    safefiles.write(path, {k: v for k, v in tensors.items() if not k.startswith("stability.")}, FORMAT, meta)
    with pytest.raises(safefiles.GuardFileError, match="lacks the stability test's tensors"):
        LinkBreaker.load(path, deep_net)
    safefiles.write(path, dict(tensors, **{"stability.noise": torch.zeros(3)}), FORMAT, meta)
    with pytest.raises(safefiles.GuardFileError, match="stability.noise has shape"):
        LinkBreaker.load(path, deep_net)


def test_a_file_from_before_the_stability_test_loads_without_it(guard_deep, deep_net, synth, tmp_path):
    """A guard saved before ``stability_noise`` existed has no pattern: it loads with the test off and
    answers as it did; recalibrating it with today's default adds the test."""
    path = tmp_path / "g.safetensors"
    guard_deep.save(path)
    tensors, meta = _file(path)
    for field in ("stability_noise", "stability_jitter", "stability_quantile"):
        del meta["config"][field]
    safefiles.write(path, {k: v for k, v in tensors.items() if not k.startswith("stability.")}, FORMAT, meta)
    old = LinkBreaker.load(path, deep_net)
    assert old.config.stability_test is False and old.stability is None
    x = synth["x_test"][:48]
    assert_same_result(old(x), with_config(guard_deep, **NO_STABILITY)(x))
    assert old.config.stability_quantile is None  # the bound rule of that time
    new = old.recalibrate(synth["x_val"], synth["y_val"], stability_noise=GuardConfig().stability_noise,
                          stability_jitter=GuardConfig().stability_jitter,
                          stability_quantile=GuardConfig().stability_quantile)
    assert_same_result(new(x), guard_deep(x))


def test_a_file_from_before_the_bound_pool_options_keeps_its_calibration_split_bounds(
        guard_deep, deep_net, synth, tmp_path):
    """A guard saved before ``consistency_split`` and ``consistency_quantile`` existed was calibrated
    on its calibration split without a floor: it loads with those values (so a recalibration that
    changes something else keeps them), and a recalibration to today's defaults gives today's guard."""
    path = tmp_path / "g.safetensors"
    old_style = guard_deep.recalibrate(synth["x_val"], synth["y_val"], consistency_split="calibration",
                                       consistency_quantile=None)
    old_style.save(path)
    tensors, meta = _file(path)
    for field in ("consistency_split", "consistency_quantile"):
        del meta["config"][field]
    safefiles.write(path, tensors, FORMAT, meta)
    old = LinkBreaker.load(path, deep_net)
    assert old.config.consistency_split == "calibration" and old.config.consistency_quantile is None
    again = old.recalibrate(synth["x_val"], synth["y_val"], mad_k=old.config.mad_k)
    torch.testing.assert_close(again.profile["norms"], old_style.profile["norms"])
    new = old.recalibrate(synth["x_val"], synth["y_val"], consistency_split="all",
                          consistency_quantile=GuardConfig().consistency_quantile)
    torch.testing.assert_close(new.profile["norms"], guard_deep.profile["norms"])
    assert not torch.allclose(old.profile["norms"], guard_deep.profile["norms"])


def test_stability_bound_rules_on_hand_made_falls():
    """The bound is the median fall + k MADs of the confident calibration samples ("mad"), capped
    at the largest fall + margin MADs ("tail"), at least the floor; unconfident samples do not count,
    and with none confident nothing is turned away."""
    from linkbreaker_ext.verdict import log_odds

    falls = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 30.0])  # the last sample is not confident
    conf = torch.full((6, 2), 0.9)
    conf[5, 0] = 0.2
    y = torch.zeros(6, dtype=torch.long)
    conf_n = torch.sigmoid(log_odds(conf) - torch.stack([falls, falls], 1)).float()
    thresholds = torch.tensor([0.5, 0.5])
    med, mad = 1.0, 1.4826 * 0.5  # of the five confident falls
    mad_rule = calibrate.stability_bound(conf, conf_n, y, thresholds, mad_k=4.0)
    assert mad_rule.item() == pytest.approx(med + 4.0 * mad, rel=1e-4)
    tail = calibrate.stability_bound(conf, conf_n, y, thresholds, mad_k=4.0, margin=0.5)
    assert tail.item() == pytest.approx(2.0 + 0.5 * mad, rel=1e-4)
    flat = torch.full((6, 2), 0.9)  # no fall at all: the floor
    assert calibrate.stability_bound(flat, flat, y, thresholds, 4.0).item() == pytest.approx(calibrate.STABILITY_FLOOR)
    nobody = calibrate.stability_bound(conf, conf_n, y, torch.tensor([0.99, 0.99]), 4.0)
    assert nobody.item() == pytest.approx(calibrate.NO_BOUND)
    # a quantile floor leaves a bell-shaped spread to the MAD rule ...
    assert calibrate.stability_bound(conf, conf_n, y, thresholds, 4.0, quantile=0.9).item() == \
        pytest.approx(mad_rule.item())


def test_stability_bound_quantile_caps_clean_refusals_on_heavy_tailed_falls():
    """Most confident falls near 0 and a few large ones (GTSRB's shape): the MAD rule alone would
    refuse all of the tail; with ``quantile`` q the bound is the q-quantile of those falls, so at
    most about 1 - q of them are refused."""
    from linkbreaker_ext.verdict import log_odds

    falls = torch.cat([torch.linspace(0.0, 0.2, 16), torch.tensor([1.0, 2.0, 4.0, 8.0])])
    conf = torch.full((20, 1), 0.9)
    conf_n = torch.sigmoid(log_odds(conf) - falls[:, None]).float()
    y, thresholds = torch.zeros(20, dtype=torch.long), torch.tensor([0.5])
    mad_rule = calibrate.stability_bound(conf, conf_n, y, thresholds, 4.25, floor=0.0)
    assert mad_rule.item() < 1.0  # every tail sample would be refused
    q = calibrate.stability_bound(conf, conf_n, y, thresholds, 4.25, floor=0.0, quantile=0.9)
    assert q.item() == pytest.approx(torch.quantile(falls.double(), 0.9).item(), rel=1e-3)
    assert (falls > q).float().mean().item() <= 0.1 + 1e-6
    top = calibrate.stability_bound(conf, conf_n, y, thresholds, 4.25, floor=0.0, quantile=1.0)
    assert top.item() == pytest.approx(8.0, rel=1e-3)  # q = 1: the largest confident fall
    with pytest.raises(ValueError, match="stability_quantile"):
        GuardConfig(stability_quantile=1.5)


def test_stability_bound_quantile_rule_ignores_the_mad_and_averages_several_neighbours():
    """``mad_k=None`` ("quantile"): the bound is the quantile of the confident falls even where the
    MAD rule is looser (a long right tail), at least the floor; with ``[M, n, K]`` neighbours the
    falls are the mean of the M falls; the rule cannot run without a quantile."""
    from linkbreaker_ext.verdict import log_odds

    falls = torch.cat([torch.linspace(0.0, 2.0, 18), torch.tensor([6.0, 9.0])])
    conf = torch.full((20, 1), 0.9)
    y, thresholds = torch.zeros(20, dtype=torch.long), torch.tensor([0.5])
    # two neighbours whose falls are falls -/+ 1: their mean is `falls`
    near = torch.stack([torch.sigmoid(log_odds(conf) - (falls + d)[:, None]).float() for d in (-1.0, 1.0)])
    q = calibrate.stability_bound(conf, near, y, thresholds, None, floor=0.0, quantile=0.9)
    assert q.item() == pytest.approx(torch.quantile(falls.double(), 0.9).item(), rel=1e-3)
    mad_rule = calibrate.stability_bound(conf, near, y, thresholds, 4.25, floor=0.0, quantile=0.9)
    assert mad_rule.item() > q.item() + 0.5
    assert calibrate.stability_bound(conf, near, y, thresholds, None, floor=5.0, quantile=0.9).item() == 5.0
    with pytest.raises(ValueError, match="needs a quantile"):
        calibrate.stability_bound(conf, near, y, thresholds, None)
    with pytest.raises(ValueError, match="stability_quantile"):
        GuardConfig(stability_bound="quantile", stability_quantile=None)


def test_consistency_peak_reads_each_evidence_twice(guard_deep, deep_net, synth, tmp_path):
    """``consistency_peak``: every evidence is also read as the largest robust z-score among class
    k's salient neurons, within its own calibrated bound; the mean readings stay as they were."""
    x = synth["x_test"][:32]
    peak = guard_deep.recalibrate(synth["x_val"], synth["y_val"], consistency_peak="all")
    names = guard_deep._profile_layers()
    maxima = [n for n in names if n.endswith("@max")]
    assert maxima and len(maxima) < len(names)
    assert readings(names, "max") == [(n, "mean") for n in names] + [(n, "peak") for n in maxima]
    assert guard_deep.readings() == [(n, "mean") for n in names]
    assert peak.readings() == [(n, "mean") for n in names] + [(n, "peak") for n in names]
    assert peak.profile["norms"].shape == (NUM_CLASSES, 2 * len(names))
    base, both = guard_deep.deviations(x, by_layer=True), peak.deviations(x, by_layer=True)
    assert both.shape == (32, NUM_CLASSES, 2 * len(names))
    # the mean readings keep their deviations; their bounds are recalibrated from the same samples
    # and only the norms' scale differs, so the columns are proportional per class
    unscaled = both[..., :len(names)] * peak.profile["norms"][:, :len(names)]
    torch.testing.assert_close(unscaled, base * guard_deep.profile["norms"], rtol=1e-4, atol=1e-5)
    # a peak column is the largest salient z-score over the head's own view, over its norm
    _, _, _, units_ = peak.head_confidences(x, with_units=True)
    i, name = len(names) - 1, names[-1]
    z = (units_[name] - peak.profile[f"center.{name}"]).abs() / peak.profile[f"scale.{name}"]
    z = z.masked_fill(peak.profile[f"weight.{name}"] <= 0, 0).amax(-1)
    torch.testing.assert_close(both[..., len(names) + i], z / peak.profile["norms"][:, len(names) + i])
    # the peak is never below the weighted mean of the same z-scores: it can only add vetoes
    mean_z = both[..., i] * peak.profile["norms"][:, i]
    assert bool((z >= mean_z - 1e-5).all())
    # saved and loaded, the guard keeps its readings and answers
    peak.save(tmp_path / "peak.safetensors")
    loaded = LinkBreaker.load(tmp_path / "peak.safetensors", deep_net)
    assert loaded.readings() == peak.readings()
    assert torch.equal(loaded(x).verdict, peak(x).verdict)
    with pytest.raises(ValueError, match="consistency_peak"):
        GuardConfig(consistency_peak=True)
