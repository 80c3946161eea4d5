"""Load testing a Ferry server: ``ferry loadtest`` on the command line, this module from Python.

>>> from ferry.client.loadtest import LoadTestConfig, run          # doctest: +SKIP
>>> report = run(LoadTestConfig("mlp", concurrency=(1, 4, 16), duration=5))
>>> print(report.format_table())

A run fetches the model's metadata, builds (or reads) one request, serializes it once, warms up,
then runs each level of the sweep while snapshotting the server's statistics around it. Every run
is bounded (see the caps in ``_config``) and refuses non-loopback targets unless ``allow_remote``.
Light like the rest of the SDK: grpcio, protobuf and numpy; matplotlib only for plots.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

import numpy as np

from ferry.client._async import AsyncInferenceClient
from ferry.client._channel import ChannelConfig, create_aio_channel, split_endpoints
from ferry.client._errors import FerryError
from ferry.client._types import ModelMetadata, ModelStatistics
from ferry.client.loadtest._config import (
    MAX_CONCURRENCY,
    MAX_DURATION,
    MAX_RATE,
    MAX_REQUESTS,
    LoadTestConfig,
    LoadTestConfigError,
    check_loopback,
)
from ferry.client.loadtest._engine import (
    Progress,
    encode_ferry,
    encode_kserve,
    make_transport,
    run_level,
)
from ferry.client.loadtest._inputs import InputError, generate_inputs, load_inputs
from ferry.client.loadtest._plot import PlotUnavailableError, plot_report
from ferry.client.loadtest._report import (
    LevelResult,
    LoadTestReport,
    Recorder,
    ServerSplit,
    latency_summary,
    server_split,
)

__all__ = [
    "MAX_CONCURRENCY",
    "MAX_DURATION",
    "MAX_RATE",
    "MAX_REQUESTS",
    "InputError",
    "LevelResult",
    "LoadTestConfig",
    "LoadTestConfigError",
    "LoadTestReport",
    "PlotUnavailableError",
    "ServerSplit",
    "arun",
    "check_loopback",
    "generate_inputs",
    "load_inputs",
    "plot_report",
    "run",
]


def _batch_of(meta: ModelMetadata, inputs: Mapping[str, Any]) -> int:
    if meta.batching.max_batch_size <= 0 or not inputs:
        return 1
    first = np.asarray(next(iter(inputs.values())))
    return int(first.shape[0]) if first.ndim else 1


# Servers cap concurrent calls per connection (Ferry: max_concurrent_streams, 256 by default);
# calls beyond it wait in the client, which would measure the cap rather than the server.
STREAMS_PER_CONNECTION = 256


def _connections(config: LoadTestConfig) -> int:
    """Enough connections for a closed unary loop's concurrency, at least the configured count."""
    if config.open_loop or config.mode == "stream":
        return config.connections
    needed = -(-max(config.concurrency) // STREAMS_PER_CONNECTION)
    return max(config.connections, needed)


async def _stats(
    clients: Sequence[AsyncInferenceClient], model: str
) -> list[ModelStatistics] | None:
    """Every endpoint's statistics, together: with several targets the load is spread over
    them, and one balanced client asked one server before a level and another after, so the
    split subtracted two servers' counters (-1850 requests, -80 ms of compute)."""
    try:
        answers = await asyncio.gather(*(c.statistics(model) for c in clients))
    except FerryError:
        return None  # a server without statistics still gets a client-side report
    return [s for answer in answers for s in answer]


async def arun(
    config: LoadTestConfig,
    *,
    progress: bool | None = None,
    progress_stream: TextIO | None = None,
) -> LoadTestReport:
    """Run ``config`` on the running event loop and return its report.

    Raises LoadTestConfigError before sending anything if the config is out of bounds, InputError
    if inputs cannot be built, and the SDK's FerryError if the model cannot be described or a probe
    request fails (with the server's reason, which beats a report full of errors). ``progress``
    draws a live line on ``progress_stream`` (stderr): None means only when it is a terminal.
    """
    config.validate()
    limit = config.max_message_bytes  # the probe's request and answer are the run's
    control = AsyncInferenceClient(
        config.target,
        timeout=config.timeout,
        tls=config.tls,
        token=config.token,
        max_message_bytes=limit,
    )
    endpoints = split_endpoints(config.target)  # validate() refused an empty target
    counters = (
        [
            AsyncInferenceClient(e, timeout=config.timeout, tls=config.tls, token=config.token)
            for e in endpoints
        ]
        if len(endpoints) > 1
        else [control]
    )
    channels = []
    try:
        meta = await control.model_metadata(config.model, version=config.version)
        if config.inputs is not None:
            inputs = {k: np.asarray(v) for k, v in config.inputs.items()}
        else:
            inputs = generate_inputs(
                meta, batch_size=config.batch_size, shapes=config.shapes, seed=config.seed
            )
        if config.protocol == "kserve":
            payload = encode_kserve(config.model, config.version, inputs)
        else:
            payload = encode_ferry(config.model, config.version, inputs, config.timeout)
        # The probe, for either protocol (one core judges both): a wrong input fails the run at
        # once with the server's reason, not after a level of errors.
        await control.infer(config.model, inputs, version=config.version)
        version = config.version or meta.version
        channel_config = ChannelConfig(
            config.target,
            tls=config.tls,
            token=config.token,
            # One connection per channel: gRPC shares connections between identical channels.
            options=[("grpc.use_local_subchannel_pool", 1)],
            max_message_bytes=limit,
        )
        channels = [create_aio_channel(channel_config) for _ in range(_connections(config))]
        transport = make_transport(
            channels,
            mode=config.mode,
            protocol=config.protocol,
            payload=payload,
            timeout=config.timeout,
            metadata=channel_config.call_metadata(),
        )
        rng = random.Random(config.seed)
        view = Progress(progress, progress_stream)
        report = LoadTestReport(model=config.model, target=channel_config.target_string())
        loop_kind = "open" if config.open_loop else "closed"
        levels = config.levels
        try:
            if config.warmup > 0:
                await _level(
                    transport,
                    config,
                    levels[0],
                    duration=config.warmup,
                    requests=None,
                    rng=rng,
                    view=view,
                    label="warm-up",
                )
            batch = _batch_of(meta, inputs)
            for level in levels:
                before = await _stats(counters, config.model)
                cpu0 = time.process_time()
                label = f"{'rate' if config.open_loop else 'concurrency'} {level:g}"
                rec, elapsed = await _level(
                    transport,
                    config,
                    level,
                    duration=config.duration,
                    requests=config.requests,
                    rng=rng,
                    view=view,
                    label=label,
                )
                cpu = (time.process_time() - cpu0) / elapsed if elapsed > 0 else 0.0
                after = await _stats(counters, config.model)
                split: ServerSplit | None = None
                if before is not None and after is not None:
                    split = server_split(before, after, version)
                report.levels.append(
                    _result(
                        rec,
                        elapsed,
                        loop_kind=loop_kind,
                        level=level,
                        config=config,
                        batch=batch,
                        split=split,
                        cpu=cpu,
                    )
                )
        finally:
            await transport.close()
        return report
    finally:
        for ch in channels:
            await ch.close()
        for client in {id(c): c for c in (control, *counters)}.values():
            await client.close()


async def _level(
    transport: Any,
    config: LoadTestConfig,
    level: float,
    *,
    duration: float | None,
    requests: int | None,
    rng: random.Random,
    view: Progress,
    label: str,
) -> tuple[Recorder, float]:
    return await run_level(
        transport,
        concurrency=None if config.open_loop else int(level),
        rate=level if config.open_loop else None,
        arrival=config.arrival,
        duration=duration,
        requests=requests,
        rng=rng,
        progress=view,
        label=label,
    )


def _result(
    rec: Recorder,
    elapsed: float,
    *,
    loop_kind: str,
    level: float,
    config: LoadTestConfig,
    batch: int,
    split: ServerSplit | None,
    cpu: float,
) -> LevelResult:
    return LevelResult(
        loop=loop_kind,
        level=level,
        mode=config.mode,
        protocol=config.protocol,
        batch_size=batch,
        elapsed=elapsed,
        ok=rec.ok,
        errors=dict(rec.codes),
        latency_ms=latency_summary(rec.latencies),
        dropped=rec.dropped,
        unsent=rec.unsent,
        server=split,
        client_cpu=cpu,
    )


def run(
    config: LoadTestConfig, *, progress: bool | None = None, progress_stream: TextIO | None = None
) -> LoadTestReport:
    """Run ``config`` to completion on a fresh event loop (not from inside a running one: use
    :func:`arun` there)."""
    return asyncio.run(arun(config, progress=progress, progress_stream=progress_stream))
