"""The ``Expect`` header as RFC 9110 10.1.1 reads it: a comma-separated list, across every
``Expect`` line of a request, whose only defined member is ``100-continue``."""

from __future__ import annotations

from collections.abc import Iterable

from ferry.server.errors import ErrorKind
from ferry.server.http.errors import HttpError

CONTINUE = "100-continue"


def expects_continue(values: Iterable[str]) -> bool:
    """Whether the request's ``Expect`` lines (``values``) ask for 100-continue; 417 for any
    other member, before any route runs, so a request that asked for what is not done is not
    run. Only the first line, compared whole, was read: ``Expect: 100-continue, 100-continue``
    or an empty line before ``Expect: 100-continue`` got no interim answer, and a client
    waiting for one (curl, .NET) sent no body until its own timeout. Empty members are
    skipped, as a list's are (RFC 9110 5.6.1)."""
    asked = False
    for value in values:
        for member in value.split(","):
            name = member.strip().lower()
            if name == CONTINUE:
                asked = True
            elif name:
                raise HttpError(
                    417,
                    f"the expectation {member.strip()[:40]!r} cannot be met: the only one this "
                    "listener knows is 'Expect: 100-continue'; send that or no Expect header",
                    ErrorKind.INVALID_ARGUMENT,
                )
    return asked
