"""TLS and mutual TLS on both listeners, with certificates generated at test time.

A failed handshake is refused by gRPC before any RPC reaches Ferry, so the client sees
UNAVAILABLE (``ConnectionError_`` in the SDK); retries are disabled to make that answer immediate.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import make_repo
from sechelpers import Certs, encrypted_copy, named_server_cert
from serverutil import ServerThread

from ferry.client import (
    AuthenticationError,
    ConnectionError_,
    InferenceClient,
    RepositoryClient,
    RetryPolicy,
    TLSConfig,
)
from ferry.server.examples import identity_model
from ferry.server.probe import main as probe_main

X = {"input": np.arange(3, dtype=np.float32)}
NO_RETRY = RetryPolicy.disabled()


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_repo(
        tmp_path_factory.mktemp("tls") / "repo", {"fixed": identity_model("FP32", (3,))}
    )


def tls_settings(certs: Certs, **extra: str) -> dict[str, str]:
    return {"tls_cert_file": str(certs.server_cert), "tls_key_file": str(certs.server_key), **extra}


def mutual(certs: Certs) -> TLSConfig:
    """A client of the test CA that presents its client certificate (for mutual TLS)."""
    return TLSConfig(ca_cert=certs.ca, client_cert=certs.client_cert, client_key=certs.client_key)


def start_refused(repo: Path, message: str, **settings: Any) -> None:
    """A server with ``settings`` refuses to start, saying ``message`` (a regex)."""
    srv = ServerThread(repo, **settings)
    with pytest.raises(OSError, match=message):
        srv.start()
    srv.stop()


def client(target: str, tls: TLSConfig | None = None, **kw: object) -> InferenceClient:
    return InferenceClient(target, timeout=10, retry=NO_RETRY, tls=tls, **kw)  # type: ignore[arg-type]


def refused(target: str, tls: TLSConfig | None) -> bool:
    with client(target, tls) as c:
        try:
            c.list_models()
        except ConnectionError_:
            return True
    return False


@pytest.fixture(scope="module")
def tls_server(repo: Path, certs: Certs) -> Iterator[ServerThread]:
    with ServerThread(repo, **tls_settings(certs), inference_token="tls-token") as srv:
        yield srv


def test_tls_serves_clients_that_trust_the_ca(tls_server: ServerThread, certs: Certs) -> None:
    trusted = TLSConfig(ca_cert=certs.ca)
    with client(tls_server.target, trusted, token="tls-token") as c:
        assert c.ready()
        assert c.infer("fixed", X)["output"].tolist() == [0.0, 1.0, 2.0]
    # The name check is real: the certificate names 127.0.0.1 and localhost, nothing else.
    with client(f"localhost:{tls_server.app.inference_port}", trusted, token="tls-token") as c:  # type: ignore[union-attr]
        assert c.infer("fixed", X)["output"].shape == (3,)
    assert refused(tls_server.target, TLSConfig(ca_cert=certs.ca, server_name_override="evil.test"))
    assert refused(tls_server.target, TLSConfig(ca_cert=certs.rogue_ca))  # untrusted server
    assert refused(tls_server.target, None)  # plaintext client on a TLS port


def test_the_token_rides_as_call_credentials_over_tls(
    tls_server: ServerThread, certs: Certs
) -> None:
    with (
        client(tls_server.target, TLSConfig(ca_cert=certs.ca)) as anonymous,
        pytest.raises(AuthenticationError),
    ):
        anonymous.infer("fixed", X)
    with client(tls_server.target, TLSConfig(ca_cert=certs.ca), token="tls-token") as c:
        results = dict(c.infer_many("fixed", [X, X, X]))  # a stream carries it too
        assert len(results) == 3


def test_mutual_tls_on_both_listeners(repo: Path, certs: Certs) -> None:
    settings = tls_settings(certs, tls_client_ca_file=str(certs.ca))
    with ServerThread(repo, **settings) as srv:
        good = mutual(certs)
        with client(srv.target, good) as c:
            assert c.infer("fixed", X)["output"].shape == (3,)
        with RepositoryClient(srv.management_target, tls=good, timeout=30) as admin:
            admin.refresh()
        rogue = TLSConfig(
            ca_cert=certs.ca, client_cert=certs.rogue_cert, client_key=certs.rogue_key
        )
        for target in (srv.target, srv.management_target):
            assert refused(target, TLSConfig(ca_cert=certs.ca)), target  # no client certificate
            assert refused(target, rogue), target  # a certificate from another CA


def test_mutual_tls_on_management_only(repo: Path, certs: Certs) -> None:
    settings = tls_settings(certs, management_tls_client_ca_file=str(certs.ca))
    with ServerThread(repo, **settings) as srv:
        server_only = TLSConfig(ca_cert=certs.ca)
        with client(srv.target, server_only) as c:
            assert c.infer("fixed", X)["output"].shape == (3,)
        assert refused(srv.management_target, server_only)
        good = mutual(certs)
        with RepositoryClient(srv.management_target, tls=good, timeout=30) as admin:
            admin.refresh()


def test_the_probe_presents_a_client_certificate_to_a_mutual_tls_listener(
    repo: Path, certs: Certs, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """With --tls-client-ca-file the probe had no way to send a certificate: every readiness
    and liveness check failed its handshake (UNAVAILABLE), so the pod never became ready."""
    settings = tls_settings(certs, tls_client_ca_file=str(certs.ca))
    with ServerThread(repo, **settings) as srv:
        base = ["--address", srv.target, "--tls-ca-file", str(certs.ca), "--timeout", "10"]
        assert probe_main(base) == 1  # no certificate: refused at the handshake
        assert "UNAVAILABLE" in capsys.readouterr().err
        mine = ["--tls-cert-file", str(certs.client_cert), "--tls-key-file", str(certs.client_key)]
        assert probe_main([*base, *mine]) == 0
        assert capsys.readouterr().out.strip().endswith("SERVING")
        missing = ["--tls-cert-file", str(certs.client_cert), "--tls-key-file", "/nonexistent.key"]
        assert probe_main([*base, *missing]) == 1
        assert "/nonexistent.key" in capsys.readouterr().err
        encrypted = encrypted_copy(certs.client_key, tmp_path / "probe-encrypted.key")
        locked = ["--tls-cert-file", str(certs.client_cert), "--tls-key-file", str(encrypted)]
        assert probe_main([*base, *locked]) == 1  # was UNAVAILABLE, blaming the listener
        assert "is encrypted" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:  # a certificate without its key
        probe_main([*base, "--tls-cert-file", str(certs.client_cert)])
    assert info.value.code == 2
    assert "--tls-key-file" in capsys.readouterr().err


def test_the_probe_checks_the_certificate_against_the_name_it_is_given(
    repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A pod's certificate names its service, not 127.0.0.1, the address a probe asks: the
    probe's TLS check failed on the name for ever. --tls-server-name checks that name."""
    ca, cert, key = named_server_cert(tmp_path, "ferry.example.svc")
    with ServerThread(repo, tls_cert_file=str(cert), tls_key_file=str(key)) as srv:
        base = ["--address", srv.target, "--tls-ca-file", str(ca), "--timeout", "10"]
        assert probe_main(base) == 1  # 127.0.0.1 is not a name of the certificate
        assert "UNAVAILABLE" in capsys.readouterr().err
        assert probe_main([*base, "--tls-server-name", "ferry.example.svc"]) == 0
        assert probe_main([*base, "--tls-server-name", "other.example.svc"]) == 1


