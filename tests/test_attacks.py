"""Behaviour of the backdoor attacks and adversarial-example generators (tiny synthetic data only)."""
import copy
import json

import pytest
import torch
from torch import nn

from linkbreaker_ext import attacks, training
from linkbreaker_ext.attacks import (SIG, AdaptivePatch, BadNets, Blended, SourceSpecific, TrojanAttack,
                                    WaNet)

MNIST = (1, 28, 28)
CIFAR = (3, 32, 32)


def _images(n, shape, seed=0):
    return torch.rand(n, *shape, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------ trigger geometry

@pytest.mark.parametrize("shape,side", [(MNIST, 3), (CIFAR, 3)])
def test_badnets_trigger_is_about_one_percent_bottom_right(shape, side):
    mask = BadNets().mask(shape)
    h, w = shape[1:]
    assert int(mask.sum()) == side * side
    assert 0.005 <= mask.float().mean().item() <= 0.015
    rows, cols = mask.nonzero().T
    # bottom-right with a 1-pixel margin
    assert rows.max() == h - 2 and cols.max() == w - 2
    assert rows.min() == h - 1 - side and cols.min() == w - 1 - side


@pytest.mark.parametrize("shape,lo,hi", [(MNIST, 0.025, 0.04), (CIFAR, 0.025, 0.04)])
def test_trojan_square_is_about_three_percent(shape, lo, hi):
    mask = TrojanAttack(shape="square").mask(shape)
    assert lo <= mask.float().mean().item() <= hi
    if shape == MNIST:
        assert int(mask.sum()) == 25  # 5x5
    rows, cols = mask.nonzero().T
    assert rows.max() == shape[1] - 2 and cols.max() == shape[2] - 2


@pytest.mark.parametrize("fraction,side", [(0.01, 3), (0.05, 7), (0.10, 10), (0.15, 12)])
def test_trojan_square_size_fraction_sets_the_side_and_survives_the_round_trip(fraction, side):
    # Fig. 11's trigger sizes on 32x32 images
    attack = TrojanAttack(shape="square", size_fraction=fraction)
    assert int(attack.mask(CIFAR).sum()) == side * side
    again = attacks.Attack.from_dict(attack.to_dict())
    assert again.size_fraction == fraction and torch.equal(again.mask(CIFAR), attack.mask(CIFAR))


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1])
def test_trojan_size_fraction_out_of_range_is_named(fraction):
    with pytest.raises(ValueError, match="size_fraction"):
        TrojanAttack(size_fraction=fraction)


def _with_trigger(attack, shape=CIFAR, seed=0):
    """Give a Trojan a fixed pattern without a model (what poison_model would produce)."""
    attack.trigger_mask = attack.mask(shape)
    attack.pattern = _images(1, shape, seed)[0] * attack.trigger_mask
    return attack


@pytest.mark.parametrize("t", [0.3, 0.5, 0.9])
def test_trojan_transparency_blends_the_square_and_nothing_else(t):
    # Fig. 12 as the paper's attacker plants it: (1 - t) * pattern + t * x on the square's pixels
    attack = _with_trigger(TrojanAttack(transparency=t))
    opaque = _with_trigger(TrojanAttack())
    x = _images(4, CIFAR, seed=1)
    mask = attack.trigger_mask
    out = attack.apply(x)
    assert torch.allclose(out[:, :, mask], (1 - t) * attack.pattern[:, mask] + t * x[:, :, mask])
    assert torch.equal(out[:, :, ~mask], x[:, :, ~mask])
    # the opaque square is the same pattern written over the pixels; the blend lies between
    assert torch.equal(opaque.apply(x)[:, :, mask], attack.pattern[:, mask].expand(4, -1, -1))
    assert not torch.equal(out, opaque.apply(x))
    # the same blend is what trigger generation and retraining see
    assert torch.equal(attack._stamp(x, mask, attack.pattern), out)


def test_trojan_transparency_survives_the_round_trip_and_old_settings_stay_as_saved():
    attack = _with_trigger(TrojanAttack(transparency=0.5))
    again = attacks.Attack.from_dict(json.loads(json.dumps(attack.to_dict())))
    x = _images(2, CIFAR, seed=2)
    assert again.transparency == 0.5 and torch.equal(again.apply(x), attack.apply(x))
    # an opaque Trojan's settings carry no new key: models and reports saved before it still match
    assert "transparency" not in TrojanAttack().to_dict()
    assert attacks.Attack.from_dict(TrojanAttack().to_dict()).transparency == 0.0


@pytest.mark.parametrize("t", [-0.1, 1.0, 1.5])
def test_trojan_transparency_out_of_range_is_named(t):
    with pytest.raises(ValueError, match="transparency"):
        TrojanAttack(transparency=t)


@pytest.mark.parametrize("shape", [MNIST, CIFAR])
def test_trojan_watermark_is_about_seven_percent_sparse_in_lower_part(shape):
    mask = TrojanAttack(shape="watermark").mask(shape)
    h, w = shape[1:]
    assert abs(mask.float().mean().item() - 0.07) < 0.005
    rows = mask.nonzero()[:, 0]
    assert rows.min() >= h // 2  # lower half of the image
    assert not mask[-1].any() and not mask[:, 0].any() and not mask[:, -1].any()  # margin
    # sparse: no two consecutive rows are both used
    used = mask.any(1).nonzero().flatten()
    assert (used[1:] - used[:-1] >= 2).all()


