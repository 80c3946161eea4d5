"""How many cores this process may use: its CPU affinity and its cgroup's CPU quota, the lower.

Every thread count Ferry picks follows from it (the execution pool, `--workers 0`, the intra-op
threads of a heavy model, the conversion child's torch threads). In a container ``os.cpu_count``
sees the node: a Kubernetes pod with ``limits.cpu: 2`` on a 64-core node gets a CFS quota, not a
cpuset (unless the kubelet's static CPU manager pins it), so its affinity still names 64 cores.
Sized from those, 64 threads drain the quota early in each 100 ms period and every thread is
then stopped for the rest of it: latency in tens of milliseconds, at any load. Go's automaxprocs,
the JVM's container support and .NET read the quota for the same reason; so does this.

Rounded down (a quota of 1.5 cores is one): a thread too few costs a little throughput, a thread
too many costs throttling. At least one.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
OWN_CGROUP = Path("/proc/self/cgroup")


def usable_cores() -> int:
    quota = quota_cores()
    cores = affinity_cores()
    if quota is not None:
        cores = min(cores, max(1, math.floor(quota)))
    return max(1, cores)


def affinity_cores() -> int:
    """Cores this process may run on (its affinity mask, as a container's cpuset sets it)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def quota_cores(root: Path = CGROUP_ROOT, own: Path = OWN_CGROUP) -> float | None:
    """The tightest CPU quota over this process's cgroup and the cgroups above it that this
    process can see, in cores; None when none is set (or this is not Linux)."""
    try:
        # A cgroup's name may be any bytes: decoded as the file system's names are.
        lines = os.fsdecode(own.read_bytes()).splitlines()
    except OSError:
        return None
    quotas: list[float] = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, path = parts
        try:
            if hierarchy == "0" and controllers == "":  # cgroup v2 (unified)
                if (root / "cgroup.controllers").exists():  # v2 mounted here, not hybrid
                    quotas += _quotas(root, path, _v2_quota)
            elif "cpu" in controllers.split(","):  # cgroup v1, the cpu controller's hierarchy
                mount = root / "cpu" if (root / "cpu").is_dir() else root / controllers
                quotas += _quotas(mount, path, _v1_quota)
        except (OSError, ValueError):  # not this process's to look into: no quota known
            continue
    return min(quotas) if quotas else None


def _quotas(mount: Path, path: str, read: Callable[[Path], float | None]) -> list[float]:
    """The quotas set on ``path`` and its parents under ``mount``. A container without a cgroup
    namespace sees the host's path in /proc/self/cgroup while its own cgroup is mounted at the
    root: then only the root's is read."""
    found: list[float] = []
    here = mount / path.lstrip("/")
    try:
        folders = [here, *here.parents] if here.is_dir() else [mount]
    except PermissionError:
        # Its folder may not be looked into (mode 0700 above it, an LSM): pathlib raises
        # for that, which stopped the server's start. The quotas readable above it still count.
        folders = [here, *here.parents]
    for folder in folders:
        if folder != mount and mount not in folder.parents:
            break
        quota = read(folder)
        if quota is not None:
            found.append(quota)
    return found


def _v2_quota(folder: Path) -> float | None:
    try:
        fields = (folder / "cpu.max").read_text().split()
    except (OSError, ValueError):
        return None
    if len(fields) != 2 or fields[0] == "max":
        return None
    return _ratio(fields[0], fields[1])


def _v1_quota(folder: Path) -> float | None:
    try:
        quota = (folder / "cpu.cfs_quota_us").read_text().strip()
        period = (folder / "cpu.cfs_period_us").read_text().strip()
    except (OSError, ValueError):
        return None
    return _ratio(quota, period)


def _ratio(quota: str, period: str) -> float | None:
    try:
        q, p = int(quota), int(period)
    except ValueError:
        return None
    if q <= 0 or p <= 0:  # -1: no quota
        return None
    return q / p
