"""The baseline defenses (issue #7) on the tiny synthetic task of conftest.py: a 3-class net with a
blatant 2x2 trigger planted by data poisoning, and the clean net of the fixtures."""
import copy

import pytest
import torch

from linkbreaker_ext import training
from linkbreaker_ext.baselines import (ABS, IBDPSC, STRIP, FinePruning, NeuralCleanse, ScaleUp,
                                       make_defense, roc_auc)
from linkbreaker_ext.baselines.base import holdout_split
from linkbreaker_ext.baselines.ibd_psc import scalable_layers

from conftest import NUM_CLASSES, add_trigger, make_net

TARGET = 0


@pytest.fixture(scope="module")
def backdoored(synth):
    """The conftest net trained with 20 % of every batch triggered and relabelled TARGET."""

    def poison(xb, yb, g):
        idx = torch.randperm(len(xb), generator=g)[:len(xb) // 5]
        xb, yb = xb.clone(), yb.clone()
        xb[idx] = add_trigger(xb[idx])
        yb[idx] = TARGET
        return xb, yb

    with torch.random.fork_rng():
        model = make_net(seed=0)
        training.train_classifier(model, synth["x_train"], synth["y_train"], epochs=4,
                                  batch_size=32, lr=1e-2, seed=0, batch_transform=poison,
                                  progress=False)
    keep = synth["y_test"] != TARGET
    xt = add_trigger(synth["x_test"][keep])
    assert (training.predict_logits(model, xt).argmax(1) == TARGET).float().mean() > 0.95
    return model.eval()


@pytest.fixture(scope="module")
def triggered(synth):
    keep = synth["y_test"] != TARGET
    return add_trigger(synth["x_test"][keep]), synth["y_test"][keep]


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model, before):
    after = model.state_dict()
    return all(torch.equal(before[k], after[k]) for k in before)


def _fit(defense, model, synth):
    return defense.fit(model, synth["x_val"], synth["y_val"], NUM_CLASSES)


# ------------------------------------------------------------------------------- shared helpers

def test_roc_auc_matches_definition():
    neg = torch.tensor([0.1, 0.2, 0.3, 0.3])
    pos = torch.tensor([0.3, 0.4])
    # 0.3 beats 0.1 and 0.2 and ties two 0.3s (half each); 0.4 beats all four: (2 + 1 + 4) / 8
    assert roc_auc(neg, pos) == pytest.approx(7 / 8)
    assert roc_auc(neg, neg + 10) == 1.0 and roc_auc(neg + 10, neg) == 0.0


def test_holdout_split_is_per_class_and_disjoint(synth):
    fit, hold = holdout_split(synth["y_val"], 0.25, seed=0)
    assert not set(fit.tolist()) & set(hold.tolist())
    assert len(fit) + len(hold) == len(synth["y_val"])
    assert torch.bincount(synth["y_val"][hold]).tolist() == [10, 10, 10]


def test_registry_and_bad_input(shared_net, synth):
    assert isinstance(make_defense("strip", n_overlays=8), STRIP)
    with pytest.raises(ValueError, match="unknown defense"):
        make_defense("nope")
    d = make_defense("scale-up")
    with pytest.raises(RuntimeError, match="not fitted"):
        d.score(synth["x_test"])
    with pytest.raises(ValueError, match="samples but y_val"):
        d.fit(shared_net, synth["x_val"], synth["y_val"][:-1], NUM_CLASSES)
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        d.fit(shared_net, synth["x_val"][:, 0], synth["y_val"], NUM_CLASSES)
    with pytest.raises(ValueError, match="labels must lie"):
        d.fit(shared_net, synth["x_val"], synth["y_val"] + 5, NUM_CLASSES)


# ------------------------------------------------------------------------- input-level detectors

def test_strip_separates_a_blatant_trigger(backdoored, synth, triggered):
    before = _state(backdoored)
    d = _fit(STRIP(n_overlays=16), backdoored, synth)
    sc, st = d.score(synth["x_test"]), d.score(triggered[0])
    assert sc.shape == (len(synth["x_test"]),) and sc.dtype == torch.float32
    assert roc_auc(sc, st) > 0.95
    assert d.detect(triggered[0]).float().mean() > 0.8
    assert _unchanged(backdoored, before) and not backdoored.training


def test_strip_score_is_deterministic_and_batch_independent(backdoored, synth):
    d = _fit(STRIP(n_overlays=8, batch_size=7), backdoored, synth)
    x = synth["x_test"][:20]
    a = d.score(x)
    assert torch.equal(a, d.score(x))
    d.batch_size = 20
    # the same overlays per input position: only positions 0-6 coincide across batch sizes
    assert torch.allclose(a[:7], d.score(x)[:7])


