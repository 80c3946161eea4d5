"""The class the server builds when an upload names ``architecture="tiny_convnet"``.

The server imports this module only in its conversion child, and only because the operator
installed this package: uploaded weights never carry code.
"""

from __future__ import annotations

from typing import Any

from torch import nn


class TinyConvNet(nn.Module):
    """Conv-BN-ReLU twice, global average pooling, a classifier; input [B, channels, H, W]."""

    def __init__(self, in_channels: int = 3, width: int = 16, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1, bias=False),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(2 * width, num_classes)

    def forward(self, x: Any) -> Any:
        return self.classifier(self.pool(self.features(x)).flatten(1))


def build_tiny_convnet(**kwargs: Any) -> nn.Module:
    """The entry point: Ferry calls it with the upload's ``architecture_kwargs``."""
    return TinyConvNet(**kwargs)
