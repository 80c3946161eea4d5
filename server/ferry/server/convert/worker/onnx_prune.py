"""The prune stage for a source the child holds as an ONNX graph (every SDK upload of an
``nn.Module``, any ONNX file): runs a method's ``build_graph`` and checks its result before any
later stage sees it: onnx.checker passes, onnxruntime runs it, every output keeps its shape.

No torch here: an ONNX source is converted without it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from ferry.server.convert.spec import PruningSpec
from ferry.server.convert.strategies import graph_weights, pruning
from ferry.server.convert.worker import graph
from ferry.server.convert.worker.parity import onnx_session
from ferry.server.convert.worker.report import PruningRecord
from ferry.server.errors import ConversionFailed, InvalidArgument, first_line

NOT_FINE_TUNED = (
    "no fine-tuning was done after pruning: the accuracy budget (validation.min_cosine, "
    "min_top1_agreement) decides whether the pruned model is served"
)


def prune_graph(
    source: Path, target: Path, spec: PruningSpec, feed: dict[str, np.ndarray], threads: int
) -> PruningRecord:
    """Prune the ONNX graph at ``source`` into ``target``; ``feed`` is one batch of samples."""
    method = pruning.method(spec.method)
    if method.build_graph is None:
        graph_methods = [m.name for m in pruning.METHODS.values() if m.build_graph is not None]
        raise InvalidArgument(
            f"pruning method {method.name!r} works on PyTorch models only: upload a state_dict "
            "or safetensors of a registered architecture, or use one that prunes ONNX graphs "
            f"({', '.join(graph_methods)})"
        )
    model = onnx.load(str(source))
    params_before, _ = graph_weights.initializer_counts(model)
    before = _output_shapes(source, feed, threads)
    account = method.build_graph(pruning.GraphPruneInputs(model, spec.amount))
    onnx.save(model, str(target))
    try:
        onnx.checker.check_model(str(target), full_check=True)
        after = _output_shapes(target, feed, threads)
    except Exception as exc:  # a pruning bug must not reach the later stages as a crash
        # Unless the graph was refused before pruning touched it: the client's file, said so
        # (INVALID_ARGUMENT, the checker's words), not "report this graph" to Ferry.
        graph.check(source, uploaded=True)
        raise ConversionFailed(
            f"{method.name} pruning left an ONNX graph that does not check or run "
            f"({first_line(exc)}); use another pruning.method and report this graph"
        ) from None
    if after != before:
        raise ConversionFailed(
            f"{method.name} pruning changed the output shapes from {before} to {after}; use an "
            "unstructured pruning.method for this graph and report it"
        )
    params_after, nonzero_after = graph_weights.initializer_counts(model)
    weights = graph_weights.weight_names(model)
    total, nonzero = graph_weights.initializer_counts(model, weights)
    return PruningRecord(
        method=method.name,
        amount=spec.amount,
        sparsity=(total - nonzero) / total if total else 0.0,
        fine_tuned=False,
        params_before=params_before,
        params_after=params_after,
        nonzero_params_after=nonzero_after,
        note=f"{account}; {NOT_FINE_TUNED}",
    )


def _output_shapes(path: Path, feed: dict[str, np.ndarray], threads: int) -> list[list[int]]:
    return [list(np.shape(o)) for o in onnx_session(path, threads).run(None, feed)]
