"""LinkBreaker.fit / __call__ / save / load on a tiny synthetic model (see conftest.py)."""
import copy
import dataclasses
import json
import struct
import zipfile

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from conftest import ACTIVE, FAST, NUM_CLASSES, SHAPE, add_trigger, make_net
from linkbreaker_ext import ACCEPT, ALARM, OOD, GuardConfig, GuardResult, LinkBreaker, guard_head_reference
from linkbreaker_ext.guard import FORMAT

HAS_CUDA = torch.cuda.is_available()


def fit(model, x, y=None, **kw):
    opts = dict(FAST, progress=False)
    opts.update(kw)
    num_classes = opts.pop("num_classes", NUM_CLASSES)
    return LinkBreaker.fit(model, x, y, num_classes, **opts)


def assert_same_result(a: GuardResult, b: GuardResult):
    assert torch.equal(a.confidences, b.confidences)
    assert torch.equal(a.labels, b.labels)
    assert torch.equal(a.verdict, b.verdict)
    assert torch.equal(a.thresholds, b.thresholds)


# ------------------------------------------------------------------------------ online contract

@pytest.mark.parametrize("which", ["guard_hidden", "guard_input"])
def test_result_types_shapes_and_vote(which, request, synth):
    guard = request.getfixturevalue(which)
    x = synth["x_test"]
    r = guard(x)
    assert isinstance(r, GuardResult)
    b = len(x)
    assert r.labels.dtype == torch.int64 and r.labels.shape == (b,)
    assert r.verdict.dtype == torch.int64 and r.verdict.shape == (b,)
    assert r.confidences.dtype == torch.float32 and r.confidences.shape == (b, NUM_CLASSES)
    assert r.thresholds.shape == (NUM_CLASSES,)
    assert guard.num_heads == NUM_CLASSES
    assert set(r.verdict.unique().tolist()) <= {ACCEPT, ALARM, OOD}
    assert ((r.confidences >= 0) & (r.confidences <= 1)).all()
    # -1 exactly on trigger alarms
    assert torch.equal(r.labels == -1, r.verdict == ALARM)
    # the verdict follows the number of credible heads; an accepted label is the unique credible head
    credible = r.confidences >= r.thresholds
    count = credible.sum(1)
    assert torch.equal(r.verdict[count == 1], torch.full_like(r.verdict[count == 1], ACCEPT))
    assert (r.verdict[count >= 2] == ALARM).all()
    assert (r.verdict[count == 0] == OOD).all()
    acc = r.verdict == ACCEPT
    assert torch.equal(r.labels[acc], credible[acc].int().argmax(1))
    # an OOD input is labelled with its most confident head (paper Fig. 9)
    ood = r.verdict == OOD
    assert torch.equal(r.labels[ood], r.confidences[ood].argmax(1))


@pytest.mark.parametrize("which", ["guard_hidden", "guard_input"])
def test_guard_keeps_clean_accuracy(which, request, synth):
    guard = request.getfixturevalue(which)
    r = guard(synth["x_test"])
    assert (r.labels == synth["y_test"]).float().mean().item() >= 0.9
    assert (r.verdict == ACCEPT).float().mean().item() >= 0.8
    # thresholds are calibrated probabilities, never below the configured floor
    assert (r.thresholds >= guard.config.threshold_floor).all() and (r.thresholds <= 1).all()


@pytest.mark.parametrize("which", ["guard_hidden", "guard_input"])
def test_confidences_match_reference_head(which, request, synth):
    guard = request.getfixturevalue(which)
    x = synth["x_test"][:64]
    r = guard(x)
    feats = guard.hooked.features(x, guard.early_masks, guard.early_fill)
    assert feats.shape == (len(x), NUM_CLASSES, guard.hooked.late.in_features)
    lin = guard.hooked.late
    conf, labels, verdict = guard_head_reference(feats, lin.weight, lin.bias, guard.late_masks,
                                                 guard.late_fill, guard.thresholds)
    torch.testing.assert_close(r.confidences, conf, atol=1e-5, rtol=0)
    clear = ((conf - guard.thresholds).abs() > 1e-5).all(1)  # rows no rounding can flip
    assert clear.float().mean() > 0.9
    assert torch.equal(r.verdict[clear], verdict[clear])
    assert torch.equal(r.labels[clear], labels[clear])


def test_empty_batch(guard_hidden):
    r = guard_hidden(torch.empty(0, *SHAPE))
    assert r.labels.shape == (0,) and r.verdict.shape == (0,)
    assert r.confidences.shape == (0, NUM_CLASSES)


