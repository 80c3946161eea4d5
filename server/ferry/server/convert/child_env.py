"""The environment a conversion or upload-check process starts with: the server's, less secrets.

Those processes run the exporters, quantizers and (when allowed) a format's own loading code on a
client's upload. They inherited the whole server environment, ``FERRY_MANAGEMENT_TOKEN`` and
``FERRY_INFERENCE_TOKEN`` included, so code reached through a hostile upload could read the
tokens that guard the server (and a cloud key, a passphrase) from ``os.environ``. The children
read no ``FERRY_*`` setting (they are given all they need as arguments), so every ``FERRY_*``
variable is left out, and so is any variable whose name says it holds a secret. A deny-list, not
an allow-list: what torch, onnxruntime and the system need (``PATH``, ``HOME``, ``LD_*``,
``CUDA_*``, proxies, locale, ``PYTHONPATH``) varies by deployment and must keep reaching them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

# Words in a variable's name (upper-cased) that mark it as holding a secret.
SECRET_WORDS = (
    "TOKEN",
    "SECRET",
    "PASSWORD",
    "PASSWD",
    "PASSPHRASE",
    "CREDENTIAL",
    "API_KEY",
    "APIKEY",
    "ACCESS_KEY",
    "PRIVATE_KEY",
)
# Named outright: an agent socket is a credential, whatever its name says; and onnxruntime's
# switch that lets a model's own metadata ("ort_config") set its session options (threads,
# profiling and the files it writes), which a client's upload must not reach.
SECRET_NAMES = frozenset({"SSH_AUTH_SOCK", "ORT_LOAD_CONFIG_FROM_MODEL"})


def is_secret(name: str) -> bool:
    """Whether a child process must not see the variable ``name``."""
    upper = name.upper()
    return (
        upper.startswith("FERRY_")
        or upper in SECRET_NAMES
        or any(word in upper for word in SECRET_WORDS)
    )


def child_environment(extra: Mapping[str, str]) -> dict[str, str]:
    """The server's environment without secrets, with ``extra`` set on top."""
    env = {name: value for name, value in os.environ.items() if not is_secret(name)}
    env.update(extra)
    return env