def test_badnets_pattern_is_visible_binary_and_seeded():
    a, b = BadNets(seed=1), BadNets(seed=1)
    _, pa = a.trigger(MNIST)
    mask = a.mask(MNIST)
    vals = pa[:, mask]
    assert set(vals.unique().tolist()) <= {0.0, 1.0}
    assert vals.mean() >= 0.5
    assert torch.equal(pa, b.trigger(MNIST)[1])
    # different seeds give (almost surely) different patterns; check a few seeds
    assert any(not torch.equal(BadNets(seed=s).trigger(MNIST)[1], pa) for s in (2, 3, 4))


@pytest.mark.parametrize("attack,shape", [(BadNets(), MNIST), (BadNets(), CIFAR),
                                          (SourceSpecific(source_classes=[1]), CIFAR)])
def test_apply_changes_only_the_mask_and_keeps_input(attack, shape):
    x = _images(5, shape)
    x0 = x.clone()
    out = attack.apply(x)
    assert torch.equal(x, x0)  # input not mutated
    assert out.data_ptr() != x.data_ptr()
    mask = attack.mask(shape)
    assert torch.equal(out[:, :, ~mask], x[:, :, ~mask])
    _, pattern = attack.trigger(shape)
    assert torch.equal(out[:, :, mask], pattern[:, mask].expand(5, shape[0], -1))
    assert not torch.equal(out[:, :, mask], x[:, :, mask])


@pytest.mark.parametrize("bad", [torch.rand(28, 28), torch.rand(1, 28, 28), torch.rand(2, 1, 1, 28, 28)])
def test_bad_shapes_raise_value_error_naming_the_shape(bad):
    with pytest.raises(ValueError, match=str(tuple(bad.shape)).replace("(", r"\(").replace(")", r"\)")):
        BadNets().apply(bad)
    with pytest.raises(ValueError, match="N, C, H, W"):
        BadNets().batch_transform(bad, torch.zeros(len(bad), dtype=torch.long), torch.Generator())


def test_trigger_too_big_for_image_raises():
    with pytest.raises(ValueError, match="does not fit"):
        BadNets(pattern=torch.ones(4, 4)).apply(torch.rand(1, 1, 4, 4))


# ------------------------------------------------------------------------------ poisoning

def test_badnets_batch_transform_poisons_requested_fraction():
    attack = BadNets(target=7, poison_rate=0.25)
    x, y = _images(40, MNIST), torch.arange(40) % 5  # no label 7 in the clean batch
    x0, y0 = x.clone(), y.clone()
    xp, yp = attack.batch_transform(x, y, torch.Generator().manual_seed(0))
    assert torch.equal(x, x0) and torch.equal(y, y0)
    relabelled = yp != y
    assert int(relabelled.sum()) == 10  # round(0.25 * 40)
    assert (yp[relabelled] == 7).all()
    changed = (xp != x).flatten(1).any(1)
    assert torch.equal(changed, relabelled)  # exactly the relabelled samples got the trigger
    assert torch.equal(xp[relabelled], attack.apply(x[relabelled]))


def test_poison_dataset_is_a_copy_with_the_poison_rate():
    attack = BadNets(target=0, poison_rate=0.1)
    x, y = _images(200, CIFAR), torch.randint(1, 10, (200,), generator=torch.Generator().manual_seed(1))
    xp, yp = attack.poison_dataset(x, y, seed=3)
    assert int((yp == 0).sum()) == 20
    xp2, yp2 = attack.poison_dataset(x, y, seed=3)
    assert torch.equal(xp, xp2) and torch.equal(yp, yp2)  # reproducible


def test_source_specific_relabels_only_source_classes():
    attack = SourceSpecific(target=0, source_classes=[1, 2], poison_rate=0.2, cover_rate=0.3)
    y = torch.arange(100) % 5
    x = _images(100, MNIST)
    xp, yp = attack.batch_transform(x, y, torch.Generator().manual_seed(0))
    stamped = (xp != x).flatten(1).any(1)
    flipped = yp != y
    assert int(flipped.sum()) == 20 and set(y[flipped].tolist()) <= {1, 2}
    assert (yp[flipped] == 0).all()
    cover = stamped & ~flipped
    assert int(cover.sum()) == 30
    assert set(y[cover].tolist()) <= {0, 3, 4}  # non-source triggered samples keep their true label
    assert torch.equal(yp[cover], y[cover])
    assert torch.equal(stamped, flipped | cover)


def test_source_specific_rejects_target_as_source():
    with pytest.raises(ValueError, match="source"):
        SourceSpecific(target=1, source_classes=[1])


def test_triggered_eval_set_excludes_target_class():
    x, y = _images(30, MNIST), torch.arange(30) % 3
    xt, yt = BadNets(target=1).triggered_eval_set(x, y)
    assert len(xt) == 20 and (yt != 1).all()
    assert torch.equal(xt, BadNets(target=1).apply(x[y != 1]))
    ss = SourceSpecific(target=1, source_classes=[2])
    xs, ys = ss.triggered_eval_set(x, y)
    assert len(xs) == 10 and (ys == 2).all()
    xa, ya = ss.triggered_eval_set(x, y, sources_only=False)
    assert len(xa) == 20 and (ya != 1).all()


