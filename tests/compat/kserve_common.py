"""Names shared by the Open Inference Protocol tests and their fixtures."""

from __future__ import annotations

from ferry.server.examples import ONNX_TYPES

DATATYPES = list(ONNX_TYPES)

# A model only the statistics test sends to: a long queue delay means batches form from the
# backlog (full batches leave at once; the delay only bounds how long a straggler waits).
STATS_MODEL = "stats"
STATS_CONFIG = {"batching": {"max_batch_size": 8, "max_queue_delay_ms": 500.0}}


def identity_name(datatype: str) -> str:
    return f"id_{datatype.lower()}"
