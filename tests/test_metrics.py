"""metrics.defended / metrics.undefended on hand-built GuardResults."""
import math

import pytest
import torch

from linkbreaker_ext import metrics
from linkbreaker_ext.verdict import ACCEPT, ALARM, OOD, GuardResult

T = torch.tensor
TARGET = 0


def result(labels, verdict):
    labels, verdict = T(labels), T(verdict)
    n = len(labels)
    return GuardResult(labels, verdict, torch.full((n, 3), 0.5), torch.full((3,), 0.6))


@pytest.fixture
def example():
    # clean:      accept 0 (right) | accept 1 (wrong, truth 2) | alarm (truth 1) | OOD -> 2 (right)
    clean = result([0, 1, -1, 2], [ACCEPT, ACCEPT, ALARM, OOD])
    y_clean = T([0, 2, 1, 2])
    # triggered:  accept target (attack wins) | alarm | accept true class | OOD labelled target
    trig = result([0, -1, 1, 0], [ACCEPT, ALARM, ACCEPT, OOD])
    y_trig = T([1, 2, 1, 2])
    return clean, y_clean, trig, y_trig


def test_defended_rates(example):
    m = metrics.defended(*example, target=TARGET)
    assert m["cda"] == pytest.approx(2 / 4)                    # samples 0 and 3 correct
    assert m["accept_accuracy_clean"] == pytest.approx(1 / 2)  # 2 accepted, 1 of them right
    assert m["alarm_rate_clean"] == pytest.approx(1 / 4)
    assert m["ood_rate_clean"] == pytest.approx(1 / 4)
    assert m["asr"] == pytest.approx(2 / 4)                    # samples 0 and 3 labelled target
    assert m["r_acc"] == pytest.approx(1 / 4)                  # sample 2 keeps its true label
    assert m["alarm_rate_trigger"] == pytest.approx(1 / 4)
    assert m["ood_rate_trigger"] == pytest.approx(1 / 4)
    assert all(0.0 <= v <= 1.0 for v in m.values())


def test_alarms_are_not_attack_successes():
    trig = result([-1, -1, -1], [ALARM, ALARM, ALARM])
    clean = result([1, 2], [ACCEPT, ACCEPT])
    m = metrics.defended(clean, T([1, 2]), trig, T([1, 2, 1]), target=TARGET)
    assert m["asr"] == 0.0 and m["r_acc"] == 0.0 and m["alarm_rate_trigger"] == 1.0
    assert m["cda"] == 1.0 and m["alarm_rate_clean"] == 0.0 and m["ood_rate_clean"] == 0.0
    # the same labels with another target: only the target label counts as a success
    trig = result([2, 2, 1], [ACCEPT, ACCEPT, ACCEPT])
    assert metrics.defended(clean, T([1, 2]), trig, T([1, 2, 1]), target=2)["asr"] == pytest.approx(2 / 3)
    assert metrics.defended(clean, T([1, 2]), trig, T([1, 2, 1]), target=1)["asr"] == pytest.approx(1 / 3)


def test_no_accepted_clean_sample_gives_nan_accept_accuracy():
    clean = result([-1, -1], [ALARM, ALARM])
    trig = result([0], [ACCEPT])
    m = metrics.defended(clean, T([0, 1]), trig, T([1]), target=TARGET)
    assert math.isnan(m["accept_accuracy_clean"])
    assert m["cda"] == 0.0 and m["alarm_rate_clean"] == 1.0 and m["asr"] == 1.0


def test_undefended():
    pred_clean, y_clean = T([0, 1, 2, 2, 1]), T([0, 1, 1, 2, 0])
    pred_trig = T([0, 0, 3, 0])
    m = metrics.undefended(pred_clean, y_clean, pred_trig, target=0)
    assert m == {"cda": pytest.approx(3 / 5), "asr": pytest.approx(3 / 4)}
    assert math.isnan(metrics.undefended(T([0]), T([0]), T([], dtype=torch.int64), target=0)["asr"])


def test_paired_drop_counts_flips_and_their_sampling_error():
    y = T([0, 1, 2, 3, 4, 5])
    bare = T([0, 1, 2, 3, 9, 9])      # right on the first four
    guard = T([0, -1, 7, 3, 4, 9])    # loses inputs 1 and 2 (an alarm, a wrong label), gains input 4
    m = metrics.paired_drop(bare, guard, y)
    assert (m["lost"], m["gained"], m["n"]) == (2, 1, 6)
    # the drop is (lost - gained) / n, and its standard error is that of the paired differences
    d = torch.tensor([0.0, 1.0, 1.0, 0.0, -1.0, 0.0])
    assert m["se"] == pytest.approx((d.std() / 6 ** 0.5).item())
    undefended = metrics.undefended(bare, y, T([0]), 0)["cda"]
    assert undefended - (guard == y).float().mean().item() == pytest.approx((m["lost"] - m["gained"]) / m["n"])
    same = metrics.paired_drop(bare, bare, y)
    assert (same["lost"], same["gained"], same["se"]) == (0, 0, 0.0)


def test_auroc_counts_pairs_and_ties():
    from linkbreaker_ext import metrics
    assert metrics.auroc(torch.tensor([0.0, 1, 2]), torch.tensor([3.0, 4])) == 1.0
    assert metrics.auroc(torch.tensor([5.0, 6]), torch.tensor([1.0, 2])) == 0.0
    assert metrics.auroc(torch.tensor([1.0, 1]), torch.tensor([1.0, 1])) == 0.5
    # pairs (c, t): (0,1) (0,4) (1,4) (2,4) win, (1,1) ties, (2,1) loses -> 4.5 / 6
    assert abs(metrics.auroc(torch.tensor([0.0, 1, 2]), torch.tensor([1.0, 4])) - 4.5 / 6) < 1e-12


def test_strict_metrics_count_only_accepted_answers():
    from linkbreaker_ext import metrics
    from linkbreaker_ext.verdict import GuardResult
    conf = torch.zeros(4, 3)
    th = torch.full((3,), 0.5)
    clean = GuardResult(torch.tensor([0, 1, 2, -1]), torch.tensor([0, 2, 0, 1]), conf, th)
    trig = GuardResult(torch.tensor([0, 0, 1, -1]), torch.tensor([0, 2, 0, 1]), conf, th)
    m = metrics.defended(clean, torch.tensor([0, 1, 2, 2]), trig, torch.tensor([1, 2, 1, 2]), 0)
    assert m["cda"] == 0.75 and m["cda_strict"] == 0.5   # the OOD hint of input 1 is right
    assert m["asr"] == 0.5 and m["asr_strict"] == 0.25   # ... and of triggered input 1 the target
