"""The built-in architectures' torch modules (imported only in the conversion child).

Their parameter names are the contract with uploaded weights: a state_dict saved from the same
definition loads with ``strict=True``. ``seed`` is the ``nn.Sequential`` of the article the project
started from, so its keys are ``0.weight``, ``0.bias``, ``2.weight``, ``2.bias``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

_ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU}


def seed() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))


def mlp(
    in_features: int = 64,
    hidden: Sequence[int] = (256, 256),
    out_features: int = 10,
    activation: str = "relu",
) -> nn.Module:
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {', '.join(_ACTIVATIONS)}, not {activation!r}")
    layers: list[nn.Module] = []
    width = in_features
    for size in hidden:
        layers += [nn.Linear(width, size), _ACTIVATIONS[activation]()]
        width = size
    layers.append(nn.Linear(width, out_features))
    return nn.Sequential(*layers)


def linear_heavy(in_features: int = 1024, out_features: int = 1000) -> nn.Module:
    """Big enough (14.6M parameters) for int8 GEMMs to beat fp32: the quantization benchmark."""
    return mlp(in_features, (4096, 2048), out_features)


def _conv_bn_relu(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(),
    ]


def small_cnn(
    in_channels: int = 3, num_classes: int = 10, width: int = 16, depth: int = 4
) -> nn.Module:
    if depth < 1:
        raise ValueError("depth must be at least 1")
    layers: list[nn.Module] = []
    channels = in_channels
    for _ in range(depth):
        layers += _conv_bn_relu(channels, width)
        channels = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes)]
    return nn.Sequential(*layers)


class BasicBlock(nn.Module):
    """ResNet's two-conv residual block; the add is out-of-place so exporters and pruners trace it."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 1000,
        widths: Sequence[int] = (64, 128, 256, 512),
        blocks: Sequence[int] = (2, 2, 2, 2),
    ) -> None:
        super().__init__()
        if len(widths) != len(blocks) or not widths:
            raise ValueError("widths and blocks must be non-empty lists of the same length")
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 7, stride=2, padding=3, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(),
            nn.MaxPool2d(3, stride=2, padding=1),
        )
        stages: list[nn.Module] = []
        cin = widths[0]
        for index, (width, count) in enumerate(zip(widths, blocks, strict=True)):
            for block in range(count):
                stride = 2 if index > 0 and block == 0 else 1
                stages.append(BasicBlock(cin, width, stride))
                cin = width
        self.layers = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.layers(self.stem(x))), 1))


class TransformerEncoderNet(nn.Module):
    """Input [B, T, d_model]. ``seq_len`` adds a learned positional embedding (fixing T);
    ``num_classes`` adds mean pooling over T and a linear head, giving [B, num_classes] logits."""

    def __init__(
        self,
        *,
        d_model: int = 64,
        nhead: int = 4,
        num_layers: int = 2,
        dim_feedforward: int = 128,
        seq_len: int | None = None,
        num_classes: int | None = None,
    ) -> None:
        super().__init__()
        self.pos = nn.Parameter(torch.zeros(1, seq_len, d_model)) if seq_len else None
        layer = nn.TransformerEncoderLayer(
            d_model, nhead, dim_feedforward, dropout=0.0, batch_first=True
        )
        # Nested tensors are a training/padding fast path the exporters cannot follow.
        self.encoder = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, num_classes) if num_classes else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pos is not None:
            x = x + self.pos
        hidden = self.encoder(x)
        if self.head is None:
            return hidden
        return self.head(hidden.mean(dim=1))
