"""The MNIST task's networks. Each builder returns a plain `nn.Module` mapping (N, 1, 28, 28) images to 10 logits."""

from __future__ import annotations

from itertools import pairwise

from torch import nn


def mlp(hidden: int = 128, layers: int = 1) -> nn.Sequential:
    """784 -> `layers` x (hidden, ReLU) -> 10: the Flux tutorial's network (hidden=128, one layer)."""
    widths = [28 * 28] + [hidden] * layers
    body = [m for w_in, w_out in pairwise(widths) for m in (nn.Linear(w_in, w_out), nn.ReLU())]
    return nn.Sequential(nn.Flatten(), *body, nn.Linear(hidden, 10))


def paper_cnn() -> nn.Sequential:
    """The Julia AD paper's CNN: conv 3x3 1->6 (no bias), ReLU, max-pool 2x2, dense ->84 (no bias), ReLU, dense 84->10."""
    return nn.Sequential(
        nn.Conv2d(1, 6, kernel_size=3, bias=False),  # 28x28 -> 26x26
        nn.ReLU(),
        nn.MaxPool2d(2),  # -> 13x13
        nn.Flatten(),
        nn.Linear(6 * 13 * 13, 84, bias=False),
        nn.ReLU(),
        nn.Linear(84, 10),
    )


def convnet(channels: int = 32, hidden: int = 128, dropout: float = 0.25) -> nn.Sequential:
    """A small, fast CNN for >= 99.2 % test accuracy in a few epochs (two conv-BN-ReLU-pool blocks, one hidden layer)."""

    def block(c_in: int, c_out: int) -> list[nn.Module]:
        return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(), nn.MaxPool2d(2)]

    return nn.Sequential(
        *block(1, channels),  # -> 14x14
        *block(channels, 2 * channels),  # -> 7x7
        nn.Flatten(),
        nn.Linear(2 * channels * 7 * 7, hidden),
        nn.ReLU(),
        nn.Dropout(dropout),
        nn.Linear(hidden, 10),
    )


def speedrun_cnn(channels: tuple[int, int] = (24, 32), hidden: int = 256) -> nn.Sequential:
    """A small CNN for 99 % in one or two epochs at a large batch (the shape of tuomaso/train_mnist_fast's network):
    conv 5x5 1->24, max-pool, ReLU, conv 3x3 24->32, max-pool, ReLU, dense 800->256, ReLU, dense 256->10."""
    c1, c2 = channels
    return nn.Sequential(
        nn.Conv2d(1, c1, kernel_size=5),  # 28x28 -> 24x24
        nn.MaxPool2d(2),  # -> 12x12
        nn.ReLU(),
        nn.Conv2d(c1, c2, kernel_size=3),  # -> 10x10
        nn.MaxPool2d(2),  # -> 5x5
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(c2 * 5 * 5, hidden),
        nn.ReLU(),
        nn.Linear(hidden, 10),
    )
