"""Benchmark models: a tiny MLP, a small CNN and a compute-heavy ResNet-style net, as ONNX files
with a dynamic batch dimension. Built with torch (the dev install has it) and exported once."""

from __future__ import annotations

from pathlib import Path

import onnx

from ferry.server.examples import mlp_model

SHAPES = {
    "mlp": (64,),
    "cnn": (3, 64, 64),
    "resnet": (3, 224, 224),
}


def _torch_model(name: str):  # type: ignore[no-untyped-def]
    import torch
    from torch import nn

    torch.manual_seed(0)
    if name == "cnn":
        layers: list[nn.Module] = []
        ch = 3
        for width in (16, 32, 32, 64):
            layers += [nn.Conv2d(ch, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
            ch = width
        return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(ch, 10))

    class Block(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int) -> None:
            super().__init__()
            self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.b1 = nn.BatchNorm2d(cout)
            self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.b2 = nn.BatchNorm2d(cout)
            self.down = (
                nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                if stride != 1 or cin != cout
                else nn.Identity()
            )

        def forward(self, x):  # type: ignore[no-untyped-def]
            y = torch.relu(self.b1(self.c1(x)))
            return torch.relu(self.b2(self.c2(y)) + self.down(x))

    stem = [
        nn.Conv2d(3, 64, 7, 2, 3, bias=False),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        nn.MaxPool2d(3, 2, 1),
    ]
    blocks: list[nn.Module] = []
    cin = 64
    for i, cout in enumerate((64, 128, 256, 512)):
        for j in range(2):
            blocks.append(Block(cin, cout, 2 if (j == 0 and i > 0) else 1))
            cin = cout
    head = [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, 1000)]
    return nn.Sequential(*stem, *blocks, *head)


def build(name: str, path: Path) -> Path:
    """Write ``name``'s ONNX to ``path`` (cached: an existing file is reused)."""
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    if name == "mlp":
        onnx.save(mlp_model(), str(path))
        return path
    import torch

    model = _torch_model(name).eval()
    example = torch.randn(2, *SHAPES[name])
    with torch.no_grad():
        torch.onnx.export(
            model,
            (example,),
            str(path),
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            dynamo=False,
            opset_version=17,
        )
    return path
