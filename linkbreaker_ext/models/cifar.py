"""The paper's CIFAR-10 model (Table I), the network of the STRIP and Neural Cleanse papers."""
from __future__ import annotations

from torch import nn


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