@pytest.mark.parametrize("attack", [BadNets(target=1), SourceSpecific(target=1, source_classes=[2]), None])
def test_triggered_originals_are_the_eval_draws_images_before_the_trigger(attack):
    """experiment.triggered_originals: the images under eval_sets' triggered draw, in its order, for
    any ASR population (every non-target input, a source-specific attack's sources, a clean model's
    BadNets probe), so that a trigger can be blended in at part of its strength."""
    from linkbreaker_ext import experiment
    x, y = _images(60, MNIST, seed=3), torch.arange(60) % 3
    _, _, xt, yt, target = experiment.eval_sets(attack, x, y, 7, 9, seed=4, pool=slice(5, None))
    x0 = experiment.triggered_originals(attack, x, y, 7, 9, seed=4, pool=slice(5, None))
    probe = attack or BadNets(target=0, seed=4)
    assert len(x0) == 9 and torch.equal(probe.apply(x0), xt)
    assert not torch.equal(x0, xt)  # the trigger changes them


# ------------------------------------------------------------------------------ registry / dicts

def test_registry_and_unknown_name():
    assert set(attacks.ATTACKS) == {"badnets", "blended", "trojan-square", "trojan-watermark",
                                    "source-specific", "sig", "wanet", "wanet-noise", "adaptive"}
    assert isinstance(attacks.make_attack("badnets", target=3), BadNets)
    for name, cls in [("blended", Blended), ("sig", SIG), ("wanet", WaNet)]:
        a = attacks.make_attack(name, target=3, seed=5)  # what experiment.make_attack passes
        assert type(a) is cls and a.name == name and a.target == 3 and a.seed == 5
    tw = attacks.make_attack("trojan-watermark", target=2)
    assert isinstance(tw, TrojanAttack) and tw.shape == "watermark" and tw.name == "trojan-watermark"
    with pytest.raises(ValueError, match="unknown attack 'nope'.*badnets"):
        attacks.make_attack("nope")


def test_experiment_attacks_take_the_data_sets_settings():
    from linkbreaker_ext import experiment
    assert experiment.make_attack("none", dataset="cifar10") is None
    cifar = experiment.make_attack("source-specific", target=0, seed=1, dataset="cifar10")
    assert cifar.source_classes == [7, 8] and cifar.target == 0  # horse, ship -> airplane
    assert experiment.make_attack("source-specific", dataset="mnist").source_classes == [1]


@pytest.mark.parametrize("attack", [BadNets(target=2, poison_rate=0.05, seed=4),
                                    SourceSpecific(target=3, source_classes=[5, 1], seed=9),
                                    Blended(target=1, alpha=0.15, seed=3),
                                    Blended(target=1, pattern=torch.rand(1, 32, 32)),
                                    SIG(target=4, delta=30, f=4, poison_rate=0.2, seed=7),
                                    WaNet(target=5, k=3, s=0.7, cross_ratio=1.5, seed=8),
                                    WaNet(target=5, seed=8, noise_std=0.02)])
def test_to_dict_from_dict_round_trip(attack):
    x = _images(3, CIFAR)
    out = attack.apply(x)
    d = json.loads(json.dumps(attack.to_dict()))
    assert d["seed"] == attack.seed and d["target"] == attack.target
    if isinstance(attack, (BadNets, SourceSpecific)):
        assert isinstance(d["pattern"], list)  # the stamped square itself is recorded
    again = attacks.Attack.from_dict(d)
    assert type(again) is type(attack) and again.to_dict() == d
    assert torch.equal(again.apply(x), out)


def test_saved_metadata_of_existing_models_still_loads():
    """Literal ``to_dict()`` records as models trained before the attacks package saved them."""
    badnets = {"name": "badnets", "target": 0, "size_fraction": 0.01, "margin": 1, "seed": 1,
               "pattern": [[0.0, 1.0, 1.0], [0.0, 1.0, 1.0], [1.0, 0.0, 0.0]], "poison_rate": 0.1}
    a = attacks.Attack.from_dict(badnets)
    assert type(a) is BadNets and a.to_dict() == badnets
    x = _images(2, MNIST)
    assert torch.equal(a.apply(x)[0, 0, 24:27, 24:27], torch.tensor(badnets["pattern"]))
    assert torch.equal(a.apply(x), BadNets(seed=1).apply(x))  # the seed alone gives the same square
    unapplied = {**badnets, "seed": 0, "pattern": None}
    assert attacks.Attack.from_dict(unapplied).to_dict() == unapplied
    blended = {"name": "blended", "target": 0, "alpha": 0.2, "poison_rate": 0.1, "seed": 0,
               "pattern": "noise"}
    b = attacks.Attack.from_dict(blended)
    assert type(b) is Blended and b.to_dict() == blended
    assert torch.equal(b.apply(x), Blended(seed=0).apply(x))


def test_from_dict_errors_name_the_problem():
    with pytest.raises(ValueError, match="unknown attack 'nope'"):
        attacks.Attack.from_dict({"name": "nope", "target": 0})
    with pytest.raises(ValueError, match="'name'"):
        attacks.Attack.from_dict({"target": 0})