@pytest.mark.parametrize("cls", [STRIP, ScaleUp, IBDPSC])
def test_threshold_gives_requested_false_rejection(cls, shared_net, synth):
    kw = {"n_overlays": 8} if cls is STRIP else {}
    d = cls(frr=0.1, holdout=0.5, **kw)
    _fit(d, shared_net, synth)
    assert d.threshold is not None
    _, hold = holdout_split(synth["y_val"], 0.5, seed=0)
    rejected = d.detect(synth["x_val"][hold]).float().mean().item()
    assert rejected <= 0.1 + 1e-6  # the quantile rejects at most frr of the calibration set
    if cls is not ScaleUp:  # SCALE-UP's score takes a handful of values: ties make it coarser
        assert rejected >= 0.1 - 2 / len(hold)
    # re-calibrating to 0 % rejection accepts every calibration sample
    d.calibrate(synth["x_val"][hold], frr=0.0)
    assert not d.detect(synth["x_val"][hold]).any()


def test_scale_up_refuses_normalised_inputs(shared_net, synth):
    d = _fit(ScaleUp(), shared_net, synth)
    with pytest.raises(ValueError, match="pixel values"):
        d.score((synth["x_test"] - 0.5) / 0.25)


def test_scale_up_spc_is_one_for_a_scale_invariant_input(backdoored, synth, triggered):
    d = _fit(ScaleUp(normalise=False), backdoored, synth)
    # the trigger and the synthetic shapes are (almost) binary: amplification keeps the prediction
    spc, _ = d.spc(triggered[0][:8])
    assert spc.min() >= 0.8 and spc.max() <= 1.0
    d2 = _fit(ScaleUp(), backdoored, synth)
    assert torch.isfinite(d2.score(synth["x_test"])).all()


def test_ibd_psc_layers_depths_and_no_side_effects(backdoored, synth, triggered):
    assert [n for n, _ in scalable_layers(backdoored)] == ["0", "4"]  # not the classifier "6"
    bn = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2), torch.nn.ReLU(),
                             torch.nn.Flatten(), torch.nn.Linear(200, 3))
    assert [n for n, _ in scalable_layers(bn)] == ["1"]
    before = _state(backdoored)
    d = _fit(IBDPSC(), backdoored, synth)
    assert d.depths and all(1 <= k <= 2 for k in d.depths)
    x = triggered[0][:16]
    s = d.score(x)
    # the mean over the amplified copies of the log-odds of the original label
    y_hat = backdoored(x).argmax(1)
    ref = []
    for depth in d.depths:
        p = torch.softmax(torch.func.functional_call(backdoored, d._params(depth), (x,)).double(), 1)
        p = p.gather(1, y_hat[:, None])[:, 0]
        ref.append(torch.log(p) - torch.log1p(-p))
    assert torch.allclose(s.double(), torch.stack(ref).mean(0), atol=1e-3)
    assert _unchanged(backdoored, before)


def test_ibd_psc_scores_do_not_tie_when_probabilities_saturate(backdoored, synth):
    """A sharpened classifier gives probability 1.0 in float32 for every input: the score still
    orders them (a threshold at 1 % FRR must be able to flag something)."""
    sharp = copy.deepcopy(backdoored)
    with torch.no_grad():
        sharp[-1].weight.mul_(50)
        sharp[-1].bias.mul_(50)
    x = synth["x_test"][:40]
    assert (torch.softmax(sharp(x), 1).amax(1) == 1).float().mean() > 0.5
    s = _fit(IBDPSC(), sharp, synth).score(x)
    assert torch.isfinite(s).all() and len(torch.unique(s)) == len(s)


# ----------------------------------------------------------------------------- model-level methods

