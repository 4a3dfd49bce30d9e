from torch import nn


def mlp(hidden: int = 32, num_classes: int = 4) -> nn.Sequential:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))


def cnn(channels: int = 8, num_classes: int = 4, dropout: float = 0.1) -> nn.Sequential:
    """With batch norm and dropout: what the precision plugins keep in FP32, and what draws random numbers."""
    return nn.Sequential(
        nn.Conv2d(1, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Dropout(dropout), nn.Linear(channels * 16, num_classes),
    )
