"""Server settings: one object, filled from defaults, then ``FERRY_*`` environment variables,
then command-line flags (flags win). Each field documents what it controls."""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

MiB = 1 << 20
LOG_FORMATS = ("text", "json")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
INT32_MAX = 2**31 - 1  # gRPC's channel arguments are C ints
# More workers than this per core only contend for the cores; far more (a typo's 100000)
# started processes until the host stalled.
WORKERS_PER_CORE = 4

# The range of every number a setting takes: (low, high), either None for unbounded; floats
# must also be finite. Outside it a value was taken as something else without a word (a
# negative port as "disabled", --poll-interval nan as "never", --max-message-bytes -1 as
# unlimited on gRPC and "over the limit" on HTTP) or failed later with a traceback (a port past
# 65535, a negative --max-stream-in-flight), so it is refused at start, naming the setting.
RANGES: dict[str, tuple[float | None, float | None, str]] = {
    "port": (0, 65535, "0 picks a free one"),
    "management_port": (-1, 65535, "0 picks a free one, -1 disables it"),
    "http_port": (-1, 65535, "0 picks a free one, -1 disables it"),
    "management_http_port": (-1, 65535, "0 picks a free one, -1 disables it"),
    "metrics_port": (-1, 65535, "0 picks a free one, -1 disables it"),
    "poll_interval": (0, None, "0: scan only on request"),
    "grace_period": (0, None, "seconds"),
    "worker_timeout": (0, None, "0: no liveness check"),
    "default_request_timeout": (0, None, "0: no bound"),
    "max_message_bytes": (4096, INT32_MAX, "bytes"),
    "max_stream_in_flight": (1, None, "requests"),
    "max_request_inputs": (1, None, "tensors"),
    "max_request_outputs": (1, None, "tensors"),
    "max_request_elements": (1, None, "elements"),
    "max_request_batch_size": (0, None, "0: each model's max_batch_size only"),
    "max_request_json_bytes": (1, None, "bytes"),
    "max_request_bytes_elements": (1, None, "elements"),
    "http_keepalive_timeout": (1, None, "seconds"),
    "http_max_connections": (1, None, "connections per HTTP listener"),
    "max_concurrent_streams": (1, INT32_MAX, "calls per connection"),
    "max_pending_calls": (0, INT32_MAX, "0: grpc's default"),
    "max_health_watches": (1, None, "streams"),
    "grpc_keepalive_time": (1, INT32_MAX, "milliseconds"),
    "grpc_keepalive_timeout": (1, INT32_MAX, "milliseconds"),
    "grpc_http2_max_pings_without_data": (0, INT32_MAX, "0: no limit"),
    "grpc_http2_min_recv_ping_interval_without_data": (0, INT32_MAX, "milliseconds"),
    "grpc_http2_max_ping_strikes": (0, INT32_MAX, "0: no limit"),
    "grpc_max_connection_age": (0, INT32_MAX, "milliseconds; 0: no limit"),
    "grpc_max_connection_age_grace": (0, INT32_MAX, "milliseconds; 0: no limit"),
    "max_upload_bytes": (1, None, "bytes"),
    "upload_retention_bytes": (0, None, "0: no limit"),
    "upload_retention_seconds": (0, None, "0: no age limit"),
    "max_concurrent_conversions": (1, None, "processes"),
    "max_queued_conversions": (0, None, "jobs"),
    "conversion_timeout": (0, None, "0: no limit"),
    "conversion_memory_bytes": (0, None, "0: none"),
    "external_data_threshold_bytes": (1, None, "bytes"),
}


HOSTS = ("host", "management_host", "metrics_host")
EMPTY_PATH = "is empty: name the model repository folder (an empty path was read as the working "
EMPTY_PATH += "directory, and whatever folders it held were served as models)"


class SettingsError(ValueError):
    """A setting is invalid: an environment value of the wrong type, or a rule between settings
    broken. The message is one line that names what to set. Raised, not exited on, so that a library
    caller can handle it; the ``ferry serve`` entry point prints it and exits with status 1."""