def test_batch_rows_chunking_does_not_change_results(guard_hidden, synth):
    x = synth["x_test"][:50]
    small = copy.copy(guard_hidden)
    small.config = dataclasses.replace(guard_hidden.config, batch_rows=NUM_CLASSES * 7)  # 7 inputs a chunk
    a, b = guard_hidden(x), small(x)
    torch.testing.assert_close(a.confidences, b.confidences, atol=1e-6, rtol=0)
    assert torch.equal(a.verdict, b.verdict) and torch.equal(a.labels, b.labels)


# ------------------------------------------------------------------------------ fitting

def test_fit_accepts_dataset_and_dataloader(shared_net, synth, guard_input):
    x, y = synth["x_val"], synth["y_val"]
    from_ds = fit(shared_net, TensorDataset(x, y))
    from_dl = fit(shared_net, DataLoader(TensorDataset(x, y), batch_size=32, shuffle=False))
    for g in (from_ds, from_dl):
        assert torch.equal(g.early_masks, guard_input.early_masks)
        assert torch.equal(g.late_masks, guard_input.late_masks)
        assert torch.equal(g.thresholds, guard_input.thresholds)


def test_automatic_layers_are_deterministic(shared_net, synth, guard_input):
    # documented rule: early = the input pixels; late = the input of the last nn.Linear
    auto = fit(shared_net, synth["x_val"], synth["y_val"])
    again = fit(shared_net, synth["x_val"], synth["y_val"])
    assert (auto.early_layer, auto.late_layer) == (again.early_layer, again.late_layer) == ("input", "6")
    for name in ("early_masks", "late_masks", "early_fill", "thresholds"):
        assert torch.equal(getattr(again, name), getattr(auto, name)), name
        assert torch.equal(getattr(auto, name), getattr(guard_input, name)), name


def test_named_and_input_layers(shared_net, synth, guard_input):
    assert guard_input.early_layer == "input"
    assert guard_input.early_masks.shape == (NUM_CLASSES, SHAPE[0] * SHAPE[1] * SHAPE[2])
    named = fit(shared_net, synth["x_val"], synth["y_val"], layers=("0", "6"))  # conv output, explicit head
    assert (named.early_layer, named.late_layer) == ("0", "6")
    assert named.early_masks.shape == (NUM_CLASSES, 4 * 12 * 12)
    assert named.late_masks.shape == (NUM_CLASSES, 16)
    r = named(synth["x_test"])
    assert (r.labels == synth["y_test"]).float().mean().item() >= 0.9


def _blank_activations(guard, x):
    return [a[0] for a in guard.hooked.activations(LinkBreaker._blank_input(x))]


@pytest.mark.parametrize("which", ["guard_hidden", "guard_input"])
def test_masks_are_binary_and_skip_dormant_neurons(which, request, synth):
    """A neuron that sits at its blank-input value on every clean sample (a dormant neuron) is never
    salient in either layer."""
    guard = request.getfixturevalue(which)
    acts = guard.hooked.activations(synth["x_val"])
    blank = _blank_activations(guard, synth["x_val"])
    n_dormant = 0
    for masks, a, b in zip((guard.early_masks, guard.late_masks), acts, blank):
        assert masks.shape == (NUM_CLASSES, a.shape[1])
        assert set(masks.unique().tolist()) <= {0.0, 1.0}
        assert (masks.sum(1) >= 1).all()  # every head keeps something
        dormant = (a == b).all(0)
        n_dormant += int(dormant.sum())
        assert (masks[:, dormant] == 0).all(), "a dormant neuron was selected"
    assert n_dormant > 0  # the synthetic data does have dormant neurons to check


def _with_constant_pixel(x):
    """The clean data plus a pixel that is 1 in every image (a fixed bright mark): constant on the
    clean data, but not at its blank-input value (the blank input is black)."""
    x = x.clone()
    x[:, 0, 11, 0] = 1.0
    return x


CONSTANT_PIXEL = 11 * 12 + 0


def test_constant_pixel_is_not_salient_without_neighbours(shared_net, synth):
    # fractions=(1.0,): every neuron with a positive importance is selected
    g = fit(shared_net, _with_constant_pixel(synth["x_val"]), synth["y_val"], layers=("input", None),
            neighbours=0, fractions=(1.0,))
    assert (g.early_masks[:, CONSTANT_PIXEL] == 0).all()
    assert (g.early_masks.sum(1) > 0).all()


def test_constant_pixel_is_not_salient_with_neighbours(shared_net, synth):
    g = fit(shared_net, _with_constant_pixel(synth["x_val"]), synth["y_val"], layers=("input", None),
            neighbours=1, fractions=(1.0,))
    assert (g.early_masks[:, CONSTANT_PIXEL] == 0).all(), "a pixel constant on the clean data was selected"