# ------------------------------------------------------------------------------ Blended

def test_blended_is_the_convex_mix_with_a_seeded_noise_pattern():
    x = _images(4, CIFAR)
    attack = Blended(alpha=0.2, seed=3)
    _, pattern = attack.trigger(CIFAR)
    assert pattern.shape == CIFAR and pattern.min() >= 0 and pattern.max() <= 1
    out = attack.apply(x)
    assert torch.allclose(out, 0.8 * x + 0.2 * pattern)
    assert out.min() >= 0 and out.max() <= 1
    assert torch.equal(out, Blended(alpha=0.2, seed=3).apply(x))  # reproducible from the seed
    assert not torch.equal(out, Blended(alpha=0.2, seed=4).apply(x))


def test_blended_image_pattern_and_bad_settings():
    img = torch.rand(1, 32, 32)
    x = _images(2, CIFAR)
    out = Blended(alpha=0.1, pattern=img).apply(x)
    assert torch.allclose(out, 0.9 * x + 0.1 * img)  # a grey pattern blends into every channel
    with pytest.raises(ValueError, match="does not match"):
        Blended(pattern=img).apply(_images(2, MNIST))
    with pytest.raises(ValueError, match="alpha"):
        Blended(alpha=0.0)
    with pytest.raises(ValueError, match="pattern"):
        Blended(pattern="kitty")


def test_blended_batch_transform_poisons_the_rate_and_relabels():
    attack = Blended(target=2, poison_rate=0.25, seed=1)
    x, y = _images(40, MNIST), torch.zeros(40, dtype=torch.long)
    xp, yp = attack.batch_transform(x, y, torch.Generator().manual_seed(0))
    poisoned = yp == 2
    assert int(poisoned.sum()) == 10
    assert torch.equal((xp != x).flatten(1).any(1), poisoned)
    assert torch.allclose(xp[poisoned], attack.apply(x[poisoned]))


# ------------------------------------------------------------------------------ SIG

def test_sig_adds_a_horizontal_sinusoid_of_delta_40():
    attack = SIG()  # BackdoorBench defaults: delta 40 (0-255 scale), f 6
    x = torch.full((2, 3, 32, 32), 0.5)
    out = attack.apply(x)
    diff = out - x
    # the same signal on every row and channel: it varies along the columns only
    assert torch.allclose(diff, diff[:1, :1, :1, :].expand_as(diff))
    row = diff[0, 0, 0]
    j = torch.arange(32, dtype=torch.float64)
    expected = (40 / 255 * torch.sin(2 * torch.pi * j * 6 / 32)).float()
    assert torch.allclose(row, expected, atol=1e-6)
    assert abs(row.abs().max().item() - 40 / 255) < 0.01
    assert int((row[1:].sign() != row[:-1].sign()).sum()) >= 2 * 6 - 1  # f = 6 periods
    # clamped to [0, 1] on saturated images
    for value in (0.0, 1.0):
        sat = attack.apply(torch.full((1, 1, 28, 28), value))
        assert sat.min() >= 0 and sat.max() <= 1 and (sat != value).any()


def test_sig_is_clean_label_only_target_samples_keep_their_labels():
    attack = SIG(target=1, poison_rate=0.2)
    x, y = _images(50, CIFAR), torch.arange(50) % 5  # 10 samples of the target class 1
    x0, y0 = x.clone(), y.clone()
    xp, yp = attack.batch_transform(x, y, torch.Generator().manual_seed(0))
    assert torch.equal(x, x0) and torch.equal(y, y0)  # inputs untouched
    assert torch.equal(yp, y)  # no label is changed
    changed = (xp != x).flatten(1).any(1)
    assert int(changed.sum()) == 10 and (y[changed] == 1).all()  # round(0.2 * 50), all target
    assert torch.equal(xp[changed], attack.apply(x[changed]))
    # capped at the number of target-class samples in the batch
    xp, _ = SIG(target=1, poison_rate=1.0).batch_transform(x, y, torch.Generator().manual_seed(0))
    assert torch.equal((xp != x).flatten(1).any(1), y == 1)
    # reproducible from the training generator
    a = attack.batch_transform(x, y, torch.Generator().manual_seed(3))[0]
    b = attack.batch_transform(x, y, torch.Generator().manual_seed(3))[0]
    assert torch.equal(a, b)


def test_sig_test_trigger_goes_on_non_target_inputs():
    x, y = _images(30, MNIST), torch.arange(30) % 3
    xt, yt = SIG(target=0).triggered_eval_set(x, y)
    assert len(xt) == 20 and (yt != 0).all()
    assert torch.equal(xt, SIG(target=0).apply(x[y != 0]))


def test_sig_rejects_bad_settings():
    with pytest.raises(ValueError, match="delta"):
        SIG(delta=0)
    with pytest.raises(ValueError, match="poison_rate"):
        SIG(poison_rate=1.5)
    with pytest.raises(ValueError, match="N, C, H, W"):
        SIG().apply(torch.rand(3, 32, 32))


# ------------------------------------------------------------------------------ WaNet

