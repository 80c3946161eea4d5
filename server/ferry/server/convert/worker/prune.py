"""The prune stage: runs a registered pruning method (``strategies.pruning``) and measures it.

Unstructured pruning leaves dense kernels as slow as before; it only shrinks the compressed file.
Structured pruning physically removes channels and neurons, so the model gets smaller and faster.
Neither fine-tunes: the report says so and the accuracy budget decides whether the result is served.

This stage runs a method's ``build`` on a torch module (a registered architecture); an ONNX source
is pruned by ``onnx_prune`` instead.
"""

from __future__ import annotations

import torch
from torch import nn

from ferry.server.convert.spec import PruningSpec
from ferry.server.convert.strategies import pruning
from ferry.server.convert.worker.onnx_prune import NOT_FINE_TUNED
from ferry.server.convert.worker.report import PruningRecord
from ferry.server.errors import InvalidArgument


def _targets(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if isinstance(m, nn.Linear | nn.modules.conv._ConvNd)]


def _count(module: nn.Module) -> tuple[int, int]:
    """(parameters, non-zero parameters)."""
    total = nonzero = 0
    for param in module.parameters():
        total += param.numel()
        nonzero += int(torch.count_nonzero(param))
    return total, nonzero


def _weight_sparsity(module: nn.Module) -> float:
    weights: list[torch.Tensor] = [m.weight for m in _targets(module)]  # type: ignore[misc]
    total = sum(w.numel() for w in weights)
    zeros = sum(w.numel() - int(torch.count_nonzero(w)) for w in weights)
    return zeros / total if total else 0.0


def prune(module: nn.Module, spec: PruningSpec, example: tuple[torch.Tensor, ...]) -> PruningRecord:
    """Prune ``module`` in place with the method ``spec`` names; returns the report's section."""
    method = pruning.method(spec.method)
    if method.build is None:
        raise InvalidArgument(f"pruning method {method.name!r} prunes nothing: nothing to run")
    params_before, _ = _count(module)
    targets = _targets(module)
    if not targets:
        raise InvalidArgument(
            f"the model has no Linear or Conv layers to prune: use method {pruning.NONE.name!r}"
        )
    method.build(pruning.PruneInputs(module, targets, spec.amount, example))
    params_after, nonzero_after = _count(module)
    return PruningRecord(
        method=method.name,
        amount=spec.amount,
        sparsity=_weight_sparsity(module),
        fine_tuned=False,
        params_before=params_before,
        params_after=params_after,
        nonzero_params_after=nonzero_after,
        note=NOT_FINE_TUNED,
    )
