"""The pruning registry: every method a ``PruningSpec.method`` may name.

``METHODS`` holds the methods that prune; ``NONE`` is the explicit "keep every weight". Adding a
method is adding a ``Method`` to ``METHODS``: validation (``method``), the child's prune stage and
the docs table (``markdown_table``) read it from there.

Each method has two builders, and the prune stage picks by what the child holds: a torch module
(a state_dict or safetensors upload with a registered architecture) goes through ``build``; any
other source, an ONNX upload above all (every SDK upload of an ``nn.Module``), goes through
``build_graph``, which edits the ONNX graph's weight initializers (``graph_pruning``) and so
needs no class and unpickles nothing.

Builders run in the conversion child only and import torch (and torch-pruning) or onnx when called.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ferry.server.convert.strategies import by_name
from ferry.server.errors import ConversionFailed

MAX_AMOUNT = 0.95


@dataclass(frozen=True)
class PruneInputs:
    module: Any  # the torch.nn.Module, pruned in place
    layers: list[Any]  # its Linear and Conv layers, in module order (the last is the output layer)
    amount: float  # fraction of weights (unstructured) or channels (structured) removed
    example: tuple[Any, ...]  # example input tensors, for methods that trace the model


@dataclass(frozen=True)
class GraphPruneInputs:
    model: Any  # the onnx.ModelProto, pruned in place
    amount: float


@dataclass(frozen=True)
class Method:
    name: str
    does: str  # what it does to the weights
    gives: str  # what you get
    structured: bool  # removes channels (smaller, faster) rather than zeroing weights
    build: Callable[[PruneInputs], None] | None  # on a torch module; None: NONE prunes nothing
    # On an ONNX graph; returns the one-line account of what was pruned and what was left.
    build_graph: Callable[[GraphPruneInputs], str] | None = None


def _l1_unstructured(job: PruneInputs) -> None:
    import torch
    from torch.nn.utils import prune as torch_prune

    with torch.no_grad():
        for layer in job.layers:
            torch_prune.l1_unstructured(layer, "weight", amount=job.amount)
            torch_prune.remove(layer, "weight")


def _global_unstructured(job: PruneInputs) -> None:
    import torch
    from torch.nn.utils import prune as torch_prune

    with torch.no_grad():
        pairs = [(layer, "weight") for layer in job.layers]
        torch_prune.global_unstructured(
            pairs, pruning_method=torch_prune.L1Unstructured, amount=job.amount
        )
        for layer in job.layers:
            torch_prune.remove(layer, "weight")


def _structured(job: PruneInputs) -> None:
    """Remove the lowest-L2 channel groups with torch-pruning, keeping the model's interface.

    The last Linear/Conv (the classifier or output projection) is never pruned, so the output
    shape holds; attention blocks are left whole, since removing embedding channels breaks their
    head split, which leaves a transformer's feed-forward layers to prune.
    """
    import torch
    import torch_pruning as tp
    from torch import nn

    module, example = job.module, job.example
    with torch.no_grad():
        before = [o.shape for o in _outputs(module(*example))]
    ignored = [job.layers[-1]] + [
        m for m in module.modules() if isinstance(m, nn.MultiheadAttention)
    ]
    try:
        with torch.enable_grad():  # torch-pruning traces its dependency graph through autograd
            pruner = tp.pruner.MagnitudePruner(
                module,
                example[0] if len(example) == 1 else example,
                importance=tp.importance.MagnitudeImportance(p=2),
                pruning_ratio=job.amount,
                ignored_layers=ignored,
            )
            pruner.step()
        with torch.no_grad():
            after = [o.shape for o in _outputs(module(*example))]
    except Exception as exc:
        raise ConversionFailed(
            f"structured pruning failed on this architecture ({type(exc).__name__}: {exc}); use "
            f"an unstructured pruning.method instead ({', '.join(_unstructured())})"
        ) from None
    if after != before:
        raise ConversionFailed(
            f"structured pruning changed the output shapes from {before} to {after}; use an "
            f"unstructured method for this architecture ({', '.join(_unstructured())})"
        )
    module.eval()


def _on_graph(job: GraphPruneInputs, how: str) -> str:
    """Run ``graph_pruning``'s ``how`` ("structured", "layer" or "global" unstructured)."""
    from ferry.server.convert.strategies import graph_pruning

    try:
        if how == "structured":
            return graph_pruning.structured(job.model, job.amount)
        return graph_pruning.unstructured(job.model, job.amount, scope=how)
    except graph_pruning.NothingToPrune as exc:
        instead = f"pruning.method {NONE.name!r}"
        if how == "structured":
            instead = (
                f"an unstructured pruning.method ({', '.join(_unstructured())}: zeroes weights, "
                f"shapes unchanged) or {instead}"
            )
        what = "structured pruning" if how == "structured" else "pruning"
        raise ConversionFailed(f"{exc}, so {what} cannot apply; use {instead}") from None