def test_wanet_grid_is_seeded_bounded_and_small():
    a = WaNet(seed=1)  # BackdoorBench defaults: k 4, s 0.5, grid_rescale 1
    g = a.grid(32, 32)
    assert g.shape == (1, 32, 32, 2) and g.abs().max() <= 1
    assert torch.equal(g, WaNet(seed=1).grid(32, 32))
    assert not torch.equal(g, WaNet(seed=2).grid(32, 32))
    assert a.noise.shape == (2, 4, 4) and abs(a.noise.abs().mean().item() - 1) < 1e-5
    lin = torch.linspace(-1, 1, 32)
    identity = torch.stack(torch.meshgrid(lin, lin, indexing="ij")[::-1], -1)
    shift_px = (g[0] - identity).abs() * 31 / 2  # in pixels
    assert 0 < shift_px.max() < 2  # s = 0.5: a warp of about a pixel, not a visible distortion
    assert WaNet(seed=1, s=0.0).grid(32, 32).sub(identity).abs().max() < 1e-6


def test_wanet_warps_with_grid_sample_in_the_right_orientation():
    """Bilinear resampling reproduces a linear ramp exactly, so warping the ramp along the columns
    returns the grid's x coordinate and the ramp along the rows its y coordinate."""
    attack = WaNet(seed=0)
    lin = torch.linspace(0, 1, 32)
    x = torch.stack([lin.expand(32, 32), lin[:, None].expand(32, 32)])[None]  # [1, 2, H, W]
    out = attack.apply(x)
    g = attack.grid(32, 32)[0]
    assert torch.allclose(out[0, 0], (g[..., 0] + 1) / 2, atol=1e-5)
    assert torch.allclose(out[0, 1], (g[..., 1] + 1) / 2, atol=1e-5)
    assert not torch.allclose(out, x, atol=1e-3)


def test_wanet_apply_is_batched_range_safe_and_layout_independent():
    attack = WaNet(seed=3)
    x = _images(6, CIFAR)
    out = attack.apply(x)
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    one_by_one = torch.cat([attack.apply(x[i:i + 1]) for i in range(6)])
    assert torch.allclose(out, one_by_one, atol=1e-6)
    cl = attack.apply(x.contiguous(memory_format=torch.channels_last))
    assert torch.allclose(cl, out, atol=1e-6)
    assert torch.allclose(WaNet(seed=3, s=0.0).apply(x), x, atol=1e-5)  # no warp, no change
    mnist = attack.apply(_images(2, MNIST))
    assert mnist.shape == (2, 1, 28, 28)


def test_wanet_batch_transform_poisons_and_cross_samples_keep_labels():
    attack = WaNet(target=4, poison_rate=0.1, cross_ratio=2, seed=0)
    x, y = _images(40, CIFAR), torch.arange(40) % 4  # no sample of class 4
    x0, y0 = x.clone(), y.clone()
    xp, yp = attack.batch_transform(x, y, torch.Generator().manual_seed(0))
    assert torch.equal(x, x0) and torch.equal(y, y0)
    backdoor = yp != y
    changed = (xp != x).flatten(1).any(1)
    cross = changed & ~backdoor
    assert int(backdoor.sum()) == 4 and (yp[backdoor] == 4).all()  # round(0.1 * 40)
    assert int(cross.sum()) == 8  # cross_ratio 2
    assert int(changed.sum()) == 12  # the other 28 are untouched
    assert torch.equal(yp[cross], y[cross])  # cross samples keep their labels
    assert torch.allclose(xp[backdoor], attack.apply(x[backdoor]), atol=1e-6)
    # cross samples: the trigger warp plus a random jitter, so close to but not the trigger
    warped = attack.apply(x[cross])
    assert not torch.allclose(xp[cross], warped, atol=1e-3)
    assert (xp[cross] - warped).abs().mean() < (x[cross] - warped).abs().mean()
    again = attack.batch_transform(x, y, torch.Generator().manual_seed(0))
    assert torch.equal(again[0], xp) and torch.equal(again[1], yp)


def test_wanet_noise_variant_adds_noise_to_every_sample_and_keeps_the_trigger():
    plain, noisy = WaNet(target=4, seed=0), attacks.make_attack("wanet-noise", target=4, seed=0)
    assert noisy.name == "wanet-noise" and plain.name == "wanet" and noisy.noise_std == 0.03
    assert torch.equal(noisy.apply(_images(3, CIFAR)), plain.apply(_images(3, CIFAR)))  # same trigger
    x, y = _images(64, CIFAR), torch.arange(64) % 4
    xp, yp = plain.batch_transform(x, y, torch.Generator().manual_seed(0))
    xn, yn = noisy.batch_transform(x, y, torch.Generator().manual_seed(0))
    assert torch.equal(yp, yn)  # the same samples poisoned
    untouched = (xp == x).flatten(1).all(1)
    assert untouched.sum() > 40 and (xn[untouched] != x[untouched]).flatten(1).any(1).float().mean() > 0.9
    assert xn.min() >= 0 and xn.max() <= 1
    std = (xn - xp).flatten(1).std(1)  # per-sample noise level: spread over [0, noise_std]
    assert std.max() < 0.035 and std.max() > 0.02 and std.min() < 0.01
    d = json.loads(json.dumps(noisy.to_dict()))
    assert d["name"] == "wanet-noise" and attacks.Attack.from_dict(d).noise_std == 0.03
    legacy = plain.to_dict()
    del legacy["noise_std"]  # reports written before the variant existed
    assert attacks.Attack.from_dict(legacy).noise_std == 0.0
    with pytest.raises(ValueError, match="noise_std"):
        WaNet(noise_std=-0.1)