@dataclass
class Settings:
    repository: Path = field(
        default=Path("model-repository"),
        metadata={
            "help": "model repository folder: <model>/<version>/model.onnx + <model>/config.toml"
        },
    )
    host: str = field(
        default="0.0.0.0",
        metadata={"help": "address of the inference listener (Inference, health)"},
    )
    port: int = field(default=8001, metadata={"help": "inference port; 0 picks a free one"})
    management_host: str = field(
        default="127.0.0.1",
        metadata={
            "help": "address of the management listener (repository load/unload, conversion)"
        },
    )
    management_port: int = field(
        default=8003,
        metadata={
            "help": "management port; 0 picks a free one, -1 turns management off (its HTTP "
            "listener too, whatever management_http_port says)"
        },
    )
    http_port: int = field(
        default=8000,
        metadata={
            "help": "HTTP/REST port of the Open Inference Protocol on the inference address "
            "(host); 0 picks a free one, -1 disables it"
        },
    )
    management_http_port: int = field(
        default=8004,
        metadata={
            "help": "HTTP/REST port of the management listener (Open Inference Protocol with "
            "repository load/unload) on management_host; 0 picks a free one, -1 disables it "
            "(and so does management_port = -1)"
        },
    )
    metrics_host: str = field(
        default="0.0.0.0", metadata={"help": "address of the Prometheus endpoint"}
    )
    metrics_port: int = field(
        default=8002,
        metadata={"help": "Prometheus /metrics port; 0 picks a free one, -1 disables it"},
    )
    create_repository: bool = field(
        default=False,
        metadata={
            "help": "create the repository folder when it does not exist; otherwise a missing "
            "folder stops the start (a typo must not serve nothing)"
        },
    )
    require_models: str = field(
        default="",
        metadata={
            "help": "comma-separated models this replica must serve to report ready (health "
            "''/ServerReady); default: those serving after the start-up load. A model loading "
            "or failing beside them does not change readiness"
        },
    )
    workers: int = field(
        default=1,
        metadata={
            "help": "inference worker processes sharing the inference ports (SO_REUSEPORT); "
            "the first also runs management, conversion and metrics; 0: one per usable core"
        },
    )
    worker_timeout: float = field(
        default=30.0,
        metadata={
            "help": "with --workers: seconds a worker may go without answering the first "
            "process's liveness check before it is killed and started again (a stopped or hung "
            "worker held its share of the connections and every management call); 0: never. "
            "Either way a management call waits on one worker's change at most 60 s plus twice "
            "the first process's start-up load or its longest load of one version (600 s at "
            "most; a worker stuck in a load answers this check): past it that worker is killed "
            "and started again"
        },
    )
    worker_socket: str = field(
        default="",
        metadata={
            "help": "set by ferry serve --workers for the workers it starts: their control "
            "socket (environment only)",
            "flag": False,
        },
    )
    poll_interval: float = field(
        default=0.0, metadata={"help": "seconds between repository scans; 0 only on request"}
    )
    grace_period: float = field(
        default=10.0, metadata={"help": "seconds in-flight requests get to finish on SIGTERM"}
    )
    max_message_bytes: int = field(
        default=80 * MiB,
        metadata={
            "help": "largest gRPC message accepted or sent, and largest HTTP request body "
            "(refused with 413 before it is read); 64 MiB tensors fit"
        },
    )
    max_stream_in_flight: int = field(
        default=1024,
        metadata={
            "help": "requests one inference stream (InferStream, ModelStreamInfer) holds at "
            "once, from read until its answer is written; every stream together holds at most "
            "4x this before each runs one request at a time"
        },
    )
    default_request_timeout: float = field(
        default=10.0,
        metadata={
            "help": "seconds an inference request that carries no deadline (none from the "
            "call, the request or the model's default_timeout_ms) may take; one predicted to "
            "take longer is refused at once (RESOURCE_EXHAUSTED); 0: no bound"
        },
    )
    warm_up: bool = field(
        default=True,
        metadata={
            "help": "run each model once at load on zeros (dynamic dims besides the batch at 1, "
            "else 8, else 32), so its first request does not pay for allocation; one that runs "
            "on none serves anyway, with a WARNING"
        },
    )
    log_level: str = field(default="INFO", metadata={"help": "DEBUG, INFO, WARNING or ERROR"})
    log_format: str = field(
        default="text",
        metadata={"help": "text, or json: one JSON object per line, for log collectors"},
    )
    # --- access (see SECURITY.md; the rules live in ferry.server.security) ---
    inference_token: str = field(
        default="",
        repr=False,
        metadata={
            "help": "bearer token the inference listener requires (environment only: a "
            "flag would show in ps)",
            "flag": False,
        },
    )
    inference_token_file: str = field(
        default="", metadata={"help": "file holding the inference token (one line)"}
    )
    management_token: str = field(
        default="",
        repr=False,
        metadata={
            "help": "bearer token the management listener requires (environment only)",
            "flag": False,
        },
    )
    management_token_file: str = field(
        default="", metadata={"help": "file holding the management token (one line)"}
    )
    health_requires_token: bool = field(
        default=False,
        metadata={
            "help": "require the inference token for health too: grpc.health.v1, the Open "
            "Inference Protocol's ServerLive/ServerReady and /v2/health/* (probes usually cannot "
            "send one)"
        },
    )
    tls_cert_file: str = field(
        default="", metadata={"help": "PEM certificate chain of both listeners; enables TLS"}
    )
    tls_key_file: str = field(
        default="", metadata={"help": "PEM private key of tls_cert_file, without a passphrase"}
    )
    tls_client_ca_file: str = field(
        default="",
        metadata={"help": "PEM CA that signs client certificates: mutual TLS on both listeners"},
    )
    management_tls_client_ca_file: str = field(
        default="",
        metadata={
            "help": "PEM CA for client certificates on the management listener only "
            "(default: tls_client_ca_file)"
        },
    )
    # --- request limits: a request over one is refused, naming the limit and its value ---
    max_request_inputs: int = field(default=256, metadata={"help": "input tensors per request"})
    max_request_outputs: int = field(
        default=256, metadata={"help": "requested outputs per request"}
    )
    max_request_elements: int = field(
        default=1 << 31, metadata={"help": "tensor elements per request, all inputs together"}
    )
    max_request_batch_size: int = field(
        default=0,
        metadata={
            "help": "batch size per request across all models; 0: each model's max_batch_size only"
        },
    )
    max_request_json_bytes: int = field(
        default=8 * MiB,
        metadata={
            "help": "JSON part of an HTTP infer request; parsing it holds every other request "
            "meanwhile, so larger tensors go in binary (the binary tensor extension)"
        },
    )
    max_request_bytes_elements: int = field(
        default=MiB,
        metadata={
            "help": "BYTES (string) elements per request, all inputs together; each is "
            "decoded into Python objects while every other request waits"
        },
    )
    http_keepalive_timeout: float = field(
        default=75.0,
        metadata={
            "help": "seconds an idle HTTP connection is kept for its next request; above the "
            "idle timeout of the proxy in front (75 s outlasts AWS load balancers' and nginx's "
            "60 s; Google Cloud's load balancer keeps 600 s), so the proxy closes first"
        },
    )
    http_max_connections: int = field(
        default=1024,
        metadata={
            "help": "connections each HTTP listener holds open at once (each process, with "
            "--workers), and at most a quarter of the open-file limit (ulimit -n); one more "
            "is answered 503 and closed, so idle connections cannot take every descriptor "
            "the gRPC listeners and model loads need"
        },
    )
    max_concurrent_streams: int = field(
        default=256,
        metadata={
            "help": "concurrent calls per client connection (HTTP/2 streams); further "
            "calls wait in the client"
        },
    )
    max_health_watches: int = field(
        default=1024,
        metadata={
            "help": "grpc.health.v1 Watch streams this process holds open at once, every "
            "gRPC listener together (each process, with --workers); one more is refused "
            "RESOURCE_EXHAUSTED, while Check still answers"
        },
    )
    grpc_overload_protection: bool = field(
        default=False,
        metadata={
            "help": "gRPC core's HTTP/2 overload protection: a call counts against "
            "--max-concurrent-streams until the server has released it, not until its stream "
            "closed, and one more is refused (RST_STREAM REFUSED_STREAM, which the client sees "
            "as UNAVAILABLE). Off by default: a client that keeps to the limit is then never "
            "refused for streams it already saw end (see docs/benchmarking.md)"
        },
    )
    max_pending_calls: int = field(
        default=0,
        metadata={
            "help": "calls the inference listener's gRPC core holds while the event loop is "
            "busy; past half of it new calls are refused at random, past it always, at "
            "arrival and before any Ferry code runs (status CANCELLED, grpc's own refusal); "
            "0: grpc's default, 3000. Sheds open-loop overload cheaply, but also refuses a "
            "closed-loop client's calls beyond it: see docs/benchmarking.md"
        },
    )
    # --- gRPC keepalive and connection age: Triton's flags, names, units (ms) and defaults
    # (its src/grpc/grpc_server.h KeepAliveOptions, which are gRPC core's own), so a Triton
    # command line carries over. Both gRPC listeners take them.
    grpc_keepalive_time: int = field(
        default=7200000,
        metadata={
            "help": "milliseconds after which the server pings an idle connection (keeps it "
            "through a NAT or a load balancer that drops idle TCP, e.g. an AWS NLB's 350 s)"
        },
    )
    grpc_keepalive_timeout: int = field(
        default=20000,
        metadata={"help": "milliseconds the server waits for a ping's answer before closing"},
    )
    grpc_keepalive_permit_without_calls: bool = field(
        default=False,
        metadata={
            "help": "let clients ping (and the server ping) with no call in flight; without "
            "it a client whose keepalive pings an idle connection is sent GOAWAY "
            "(too_many_pings)"
        },
    )
    grpc_http2_max_pings_without_data: int = field(
        default=2,
        metadata={"help": "pings the server sends with no data sent in between; 0: no limit"},
    )
    grpc_http2_min_recv_ping_interval_without_data: int = field(
        default=300000,
        metadata={
            "help": "milliseconds a client must leave between pings when no data is sent; a "
            "faster ping is a strike"
        },
    )
    grpc_http2_max_ping_strikes: int = field(
        default=2,
        metadata={
            "help": "strikes (pings too soon) tolerated before the connection is closed with "
            "GOAWAY; 0: any number"
        },
    )
    grpc_max_connection_age: int = field(
        default=0,
        metadata={
            "help": "milliseconds after which a connection is told to go away (GOAWAY) and "
            "the client reconnects, so long-lived clients spread over replicas added since; "
            "0: no limit"
        },
    )
    grpc_max_connection_age_grace: int = field(
        default=0,
        metadata={
            "help": "milliseconds calls in flight get to finish after the connection's age "
            "is reached, before it is closed; 0: no limit"
        },
    )
    # --- conversion (ModelConversion service, management listener) ---
    state_dir: str = field(
        default="",
        metadata={
            "help": "folder for uploads and the conversion job database; empty: "
            "<repository>.ferry beside the repository (never inside it)"
        },
    )
    allow_code_formats: bool = field(
        default=False,
        metadata={
            "help": "accept ExportedProgram (.pt2) and TorchScript uploads, whose "
            "loading runs code: only when every uploader is trusted"
        },
    )
    max_upload_bytes: int = field(
        default=2 << 30, metadata={"help": "largest model upload, enforced while receiving"}
    )
    upload_retention_bytes: int = field(
        default=20 << 30,
        metadata={
            "help": "total bytes of uploads kept; past it the oldest uploads no queued or "
            "running job reads are removed (after each upload, before each conversion and at "
            "start); 0: no limit"
        },
    )
    upload_retention_seconds: float = field(
        default=7 * 86400.0,
        metadata={
            "help": "age past which an upload no queued or running job reads is removed "
            "(checked after each upload, before each conversion, which then answers NOT_FOUND "
            "for it, and at start); 0: kept until deleted or over "
            "upload_retention_bytes"
        },
    )
    max_concurrent_conversions: int = field(
        default=1,
        metadata={"help": "conversion processes running at once, and upload-check processes"},
    )
    max_queued_conversions: int = field(
        default=16, metadata={"help": "conversion jobs waiting for a slot; more are refused"}
    )
    conversion_timeout: float = field(
        default=600.0,
        metadata={
            "help": "seconds a conversion process (or an upload's check) may run; 0: no limit"
        },
    )
    warm_conversion_child: bool = field(
        default=True,
        metadata={
            "help": "after a conversion, start the next conversion process ahead (torch "
            "imported, exporter primed) so the next job does not wait ~6 s for it; still one "
            "job per process; it leaves after 10 idle minutes"
        },
    )
    conversion_memory_bytes: int = field(
        default=4 << 30,
        metadata={
            "help": "address-space limit (RLIMIT_AS) of a conversion process and of the "
            "process that checks an upload; 0: none"
        },
    )
    external_data_threshold_bytes: int = field(
        default=int(1.8 * (1 << 30)),
        metadata={
            "help": "a converted model whose weights exceed this is published as model.onnx + "
            "model.onnx.data (ONNX files cannot exceed 2 GiB)"
        },
    )

    def __post_init__(self) -> None:
        from ferry.server.security import check_settings

        if self.log_format not in LOG_FORMATS:
            raise SettingsError(
                f"log_format {self.log_format!r}: use one of {', '.join(LOG_FORMATS)}"
            )
        if str(self.log_level).upper() not in LOG_LEVELS:
            raise SettingsError(f"log_level {self.log_level!r}: use one of {', '.join(LOG_LEVELS)}")
        for name, (low, high, meaning) in RANGES.items():
            _check_range(name, getattr(self, name), low, high, meaning)
        if self.management_port < 0:
            # Management off is both its listeners: with the HTTP one left on (its default
            # port), a replica started with --management-port -1 still took repository
            # load/unload on 127.0.0.1:8004, and a management host off loopback was refused.
            self.management_http_port = -1
        for name in HOSTS:
            if not str(getattr(self, name)).strip():
                # grpc read "" as no address and the start said "cannot listen on :8001: in
                # use or not permitted"; an unset variable in a manifest gives exactly this.
                raise SettingsError(
                    f"{name} is empty: use an address of this machine, 0.0.0.0 (all IPv4), "
                    ":: (all IPv6) or 127.0.0.1 (this machine only)"
                )
        most = WORKERS_PER_CORE * (os.cpu_count() or 1)
        _check_range(
            "workers",
            self.workers,
            0,
            most,
            f"0: one per usable core; at most {WORKERS_PER_CORE} per core of this host",
        )
        check_settings(self)

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides: Any) -> Settings:
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            key = f"FERRY_{f.name.upper()}"
            if key in env:
                values[f.name] = _convert(f.type, env[key], key)
        values.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return cls(**values)
        except ValueError as exc:  # a settings rule (security.check_settings)
            raise SettingsError(str(exc)) from None


