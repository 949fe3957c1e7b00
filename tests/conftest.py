"""Shared tiny fixtures: a synthetic 3-class 1x12x12 data set and a small conv net trained on it.

Each class is a bright shape (a horizontal bar, a vertical bar, a square blob) with a random shift
of up to one pixel, plus clipped Gaussian noise. Everything lives in the top-left 9x9 region: rows
9-11 and columns 9-11 are exactly 0 in every image, so they are *dormant* input pixels on clean data
and the natural place for a trigger. Most pixels are 0, so the guard's "blank" input is black.

Everything here is session-scoped and seeded, so every test sees the same model and data. The whole
session runs on one torch thread: the tensors are tiny (threads only cost), and float results must
not depend on which test happened to build a shared fixture (a fixture first built inside a
one-thread module and compared bit for bit with a fit under two threads once failed that way).
"""
import copy

import pytest
import torch
from torch import nn

from linkbreaker_ext import training
from linkbreaker_ext.guard import LinkBreaker

NUM_CLASSES = 3
SHAPE = (1, 12, 12)
ACTIVE = 9            # pixels [0, ACTIVE) x [0, ACTIVE) may be non-zero; the rest are always 0
TRIGGER = (slice(10, 12), slice(10, 12))  # a 2x2 patch inside the always-zero corner

# Cheap guard settings shared by the tests (a few seconds of fitting at most).
FAST = dict(neighbours=1, neighbour_iters=3, fractions=(0.1, 0.3, 0.6, 1.0))


def make_images(n_per_class: int, seed: int):
    """``(x, y)``: float32 ``[3n, 1, 12, 12]`` in [0, 1], int64 labels, classes interleaved."""
    g = torch.Generator().manual_seed(seed)
    n = n_per_class * NUM_CLASSES
    y = torch.arange(n) % NUM_CLASSES
    x = torch.zeros(n, *SHAPE)
    shift = torch.randint(-1, 2, (n, 2), generator=g)
    for i in range(n):
        dr, dc = shift[i].tolist()
        c = int(y[i])
        if c == 0:    # horizontal bar
            x[i, 0, 3 + dr:5 + dr, 1:8] = 1.0
        elif c == 1:  # vertical bar
            x[i, 0, 1:8, 3 + dc:5 + dc] = 1.0
        else:         # square blob
            x[i, 0, 3 + dr:6 + dr, 3 + dc:6 + dc] = 1.0
    noise = torch.randn(n, 1, ACTIVE, ACTIVE, generator=g) * 0.15
    x[:, :, :ACTIVE, :ACTIVE] += noise
    return x.clamp_(0.0, 1.0), y


def add_trigger(x: torch.Tensor) -> torch.Tensor:
    xt = x.clone()
    xt[:, 0, TRIGGER[0], TRIGGER[1]] = 1.0
    return xt


def make_deep_net(seed: int = 0) -> nn.Sequential:
    """Two conv blocks: Conv(1,4)-ReLU-Conv(4,6)-ReLU-MaxPool-Flatten-Linear(216,16)-ReLU-Linear(16,3);
    module names "0".."8" (hidden conv feature maps at "1" with 4 channels and "3" with 6)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(6 * 6 * 6, 16), nn.ReLU(), nn.Linear(16, NUM_CLASSES))


def make_net(seed: int = 0) -> nn.Sequential:
    """Conv(1,4,3)-ReLU-MaxPool-Flatten-Linear(144,16)-ReLU-Linear(16,3); module names "0".."6"."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(4 * 6 * 6, 16), nn.ReLU(), nn.Linear(16, NUM_CLASSES))


@pytest.fixture(scope="session")
def synth():
    x_train, y_train = make_images(200, seed=1)
    x_val, y_val = make_images(40, seed=2)
    x_test, y_test = make_images(100, seed=3)
    return {"x_train": x_train, "y_train": y_train, "x_val": x_val, "y_val": y_val,
            "x_test": x_test, "y_test": y_test}


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    """One torch thread for the whole session (see the module docstring)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _train(make, x, y):
    """``make()`` trained for 3 epochs on ``(x, y)``, without touching the global RNG state."""
    with torch.random.fork_rng():
        model = make()
        training.train_classifier(model, x, y, epochs=3, batch_size=32, lr=1e-2, seed=0,
                                  progress=False)
    return model.eval()


@pytest.fixture(scope="session")
def _trained_net(synth):
    return _train(make_net, synth["x_train"], synth["y_train"])


@pytest.fixture
def net(_trained_net):
    """A private copy of the trained model (tests may move or modify it)."""
    return copy.deepcopy(_trained_net)


@pytest.fixture(scope="session")
def shared_net(_trained_net):
    """The session's trained model itself; read-only by convention (used by the session guards)."""
    return _trained_net


@pytest.fixture(scope="session")
def deep_net(synth):
    """:func:`make_deep_net` trained on the clean data; read-only by convention."""
    return _train(make_deep_net, synth["x_train"], synth["y_train"])


@pytest.fixture(scope="session")
def backdoored_net(synth):
    """:func:`make_net` trained with 10% extra BadNets samples (:func:`add_trigger`, label 0): the
    trigger flips (nearly) every input of classes 1 and 2 to class 0. Read-only by convention."""
    x, y = synth["x_train"], synth["y_train"]
    n = len(x) // 10
    x_p = torch.cat([x, add_trigger(x[:n])])
    y_p = torch.cat([y, torch.zeros(n, dtype=torch.int64)])
    return _train(make_net, x_p, y_p)


@pytest.fixture(scope="session")
def guard_hidden(shared_net, synth):
    """A guard whose only masked layer is a hidden module (the ReLU after the first conv, masked per
    channel), so the hooked forward path is exercised."""
    return LinkBreaker.fit(shared_net, synth["x_val"], synth["y_val"], NUM_CLASSES,
                           layers=["1"], progress=False, **FAST)


@pytest.fixture(scope="session")
def guard_input(shared_net, synth):
    """A guard whose only masked layer is the input pixels."""
    return LinkBreaker.fit(shared_net, synth["x_val"], synth["y_val"], NUM_CLASSES,
                           layers=["input"], progress=False, **FAST)


@pytest.fixture(scope="session")
def guard_deep(deep_net, synth):
    """Three masked layers on the two-conv net: the pixels and both hidden conv feature maps."""
    return LinkBreaker.fit(deep_net, synth["x_val"], synth["y_val"], NUM_CLASSES,
                           layers=["input", "1", "3"], progress=False, **FAST)

