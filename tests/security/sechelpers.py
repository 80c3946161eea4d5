"""Helpers of the hardening tests: certificates made at test time, and Ferry as a subprocess.

Certificates: one CA signs the server certificate (SAN 127.0.0.1, ::1 and localhost) and a client
certificate; a second, unrelated CA signs a "rogue" client certificate that mutual TLS must refuse.
EC P-256 keys keep generation in milliseconds.

``ServerProcess`` runs ``python -m ferry.server`` for the tests that need a process of their own:
SIGKILL, and memory read from ``/proc/<pid>/status`` (a server thread would share the test
process's RSS). Readiness is the health RPC reporting SERVING, never a log line or a sleep.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import onnx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from onnx import TensorProto, helper, numpy_helper

START_TIMEOUT = 90.0  # a cold start imports onnxruntime; on a loaded 2-core machine that is slow


@dataclass(frozen=True)
class Certs:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_ca: Path
    rogue_cert: Path
    rogue_key: Path


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> Path:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return path


def encrypted_copy(key_file: Path, path: Path, passphrase: bytes = b"passphrase") -> Path:
    """``key_file``'s key written to ``path`` under a passphrase: a key gRPC cannot use, which
    each side must refuse by name rather than ask a terminal for the passphrase."""
    key = serialization.load_pem_private_key(key_file.read_bytes(), None)
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(passphrase),
        )
    )
    return path


def _write_cert(cert: x509.Certificate, path: Path) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def _ca(cn: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _leaf(
    cn: str,
    ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
    *,
    server: bool,
    dns_names: tuple[str, ...] = (),
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(ca[0].subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
    )
    if server:
        names: list[x509.GeneralName] = [
            x509.DNSName("localhost"),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
            x509.IPAddress(ipaddress.ip_address("::1")),
        ]
        if dns_names:  # a certificate as a cluster's issuer makes: its names, no address
            names = [x509.DNSName(n) for n in dns_names]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(ca[1], hashes.SHA256()), key


def make_certs(d: Path) -> Certs:
    """Write a CA, a server and a client certificate, and a rogue CA's client certificate."""
    ca = _ca("Ferry test CA")
    rogue = _ca("Rogue CA")
    server = _leaf("ferry-server", ca, server=True)
    client = _leaf("ferry-client", ca, server=False)
    rogue_client = _leaf("ferry-client", rogue, server=False)
    return Certs(
        ca=_write_cert(ca[0], d / "ca.pem"),
        server_cert=_write_cert(server[0], d / "server.pem"),
        server_key=_write_key(server[1], d / "server.key"),
        client_cert=_write_cert(client[0], d / "client.pem"),
        client_key=_write_key(client[1], d / "client.key"),
        rogue_ca=_write_cert(rogue[0], d / "rogue-ca.pem"),
        rogue_cert=_write_cert(rogue_client[0], d / "rogue.pem"),
        rogue_key=_write_key(rogue_client[1], d / "rogue.key"),
    )


def named_server_cert(d: Path, name: str) -> tuple[Path, Path, Path]:
    """(CA, certificate, key) of a server certificate for DNS ``name`` alone, not 127.0.0.1."""
    ca = _ca("Named CA")
    cert, key = _leaf("ferry-server", ca, server=True, dns_names=(name,))
    return (
        _write_cert(ca[0], d / "named-ca.pem"),
        _write_cert(cert, d / "named.pem"),
        _write_key(key, d / "named.key"),
    )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def proc_status(pid: int) -> dict[str, str]:
    out = {}
    with open(f"/proc/{pid}/status", encoding="ascii") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            out[key] = value.strip()
    return out


def rss_kib(pid: int) -> int:
    return int(proc_status(pid)["VmRSS"].split()[0])


class ServerProcess:
    """``python -m ferry.server`` on 127.0.0.1, ready when its health check says SERVING.

    Ports are picked free just before the start; if another process takes one in between, the
    server exits at bind and the start is retried on fresh ports."""

    def __init__(
        self,
        repository: Path,
        log_path: Path,
        *args: str,
        management: bool = False,
        env: dict[str, str] | None = None,
    ) -> None:
        self.repository = repository
        self.log_path = log_path
        self.args = list(args)
        self.management = management
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.management_port = -1

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def management_target(self) -> str:
        return f"127.0.0.1:{self.management_port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> ServerProcess:
        for _attempt in range(3):
            self.port = free_port()
            self.management_port = free_port() if self.management else -1
            cmd = [
                sys.executable, "-m", "ferry.server",
                "--repository", str(self.repository),
                "--host", "127.0.0.1", "--port", str(self.port),
                "--management-host", "127.0.0.1", "--management-port", str(self.management_port),
                "--metrics-port", "-1", "--grace-period", "2",
                "--http-port", "-1", "--management-http-port", "-1",
                "--no-warm-conversion-child",
                *self.args,
            ]  # fmt: skip
            with open(self.log_path, "ab") as log:
                self.proc = subprocess.Popen(
                    cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env
                )
            if self._wait_serving():
                return self
        raise AssertionError(f"ferry server did not start; log:\n{self.log()}")

    def _wait_serving(self) -> bool:
        assert self.proc is not None
        end = time.monotonic() + START_TIMEOUT
        pause = threading.Event()
        with grpc.insecure_channel(self.target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < end:
                if self.proc.poll() is not None:
                    return False  # exited: a port was taken, or a real failure (the log says)
                try:
                    status = stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0).status
                except grpc.RpcError:
                    status = None
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return True
                pause.wait(0.05)
        self.kill()
        raise AssertionError(f"ferry server not SERVING after {START_TIMEOUT}s; log:\n{self.log()}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def kill(self) -> None:
        """SIGKILL: no handler runs, nothing is cleaned up; the point of the fault tests."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode


def slow_model(size: int = 256, layers: int = 6) -> onnx.ModelProto:
    """A compute-bound model with a small request: ``input`` [1, size] is tiled to [size, size]
    and pushed through ``layers`` matmuls (about 34 MFLOP each at 256), then summed back to
    [1, size]. No batch dimension, so each request is one execution: capacity is easy to
    saturate from a Python client on the same machine."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Tile", ["input", "reps"], ["h0"])]
    inits = [numpy_helper.from_array(np.array([size, 1], np.int64), "reps")]
    for i in range(layers):
        w = (rng.standard_normal((size, size)) / np.sqrt(size)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes.append(helper.make_node("MatMul", [f"h{i}", f"w{i}"], [f"h{i + 1}"]))
    inits.append(numpy_helper.from_array(np.array([0], np.int64), "axes"))
    nodes.append(helper.make_node("ReduceSum", [f"h{layers}", "axes"], ["output"], keepdims=1))
    graph = helper.make_graph(
        nodes,
        "slow",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, size])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, size])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model
