"""memory.py reads what the kernel says a process costs, and says nothing rather than guess."""

from __future__ import annotations

import mmap
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ferry.server.memory import KINDS, process_memory, summary

pytestmark = pytest.mark.skipif(
    not Path("/proc/self/smaps_rollup").exists(), reason="needs Linux /proc/<pid>/smaps_rollup"
)


def test_a_process_reports_every_kind_and_private_is_within_pss_within_rss() -> None:
    m = process_memory(os.getpid())
    assert m is not None and set(m) == set(KINDS)
    assert 0 < m["private"] <= m["pss"] <= m["rss"]


def test_pages_shared_with_another_process_count_in_full_in_rss_and_halved_in_pss(
    tmp_path: Path,
) -> None:
    """The reason PSS is reported: two processes mapping one file each show it whole in RSS."""
    size = 64 << 20
    path = tmp_path / "weights.bin"
    path.write_bytes(os.urandom(1 << 20) * 64)
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import mmap, sys; f = open(sys.argv[1], 'rb'); "
            "m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ); "
            "sum(m[i] for i in range(0, len(m), 4096)); print('mapped', flush=True); "
            "sys.stdin.read()",
            str(path),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "mapped"
        before = process_memory(os.getpid())
        with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            sum(m[i] for i in range(0, size, 4096))  # touch every page
            after = process_memory(os.getpid())
        assert before is not None and after is not None
        assert after["rss"] - before["rss"] >= size * 0.9
        assert after["pss"] - before["pss"] <= size * 0.6  # shared with the child: half each
    finally:
        if child.stdin is not None:
            child.stdin.close()
        child.wait(timeout=30)


def test_a_process_that_is_gone_reports_nothing() -> None:
    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    assert process_memory(int(done.stdout)) is None
    assert "unreadable" in summary([int(done.stdout)])
