"""Behaviour of the backdoor attacks and adversarial-example generators (tiny synthetic data only)."""
import copy
import json

import pytest
import torch
from torch import nn

from linkbreaker_ext import attacks, training
from linkbreaker_ext.attacks import BadNets, SourceSpecific, TrojanAttack

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


# ------------------------------------------------------------------------------ registry / dicts

def test_registry_and_unknown_name():
    assert set(attacks.ATTACKS) == {"badnets", "trojan-square", "trojan-watermark", "source-specific"}
    assert isinstance(attacks.make_attack("badnets", target=3), BadNets)
    tw = attacks.make_attack("trojan-watermark", target=2)
    assert isinstance(tw, TrojanAttack) and tw.shape == "watermark" and tw.name == "trojan-watermark"
    with pytest.raises(ValueError, match="unknown attack 'nope'.*badnets"):
        attacks.make_attack("nope")


@pytest.mark.parametrize("attack", [BadNets(target=2, poison_rate=0.05, seed=4),
                                    SourceSpecific(target=3, source_classes=[5, 1], seed=9)])
def test_to_dict_from_dict_round_trip(attack):
    x = _images(3, CIFAR)
    out = attack.apply(x)
    d = json.loads(json.dumps(attack.to_dict()))
    assert isinstance(d["pattern"], list)
    again = attacks.Attack.from_dict(d)
    assert type(again) is type(attack) and again.to_dict() == d
    assert torch.equal(again.apply(x), out)


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