def test_always_zero_pixels_are_never_salient(guard_input, synth):
    assert (synth["x_val"][:, :, ACTIVE:, :] == 0).all() and (synth["x_val"][:, :, :, ACTIVE:] == 0).all()
    masks = guard_input.early_masks.reshape(NUM_CLASSES, *SHAPE)
    assert (masks[:, :, ACTIVE:, :] == 0).all()
    assert (masks[:, :, :, ACTIVE:] == 0).all()
    # ... while the pixels the classes use are kept by some head
    assert masks[:, :, :ACTIVE, :ACTIVE].sum() > 0


def test_trigger_on_dormant_pixels_is_erased_for_every_head(guard_input, synth):
    x = synth["x_test"][:60]
    xt = add_trigger(x)
    assert not torch.equal(x, xt)
    em, fill = guard_input.early_masks, guard_input.early_fill
    assert torch.equal(guard_input.hooked.features(x, em, fill), guard_input.hooked.features(xt, em, fill))
    assert_same_result(guard_input(x), guard_input(xt))


def test_fill_is_the_blank_input(guard_input):
    # the reference for non-salient pixels is the per-channel median: black on this data
    assert torch.equal(guard_input.early_fill, torch.zeros_like(guard_input.early_fill))


def test_use_early_false_keeps_every_early_neuron(shared_net, synth):
    g = fit(shared_net, synth["x_val"], synth["y_val"], use_early=False)
    assert (g.early_masks == 1).all()
    assert g.config.use_early is False


# ------------------------------------------------------------------------------ bad inputs

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
    with pytest.raises(TypeError, match="floating"):
        guard_hidden(torch.zeros(2, *SHAPE, dtype=torch.int64))
    with pytest.raises(TypeError, match="torch.Tensor"):
        guard_hidden(torch.zeros(2, *SHAPE).numpy())


def test_fit_rejects_unknown_layers(shared_net, synth):
    x, y = synth["x_val"], synth["y_val"]
    with pytest.raises(ValueError, match="unknown layer 'nope'"):
        fit(shared_net, x, y, layers=("nope", None))
    with pytest.raises(ValueError, match="unknown layer 'nope'"):
        fit(shared_net, x, y, layers=(None, "nope"))
    with pytest.raises(ValueError, match="must be an nn.Linear"):
        fit(shared_net, x, y, layers=(None, "1"))
    with pytest.raises(ValueError, match=r"layers must be \(early, late\)"):
        fit(shared_net, x, y, layers=("input",))
    with pytest.raises(ValueError, match=r"layers must be \(early, late\)"):
        fit(shared_net, x, y, layers=("input", None, "6"))


def test_fit_rejects_too_few_samples(shared_net, synth):
    x, y = synth["x_val"], synth["y_val"]
    keep = torch.cat([torch.nonzero(y == k).flatten()[: (3 if k == 1 else 20)] for k in range(3)])
    with pytest.raises(ValueError, match="too few validation samples: class 1 has 3"):
        fit(shared_net, x[keep], y[keep])
    # a class that is missing altogether is too few as well
    keep = torch.nonzero(y != 2).flatten()
    with pytest.raises(ValueError, match="too few.*class 2 has 0"):
        fit(shared_net, x[keep], y[keep])


def test_fit_rejects_labels_out_of_range(shared_net, synth):
    x, y = synth["x_val"], synth["y_val"].clone()
    y[0] = 5
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        fit(shared_net, x, y)


def test_fit_rejects_negative_labels(shared_net, synth):
    x, y = synth["x_val"], synth["y_val"].clone()
    y[0] = -1
    with pytest.raises(ValueError, match="labels must lie"):
        fit(shared_net, x, y)


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


# ------------------------------------------------------------------------------ save / load

def test_save_load_round_trip(guard_hidden, net, synth, tmp_path):
    path = tmp_path / "guard.safetensors"
    guard_hidden.save(path)
    fresh = make_net(seed=123)
    fresh.load_state_dict(net.state_dict())  # an independent copy of the same weights
    loaded = LinkBreaker.load(path, fresh)
    assert loaded.model is fresh
    for name in ("early_masks", "late_masks", "early_fill", "late_fill", "thresholds"):
        assert torch.equal(getattr(loaded, name), getattr(guard_hidden, name)), name
    assert (loaded.early_layer, loaded.late_layer) == (guard_hidden.early_layer, guard_hidden.late_layer)
    assert loaded.input_shape == guard_hidden.input_shape == SHAPE
    assert loaded.config == guard_hidden.config
    x = torch.cat([synth["x_test"][:40], add_trigger(synth["x_test"][:40])])
    assert_same_result(loaded(x), guard_hidden(x))


