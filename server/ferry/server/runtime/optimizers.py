"""onnxruntime graph optimizers Ferry turns off in every session it opens.

``MatmulTransposeFusion``: onnxruntime 1.32 crashes the process (SIGSEGV, while the
``ORT_ENABLE_ALL`` layout pass runs after it) opening a float16 graph in which a Transpose feeds
a MatMul, directly or through a Cast. That is what onnxruntime's own fp16 converter makes of a
GRU followed by a Linear, or of a causal self-attention block: every ``fp16`` conversion of such
a model killed its conversion process (an INTERNAL "crashed (signal SIGSEGV)" job, and under
``auto`` the whole job), and the same file in a repository would kill the serving process as it
loaded. Without the fusion these graphs load and answer as before; on fp32 graphs the fusion
measured within noise (0.87-1.03x: a causal LM block, a GRU tagger, a padded transformer
encoder, batch 8, one thread), so it is off for every graph rather than guessed per graph
(the serving process does not read the graph to see its types).

Every session that can run at ``ORT_ENABLE_ALL`` passes these: the serving session
(runtime.session) and the conversion child's (convert.worker.parity.onnx_session: parity,
benchmark and pruning), so that what the child validated is what the server loads.
"""

from __future__ import annotations

DISABLED_OPTIMIZERS: tuple[str, ...] = ("MatmulTransposeFusion",)


def disabled() -> list[str]:
    """The ``disabled_optimizers`` argument of ``onnxruntime.InferenceSession``."""
    return list(DISABLED_OPTIMIZERS)
