"""Names shared by the Open Inference Protocol tests and their fixtures."""

from __future__ import annotations

import http.client

from ferry.server.examples import ONNX_TYPES

DATATYPES = list(ONNX_TYPES)

# A model only the statistics test sends to: a long queue delay means batches form from the
# backlog (full batches leave at once; the delay only bounds how long a straggler waits).
STATS_MODEL = "stats"
STATS_CONFIG = {"batching": {"max_batch_size": 8, "max_queue_delay_ms": 500.0}}


def identity_name(datatype: str) -> str:
    return f"id_{datatype.lower()}"


def http_call(
    target: str,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """One plain HTTP request (what curl sends), for what tritonclient.http cannot build:
    (status, headers with lower-case names, body), errors included."""
    host, port = target.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        headers = {k.lower(): v for k, v in response.getheaders()}
        return response.status, headers, response.read()
    finally:
        conn.close()