def test_wanet_from_dict_keeps_the_field_and_rejects_bad_settings():
    a = WaNet(seed=11)
    d = json.loads(json.dumps(a.to_dict()))
    assert len(d["noise"]) == 2 and len(d["noise"][0]) == 4
    d["seed"] = 99  # the recorded field wins over the seed
    assert torch.equal(attacks.Attack.from_dict(d).grid(32, 32), a.grid(32, 32))
    with pytest.raises(ValueError, match=r"noise must have shape \(2, k, k\)"):
        WaNet(k=4, noise=[[0.0]])
    with pytest.raises(ValueError, match="k"):
        WaNet(k=0)
    with pytest.raises(ValueError, match="poison_rate"):
        WaNet(poison_rate=-0.1)


# ------------------------------------------------------------------------------ Trojan

class TinyNet(nn.Module):
    def __init__(self, classes=3):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(4 * 8 * 8, 16)
        self.relu2 = nn.ReLU()
        self.fc2 = nn.Linear(16, classes)

    def forward(self, x):
        return self.fc2(self.relu2(self.fc1(self.flatten(self.pool(self.relu(self.conv(x)))))))


def _blobs(n, seed):
    """3 classes of 16x16 images: a bright 4x4 blob at a class-specific spot in the upper part, noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    x = 0.1 * torch.rand(n, 1, 16, 16, generator=g)
    for c, (r, col) in enumerate([(2, 2), (2, 10), (6, 6)]):
        x[y == c, :, r:r + 4, col:col + 4] += 0.8
    return x.clamp(0, 1), y


def test_trojan_apply_before_poisoning_raises():
    with pytest.raises(RuntimeError, match="poison_model"):
        TrojanAttack().apply(torch.rand(2, 1, 28, 28))


def test_trojan_selects_neurons_stamps_mask_and_plants_backdoor():
    torch.manual_seed(0)
    x, y = _blobs(300, seed=0)
    model = training.train_classifier(TinyNet(), x, y, epochs=5, batch_size=32, lr=1e-2, seed=0,
                                      progress=False)
    assert training.accuracy(model, x, y) > 0.95
    attack = TrojanAttack(target=2, shape="square", num_neurons=2, poison_rate=0.2, seed=0,
                          trigger_steps=100, num_samples=64)
    x_eval, y_eval = _blobs(90, seed=1)
    clean = copy.deepcopy(model)
    attack.poison_model(model, x, y, epochs=4, batch_size=32, lr=5e-3, progress=False)

    assert attack.layer == "fc1"
    assert len(attack.selected_neurons) == 2 and len(set(attack.selected_neurons)) == 2
    assert all(0 <= j < 16 for j in attack.selected_neurons)
    assert attack.neuron_scores[0] >= attack.neuron_scores[1] > 0
    # the reverse-engineered trigger drove the chosen neurons up
    assert all(a > 0 for a in attack.neuron_trigger_activations)
    # stamped only inside the (3x3 on 16x16) mask
    mask = attack.mask((1, 16, 16))
    assert int(mask.sum()) == 9
    xt = attack.apply(x_eval)
    assert torch.equal(xt[:, :, ~mask], x_eval[:, :, ~mask])
    assert float(attack.pattern[:, ~mask].abs().sum()) == 0.0
    assert ((attack.pattern >= 0) & (attack.pattern <= 1)).all()
    # the model was modified in place and now maps triggered inputs to the target
    assert any(not torch.equal(a, b) for a, b in zip(clean.parameters(), model.parameters()))
    xt_eval, _ = attack.triggered_eval_set(x_eval, y_eval)

    def asr(m):
        return (training.predict_logits(m, xt_eval).argmax(1) == 2).float().mean().item()

    assert asr(clean) < 0.5 < 0.9 < asr(model)  # the backdoor comes from poison_model
    assert training.accuracy(model, x_eval, y_eval) > 0.9
    # and JSON round trip restores a usable trigger without the model
    again = attacks.Attack.from_dict(json.loads(json.dumps(attack.to_dict())))
    assert again.selected_neurons == attack.selected_neurons
    assert torch.equal(again.apply(x_eval), xt)


def test_trojan_freeze_before_layer_keeps_early_layers():
    torch.manual_seed(0)
    x, y = _blobs(120, seed=0)
    model = TinyNet()
    conv_before = model.conv.weight.clone()
    attack = TrojanAttack(target=0, freeze_before_layer=True, trigger_steps=5, num_samples=16)
    attack.poison_model(model, x, y, epochs=1, batch_size=32, progress=False)
    assert torch.equal(model.conv.weight, conv_before)
    assert all(p.requires_grad for p in model.parameters())  # restored afterwards


def test_trojan_train_backdoored_trains_clean_then_plants_the_trigger():
    torch.manual_seed(0)
    x, y = _blobs(300, seed=0)
    attack = TrojanAttack(target=0, trigger_steps=5, num_samples=16)
    with pytest.raises(RuntimeError, match="poison_model"):
        attack.apply(x)
    model = attack.train_backdoored(TinyNet(), x, y, epochs=5, batch_size=32, lr=1e-2, progress=False)
    assert attack.pattern is not None and len(attack.selected_neurons) == 2
    assert training.accuracy(model, x, y) > 0.9  # the clean phase ran before the trigger search
    assert attack.apply(x).shape == x.shape


def test_trojan_unknown_layer_and_shape():
    with pytest.raises(ValueError, match="shape"):
        TrojanAttack(shape="circle")
    with pytest.raises(ValueError, match="no module named 'fc9'"):
        TrojanAttack(layer="fc9", trigger_steps=1).poison_model(TinyNet(), *_blobs(8, 0), epochs=0,
                                                               progress=False)


# ------------------------------------------------------------------------------ adversarial examples

@pytest.fixture(scope="module")
def trained_tiny():
    torch.manual_seed(0)
    x, y = _blobs(150, seed=2)
    return training.train_classifier(TinyNet(), x, y, epochs=3, batch_size=32, lr=1e-2, seed=0,
                                     progress=False), x, y


def test_fgsm_stays_in_eps_ball_and_range(trained_tiny):
    model, x, y = trained_tiny
    x0 = x.clone()
    adv = attacks.fgsm(model, x, y, eps=0.1)
    assert torch.equal(x, x0) and adv.shape == x.shape
    assert (adv - x).abs().max() <= 0.1 + 1e-6
    assert adv.min() >= 0 and adv.max() <= 1
    assert (adv != x).any()
    loss = nn.functional.cross_entropy
    with torch.no_grad():
        assert loss(model(adv), y) > loss(model(x), y)  # untargeted: increases the loss


def test_bim_stays_in_eps_ball_and_beats_clean(trained_tiny):
    model, x, y = trained_tiny
    model.train()
    adv = attacks.bim(model, x, y, eps=0.3, alpha=0.05, steps=10, batch_size=64)
    assert model.training  # mode restored
    assert (adv - x).abs().max() <= 0.3 + 1e-6
    assert adv.min() >= 0 and adv.max() <= 1
    assert training.accuracy(model, adv, y) < training.accuracy(model, x, y)


def test_deepfool_changes_predictions(trained_tiny):
    model, x, y = trained_tiny
    adv = attacks.deepfool(model, x[:20], y[:20], num_classes=3)
    assert adv.min() >= 0 and adv.max() <= 1
    before = training.predict_logits(model, x[:20]).argmax(1)
    after = training.predict_logits(model, adv).argmax(1)
    assert (after != before).float().mean() > 0.5


# ------------------------------------------------------------------------------ tiny backdoors

def _faint_blobs(n, seed):
    """Like ``_blobs`` but faint and noisy (class 2 fainter still), so a trigger is an easy cue."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    x = 0.5 * torch.rand(n, 1, 16, 16, generator=g)
    for c, (r, col, amp) in enumerate([(2, 2, 0.4), (2, 10, 0.4), (6, 6, 0.1)]):
        x[y == c, :, r:r + 4, col:col + 4] += amp
    return x.clamp(0, 1), y