def _check_range(
    name: str, value: Any, low: float | None, high: float | None, meaning: str
) -> None:
    ok = not isinstance(value, float) or math.isfinite(value)
    ok = ok and (low is None or value >= low) and (high is None or value <= high)
    if not ok:
        span = f"{low if low is not None else '-inf'}..{high if high is not None else 'inf'}"
        raise SettingsError(f"{name} {value!r} is outside {span} ({meaning}); set it within")


def _convert(type_name: Any, raw: str, where: str) -> Any:
    t = str(type_name)
    if t == "Path" and not raw.strip():
        raise SettingsError(f"{where}={raw!r} {EMPTY_PATH}")
    try:
        if t == "bool":
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if t == "int":
            return int(raw)
        if t == "float":
            return float(raw)
        if t == "Path":
            return Path(raw)
        return raw
    except ValueError:
        raise SettingsError(f"{where}={raw!r} is not a valid {t}") from None


def _path(raw: str) -> Path:
    """A path flag's value; "" is refused, not read as the working directory."""
    if not raw.strip():
        raise argparse.ArgumentTypeError(EMPTY_PATH)
    return Path(raw)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    for f in fields(Settings):
        if not f.metadata.get("flag", True):
            continue  # secrets: environment only
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not MISSING else None
        help_text = f"{f.metadata.get('help', '')} (env FERRY_{f.name.upper()}; default {default})"
        if str(f.type) == "bool":
            parser.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=None, help=help_text
            )
        else:
            converters: dict[str, Callable[[str], Any]] = {
                "int": int,
                "float": float,
                "Path": _path,
            }
            conv = converters.get(str(f.type), str)
            parser.add_argument(flag, type=conv, default=None, help=help_text)


def from_args(args: argparse.Namespace) -> Settings:
    return Settings.from_env(**{f.name: getattr(args, f.name, None) for f in fields(Settings)})
