"""Model zoo for the supported datasets (8x8, 28x28 and 32x32 images, and 1-D signals).

BatchNorm running statistics stay local to each agent and are never mixed;
only parameters are exchanged. The statistics describe the agent's own shard,
so averaging them would describe no real data; to evaluate an averaged model,
recompute them with :func:`recalibrate_bn`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

MODELS = ("mlp", "cnn", "resnet20", "vgg11")
# The digits results were measured with 64 hidden units; on 1-D signals the MNIST-1D authors' 100.
IMAGE_MLP_HIDDEN = 64
SIGNAL_MLP_HIDDEN = 100


def build(name: str, input_shape: tuple[int, ...], num_classes: int, *, seed: int = 0) -> nn.Module:
    """Build ``name`` with parameters that depend only on ``seed`` (global RNG untouched)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}")
    input_shape = tuple(int(d) for d in input_shape)
    signal = len(input_shape) == 2
    if name == "cnn" and len(input_shape) not in (2, 3):
        raise ValueError(f"model 'cnn' needs image inputs shaped C x H x W or signals shaped C x L, got {input_shape}")
    if name not in ("mlp", "cnn") and len(input_shape) != 3:
        raise ValueError(f"model {name!r} needs image inputs shaped C x H x W, got {input_shape}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if name == "mlp":
            return _mlp(input_shape, num_classes, hidden=SIGNAL_MLP_HIDDEN if signal else IMAGE_MLP_HIDDEN)
        if name == "cnn":
            if signal:
                return _Conv1dNet(input_shape, num_classes)
            return _LeNet(input_shape[0], num_classes)
        if name == "resnet20":
            return _ResNet20(input_shape[0], num_classes)
        return _VGG11(input_shape, num_classes)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def warm_up(model: torch.nn.Module, xb: torch.Tensor, yb: torch.Tensor) -> None:
    """One forward and backward before the clock starts, then everything as it was.

    The first pass pays for lazy set-up (allocations, kernel selection), several times a step's
    cost; in async mode a neighbour's first message would arrive that much later (a straggler's
    slowness multiplies it), and it would be dropped as never heard from in the meantime.
    """
    buffers = [b.detach().clone() for b in model.buffers()]
    nn.functional.cross_entropy(model(xb), yb).backward()
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        for b, saved in zip(model.buffers(), buffers):
            b.copy_(saved)


@torch.no_grad()
def recalibrate_bn(model: nn.Module, x: torch.Tensor, batch_size: int = 256) -> None:
    """Recompute BatchNorm running statistics as an exact average over ``x``; leaves eval mode."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average instead of an exponential one
    chunks = list(torch.split(x, batch_size))
    # BatchNorm in train mode rejects a single sample when the feature map is 1x1.
    if len(chunks) > 1 and len(chunks[-1]) == 1:
        chunks[-2:] = [torch.cat(chunks[-2:])]
    device = next(model.parameters()).device
    model.train()
    try:
        for chunk in chunks:
            model(chunk.to(device))
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.eval()


def _mlp(input_shape, num_classes, hidden: int) -> nn.Module:
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(math.prod(input_shape), hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, num_classes),
    )


class _Conv1dNet(nn.Module):
    """The MNIST-1D authors' CNN: three strided 1-D convolutions of 25 channels and a linear layer.

    About 5,000 parameters on 40-sample signals (Greydanus & Kobak 2020, whose table gives it 94 %).
    """

    def __init__(self, input_shape: tuple[int, int], num_classes: int, channels: int = 25):
        super().__init__()
        in_channels, length = input_shape
        self.features = nn.Sequential(
            nn.Conv1d(in_channels, channels, 5, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv1d(channels, channels, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv1d(channels, channels, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Flatten(),
        )
        for kernel in (5, 3, 3):
            length = (length + 2 - kernel) // 2 + 1
        if length < 1:
            raise ValueError(f"model 'cnn' needs signals of at least 3 samples, got {input_shape}")
        self.classifier = nn.Linear(channels * length, num_classes)

    def forward(self, x):
        return self.classifier(self.features(x))


class _LeNet(nn.Module):
    """LeNet-5 with padded convolutions and an adaptive pool, so 8x8 inputs fit too."""

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(4),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(16 * 4 * 4, 120),
            nn.ReLU(),
            nn.Linear(120, 84),
            nn.ReLU(),
            nn.Linear(84, num_classes),
        )

    def forward(self, x):
        return self.classifier(self.features(x))


class _PadShortcut(nn.Module):
    """Parameter-free shortcut (option A of He et al.): subsample, zero-pad channels."""

    def __init__(self, extra_channels: int):
        super().__init__()
        self.extra = extra_channels

    def forward(self, x):
        x = x[:, :, ::2, ::2]
        return F.pad(x, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))


class _BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        if stride != 1 or in_planes != planes:
            self.shortcut = _PadShortcut(planes - in_planes)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class _ResNet20(nn.Module):
    """CIFAR ResNet-20: 3 stages of 3 basic blocks (16/32/64 channels), global average pool."""

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, 16, 3, padding=1, bias=False),
            nn.BatchNorm2d(16),
            nn.ReLU(),
        )
        blocks, planes = [], 16
        for width, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(3):
                blocks.append(_BasicBlock(planes, width, stride if i == 0 else 1))
                planes = width
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, num_classes))
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)))


_VGG11_LAYOUT = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


class _VGG11(nn.Module):
    """CIFAR VGG-11 with BatchNorm.

    A max-pool is skipped once the feature map is down to 1 pixel in a
    direction, so inputs smaller than 32x32 (e.g. 8x8 digits) still fit.
    """

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int):
        super().__init__()
        channels, height, width = input_shape
        layers: list[nn.Module] = []
        for item in _VGG11_LAYOUT:
            if item == "M":
                if height >= 2 and width >= 2:
                    layers.append(nn.MaxPool2d(2))
                    height, width = height // 2, width // 2
                continue
            layers += [nn.Conv2d(channels, item, 3, padding=1), nn.BatchNorm2d(item), nn.ReLU()]
            channels = item
        # Inputs larger than 32x32 leave more than 1x1; pooling keeps the classifier fixed.
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(512, num_classes)

    def forward(self, x):
        return self.classifier(self.features(x))