def test_neural_cleanse_finds_the_target_and_unlearns(backdoored, synth, triggered):
    before = _state(backdoored)
    d = _fit(NeuralCleanse(epochs=6, batch_size=16, unlearn_epochs=3), backdoored, synth)
    norms = torch.tensor(d.report["mask_l1"])
    assert int(norms.argmin()) == TARGET       # the backdoor label needs the smallest trigger
    assert _unchanged(backdoored, before)
    # three classes are too few for a MAD outlier test to be meaningful: force the mitigation path
    d2 = NeuralCleanse(epochs=6, batch_size=16, unlearn_epochs=20, unlearn_lr=1e-2,
                       anomaly_threshold=0.5)
    _fit(d2, backdoored, synth)
    assert d2.flagged and d2.report["unlearned_class"] == TARGET and d2.repaired is not None
    # unlearning removes what it was shown: the reverse-engineered trigger no longer flips inputs
    from linkbreaker_ext.baselines.neural_cleanse import stamp
    x_rev = stamp(synth["x_test"][synth["y_test"] != TARGET], d2.masks[TARGET], d2.patterns[TARGET])
    flips_before = (training.predict_logits(backdoored, x_rev).argmax(1) == TARGET).float().mean()
    flips_after = (d2.predict(x_rev) == TARGET).float().mean()
    assert flips_before > 0.9 and flips_after < 0.5 * flips_before
    assert (d2.predict(synth["x_test"]) == synth["y_test"]).float().mean() > 0.9
    assert _unchanged(backdoored, before)


def test_anomaly_index_flags_only_small_outliers():
    from linkbreaker_ext.baselines.neural_cleanse import anomaly_index
    norms = torch.tensor([10.0, 11.0, 9.5, 10.5, 1.0, 30.0])
    idx = anomaly_index(norms)
    assert int(idx.argmax()) == 4 and idx[4] > 2 and idx[5] < 0


def test_abs_stimulation_and_reasr(backdoored, synth):
    before = _state(backdoored)
    d = _fit(ABS(images_per_class=4, top_k=2, steps=60, mask_bound=0.06, unlearn_epochs=2),
             backdoored, synth)
    assert len(d.report["stimulation_scores"]) == 4   # the conv has 4 channels
    assert d.report["target"] == TARGET
    assert d.report["max_reasr"] > 0.9 and d.flagged and d.repaired is not None
    assert _unchanged(backdoored, before)


def test_fine_pruning_reports_both_steps(backdoored, synth):
    before = _state(backdoored)
    d = _fit(FinePruning(prune_ratio=0.5, epochs=2), backdoored, synth)
    assert d.report["pruned"] == 2 and d.flagged is None
    # pruned channels stay zero in both models, and the original still has all of them
    act = {}
    for name, net in (("pruned", d.pruned), ("tuned", d.repaired), ("orig", backdoored)):
        h = dict(net.named_modules())["1"].register_forward_hook(
            lambda m, i, o, name=name: act.__setitem__(name, o))
        net(synth["x_val"][:5])
        h.remove()
    ch = d.report["pruned_channels"]
    assert act["pruned"][:, ch].abs().max() == 0 and act["tuned"][:, ch].abs().max() == 0
    assert d.report["val_acc_fine_tuned"] >= d.report["val_acc_pruned"] - 0.05
    assert _unchanged(backdoored, before)
    rule = _fit(FinePruning(max_acc_drop=0.04, epochs=1), backdoored, synth)
    assert rule.report["val_acc_original"] - rule.report["val_acc_pruned"] <= 0.04 + 1e-6


def test_model_is_never_modified_in_place(net, synth):
    before = _state(net)
    copy_before = copy.deepcopy(net)
    for d in (FinePruning(prune_ratio=0.25, epochs=1), NeuralCleanse(epochs=1, anomaly_threshold=-1e9,
                                                                      unlearn_epochs=1)):
        _fit(d, net, synth)
        assert d.repaired is not net
    assert _unchanged(net, before)
    assert not net._forward_hooks and all(not m._forward_hooks for m in net.modules())
    assert torch.equal(net(synth["x_val"][:4]), copy_before(synth["x_val"][:4]))


def test_abs_stimulates_a_residual_net_at_its_feature_layer():
    """A ResNet's last conv feeds an addition with its block's input, which a batch grown through the
    stimulation hook cannot meet: ABS stimulates the net's ``feature_layer`` (the last stage's
    output, one score per channel), and a layer inside a block is refused with a clear error."""
    from linkbreaker_ext.models.resnet import ResNet20

    torch.manual_seed(0)
    net = ResNet20(num_classes=3).eval()
    x, y = torch.rand(6, 3, 32, 32), torch.tensor([0, 0, 1, 1, 2, 2])
    d = ABS(n_values=2)
    name, module = d._module(net)
    assert name == "layer3"
    scores, labels = d.stimulate(net, module, x, y, 3)
    assert scores.shape == labels.shape == (64,) and torch.isfinite(scores).all()
    inner = dict(net.named_modules())["layer3.2.conv2"]
    with pytest.raises(ValueError, match="choose another layer"):
        d.stimulate(net, inner, x, y, 3)


