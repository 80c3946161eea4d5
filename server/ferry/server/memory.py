"""Memory of the serving processes as the kernel accounts it, for /metrics and the start log.

RSS counts every page a process maps, so N workers that map one weights file each report it in
full and their RSS adds up to more than the host holds. PSS divides each shared page among the
processes that share it, so the workers' PSS adds up to what they really cost together; private
is what a process alone holds (what stopping it would free). That difference is the point of
sharing weights between workers (runtime/shared_weights.py). Read from /proc/<pid>/smaps_rollup
(Linux 4.14 and later); where it cannot be read, nothing is reported rather than a guess.
"""

from __future__ import annotations

from pathlib import Path

KINDS = ("rss", "pss", "private")


def process_memory(pid: int) -> dict[str, int] | None:
    """Bytes by kind (``KINDS``) of one process, or None when its smaps cannot be read (gone,
    not Linux, or not ours to read)."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return None
    kib: dict[str, int] = {}
    for line in text.splitlines()[1:]:  # the first line is the address range
        key, _, rest = line.partition(":")
        parts = rest.split()
        if len(parts) == 2 and parts[1] == "kB" and parts[0].isdigit():
            kib[key] = int(parts[0])
    if "Rss" not in kib:
        return None
    return {
        "rss": kib["Rss"] * 1024,
        "pss": kib.get("Pss", 0) * 1024,
        "private": (kib.get("Private_Clean", 0) + kib.get("Private_Dirty", 0)) * 1024,
    }


def summary(pids: list[int]) -> str:
    """One log line's worth: each worker's RSS and PSS, then the PSS total (MiB)."""
    parts = []
    total = 0
    for index, pid in enumerate(pids):
        m = process_memory(pid)
        if m is None:
            parts.append(f"worker {index} (pid {pid}) unreadable")
            continue
        total += m["pss"]
        parts.append(f"worker {index} RSS {m['rss'] >> 20} MiB PSS {m['pss'] >> 20} MiB")
    return "; ".join(parts) + f"; PSS of all {total >> 20} MiB"
