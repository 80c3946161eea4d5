"""The prune stage: unstructured (zeros, same shapes) or structured (channels removed) pruning.

Unstructured pruning leaves dense kernels as slow as before; it only shrinks the compressed file.
Structured pruning physically removes channels and neurons, so the model gets smaller and faster.
Neither fine-tunes: the report says so and the accuracy budget decides whether the result is served.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from ferry.server.convert.spec import PruningSpec
from ferry.server.errors import ConversionFailed, InvalidArgument

NOT_FINE_TUNED = (
    "no fine-tuning was done after pruning: the accuracy budget (validation.min_cosine, "
    "min_top1_agreement) decides whether the pruned model is served"
)


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


def prune(
    module: nn.Module, spec: PruningSpec, example: tuple[torch.Tensor, ...]
) -> dict[str, Any]:
    """Prune ``module`` in place and return the report's "pruning" section."""
    params_before, _ = _count(module)
    targets = _targets(module)
    if not targets:
        raise InvalidArgument("the model has no Linear or Conv layers to prune: use method 'none'")
    with torch.no_grad():
        if spec.method == "l1_unstructured":
            for layer in targets:
                torch_prune.l1_unstructured(layer, "weight", amount=spec.amount)
                torch_prune.remove(layer, "weight")
        elif spec.method == "global_unstructured":
            pairs = [(layer, "weight") for layer in targets]
            torch_prune.global_unstructured(
                pairs, pruning_method=torch_prune.L1Unstructured, amount=spec.amount
            )
            for layer in targets:
                torch_prune.remove(layer, "weight")
    if spec.method == "structured":
        _structured(module, spec.amount, example)
    params_after, nonzero_after = _count(module)
    return {
        "method": spec.method,
        "amount": spec.amount,
        "sparsity": _weight_sparsity(module),
        "fine_tuned": False,
        "params_before": params_before,
        "params_after": params_after,
        "nonzero_params_after": nonzero_after,
        "note": NOT_FINE_TUNED,
    }


def _structured(module: nn.Module, amount: float, example: tuple[torch.Tensor, ...]) -> None:
    """Remove the lowest-L2 channel groups with torch-pruning, keeping the model's interface.

    The last Linear/Conv (the classifier or output projection) is never pruned, so the output
    shape holds; attention blocks are left whole, since removing embedding channels breaks their
    head split, which leaves a transformer's feed-forward layers to prune.
    """
    import torch_pruning as tp

    with torch.no_grad():
        before = [o.shape for o in _outputs(module(*example))]
    ignored = [_targets(module)[-1]] + [
        m for m in module.modules() if isinstance(m, nn.MultiheadAttention)
    ]
    try:
        with torch.enable_grad():  # torch-pruning traces its dependency graph through autograd
            pruner = tp.pruner.MagnitudePruner(
                module,
                example[0] if len(example) == 1 else example,
                importance=tp.importance.MagnitudeImportance(p=2),
                pruning_ratio=amount,
                ignored_layers=ignored,
            )
            pruner.step()
        with torch.no_grad():
            after = [o.shape for o in _outputs(module(*example))]
    except Exception as exc:
        raise ConversionFailed(
            f"structured pruning failed on this architecture ({type(exc).__name__}: {exc}); use "
            "pruning.method 'l1_unstructured' or 'global_unstructured' instead"
        ) from None
    if after != before:
        raise ConversionFailed(
            f"structured pruning changed the output shapes from {before} to {after}; use an "
            "unstructured method for this architecture"
        )
    module.eval()


def _outputs(result: object) -> list[torch.Tensor]:
    if isinstance(result, torch.Tensor):
        return [result]
    if isinstance(result, list | tuple):
        return [r for r in result if isinstance(r, torch.Tensor)]
    return []
