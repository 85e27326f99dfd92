"""Built-in models. Each takes ``input_shape`` and ``num_classes``; sizes that follow from the
input are computed here, so the same factory serves 8x8 digits and 28x28 MNIST."""

from __future__ import annotations

import math

from torch import nn

from dcomp.errors import UsageError


def _image_shape(input_shape, model: str) -> tuple[int, int, int]:
    if len(input_shape) != 3:
        raise UsageError(f"{model} needs image inputs (C, H, W); the data has shape {list(input_shape)}")
    return tuple(int(s) for s in input_shape)


class LeNet300100(nn.Module):
    """Han et al.'s LeNet-300-100: two hidden fully connected layers of 300 and 100 units."""

    def __init__(self, input_shape=(1, 28, 28), num_classes: int = 10, hidden=(300, 100)):
        super().__init__()
        d = math.prod(input_shape)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(d, hidden[0])
        self.fc2 = nn.Linear(hidden[0], hidden[1])
        self.fc3 = nn.Linear(hidden[1], num_classes)
        self.relu = nn.ReLU()

    def forward(self, x):
        x = self.flatten(x)
        x = self.relu(self.fc1(x))
        x = self.relu(self.fc2(x))
        return self.fc3(x)


class LeNet5(nn.Module):
    """Caffe's LeNet-5 as used in Deep Compression: conv 20@5x5, pool, conv 50@5x5, pool, fc 500, fc."""

    def __init__(self, input_shape=(1, 28, 28), num_classes: int = 10):
        super().__init__()
        c, h, w = _image_shape(input_shape, "lenet-5")
        if min(h, w) < 16:
            raise UsageError(f"lenet-5 needs inputs of at least 16x16, got {h}x{w}: add --resize 28")
        oh, ow = ((h - 4) // 2 - 4) // 2, ((w - 4) // 2 - 4) // 2
        self.conv1 = nn.Conv2d(c, 20, 5)
        self.conv2 = nn.Conv2d(20, 50, 5)
        self.pool = nn.MaxPool2d(2)
        self.relu = nn.ReLU()
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(50 * oh * ow, 500)
        self.fc2 = nn.Linear(500, num_classes)

    def forward(self, x):
        x = self.pool(self.relu(self.conv1(x)))
        x = self.pool(self.relu(self.conv2(x)))
        x = self.relu(self.fc1(self.flatten(x)))
        return self.fc2(x)


class VGGSmall(nn.Module):
    """VGG-style: stages of 3x3 conv + BatchNorm + ReLU, max-pooling between stages,
    global average pooling, one classifier layer. ``widths`` uses "M" for a pooling step."""

    def __init__(self, input_shape=(1, 8, 8), num_classes: int = 10,
                 widths=(32, 32, "M", 64, 64, "M", 128, 128, "M")):
        super().__init__()
        c, h, w = _image_shape(input_shape, "vgg-small")
        pools = sum(1 for v in widths if v == "M")
        if min(h, w) < 2 ** pools:
            raise UsageError(f"vgg-small with {pools} pooling steps needs inputs of at least {2 ** pools}x{2 ** pools}")
        layers: list[nn.Module] = []
        for v in widths:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(c, int(v), 3, padding=1, bias=False), nn.BatchNorm2d(int(v)), nn.ReLU()]
                c = int(v)
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(c, num_classes)

    def forward(self, x):
        return self.classifier(self.flatten(self.pool(self.features(x))))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNetSmall(nn.Module):
    """ResNet-style: a 3x3 stem, three stages of basic residual blocks (the 2nd and 3rd
    halve the resolution with a 1x1 projection shortcut), global pooling, classifier."""

    def __init__(self, input_shape=(1, 8, 8), num_classes: int = 10, widths=(16, 32, 64), blocks: int = 1):
        super().__init__()
        c, h, w = _image_shape(input_shape, "resnet-small")
        self.conv1 = nn.Conv2d(c, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        cin = widths[0]
        for i, cout in enumerate(widths):
            stage = []
            for b in range(blocks):
                stage.append(BasicBlock(cin, cout, stride=2 if (i > 0 and b == 0) else 1))
                cin = cout
            setattr(self, f"layer{i + 1}", nn.Sequential(*stage))
        self.num_stages = len(widths)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return self.fc(self.flatten(self.pool(x)))
