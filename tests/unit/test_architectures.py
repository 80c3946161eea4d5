"""The architecture registry: built-ins, entry-point plugins, and the torch-free listing the
serving process relies on."""

from __future__ import annotations

import subprocess
import sys
from importlib import metadata
from typing import Any

import pytest
import torch

from ferry.server.convert import architectures
from ferry.server.convert.worker.architectures import build
from ferry.server.errors import InvalidArgument

BUILTINS = ["seed", "mlp", "small_cnn", "resnet", "transformer_encoder", "linear_heavy"]
SMALL: dict[str, dict[str, Any]] = {
    "seed": {},
    "mlp": {"in_features": 5, "hidden": [7], "out_features": 3, "activation": "gelu"},
    "small_cnn": {"num_classes": 4, "width": 4, "depth": 2},
    "resnet": {"num_classes": 5, "widths": [8, 16], "blocks": [1, 1]},
    "transformer_encoder": {"d_model": 16, "nhead": 2, "num_layers": 1, "dim_feedforward": 32},
}


def tiny_plugin(width: int = 2) -> torch.nn.Module:
    return torch.nn.Linear(3, width)


def fake_entry_points(monkeypatch: pytest.MonkeyPatch, **targets: str) -> None:
    eps = [
        metadata.EntryPoint(name, value, architectures.ENTRY_POINT_GROUP)
        for name, value in targets.items()
    ]

    def entry_points(*, group: str) -> list[metadata.EntryPoint]:
        return eps if group == architectures.ENTRY_POINT_GROUP else []

    monkeypatch.setattr(architectures.metadata, "entry_points", entry_points)


def test_listing_and_default_specs_do_not_import_torch() -> None:
    """The server lists architectures and checks specs; an ONNX-source child never needs torch."""
    code = (
        "import sys\n"
        "from ferry.server.convert import architectures, validation\n"
        "from ferry.server.convert.worker import child, pipeline\n"
        f"assert architectures.available()[:6] == {BUILTINS!r}\n"
        "assert architectures.default_input_specs('resnet', {})[0].shape == [-1, 3, 224, 224]\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


@pytest.mark.parametrize("name", list(SMALL))
def test_builtin_runs_on_its_default_input(name: str) -> None:
    kwargs: dict[str, Any] = SMALL[name]
    module = build(name, kwargs)
    assert not module.training
    (spec,) = architectures.default_input_specs(name, kwargs)
    assert spec.datatype == "FP32" and spec.shape[0] == -1
    with torch.no_grad():
        out = module(torch.randn(2, *spec.shape[1:]))
    assert out.shape[0] == 2


def test_seed_keys_match_the_article() -> None:
    keys = list(build("seed", {}).state_dict())
    assert keys == ["0.weight", "0.bias", "2.weight", "2.bias"]


def test_default_sizes() -> None:
    resnet = build("resnet", {})
    assert sum(p.numel() for p in resnet.parameters()) == pytest.approx(11.7e6, rel=0.01)
    heavy = build("linear_heavy", {})
    assert sum(p.numel() for p in heavy.parameters()) >= 10_000_000
    assert architectures.default_input_specs("linear_heavy", {})[0].shape == [-1, 1024]


def test_transformer_options_shape_the_output() -> None:
    base = {"d_model": 16, "nhead": 2, "num_layers": 1, "dim_feedforward": 32}
    x = torch.randn(3, 5, 16)
    with torch.no_grad():
        assert build("transformer_encoder", base)(x).shape == (3, 5, 16)
        head = build("transformer_encoder", {**base, "seq_len": 5, "num_classes": 4})
        assert head(x).shape == (3, 4)
    specs = architectures.default_input_specs("transformer_encoder", {**base, "seq_len": 5})
    assert specs[0].shape == [-1, 5, 16]


def test_unknown_name_lists_what_exists() -> None:
    with pytest.raises(
        InvalidArgument, match="unknown architecture 'nope': available are seed, mlp"
    ):
        build("nope", {})
    assert architectures.default_input_specs("nope", {}) == []


def test_bad_kwargs_are_invalid_argument() -> None:
    with pytest.raises(InvalidArgument, match="rejected its arguments"):
        build("mlp", {"depth": 3})
    with pytest.raises(InvalidArgument, match="activation"):
        build("mlp", {"activation": "swish"})


def test_plugins_from_entry_points(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_entry_points(
        monkeypatch,
        tiny=f"{__name__}:tiny_plugin",
        seed=f"{__name__}:tiny_plugin",  # cannot shadow a built-in
        broken=f"{__name__}:BUILTINS",
    )
    assert architectures.available() == [*BUILTINS, "broken", "tiny"]
    module = build("tiny", {"width": 4})
    assert isinstance(module, torch.nn.Linear) and module.out_features == 4
    assert isinstance(build("seed", {}), torch.nn.Sequential)
    assert architectures.default_input_specs("tiny", {}) == []  # plugins are not loaded to ask
    with pytest.raises(InvalidArgument, match="not callable"):
        build("broken", {})


class SeedArticle(torch.nn.Module):
    """The seed article's own class: the built-in seed's layers under other names."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(3, 4)
        self.fc2 = torch.nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def test_the_seed_articles_state_dict_loads_into_the_builtin_seed() -> None:
    """torch.save(model.state_dict(), 'model.pth') of the article's class, with
    architecture='seed': the keys differ (fc1/fc2 vs 0/2), every shape occurs once, so the
    weights are matched by shape, and the built-in computes what the user's class did."""
    from ferry.server.convert.worker.load import _load_weights

    torch.manual_seed(0)
    article = SeedArticle().eval()
    seed = build("seed", {})
    _load_weights(seed, article.state_dict(), "seed")
    x = torch.randn(5, 3)
    with torch.no_grad():
        assert torch.equal(seed(x), article(x))


def test_weights_under_other_names_are_never_guessed_when_shapes_repeat() -> None:
    """Two layers of one shape could be swapped: keys must match then, and the message names
    the ways out."""
    from ferry.server.convert.worker.load import _load_weights, rename_by_shape

    twin = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    other = {f"layer{i}.{p}": t for i, m in enumerate(twin) for p, t in m.state_dict().items()}
    assert rename_by_shape(twin.state_dict(), other) is None
    with pytest.raises(InvalidArgument, match=r"upload the nn\.Module itself") as info:
        _load_weights(
            build("mlp", {"in_features": 4, "hidden": [4], "out_features": 4}), other, "mlp"
        )
    assert "ferry.architectures" in info.value.message


def test_the_cli_help_example_kwargs_build_the_builtin_mlp() -> None:
    import json

    from ferry.cli.conversion import MLP_KWARGS

    module = build("mlp", json.loads(MLP_KWARGS))
    assert module(torch.zeros(2, 64)).shape == (2, 10)


def test_a_weights_upload_without_architecture_names_the_routes() -> None:
    from ferry.server.convert.uploads import UploadHeader, check_header

    with pytest.raises(InvalidArgument) as info:
        check_header(UploadHeader("m", "state_dict"), limit=1 << 20, allow_code_formats=False)
    message = info.value.message
    assert "upload the nn.Module itself" in message and "ferry.architectures" in message
    assert "seed" in message  # the built-ins are named too