def test_bad_certificate_files_stop_the_start(repo: Path, certs: Certs, tmp_path: Path) -> None:
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("hello")
    for settings, message in (
        (tls_settings(certs, tls_cert_file=str(tmp_path / "missing.pem")), "missing.pem"),
        (tls_settings(certs, tls_key_file=str(not_pem)), "not a PEM"),
        (tls_settings(certs, tls_client_ca_file=str(tmp_path / "ca.pem")), "client CA"),
    ):
        start_refused(repo, message, **settings)


@pytest.mark.parametrize("http", [True, False], ids=["with-http", "grpc-only"])
def test_an_encrypted_key_stops_the_start_saying_so(
    repo: Path, certs: Certs, tmp_path: Path, http: bool
) -> None:
    """OpenSSL asked for a passphrase on the terminal (the start waited there for ever) or,
    with no terminal, failed "[Errno 22] Invalid argument"; gRPC cannot use such a key."""
    encrypted = encrypted_copy(certs.server_key, tmp_path / "encrypted.key")
    ports = {} if http else {"http_port": -1, "management_http_port": -1}
    settings = tls_settings(certs, tls_key_file=str(encrypted))
    start_refused(repo, r"encrypted\.key.*is encrypted", **ports, **settings)


@pytest.mark.parametrize(
    "files",
    [
        {"tls_key_file": "client_key"},  # a key of another certificate
        {"tls_cert_file": "server_key", "tls_key_file": "server_key"},  # PEM, but no certificate
        {"tls_client_ca_file": "server_key"},  # PEM, but no CA certificate
    ],
    ids=["key-of-another-certificate", "key-as-certificate", "key-as-ca"],
)
def test_certificate_files_that_do_not_fit_are_named_with_grpc_listeners_only(
    repo: Path, certs: Certs, files: dict[str, str]
) -> None:
    """With the HTTP listeners off, grpc alone read the files: it refused them at bind and the
    start said "cannot listen on 0.0.0.0:0: in use or not permitted", sending the operator after
    a port."""
    chosen = {key: str(getattr(certs, name)) for key, name in files.items()}
    settings = tls_settings(certs, **chosen)
    start_refused(
        repo, "cannot load the TLS files", http_port=-1, management_http_port=-1, **settings
    )


def test_the_cli_takes_the_token_and_tls_options(tls_server: ServerThread, certs: Certs) -> None:
    """The CLI reads the token from FERRY_TOKEN (a flag would show in ps) and trusts --tls-ca."""
    cmd = [sys.executable, "-m", "ferry.cli", "models", "list", "--target", tls_server.target]
    env = {k: v for k, v in os.environ.items() if k != "FERRY_TOKEN"}
    ok = subprocess.run(
        [*cmd, "--tls-ca", str(certs.ca)], env={**env, "FERRY_TOKEN": "tls-token"},
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert "fixed" in ok.stdout
    anonymous = subprocess.run(
        [*cmd, "--tls-ca", str(certs.ca)], env=env,
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert anonymous.returncode == 1
    assert "FERRY_TOKEN" in anonymous.stderr


def test_a_client_key_grpc_cannot_use_is_refused_when_the_client_is_made(
    certs: Certs, tmp_path: Path
) -> None:
    """An encrypted client key, or a certificate given as the key, failed every call as
    UNAVAILABLE "Failed to create security handshaker" (retried, blaming the connection), with
    gRPC's own errors on stderr."""
    encrypted = encrypted_copy(certs.client_key, tmp_path / "client-encrypted.key")
    for bad, message in ((encrypted, "is encrypted"), (certs.client_cert, "not a PEM private key")):
        tls = TLSConfig(ca_cert=certs.ca, client_cert=certs.client_cert, client_key=bad)
        with pytest.raises(ValueError, match=message):
            InferenceClient("127.0.0.1:1", tls=tls)