def _compare_baselines():
    """scripts/compare_baselines.py as a module (a script, not part of the package)."""
    import importlib.util
    from pathlib import Path
    spec = importlib.util.spec_from_file_location(
        "compare_baselines", Path(__file__).resolve().parents[1] / "scripts" / "compare_baselines.py")
    cb = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cb)
    return cb


def test_comparison_tables_cover_every_saved_run(tmp_path):
    """scripts/compare_baselines.py rebuilds its tables from every per-run JSON present, so a call
    for one attack or one defense adds rows instead of dropping the others' (hyphenated attack and
    defense names parse)."""
    cb = _compare_baselines()
    runs = tmp_path / "runs"
    runs.mkdir()
    for name in ("cifar10-trojan-square-0-neural-cleanse", "cifar10-source-specific-2-ibd-psc",
                 "cifar10-badnets-0-adversarial", "cifar10-badnets-1-strip", "mnist-blended-0-strip",
                 "cifar10-wanet-0-notes"):
        (runs / f"{name}.json").write_text("{}")
    attacks_, seeds, adv = cb.present_runs(tmp_path, "cifar10", ["badnets", "wanet", "trojan-square"])
    assert attacks_ == ["badnets", "trojan-square", "source-specific"]  # given order first, then sorted
    assert seeds == [0, 1, 2]
    assert adv == ["badnets"]
    # Table V compares timings measured in one call: a defense added to a model later does not make
    # that model the timing one
    one = {"call": "2026-01-01T00:00Z"}
    later = {"call": "2026-02-01T00:00Z"}
    runs_ = {"linkbreaker": {"badnets": [one], "wanet": [one]}, "strip": {"badnets": [one], "wanet": [one]},
             "neural-cleanse": {"badnets": [later], "wanet": [one]}}
    assert cb.timing_attack(runs_, ["badnets", "wanet"]) == "wanet"
    runs_["neural-cleanse"]["badnets"] = [one]
    assert cb.timing_attack(runs_, ["badnets", "wanet"]) == "badnets"
    del runs_["neural-cleanse"]["wanet"]
    runs_["neural-cleanse"]["badnets"] = [later]  # no model timed in one call: the first complete one
    assert cb.timing_attack(runs_, ["wanet", "badnets"]) == "badnets"


def test_comparison_table_gives_linkbreakers_alarm_only_operating_point(tmp_path):
    """Beside "verdict != accept", the TPR / FPR table gives LinkBreaker's trigger alarm alone,
    read from the same run's alarm rates: an OOD refusal is not a trigger claim."""
    import json
    from types import SimpleNamespace
    cb = _compare_baselines()
    runs = tmp_path / "runs"
    runs.mkdir()
    common = {"attack": "badnets", "seed": 0, "dataset": "gtsrb", "threads": 1, "poisoning": "data",
              "before": {"cda": 0.97, "asr": 0.999}, "timing": {"offline_s": 10.0, "online_ms_per_sample": 1.0}}
    lb_after = {"cda": 0.955, "asr": 0.0005, "cda_strict": 0.879, "asr_strict": 0.0, "r_acc": 0.0035,
                "alarm_rate_clean": 0.012, "alarm_rate_trigger": 0.994, "ood_rate_clean": 0.1015,
                "ood_rate_trigger": 0.006}
    (runs / "gtsrb-badnets-0-linkbreaker.json").write_text(json.dumps(
        {**common, "defense": "linkbreaker", "after": lb_after, "tpr": 1.0, "fpr": 0.1135, "auroc": 0.99}))
    (runs / "gtsrb-badnets-0-strip.json").write_text(json.dumps(
        {**common, "defense": "strip", "after": {"cda": 0.96, "asr": 0.999, "r_acc": 0.001,
                                                   "alarm_rate_clean": 0.006, "alarm_rate_trigger": 0.0},
         "tpr": 0.0, "fpr": 0.006, "auroc": 0.71}))
    cb.write_tables(tmp_path, SimpleNamespace(dataset="gtsrb", attacks=[], data="d", threads=1, reuse_guards=False,
                                              work="runs/gtsrb-sgd", recipe="sgd"))
    table = (tmp_path / "gtsrb.md").read_text()
    # the command it names regenerates it: the models' folder and recipe, and where the tables go
    assert f"--work runs/gtsrb-sgd --recipe sgd --out {tmp_path} " in table
    assert "| attack | linkbreaker TPR / FPR | linkbreaker, alarm only TPR / FPR | strip TPR / FPR |" in table
    assert "| badnets | 100.00 / 11.35 | 99.40 / 1.20 | 0.00 / 0.60 | n/a / n/a | n/a / n/a |" in table
