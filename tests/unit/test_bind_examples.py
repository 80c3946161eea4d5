"""The SDK binds example inputs to ``forward()`` by name (issue 13 item 1): no export here, so
these stay fast; the exporting end-to-end checks are in tests/integration/test_module_binding.py."""

from __future__ import annotations

from collections import namedtuple
from typing import Any

import numpy as np
import pytest
import torch

from ferry.client import InvalidInputError
from ferry.client._module_upload import bind, call, flatten_outputs, from_module


class XY(torch.nn.Module):
    def forward(self, x: torch.Tensor, y: torch.Tensor, z: torch.Tensor | None = None) -> Any:
        out = 2 * x - y
        return out if z is None else out + 10 * z


class Optional(torch.nn.Module):
    def forward(self, x: torch.Tensor, y: Any = None, z: Any = None) -> torch.Tensor:
        return x if z is None else x + z


class Star(torch.nn.Module):
    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        return xs[0] - xs[1]


class PosOnly(torch.nn.Module):
    def forward(self, x: torch.Tensor, /) -> torch.Tensor:
        return x


X, Y, Z = (torch.full((2, 3), v) for v in (1.0, 5.0, 7.0))


def test_dict_in_reverse_order_binds_by_name() -> None:
    bound = bind(torch, XY(), {"y": Y, "x": X})
    assert bound.args == () and list(bound.named) == ["y", "x"]
    assert torch.equal(call(torch, XY(), bound), 2 * X - Y)  # not 2 * Y - X


@pytest.mark.parametrize(
    ("examples", "names", "expected"),
    [
        (X, ["x"], None),  # a lone tensor: forward then misses y
        ((X, Y), ["x", "y"], 2 * X - Y),
        ([X, Y, Z], ["x", "y", "z"], 2 * X - Y + 10 * Z),
        (((X,), {"z": Z, "y": Y}), ["x", "z", "y"], 2 * X - Y + 10 * Z),  # torch.export style
        ((X, {"y": Y}), ["x", "y"], 2 * X - Y),  # positional tensors, then keyword tensors
        ({"x": X, "y": Y}, ["x", "y"], 2 * X - Y),  # z left out keeps its default
    ],
)
def test_tuples_and_mixed_cases_bind_like_the_call(
    examples: Any, names: list[str], expected: torch.Tensor | None
) -> None:
    if expected is None:
        with pytest.raises(InvalidInputError, match="missing a required argument: 'y'"):
            bind(torch, XY(), examples)
        return
    bound = bind(torch, XY(), examples)
    assert list(bound.named) == names
    assert torch.equal(call(torch, XY(), bound), expected)


def test_var_positional_inputs_take_the_exporters_names() -> None:
    assert list(bind(torch, Star(), (X, Y)).named) == ["xs_0", "xs_1"]


@pytest.mark.parametrize(
    ("module", "examples", "message"),
    [
        (XY(), {"x": X, "w": Y}, r"names 'w', which is not a parameter of XY.forward; its "
         r"parameters are \(x, y, z\)"),
        (XY(), {"x": X, "y": None}, r"example_inputs\['y'\] is None: leave it out"),
        (XY(), {"x": X, "y": 3}, r"example_inputs\['y'\] is a int: only tensors"),
        (XY(), {"x": X, "y": torch.tensor(1.0)}, r"\['y'\] is a scalar"),
        (XY(), ((X,), {"x": Y}), "multiple values for argument 'x'"),
        (XY(), (X, Y, Z, Z), "too many positional arguments"),
        (XY(), {1: X}, "keys must be parameter names"),
        (XY(), "x", "example_inputs is a str"),
        (PosOnly(), {"x": X}, "positional-only parameter"),
    ],
)  # fmt: skip
def test_bad_examples_get_a_precise_error(module: Any, examples: Any, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        bind(torch, module, examples)


def test_a_typo_is_refused_even_when_forward_takes_kwargs() -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        vocab_size=100,
    )  # fmt: skip
    ids = torch.zeros(2, 4, dtype=torch.int64)
    with pytest.raises(InvalidInputError, match=r"'input_id'.*\(input_ids, attention_mask"):
        bind(torch, transformers.BertModel(config), {"input_id": ids})


def test_a_module_failing_on_its_examples_is_a_client_error() -> None:
    with pytest.raises(InvalidInputError, match="XY fails on example_inputs: RuntimeError"):
        call(torch, XY(), bind(torch, XY(), {"x": X, "y": torch.ones(2, 4)}))


def test_outputs_keep_the_models_own_names() -> None:
    pair = namedtuple("pair", ["logits", "hidden"])
    assert list(flatten_outputs(torch, X)) == ["output"]
    assert list(flatten_outputs(torch, (X, Y))) == ["output_0", "output_1"]
    assert list(flatten_outputs(torch, {"b": X, "a": Y, "none": None})) == ["b", "a"]
    assert list(flatten_outputs(torch, pair(X, Y))) == ["logits", "hidden"]
    assert list(flatten_outputs(torch, {"h": (X, Y)})) == ["h_0", "h_1"]
    with pytest.raises(InvalidInputError, match="returns a str at label"):
        flatten_outputs(torch, {"label": "cat"})


def test_architecture_uploads_need_forwards_leading_parameters_in_order() -> None:
    data, fmt, extras = from_module(torch, XY(), {"y": Y, "x": X}, "xy", 20)
    data.unlink()  # the upload streams this file and removes it; here nothing sends it
    assert fmt == "state_dict"
    assert [s.name for s in extras["inputs"]] == ["x", "y"]  # the server calls it positionally
    assert (extras["reference_outputs"]["output"] == (2 * X - Y).numpy()).all()
    with pytest.raises(InvalidInputError, match=r"first 2 positional parameters \(x, y, z\)"):
        from_module(torch, Optional(), {"z": Z, "x": X}, "xy", 20)  # skips y


class BranchOnBatch(torch.nn.Module):
    """Adds 1 only when there is more than one sample: the export froze the branch the example
    took, and batch-1 requests were served the other branch's answer."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x)
        return y + 1.0 if x.shape[0] > 1 else y


class ReturnsItsInputsName(torch.nn.Module):
    def forward(self, x: torch.Tensor, half: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"y": x * 2, "half": half * 2}


def test_a_model_that_answers_differently_at_batch_1_is_checked_at_batch_1() -> None:
    """Its batch-1 answers travel as the reference, so the server runs the graph at batch 1
    against them (a frozen branch disagrees there); a module that agrees sends its batch."""
    module = BranchOnBatch().eval()
    x = torch.randn(4, 8)
    _, _, extras = from_module(torch, module, x, None, 18)
    ((_name, sample),) = extras["sample_inputs"].items()
    assert sample.shape == (1, 8)
    with torch.no_grad():
        alone = module.fc(x[:1]).numpy()
    ((_, reference),) = extras["reference_outputs"].items()
    np.testing.assert_allclose(reference, alone, rtol=1e-6)
    _, _, plain = from_module(torch, torch.nn.Linear(8, 3).eval(), x, None, 18)
    assert next(iter(plain["sample_inputs"].values())).shape == (4, 8)


def test_an_output_named_like_an_input_is_refused_before_the_export() -> None:
    """The export went through and the job failed late with onnxruntime's "Duplicate
    definition of name (half)" and a server scratch path."""
    examples = {"x": torch.randn(2, 3), "half": torch.randn(2, 3)}
    with pytest.raises(InvalidInputError, match=r"output named 'half'.*e\.g\. to 'half_out'"):
        from_module(torch, ReturnsItsInputsName(), examples, None, 18)
