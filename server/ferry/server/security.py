"""Who may call which listener: tokens, exposure rules and TLS file settings, without grpc.

The decisions live here so that settings validation (at construction, before anything binds) and
the server's start share one rule set:

- The management listener loads models and runs conversions. ShellTorch (TorchServe <= 0.8.1) was
  an unauthenticated management API on every interface, so Ferry refuses to put management on a
  non-loopback address unless a management token or mutual TLS guards it.
- Tokens are separate per listener. The inference token never grants management; the management
  token is accepted on the inference listener too, since whoever may load models may also run them.
- Tokens come from the environment or from files, never from command-line flags (a flag shows in
  ``ps`` and shell history), and never appear in ``repr(settings)``.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ferry.server.settings import SettingsError

if TYPE_CHECKING:
    from ferry.server.settings import Settings

LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})


def is_loopback(host: str) -> bool:
    """True only for addresses that cannot be reached from another machine. A host name other
    than localhost counts as exposed: what it resolves to can change after the check."""
    name = host.strip().strip("[]").lower()
    if name in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class ListenerTLS:
    """Certificate files of one listener; ``client_ca_file`` turns on mutual TLS."""

    cert_file: str
    key_file: str
    client_ca_file: str = ""

    @property
    def mutual(self) -> bool:
        return bool(self.client_ca_file)


@dataclass(frozen=True)
class Tokens:
    """The bearer tokens in force (None: that listener checks no token)."""

    inference: bytes | None
    management: bytes | None


def encrypted_key() -> bytes:
    """``load_cert_chain``'s password callback, which OpenSSL calls only for an encrypted key.
    Without one it asked for the passphrase on the terminal, so a start from a shell waited
    there for ever, and with no terminal it failed "[Errno 22] Invalid argument"; gRPC cannot
    use such a key in any case."""
    raise OSError(
        "the key is encrypted (passphrase-protected), which gRPC cannot use: give a key without "
        "a passphrase (openssl pkey -in KEY -out PLAIN.key), readable by the server alone"
    )


def inference_tls(s: Settings) -> ListenerTLS | None:
    if not s.tls_cert_file:
        return None
    return ListenerTLS(s.tls_cert_file, s.tls_key_file, s.tls_client_ca_file)


def management_tls(s: Settings) -> ListenerTLS | None:
    """The management listener shares the server certificate; its client CA defaults to the
    inference one, so turning on mTLS for inference never leaves management weaker."""
    if not s.tls_cert_file:
        return None
    return ListenerTLS(
        s.tls_cert_file, s.tls_key_file, s.management_tls_client_ca_file or s.tls_client_ca_file
    )


def check_settings(s: Settings) -> None:
    """Reject inconsistent or unsafe security settings with one line that says what to set.

    Runs on every ``Settings`` construction, so a bad deployment fails before binding a port."""
    for listener in ("inference", "management"):
        if getattr(s, f"{listener}_token") and getattr(s, f"{listener}_token_file"):
            raise ValueError(
                f"set FERRY_{listener.upper()}_TOKEN or {listener}_token_file, not both"
            )
    if bool(s.tls_cert_file) != bool(s.tls_key_file):
        raise ValueError("TLS needs both tls_cert_file and tls_key_file (PEM files)")
    if (s.tls_client_ca_file or s.management_tls_client_ca_file) and not s.tls_cert_file:
        raise ValueError(
            "mutual TLS (a client CA file) needs the server's own tls_cert_file and tls_key_file"
        )
    if (s.management_port < 0 and s.management_http_port < 0) or is_loopback(s.management_host):
        return
    mtls = management_tls(s)
    if s.management_token or s.management_token_file or (mtls is not None and mtls.mutual):
        return
    raise ValueError(
        f"refusing to serve management on non-loopback address {s.management_host!r} without "
        "authentication: set FERRY_MANAGEMENT_TOKEN or --management-token-file, or mutual TLS "
        "(--tls-cert-file, --tls-key-file, --management-tls-client-ca-file), or keep "
        "--management-host 127.0.0.1 (both management listeners, gRPC and HTTP, bind there)"
    )


def _token(value: str, file: str, what: str) -> bytes | None:
    if file:
        try:
            value = Path(file).read_text(encoding="utf-8")
        except OSError as exc:
            raise OSError(f"cannot read the {what} token file {file!r}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise SettingsError(f"the {what} token file {file!r} is not UTF-8 text") from None
        value = value.strip()  # files end with a newline; a token never has surrounding spaces
        if not value:
            raise SettingsError(f"the {what} token file {file!r} is empty")
    if not value:
        return None
    if any(c in value for c in "\r\n\0") or len(value) > 4096:
        raise SettingsError(f"the {what} token must be one line of at most 4096 characters")
    # What a client can send: gRPC metadata and HTTP headers carry printable ASCII, and the
    # server strips the spaces around a credential. A token outside that (a trailing space from
    # an .env file, a tab, an accented letter) matched no request: every caller was refused.
    if value != value.strip() or not all(" " <= c <= "~" for c in value):
        raise SettingsError(
            f"the {what} token must be printable ASCII (letters, digits, punctuation; what a "
            "gRPC or HTTP client can send) with no spaces around it: check the environment "
            "variable or token file for stray spaces, tabs or non-ASCII characters"
        )
    return value.encode("utf-8")


def load_tokens(s: Settings) -> Tokens:
    """Read the tokens (files now, at start, so a rotated file is picked up by a restart).

    What a file holds is only known here, after the settings were built, so a bad token is a
    ``SettingsError`` too: ``ferry serve`` prints it as one line instead of a traceback."""
    tokens = Tokens(
        _token(s.inference_token, s.inference_token_file, "inference"),
        _token(s.management_token, s.management_token_file, "management"),
    )
    if tokens.inference is not None and tokens.inference == tokens.management:
        raise SettingsError(
            "the inference and management tokens are equal: use different tokens, or the "
            "inference token would also grant model management"
        )
    return tokens


def exposure_warnings(s: Settings, tokens: Tokens) -> list[str]:
    """Deployments that start but deserve a warning in the log."""
    out = []
    listeners = [("inference", s.host, tokens.inference)]
    if s.management_port >= 0 or s.management_http_port >= 0:
        listeners.append(("management", s.management_host, tokens.management))
    for name, host, token in listeners:
        if token is not None and not s.tls_cert_file and not is_loopback(host):
            out.append(
                f"the {name} token travels in clear text on {host}: set tls_cert_file and "
                "tls_key_file, or terminate TLS in front of Ferry"
            )
    return out
