"""ResNets for 32x32 inputs: the paper's GTSRB ResNet20 (Table I) and the ResNet18/50/101 of its
Table VII.

Every ReLU is its own module and used once per forward, and every block is a module, so a guard can
hook any of them (``layer1.0.relu2`` is the output of the first block); ``fc`` is the last
``nn.Linear``, the classifier head LinkBreaker masks.
"""
from __future__ import annotations

from torch import nn


class BasicBlock(nn.Module):
    """Two 3x3 conv + BatchNorm, added to the shortcut, then ReLU (He et al. 2016).

    ``bias`` and ``shortcut_bn`` choose the flavour: ResNet20 follows the Keras ResNet v1 example
    (biased convs, a plain 1x1 conv projection), ResNet18 the torchvision one (no conv bias, 1x1 conv +
    BatchNorm projection)."""

    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1, bias: bool = False,
                 shortcut_bn: bool = True):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=bias)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=bias)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = _shortcut(cin, planes, stride, bias, shortcut_bn)
        self.relu2 = nn.ReLU()

    def forward(self, x):
        out = self.relu1(self.bn1(self.conv1(x)))
        return self.relu2(self.bn2(self.conv2(out)) + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3, 1x1 expand (x4), each with BatchNorm, added to the shortcut, then ReLU."""

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1):
        super().__init__()
        cout = planes * self.expansion
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(planes, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.shortcut = _shortcut(cin, cout, stride, False, True)
        self.relu3 = nn.ReLU()

    def forward(self, x):
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        return self.relu3(self.bn3(self.conv3(out)) + self.shortcut(x))


def _shortcut(cin: int, cout: int, stride: int, bias: bool, bn: bool) -> nn.Module:
    if stride == 1 and cin == cout:
        return nn.Identity()
    conv = nn.Conv2d(cin, cout, 1, stride, bias=bias)
    return nn.Sequential(conv, nn.BatchNorm2d(cout)) if bn else conv


def _init(model: nn.Module) -> None:
    """He initialisation of the convs (as both reference implementations do), zero conv biases."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class ResNet20(nn.Module):
    """CIFAR-style ResNet20 (He et al. 2016, Sec. 4.2): a 3x3 conv stem with 16 channels, three stages
    of three basic blocks (16, 32, 64 channels; stride 2 at stages 2 and 3), global average pool and
    one Linear. As in the Keras ResNet v1 example that STRIP (and so the paper) used: convs have a
    bias and the two down-sampling shortcuts are plain 1x1 convs. With 43 classes that is 275,211
    trainable parameters plus 1,376 BatchNorm running statistics = 276,587, the count Keras reports
    and the paper's GTSRB model has."""

    feature_layer = "layer3"  # the last feature map whose later layers work per sample (ABS stimulates it)

    def __init__(self, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu1 = nn.ReLU()
        cin = 16
        for i, width in enumerate((16, 32, 64)):
            blocks = []
            for j in range(3):
                stride = 2 if i > 0 and j == 0 else 1
                blocks.append(BasicBlock(cin, width, stride, bias=True, shortcut_bn=False))
                cin = width
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(64, num_classes)
        _init(self)

    def forward(self, x):
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.flatten(self.pool(x)))


class ResNet(nn.Module):
    """ResNet18/50/101 adapted to 32x32 inputs (the common CIFAR adaptation, e.g. kuangliu's
    pytorch-cifar and BackdoorBench): a 3x3 stride-1 stem with 64 channels and no max-pool, so the
    four stages see 32, 16, 8 and 4 pixels instead of an ImageNet stem's 8 ... 1."""

    feature_layer = "layer4"  # the last feature map whose later layers work per sample (ABS stimulates it)

    def __init__(self, block, num_blocks, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu1 = nn.ReLU()
        cin = 64
        for i, (planes, n) in enumerate(zip((64, 128, 256, 512), num_blocks)):
            blocks = []
            for j in range(n):
                blocks.append(block(cin, planes, 2 if i > 0 and j == 0 else 1))
                cin = planes * block.expansion
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(cin, num_classes)
        _init(self)

    def forward(self, x):
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.flatten(self.pool(x)))


class ResNet18(ResNet):
    """Basic blocks (2, 2, 2, 2): 11,190,891 parameters with 43 classes."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3):
        super().__init__(BasicBlock, (2, 2, 2, 2), num_classes, in_channels)


class ResNet50(ResNet):
    """Bottleneck blocks (3, 4, 6, 3): 23,588,459 parameters with 43 classes."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3):
        super().__init__(Bottleneck, (3, 4, 6, 3), num_classes, in_channels)


class ResNet101(ResNet):
    """Bottleneck blocks (3, 4, 23, 3): 42,580,587 parameters with 43 classes."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3):
        super().__init__(Bottleneck, (3, 4, 23, 3), num_classes, in_channels)
