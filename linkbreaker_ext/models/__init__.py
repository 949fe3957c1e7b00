"""Classifiers used in the experiments. Any ``nn.Module`` classifier can be guarded; these are the
paper's architectures so its numbers can be compared (Table I, Table VII).

All take float images in [0, 1] (no normalisation inside), work in ``channels_last``, and end in
their last registered ``nn.Linear``, the classifier head the guard masks.
"""
from __future__ import annotations

from torch import nn

from .cifar import CifarNet
from .mnist import MnistNet
from .resnet import ResNet18, ResNet20, ResNet50, ResNet101

__all__ = ["MnistNet", "CifarNet", "ResNet20", "ResNet18", "ResNet50", "ResNet101", "MODELS",
           "DEFAULT_ARCH", "build_model"]

# architecture name -> class; each is built as cls(num_classes, in_channels=...) (MnistNet: 1 channel)
MODELS = {"mnistnet": MnistNet, "cifarnet": CifarNet, "resnet20": ResNet20, "resnet18": ResNet18,
          "resnet50": ResNet50, "resnet101": ResNet101}
# data set -> the paper's model for it (Table I)
DEFAULT_ARCH = {"mnist": "mnistnet", "cifar10": "cifarnet", "gtsrb": "resnet20"}
_CHANNELS = {"mnist": 1, "cifar10": 3, "gtsrb": 3}


def build_model(dataset: str, num_classes: int, arch: str | None = None) -> nn.Module:
    """A fresh model for ``dataset``: the paper's architecture for it, or ``arch`` (a key of
    :data:`MODELS`), e.g. ``build_model("gtsrb", 43, arch="resnet18")`` for Table VII."""
    if arch is None:
        if dataset not in DEFAULT_ARCH:
            raise ValueError(f"no built-in model for {dataset!r}; known: {sorted(DEFAULT_ARCH)} "
                             f"(or pass arch= one of {sorted(MODELS)})")
        arch = DEFAULT_ARCH[dataset]
    if arch not in MODELS:
        raise ValueError(f"unknown architecture {arch!r}; known: {sorted(MODELS)}")
    if arch == "mnistnet":
        if dataset != "mnist":
            raise ValueError(f"mnistnet takes 1x28x28 images; it cannot be built for {dataset!r}")
        return MnistNet(num_classes)
    return MODELS[arch](num_classes, in_channels=_CHANNELS.get(dataset, 3))