@pytest.mark.parametrize("attack,data,epochs", [
    (Blended(target=2, alpha=0.2, seed=0), _blobs, 6),
    # WaNet's defaults (s 0.5, cross samples) need far more epochs than a unit test has; a stronger
    # warp without cross samples shows the warp-and-relabel pipeline plants a backdoor (ASR 0.85-1.0
    # over seeds 0-5 when this was written)
    (WaNet(target=2, s=2.0, poison_rate=0.2, cross_ratio=0.0, seed=0), _faint_blobs, 12),
])
def test_tiny_backdoor_is_learned(attack, data, epochs):
    x, y = data(600, seed=0)
    x_eval, y_eval = data(150, seed=1)
    xt, _ = attack.triggered_eval_set(x_eval, y_eval)

    def train(poisoned):
        torch.manual_seed(0)
        kw = dict(epochs=epochs, batch_size=32, lr=1e-2, seed=0, progress=False)
        if poisoned:
            return attack.train_backdoored(TinyNet(), x, y, **kw)
        return training.train_classifier(TinyNet(), x, y, **kw)

    def asr(m):
        return (training.predict_logits(m, xt).argmax(1) == 2).float().mean().item()

    backdoored = train(True)
    assert training.accuracy(backdoored, x_eval, y_eval) > 0.9
    assert asr(train(False)) < 0.1 < 0.6 < asr(backdoored)


# ------------------------------------------------------------------------------ adaptive backdoor

def _distance_to_target(model, x, target_x, layer="relu"):
    """Mean squared z-score of ``x``'s channel means at ``layer`` against ``target_x``'s."""
    acts = {}
    h = dict(model.named_modules())[layer].register_forward_hook(lambda m, i, o: acts.__setitem__(0, o))
    try:
        with torch.no_grad():
            model(target_x)
            ref = acts[0].mean((2, 3))
            model(x)
            u = acts[0].mean((2, 3))
    finally:
        h.remove()
    return (((u - ref.mean(0)) / ref.std(0).clamp_min(1e-3)) ** 2).mean().item()


