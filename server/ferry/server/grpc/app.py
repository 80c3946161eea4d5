"""Assembles the gRPC servers around one core: inference listener, management listener,
health, reflection, metrics, polling and graceful shutdown.

This is the one place that wires the parts together: it builds the core (repository, registry
with the onnxruntime opener, DataPlane), the conversion service, and hands each protocol adapter
exactly the dependencies it needs. Adapters never see this object.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import ssl
import tempfile
import time
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

import grpc
from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from ferry.proto.v1 import inference_pb2, repository_pb2, repository_pb2_grpc
from ferry.server import memory, security
from ferry.server.addresses import bind_failure, host_port
from ferry.server.coalesced import Coalesced
from ferry.server.convert.service import ConversionService, default_state_dir
from ferry.server.core.dataplane import DataPlane
from ferry.server.core.pools import ThreadPools
from ferry.server.core.registry import ModelRegistry
from ferry.server.core.repository import ModelRepository
from ferry.server.core.types import Limits
from ferry.server.cpus import affinity_cores, quota_cores, usable_cores
from ferry.server.errors import FerryError
from ferry.server.grpc import conversion, kserve, reflection
from ferry.server.grpc._base import new_server, quiet_peer_gone
from ferry.server.grpc.auth import inference_guard, management_guard
from ferry.server.grpc.health_service import HealthServicer, WatchSlots
from ferry.server.grpc.inference import InferenceServicer
from ferry.server.grpc.inference import add_to_server as add_inference_to_server
from ferry.server.grpc.repository import RepositoryServicer
from ferry.server.grpc.tls import server_credentials
from ferry.server.http.listener import HttpListener, ssl_context
from ferry.server.http.oip import OipRoutes
from ferry.server.metrics import Metrics
from ferry.server.runtime import external_files, shared_weights
from ferry.server.runtime.session import open_session, set_auto_threads
from ferry.server.settings import Settings
from ferry.server.workers import control as worker_control
from ferry.server.workers.fleet import (
    WorkerFleet,
    die_with_parent,
    parent_gone,
    unloaded_by_parent,
)
from ferry.server.workers.peers import Peers, socket_path
from ferry.server.workers.shadow_pull import ShadowPull

log = logging.getLogger(__name__)

INFERENCE_SERVICES = (
    inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name,
    kserve.SERVICE,
)
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class FerryServer:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.repository = ModelRepository(settings.repository, create=settings.create_repository)
        # --workers N: N processes share the inference ports; this one is the first unless the
        # first started it (worker_socket). Each gets its share of the cores for execution.
        cores = usable_cores()  # reads the cgroup's files: once
        self.workers = settings.workers or cores
        if cores < affinity_cores():
            log.info(
                "CPU quota of %.2f cores: threads and --workers 0 sized for %d of the %d cores "
                "this process may run on",
                quota_cores() or 0.0,
                cores,
                affinity_cores(),
            )
        self.is_worker = bool(settings.worker_socket)
        share = max(1, cores // self.workers)
        pools = ThreadPools(share, cores=cores)
        set_auto_threads(share)
        # Aligned weight copies (onnxruntime.share_weights) live beside the conversion state,
        # outside the repository, where every worker of this server finds them.
        state = settings.state_dir
        shared_weights.set_cache_dir(
            Path(state) if state else default_state_dir(self.repository.root)
        )
        self.registry = ModelRegistry(
            self.repository, open_session, warm_up=settings.warm_up, pools=pools
        )
        self.dataplane = DataPlane(
            self.registry,
            Limits(
                max_inputs=settings.max_request_inputs,
                max_outputs=settings.max_request_outputs,
                max_elements=settings.max_request_elements,
                max_batch=settings.max_request_batch_size,
                max_json_bytes=settings.max_request_json_bytes,
                max_bytes_elements=settings.max_request_bytes_elements,
            ),
            max_stream_in_flight=settings.max_stream_in_flight,
            default_timeout=settings.default_request_timeout,
        )
        self.dataplane.decides_rollouts = settings.management_port >= 0 and not self.is_worker
        self.metrics = Metrics(self.dataplane)
        self.dataplane.observe_with(self.metrics.observe)
        self.watch_slots = WatchSlots(settings.max_health_watches)
        self.health = HealthServicer(slots=self.watch_slots)
        self.inference_port = 0
        self.management_port = 0
        self.metrics_port = 0
        self.http_port = 0
        self.management_http_port = 0
        self._servers: list[aio.Server] = []
        self._http: list[HttpListener] = []
        self._stopping = False
        self._poll_task: asyncio.Task[None] | None = None
        # After every repository change (registry listeners): health follows, and weight
        # copies no loaded version uses go; a burst of changes costs one or two runs of each.
        self._health = Coalesced(self._update_health)
        self._prune = Coalesced(self._prune_weights)
        self._health_status: dict[str, int] = {}  # service name -> the status last set
        self._management_health: HealthServicer | None = None
        self._management_services: list[str] = []
        self._stopped = asyncio.Event()
        # Set by SIGTERM/SIGINT (run_until_signal): a start-up load still running gives up.
        self._stop_requested = asyncio.Event()
        # A worker's: the first process asked it to join the inference ports (JOIN), and
        # they are bound and listening (the answer to that call waits for it).
        self._join_asked = asyncio.Event()
        self._listening = asyncio.Event()
        self.fleet: WorkerFleet | None = None
        self._load_seconds = 0.0  # the first process's start-up load, timed
        self._control: aio.Server | None = None
        self._peers: Peers | None = None
        self._shadow_pull: ShadowPull | None = None
        self._run_dir: Path | None = None
        # Model conversion (uploads, jobs, versions): management listener only. Its state
        # folder is opened in start(), only when the management listener runs.
        self.conversion = ConversionService(settings, self.repository, self.registry)
        # Awaited first in stop(), before the listeners drain (conversion kills its children
        # and ends its job streams there, so they do not hold the grace period).
        self.on_stop: list[Callable[[], Awaitable[None]]] = [self.conversion.close]

    def _management_address(self) -> str | None:
        if self.settings.management_port < 0:
            return None
        return f"{self.settings.management_host}:{self.management_port}"

    def _management_http_address(self) -> str | None:
        if self.settings.management_http_port < 0:
            return None
        return f"{self.settings.management_host}:{self.management_http_port}"

    def _options(self, *, inference: bool = False) -> list[tuple[str, int]]:
        n = self.settings.max_message_bytes
        options = [
            ("grpc.max_receive_message_length", n),
            ("grpc.max_send_message_length", n),
            ("grpc.so_reuseport", 1 if self.workers > 1 else 0),
            ("grpc.max_concurrent_streams", self.settings.max_concurrent_streams),
            # Off (grpc's default is on): it counted a call against max_concurrent_streams
            # until the application released it, so a client that kept to the limit had calls
            # refused REFUSED_STREAM (UNAVAILABLE) for streams it had already seen end, under
            # any overload the event loop lagged behind (66-346 of 1,500 in 5 runs of 6 of
            # test_overload on a busy host; none in 6 with it off).
            ("grpc.http.overload_protection", int(self.settings.grpc_overload_protection)),
            *keepalive_options(self.settings),
        ]
        return options + (pending_call_limits(self.settings.max_pending_calls) if inference else [])

    async def start(self) -> None:
        s = self.settings
        if self.is_worker:
            die_with_parent()
        # Access first: a refused configuration or an unreadable token or certificate file must
        # stop the start before anything is bound or changed on disk.
        security.check_settings(s)
        tokens = security.load_tokens(s)
        for warning in security.exposure_warnings(s, tokens):
            log.warning("%s", warning)
        creds = server_credentials(security.inference_tls(s))
        mcreds = server_credentials(security.management_tls(s)) if s.management_port >= 0 else None
        http_tls = ssl_context(security.inference_tls(s)) if s.http_port >= 0 else None
        mhttp_tls = ssl_context(security.management_tls(s)) if s.management_http_port >= 0 else None
        self.repository.clean_temporaries()  # a live writer's staging folders are kept
        quiet_peer_gone()
        await self.health.set("", NOT_SERVING)
        if self.is_worker:
            # A worker (started again while the others serve) joins the shared inference ports
            # once its models are loaded: bound before, the kernel gave it its share of new
            # connections at once, and they were answered MODEL_NOT_READY, an empty
            # ModelStatistics and a not-ready health check by a server that was serving.
            self.registry.keep_unloaded(unloaded_by_parent())
            if not await self._load_unless_stopped():
                return
            # And once the first process has seen that it serves what the first serves (JOIN):
            # its own load can fail where the first's did not, and joined without the model,
            # 1 connection in N was refused it. Until then, only its control socket listens.
            await self._start_workers()
            if not await self._unless_stopped(self._join_asked.wait(), "the wait to join"):
                return
        # Inference listener.
        guard = inference_guard(tokens, health_requires_token=s.health_requires_token)
        server = new_server(self._options(inference=True), [guard])
        add_inference_to_server(
            server, InferenceServicer(self.dataplane, max_message_bytes=s.max_message_bytes)
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        names = [
            inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name,
            health.SERVICE_NAME,
        ]
        # Open Inference Protocol: everything but repository load/unload.
        names += kserve.add_to_server(
            server,
            kserve.KServeServicer(
                self.dataplane,
                repository_control=False,
                management_address=self._management_address,
                max_message_bytes=s.max_message_bytes,
            ),
        )
        reflection.enable(server, names)
        self.inference_port = _bind(server, s.host, s.port, creds, shared=self.workers > 1)
        self._servers.append(server)
        # Management listener: separate, loopback by default.
        if s.management_port >= 0:
            mserver = new_server(self._options(), [management_guard(tokens)])
            repository_pb2_grpc.add_ModelRepositoryServicer_to_server(
                RepositoryServicer(self.dataplane), mserver
            )
            mnames = [repository_pb2.DESCRIPTOR.services_by_name["ModelRepository"].full_name]
            mnames += kserve.add_to_server(
                mserver,
                kserve.KServeServicer(
                    self.dataplane,
                    repository_control=True,
                    management_address=self._management_address,
                    max_message_bytes=s.max_message_bytes,
                ),
            )
            self.conversion.open()
            mnames += conversion.add_to_server(mserver, self.conversion)
            # Health on the management listener too: a control-plane probe asks it directly.
            self._management_health = HealthServicer(
                "'' (the server) or a service name such as ferry.v1.ModelRepository",
                self.watch_slots,
            )
            health_pb2_grpc.add_HealthServicer_to_server(self._management_health, mserver)
            self._management_services = list(mnames)
            mnames.append(health.SERVICE_NAME)
            reflection.enable(mserver, mnames)
            self.management_port = _bind(mserver, s.management_host, s.management_port, mcreds)
            self._servers.append(mserver)
        await self._start_http(tokens, http_tls, mhttp_tls)
        if s.metrics_port >= 0:
            self.metrics_port = self.metrics.serve(s.metrics_host, s.metrics_port)
        for srv in self._servers:
            await srv.start()
        self._listening.set()  # a worker's JOIN call, which asked for this, returns
        self.registry.add_listener(self._health.request)
        if not self.is_worker:
            self.registry.add_listener(self._prune.request)
            began = time.monotonic()
            if not await self._load_unless_stopped():
                return  # stopped during the load: run_until_signal stops what did start
            self._load_seconds = time.monotonic() - began  # the workers' start-up bound
        if (
            self.workers > 1
            and not self.is_worker
            and not await self._unless_stopped(
                self._start_workers(), "the workers' start (each loads the repository)"
            )
        ):
            return  # stop() stops the workers started so far, which give up their own loads
        await self._update_health()
        if self._management_health is not None:
            for name in ("", *self._management_services):
                await self._management_health.set(name, SERVING)
        if s.poll_interval > 0 and not self.is_worker:
            self._poll_task = asyncio.create_task(self._poll(s.poll_interval))
        log.info(
            "ferry serving %d model version(s) on %s (HTTP %s; management %s, HTTP %s; metrics %s)",
            len(self.dataplane.statistics()),
            _where(s.host, self.inference_port),
            _where(s.host, self.http_port, s.http_port),
            _where(s.management_host, self.management_port, s.management_port),
            _where(s.management_host, self.management_http_port, s.management_http_port),
            _where(s.metrics_host, self.metrics_port, s.metrics_port),
        )

    async def _load_unless_stopped(self) -> bool:
        """The start-up load, given up when SIGTERM/SIGINT arrives meanwhile (False). The
        signal otherwise waited for the whole load, minutes for a large repository: far past
        a pod's termination grace period, so the kubelet killed the process instead."""
        return await self._unless_stopped(self._load_repository(), "the start-up load")

    async def _unless_stopped(self, work: Coroutine[Any, Any, object], what: str) -> bool:
        """Run a start-up step that may take minutes; give it up (False) when SIGTERM/SIGINT
        arrives meanwhile, so that the stop does not wait for it."""
        load = asyncio.ensure_future(work)
        stop = asyncio.ensure_future(self._stop_requested.wait())
        try:
            await asyncio.wait({load, stop}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            load.cancel()
            raise
        finally:
            stop.cancel()
        if load.done():
            load.result()
            return True
        log.info("stopping during %s: it is given up", what)
        load.cancel()  # a refresh stops its syncs (loads already running finish); workers stop
        with contextlib.suppress(asyncio.CancelledError):
            await load
        return False

    async def _load_repository(self) -> None:
        """The start-up load, after which readiness means the required models (settle)."""
        s = self.settings
        await self.registry.refresh()
        if not self.is_worker:
            for line in await asyncio.to_thread(self.repository.misplaced_model_files):
                log.warning("%s", line)
        required = [m.strip() for m in s.require_models.split(",") if m.strip()]
        missing = [m for m in required if not _in_repository(self.registry.repository, m)]
        if missing and not self.is_worker:
            # Readiness waits for them, so a typo kept the replica not ready for ever, silently.
            log.warning(
                "--require-models names %s, which the repository %s does not hold: this "
                "replica reports not ready until they are published there",
                ", ".join(repr(m) for m in missing),
                s.repository,
            )
        self.registry.settle(required)

    async def _start_workers(self) -> None:
        """Every worker process listens on a control socket in one run folder; the first one
        also starts the others and makes its repository changes theirs (workers/fleet.py)."""
        if self.is_worker:
            own = Path(self.settings.worker_socket)
            self._run_dir = own.parent
        else:
            self._run_dir = Path(tempfile.mkdtemp(prefix="ferry-workers-"))
            own = socket_path(self._run_dir, 0)
        first = not self.is_worker
        self._peers = Peers(self._run_dir, own, self.registry.loaded, keeps_retired=first)
        service = worker_control.ControlService(
            self.dataplane,
            self.metrics.requests_snapshot,
            self._peers if first else None,
            join=None if first else self._join,
        )
        self._control = await worker_control.start_control(str(own), service)
        self.dataplane.sum_with(self._peers.statistics)
        self.metrics.sum_with(self._peers)
        if self.is_worker:
            return
        # The rules, GetRollout and /metrics see every worker's shadow comparison, summed.
        self._shadow_pull = ShadowPull(self._peers, self.dataplane)
        self.dataplane.sum_shadows_with(self._shadow_pull)
        self._shadow_pull.start()
        self.fleet = WorkerFleet(
            self.settings,
            self._run_dir,
            self.workers,
            self._peers,
            lambda: self.registry.unloaded_by_request,
            ready=self.dataplane.ready,
            load_seconds=self._load_seconds,
            longest_load=lambda: self.registry.longest_load,
            refresh=lambda: self.registry.refresh(follow=True),
            serving=lambda model: worker_control.serving(self.dataplane, model),
            earlier=lambda model: worker_control.earlier(self.dataplane, model),
            files=lambda model: worker_control.files(self.dataplane, model),
            failed=self.dataplane.failed_loads,
            kept=self.dataplane.kept_serving,
            rollouts=self.dataplane.kept_rollouts,
        )
        http_port = self.http_port if self.settings.http_port >= 0 else -1
        # Following before the workers start: each catches up once it is ready (fleet._spawn),
        # and every change after that reaches it. Set after the start, a change made through
        # management while the workers started answered OK and never reached them.
        self.registry.follower = self.fleet.follow
        await self.fleet.start(self.inference_port, http_port)
        fleet = self.fleet
        self.metrics.workers(lambda: [os.getpid(), *fleet.pids], lambda: fleet.restarts)
        log.info(
            "%d inference workers on port %d (pids %s; control sockets in %s)",
            self.workers,
            self.inference_port,
            ",".join(str(p) for p in [os.getpid(), *self.fleet.pids]),
            self._run_dir,
        )
        # Workers x models is the known trap of multi-process servers: say what it costs.
        log.info("memory with models loaded: %s", memory.summary([os.getpid(), *fleet.pids]))

    async def _join(self) -> None:
        """A worker's JOIN: start() binds the inference ports; returns once they listen."""
        self._join_asked.set()
        await self._listening.wait()

    async def _start_http(
        self,
        tokens: security.Tokens,
        tls: ssl.SSLContext | None,
        management_tls: ssl.SSLContext | None,
    ) -> None:
        """The Open Inference Protocol's REST form: the same core, tokens, certificates and
        limits as the gRPC listeners; repository control on the management side only."""
        s = self.settings
        listeners = []
        if s.http_port >= 0:
            guard = inference_guard(tokens, health_requires_token=s.health_requires_token)
            listeners.append((False, guard, s.host, s.http_port, tls))
        if s.management_http_port >= 0:
            guard = management_guard(tokens)
            listeners.append(
                (True, guard, s.management_host, s.management_http_port, management_tls)
            )
        for control, guard, host, port, context in listeners:
            routes = OipRoutes(
                self.dataplane,
                repository_control=control,
                management_address=self._management_http_address,
            )
            listener = HttpListener(
                routes,
                guard,
                max_body_bytes=s.max_message_bytes,
                open_health=not (control or s.health_requires_token),  # as the gRPC guards
                keepalive=s.http_keepalive_timeout,
                max_connections=s.http_max_connections,
            )
            try:
                bound = await listener.start(
                    host, port, context, reuse_port=not control and self.workers > 1
                )
            except BaseException:
                await asyncio.gather(*(h.stop(0) for h in self._http))
                raise
            self._http.append(listener)
            if control:
                self.management_http_port = bound
            else:
                self.http_port = bound

    async def _update_health(self) -> None:
        # It awaits when Watch streams are open: a change meanwhile makes Coalesced run it
        # again, so health is never left stale.
        if self._stopping:
            return
        ready, models = self.dataplane.health()
        self.metrics.ready.ready = ready  # the metrics port's HTTP readiness reads this
        replica = SERVING if ready else NOT_SERVING
        # A model that left the registry (folder removed, unloaded) must not stay SERVING.
        wanted = dict.fromkeys(self._health_status, NOT_SERVING)
        for name, model_ready in models.items():
            wanted[name] = SERVING if model_ready else NOT_SERVING
        # The replica, and the inference services by their full names (as probes configured per
        # service ask): they serve when the replica does.
        wanted[""] = replica
        wanted.update(dict.fromkeys(INFERENCE_SERVICES, replica))
        # Only what changed is set: every registry change lands here, and with hundreds of
        # models re-setting each one (and waking every Watch stream) would cost the event loop.
        for name, status in wanted.items():
            if self._health_status.get(name) != status:
                await self.health.set(name, status)
                self._health_status[name] = status

    async def _prune_weights(self) -> None:
        """Weight copies no loaded version uses go (shared_weights), off the loop."""
        if self._stopping or not shared_weights.has_copies():
            return  # no copies: nothing to look at, no paths to resolve
        # Only versions that share weights can hold a copy (and only their files have been
        # hashed here: hashing another model of gigabytes would hold the files thread).
        versions = self.registry.loaded_versions()
        loaded = [(v.name, v.version) for v in versions if v.config.onnxruntime.share_weights]
        # Any version may map a copy of its external data (runtime.external_files): found by
        # path, nothing hashed.
        every = [(v.name, v.version) for v in versions]
        try:
            removed = await asyncio.get_running_loop().run_in_executor(
                self.registry.pools.files, self._prune_copies, loaded, every
            )
        except OSError as exc:
            log.warning("weight copies not pruned: %s", exc)
            return
        if removed:
            log.info("removed %d shared weight copies no loaded version uses", len(removed))

    def _prune_copies(
        self, loaded: list[tuple[str, int]], every: list[tuple[str, int]]
    ) -> list[str]:
        # Path resolution (a stat and realpath per version) runs here, off the event loop.
        files = [self.repository.model_file(name, version) for name, version in loaded]
        mapped = external_files.copies_of(
            [self.repository.model_file(name, version) for name, version in every]
        )
        return shared_weights.prune(files, keep=mapped)

    async def _poll(self, interval: float) -> None:
        """Scan the repository every ``interval`` seconds. With --workers the first process
        alone scans, and every worker applies the scan after it (fleet.follow, op "poll"):
        each scanned on its own, at its own time, so a version published by hand was served
        by some workers and not others for up to one interval, and for good by a worker whose
        own load of it failed (out of memory there); follow starts such a worker again."""
        while True:
            await asyncio.sleep(interval)
            try:
                await self.registry.refresh(retry_failed=False, follow=self.fleet is not None)
            except Exception:
                log.exception("repository poll failed")

    async def stop(self, grace: float | None = None) -> None:
        """Stop accepting, let in-flight requests finish within the grace period, then unload."""
        if self._stopping:
            await self._stopped.wait()
            return
        self._stopping = True
        grace = self.settings.grace_period if grace is None else grace
        self.metrics.ready.ready = False  # NOT ready first, so load balancers stop sending
        # Streams end within the grace period, not cut at its end by grpc (core.streams).
        self.dataplane.stream_budget.stop_grace_s = grace
        self.dataplane.drain()  # on every protocol: OIP ServerReady, HTTP /v2/health/ready
        await self.health.enter_graceful_shutdown()
        if self._management_health is not None:
            await self._management_health.enter_graceful_shutdown()
        if self.fleet is not None:  # the workers say NOT_SERVING now too, then drain
            self.fleet.signal_stop()
        if self._poll_task is not None:
            self._poll_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poll_task
        await self._prune.cancel()
        if self._shadow_pull is not None:  # before the fleet closes the channels it calls on
            await self._shadow_pull.close()
        for hook in self.on_stop:
            try:
                await hook()
            except Exception:
                log.exception("stop hook failed")
        await asyncio.gather(
            *(srv.stop(grace) for srv in self._servers),
            *(h.stop(grace) for h in self._http),
            *([self.fleet.stop(grace)] if self.fleet is not None else []),
        )
        if self._control is not None:
            await self._control.stop(0)
        if self._peers is not None:
            await self._peers.close()
            await asyncio.to_thread(self._peers.close_sync)
        if self._run_dir is not None and (
            not self.is_worker or await asyncio.to_thread(parent_gone, self._run_dir)
        ):
            # A worker whose first process was killed (it stops with it) removes the run folder
            # that process could not: the folder and its sockets were left in /tmp.
            shutil.rmtree(self._run_dir, ignore_errors=True)
        await self.dataplane.close_shadows()
        await self.registry.close()
        # prometheus_client's HTTP server polls for shutdown every 0.5 s: not on the event loop.
        await asyncio.to_thread(self.metrics.close)
        self._stopped.set()

    async def wait(self) -> None:
        await self._stopped.wait()

    async def run_until_signal(self) -> None:
        loop = asyncio.get_running_loop()
        stop = self._stop_requested
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            await self.start()
        except Exception:
            # What did start stops: a worker that died while the fleet started (killed for
            # memory while it loaded) left the first process's listeners, the other workers'
            # loads and the run folder in /tmp to asyncio.run's teardown, which reported "Event
            # loop is closed" tracebacks and removed no folder.
            await self.stop()
            raise
        await stop.wait()
        log.info("ferry shutting down (grace %.1fs)", self.settings.grace_period)
        await self.stop()


def keepalive_options(s: Settings) -> list[tuple[str, int]]:
    """Triton's --grpc-keepalive-* / --grpc-http2-* / --grpc-max-connection-age* as the gRPC
    core arguments its server sets from them; an age of 0 is left unset (gRPC: no limit)."""
    options = [
        ("grpc.keepalive_time_ms", s.grpc_keepalive_time),
        ("grpc.keepalive_timeout_ms", s.grpc_keepalive_timeout),
        ("grpc.keepalive_permit_without_calls", int(s.grpc_keepalive_permit_without_calls)),
        ("grpc.http2.max_pings_without_data", s.grpc_http2_max_pings_without_data),
        (
            "grpc.http2.min_ping_interval_without_data_ms",
            s.grpc_http2_min_recv_ping_interval_without_data,
        ),
        ("grpc.http2.max_ping_strikes", s.grpc_http2_max_ping_strikes),
    ]
    if s.grpc_max_connection_age:
        options.append(("grpc.max_connection_age_ms", s.grpc_max_connection_age))
    if s.grpc_max_connection_age_grace:
        options.append(("grpc.max_connection_age_grace_ms", s.grpc_max_connection_age_grace))
    return options


def _where(host: str, bound: int, asked: int = 0) -> str:
    """A listener as the start-up line shows it: host:port, or "off" for one disabled (port
    -1), which the line printed as port 0, the port that means "pick a free one"."""
    if asked < 0:
        return "off"
    return host_port(host, bound)


def _bind(
    server: aio.Server,
    host: str,
    port: int,
    credentials: grpc.ServerCredentials | None = None,
    *,
    shared: bool = False,
) -> int:
    address = host_port(host, port)
    _check_free(host, port, address, shared=shared)
    try:
        if credentials is None:
            bound = server.add_insecure_port(address)
        else:
            bound = server.add_secure_port(address, credentials)
    except RuntimeError:  # grpcio raises instead of returning 0 when it cannot bind
        bound = 0
    if bound == 0:
        raise OSError(f"cannot listen on {address}: in use or not permitted")
    return bound


def _check_free(host: str, port: int, address: str, *, shared: bool = False) -> None:
    """Fail with one clear line when the port is taken. grpc's own bind failure also writes a
    C-core log line to stderr, so ``ferry serve`` on a busy port would not end with just our
    message; probing first (as grpc binds: SO_REUSEADDR, so TIME_WAIT leftovers do not count)
    catches the common case before grpc tries."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if shared:  # the workers of one server share the port: only a foreign holder is a clash
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise bind_failure(address, host, exc) from None


def _in_repository(repository: ModelRepository, name: str) -> bool:
    try:
        return bool(repository.has_model(name))
    except FerryError:  # not even a valid model name
        return False


def pending_call_limits(max_pending: int) -> list[tuple[str, int]]:
    """grpc's own bound on calls that arrived while the event loop was too busy to take them.

    Only grpc's core can refuse a call for less than the ~200-340 µs of Python that any call
    reaching the event loop costs on grpc.aio, refused or served (bench: docs/benchmarking.md);
    under open-loop overload it is the one refusal cheap enough to keep the loop for work that
    can finish. It counts calls, not deadlines, so it is off (grpc's defaults) unless set. Half
    the bound is where grpc's random early refusal starts, so that clients refused together do
    not all come back together."""
    if max_pending <= 0:
        return []
    return [
        ("grpc.server.max_pending_requests", max_pending // 2),
        ("grpc.server.max_pending_requests_hard_limit", max_pending),
    ]


__all__ = ["FerryServer", "grpc"]