def _graph_l1_unstructured(job: GraphPruneInputs) -> str:
    return _on_graph(job, "layer")


def _graph_global_unstructured(job: GraphPruneInputs) -> str:
    return _on_graph(job, "global")


def _graph_structured(job: GraphPruneInputs) -> str:
    return _on_graph(job, "structured")


def _outputs(result: object) -> list[Any]:
    import torch

    if isinstance(result, torch.Tensor):
        return [result]
    if isinstance(result, list | tuple):
        return [r for r in result if isinstance(r, torch.Tensor)]
    return []


NONE = Method(
    name="none",
    does="keeps every weight",
    gives="the model as uploaded",
    structured=False,
    build=None,
)
DEFAULT = NONE
METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method(
            name="l1_unstructured",
            does="zeroes the smallest weights of each layer",
            gives="the same shapes and the same speed (dense kernels); only the **gzip** size "
            "shrinks, with sparsity",
            structured=False,
            build=_l1_unstructured,
            build_graph=_graph_l1_unstructured,
        ),
        Method(
            name="global_unstructured",
            does="zeroes the smallest weights across all layers",
            gives="the same shapes and the same speed (dense kernels); only the **gzip** size "
            "shrinks, with sparsity",
            structured=False,
            build=_global_unstructured,
            build_graph=_graph_global_unstructured,
        ),
        Method(
            name="structured",
            does="removes whole channels/neurons, lowest L2 norm first; the output layer and "
            "attention blocks are kept whole, so the model's interface is unchanged. A PyTorch "
            "model: torch-pruning. An ONNX graph: the hidden units between two weight layers "
            "joined only by per-channel ops (bias, BatchNorm, activations, a global pooling); "
            "layers feeding a Reshape that moves the features off the last axis (a Reshape "
            "that keeps them there, as GPT-2's Conv1D does, passes them), a residual Add, a "
            "Concat or an output are left whole",
            gives="a smaller, faster model: 2.3x (MLP, CNN) to 2.8x (Linear-heavy) at batch 32 "
            "at 50% (PyTorch route); 2.4x (MLP) and 2.2x (CNN) on the ONNX graph",
            structured=True,
            build=_structured,
            build_graph=_graph_structured,
        ),
    )
}


def methods() -> list[Method]:
    return [NONE, *METHODS.values()]


def names() -> list[str]:
    return [m.name for m in methods()]


def _unstructured() -> list[str]:
    return [m.name for m in METHODS.values() if not m.structured]


def method(name: str) -> Method:
    """The method ``name`` selects; an unknown name is refused with every known one."""
    return by_name(methods(), name, "pruning method")


def markdown_table() -> str:
    """docs/conversion.md's pruning table (a test keeps the two equal)."""
    rows = ["| `Pruning(method=...)` | what it does | what you get |", "|---|---|---|"]
    for m in METHODS.values():
        rows.append(f'| `"{m.name}"` | {m.does} | {m.gives} |')
    return "\n".join(rows)