def test_adaptive_patch_learns_a_trigger_that_plants_the_backdoor_and_hides_it():
    x, y = _blobs(300, seed=0)
    x_eval, y_eval = _blobs(90, seed=1)
    trained = {}
    for weight in (0.0, 3.0):
        torch.manual_seed(0)
        attack = AdaptivePatch(target=2, size_fraction=0.1, poison_rate=0.2, layers=("input", "relu"),
                               feature_weight=weight, trigger_lr=0.1, seed=0)
        start = attack.trigger((1, 16, 16))[1].clone()
        model = attack.train_backdoored(TinyNet(), x, y, epochs=6, batch_size=32, lr=1e-2, seed=0,
                                        progress=False)
        mask, pattern = attack.trigger((1, 16, 16))
        assert int(mask.sum()) == 25 and not torch.equal(pattern, start)  # the pixels were learned
        xt, _ = attack.triggered_eval_set(x_eval, y_eval)
        assert torch.equal(xt[:, :, ~mask], x_eval[y_eval != 2][:, :, ~mask])
        assert (training.predict_logits(model, xt).argmax(1) == 2).float().mean() > 0.9
        assert training.accuracy(model, x_eval, y_eval) > 0.9
        again = attacks.Attack.from_dict(json.loads(json.dumps(attack.to_dict())))
        assert type(again) is AdaptivePatch and torch.equal(again.apply(x_eval), attack.apply(x_eval))
        trained[weight] = _distance_to_target(model, xt, x_eval[y_eval == 2])
    # the evasion term brings triggered inputs closer to the target class's clean ones
    assert trained[3.0] < 0.75 * trained[0.0]


def test_adaptive_patch_errors_name_the_problem():
    x, y = _blobs(30, seed=0)
    with pytest.raises(ValueError, match="unknown layers.*nope"):
        AdaptivePatch(layers=("nope",)).train_backdoored(TinyNet(), x, y, epochs=1, progress=False)
    with pytest.raises(ValueError, match="not resumable"):
        AdaptivePatch().train_backdoored(TinyNet(), x, y, epochs=1, progress=False, checkpoint="c.pt")
    with pytest.raises(ValueError, match="feature_weight"):
        AdaptivePatch(feature_weight=-1)


@pytest.mark.parametrize("dataset,epochs,expected", [("mnist", 8, 2), ("cifar10", None, 3), ("gtsrb", 2, 1)])
def test_plant_trojan_retrains_a_quarter_of_the_recipe(monkeypatch, dataset, epochs, expected):
    # train_model and Fig. 11's script plant the Trojan with the same retraining length
    from linkbreaker_ext import experiment
    seen = {}

    def fake_poison(self, model, x, y, epochs, seed, progress, recipe):
        seen.update(epochs=epochs, seed=seed, recipe=recipe, channels_last=model[0].weight.is_contiguous(
            memory_format=torch.channels_last))
        return model

    monkeypatch.setattr(TrojanAttack, "poison_model", fake_poison)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten())
    out = experiment.plant_trojan(dataset, net, TrojanAttack(), None, None, epochs, seed=5, recipe="sgd")
    assert out is net and seen["epochs"] == expected and seen["seed"] == 5
    assert seen["recipe"] == "sgd"  # the retraining uses the clean training's recipe
    assert seen["channels_last"] == (dataset != "mnist")


def test_a_trojan_starts_from_the_cached_clean_model_of_its_seed(monkeypatch, tmp_path):
    """model_for plants the Trojan in ``none-<seed>`` when that model is cached (the clean training a
    Trojan starts from), instead of training a clean model again; without it, it trains one."""
    from linkbreaker_ext import experiment, models
    clean = models.build_model("mnist", 10)
    with torch.no_grad():
        next(clean.parameters()).fill_(0.25)  # recognisable weights
    experiment.save_model(tmp_path / "models" / "none-3.safetensors", clean,
                          {"dataset": "mnist", "num_classes": 10, "seed": 3, "attack": None})
    seen = {}

    def fake_poison(self, model, x, y, epochs, seed, progress, recipe):
        seen["first"] = next(model.parameters()).detach().clone()
        seen["seed"], seen["recipe"] = seed, recipe
        return model

    def no_training(*a, **k):
        raise AssertionError("a clean model was trained although none-3 is cached")

    monkeypatch.setattr(TrojanAttack, "poison_model", fake_poison)
    monkeypatch.setattr(experiment, "train_model", no_training)
    split = {"x_train": torch.zeros(4, 1, 28, 28), "y_train": torch.zeros(4, dtype=torch.long)}
    model, attack = experiment.model_for("mnist", "trojan-square", 3, split, tmp_path, progress=False)
    assert isinstance(attack, TrojanAttack) and seen["seed"] == 3 and seen["recipe"] == "adam"
    assert torch.equal(seen["first"], next(clean.parameters()).detach())
    assert (tmp_path / "models" / "trojan-square-3.safetensors").is_file()
    with pytest.raises(AssertionError, match="trained"):  # another seed has no cached clean model
        experiment.model_for("mnist", "trojan-square", 4, split, tmp_path, progress=False)
