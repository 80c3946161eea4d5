"""Where the conversion child measures: on the execution providers the version will serve with.

A job carries the providers of the model's serving config (``Job.providers``). Parity and the
benchmark run their sessions there, so ``auto`` chooses a variant by its speed on the device that
will serve it (an int8 graph that wins on CPU can lose on a GPU), through the same providers
table, and with the same fallback, as the server.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ferry.server.core.config import ProviderConfig
from ferry.server.errors import ConversionFailed, FerryError
from ferry.server.runtime.providers import resolve

CPU_ONLY: list[tuple[str, dict[str, str]]] = [("CPUExecutionProvider", {})]


def session_providers(
    job_providers: Sequence[dict[str, Any]] | None,
) -> list[tuple[str, dict[str, str]]]:
    """onnxruntime's ``providers=`` argument for the job's providers ([] or None: CPU)."""
    if not job_providers:
        return CPU_ONLY
    import onnxruntime as ort

    configs = [
        ProviderConfig(p["name"], tuple(sorted(dict(p.get("options") or {}).items())))
        for p in job_providers
    ]
    try:
        plan = resolve(configs, ort.get_available_providers())
    except FerryError as exc:
        raise ConversionFailed(
            f"the model's serving providers cannot run here: {exc.message}"
        ) from None
    return list(zip(plan.names, plan.options, strict=True))
