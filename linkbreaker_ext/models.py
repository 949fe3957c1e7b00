"""Classifiers used in the experiments. Any ``nn.Module`` classifier can be guarded; these are the
paper's architectures so its numbers can be compared."""
from __future__ import annotations

from torch import nn


class MnistNet(nn.Module):
    """The paper's MNIST model, 2 Conv + 2 Dense (STRIP's Conv8-pool-Conv16-pool-FC100-FC10, 3x3 'same'
    convolutions: 80,758 parameters)."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(16 * 7 * 7, 100)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(100, num_classes)

    def forward(self, x):
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.pool2(self.relu2(self.conv2(x)))
        return self.fc2(self.relu3(self.fc1(self.flatten(x))))


def _conv_bn(cin: int, cout: int, name: str) -> list:
    return [(f"conv{name}", nn.Conv2d(cin, cout, 3, padding=1)), (f"bn{name}", nn.BatchNorm2d(cout)),
            (f"relu{name}", nn.ReLU())]


class CifarNet(nn.Module):
    """The CIFAR-10 model of the STRIP and Neural Cleanse papers (the paper's Table I): three blocks of
    two 3x3 conv + BatchNorm + ReLU (32, 32 | 64, 64 | 128, 128 channels), each block ending in a 2x2
    max-pool, then one Linear to the classes: 308,394 parameters. Module names (``relu1`` ... ``relu6``,
    ``pool1`` ... ``pool3``) are the layers a guard can mask."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        widths = [in_channels, 32, 32, 64, 64, 128, 128]
        for i in range(6):
            for name, module in _conv_bn(widths[i], widths[i + 1], str(i + 1)):
                self.add_module(name, module)
            if i % 2 == 1:
                self.add_module(f"pool{i // 2 + 1}", nn.MaxPool2d(2))
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(128 * 4 * 4, num_classes)

    def forward(self, x):
        for i in range(1, 7):
            x = getattr(self, f"relu{i}")(getattr(self, f"bn{i}")(getattr(self, f"conv{i}")(x)))
            if i % 2 == 0:
                x = getattr(self, f"pool{i // 2}")(x)
        return self.fc(self.flatten(x))


MODELS = {"mnist": MnistNet, "cifar10": CifarNet}


def build_model(dataset: str, num_classes: int) -> nn.Module:
    try:
        return MODELS[dataset](num_classes)
    except KeyError:
        raise ValueError(f"no built-in model for {dataset!r}; known: {sorted(MODELS)}") from None
