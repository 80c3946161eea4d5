"""The server raises its soft open-file limit to the hard one (ferry.server.open_files)."""

from __future__ import annotations

import resource
import subprocess
import sys

SCRIPT = """
import resource, sys
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (min(int(sys.argv[1]), hard), int(sys.argv[2])))
from ferry.server.open_files import raise_open_files_limit
before, after = raise_open_files_limit()
print(before, after, *resource.getrlimit(resource.RLIMIT_NOFILE))
"""


def _run(soft: int, hard: int) -> list[int]:
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(soft), str(hard)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return [int(v) for v in out.stdout.split()]


def test_a_low_soft_limit_is_raised_to_the_hard_one() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    hard = min(hard, 4096) if hard != resource.RLIM_INFINITY else 4096
    assert _run(256, hard) == [256, hard, hard, hard]


def test_a_soft_limit_already_at_the_hard_one_stays() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    hard = min(hard, 2048) if hard != resource.RLIM_INFINITY else 2048
    assert _run(hard, hard) == [hard, hard, hard, hard]