def test_config_survives_round_trip(shared_net, synth, tmp_path):
    cfg = GuardConfig(mad_k=2.5, out_quantile=None, fill="mean", noise_amplitude=0.1, seed=7,
                      threshold_floor=0.6, min_per_class=4)
    g = LinkBreaker.fit(shared_net, synth["x_val"], synth["y_val"], NUM_CLASSES,
                        layers=("input", None), config=cfg, progress=False, **FAST)
    assert g.config == dataclasses.replace(cfg, **FAST)
    g.save(tmp_path / "g.safetensors")
    loaded = LinkBreaker.load(tmp_path / "g.safetensors", shared_net)
    assert loaded.config == g.config
    assert isinstance(loaded.config.fractions, tuple) and loaded.config.out_quantile is None
    assert torch.equal(loaded.early_fill, g.early_fill) and torch.equal(loaded.late_fill, g.late_fill)
    assert_same_result(loaded(synth["x_test"]), g(synth["x_test"]))


def test_saved_file_is_plain_safetensors(guard_hidden, tmp_path):
    from safetensors import safe_open

    path = tmp_path / "guard.safetensors"
    guard_hidden.save(path)
    raw = path.read_bytes()
    assert not zipfile.is_zipfile(path) and raw[:1] != b"\x80"  # neither torch.save zip nor a raw pickle
    (n,) = struct.unpack("<Q", raw[:8])  # safetensors: u64 header length, JSON header, raw tensor bytes
    header = json.loads(raw[8:8 + n])
    names = {"early_masks", "late_masks", "early_fill", "late_fill", "thresholds"}
    assert set(header) == names | {"__metadata__"}
    with safe_open(str(path), framework="pt") as f:
        assert set(f.keys()) == names
        meta = json.loads(f.metadata()[FORMAT])
        assert torch.equal(f.get_tensor("thresholds"), guard_hidden.thresholds)
    assert meta["format"] == FORMAT
    assert meta["early_layer"] == guard_hidden.early_layer and meta["input_shape"] == list(SHAPE)
    assert len(meta["model_sha256"]) == 64


def test_load_refuses_a_different_model(guard_hidden, net, synth, tmp_path):
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
    assert torch.equal(loaded.early_masks, guard_hidden.early_masks)


def test_load_rejects_files_that_are_not_guards(net, tmp_path):
    from safetensors.torch import save_file

    rnd = tmp_path / "random.bin"
    rnd.write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8,
                                  generator=torch.Generator().manual_seed(0)).numpy().tobytes())
    with pytest.raises(ValueError, match="not a LinkBreaker guard"):
        LinkBreaker.load(rnd, net)

    pickled = tmp_path / "pickled.pt"
    torch.save({"early_masks": torch.ones(3, 4)}, pickled)
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


def test_load_rejects_unknown_format_version(guard_hidden, net, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = tmp_path / "guard.safetensors"
    guard_hidden.save(path)
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = json.loads(f.metadata()[FORMAT])
    meta["version"] = 99
    save_file(tensors, str(path), metadata={FORMAT: json.dumps(meta)})
    with pytest.raises(ValueError, match="version 99 is not supported"):
        LinkBreaker.load(path, net)


# ------------------------------------------------------------------------------ CUDA

@pytest.mark.skipif(not HAS_CUDA, reason="CUDA is not available")
def test_guard_on_cuda(net, synth, guard_hidden, tmp_path):
    model = net.to("cuda")
    g = fit(model, synth["x_val"], synth["y_val"])  # CPU validation data, CUDA model
    for t in (g.early_masks, g.late_masks, g.early_fill, g.late_fill, g.thresholds):
        assert t.device.type == "cuda"
    x = synth["x_test"]
    r = g(x.cuda())
    assert r.labels.device.type == "cuda" and r.confidences.dtype == torch.float32
    assert (r.labels.cpu() == synth["y_test"]).float().mean().item() >= 0.9
    with pytest.raises(ValueError, match="is on cpu"):
        g(x)
    # the CPU guard's masks loaded onto the CUDA model give the CPU guard's confidences
    guard_hidden.save(tmp_path / "g.safetensors")
    on_cuda = LinkBreaker.load(tmp_path / "g.safetensors", model)
    assert on_cuda.thresholds.device.type == "cuda"
    rc, rr = on_cuda(x.cuda()), guard_hidden(x)
    torch.testing.assert_close(rc.confidences.cpu(), rr.confidences, atol=1e-4, rtol=0)
    clear = ((rr.confidences - rr.thresholds).abs() > 1e-4).all(1)
    assert torch.equal(rc.verdict.cpu()[clear], rr.verdict[clear])
