"""The cores Ferry sizes its threads for: the affinity mask and the cgroup's CPU quota, the
lower, read from cgroup trees laid out as the kernel and container runtimes lay them out."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ferry.server import cpus


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _v2(tmp_path: Path, own: str, limits: dict[str, str]) -> tuple[Path, Path]:
    root = tmp_path / "cgroup"
    _write(root / "cgroup.controllers", "cpu memory\n")
    for folder, cpu_max in limits.items():
        _write(root / folder.lstrip("/") / "cpu.max", cpu_max + "\n")
    proc = tmp_path / "proc-self-cgroup"
    _write(proc, f"0::{own}\n")
    return root, proc


def test_a_kubernetes_limit_on_cgroup_v2_is_read(tmp_path: Path) -> None:
    """limits.cpu: 2 with a cgroup namespace: the container's cgroup is the root it sees."""
    root, proc = _v2(tmp_path, "/", {"/": "200000 100000"})
    assert cpus.quota_cores(root, proc) == 2.0


def test_no_limit_is_none(tmp_path: Path) -> None:
    root, proc = _v2(tmp_path, "/", {"/": "max 100000"})
    assert cpus.quota_cores(root, proc) is None
    assert cpus.quota_cores(tmp_path / "none", tmp_path / "no-such-file") is None


def test_the_tightest_quota_above_the_process_counts(tmp_path: Path) -> None:
    """A pod's limit sits on the pod's cgroup, above the container's."""
    root, proc = _v2(
        tmp_path,
        "/kubepods/pod1/ctr",
        {"/kubepods/pod1": "150000 100000", "/kubepods/pod1/ctr": "400000 100000"},
    )
    assert cpus.quota_cores(root, proc) == 1.5


def test_a_path_the_container_cannot_see_reads_its_own_root(tmp_path: Path) -> None:
    """Without a cgroup namespace /proc/self/cgroup names the host's path, while the
    container's own cgroup is mounted at the root."""
    root, proc = _v2(tmp_path, "/docker/abc123", {"/": "300000 100000"})
    assert cpus.quota_cores(root, proc) == 3.0


def test_cgroup_v1_and_a_hybrid_mount(tmp_path: Path) -> None:
    """v1's cpu controller (this box's layout: cpu, cpuacct apart, unified without the cpu
    controller)."""
    root = tmp_path / "cgroup"
    (root / "unified").mkdir(parents=True)
    _write(root / "cpu" / "cpu.cfs_quota_us", "250000\n")
    _write(root / "cpu" / "cpu.cfs_period_us", "100000\n")
    proc = tmp_path / "proc-self-cgroup"
    _write(proc, "4:memory:/x\n2:cpuacct:/\n1:cpu:/\n0::/\n")
    assert cpus.quota_cores(root, proc) == 2.5
    _write(root / "cpu" / "cpu.cfs_quota_us", "-1\n")
    assert cpus.quota_cores(root, proc) is None


@pytest.mark.parametrize("cpu_max", ["", "garbage", "0 100000", "100000 0", "1 2 3", "-5 100"])
def test_a_file_that_does_not_read_as_a_quota_is_no_quota(tmp_path: Path, cpu_max: str) -> None:
    root, proc = _v2(tmp_path, "/", {"/": cpu_max})
    assert cpus.quota_cores(root, proc) is None


@pytest.mark.parametrize(
    ("quota", "affinity", "cores"),
    [(None, 64, 64), (2.0, 64, 2), (1.5, 64, 1), (0.25, 64, 1), (8.0, 4, 4)],
)
def test_usable_cores_is_the_lower_rounded_down_and_at_least_one(
    monkeypatch: pytest.MonkeyPatch, quota: float | None, affinity: int, cores: int
) -> None:
    monkeypatch.setattr(cpus, "quota_cores", lambda: quota)
    monkeypatch.setattr(cpus, "affinity_cores", lambda: affinity)
    assert cpus.usable_cores() == cores


def test_a_cgroup_folder_this_process_may_not_look_into_is_no_quota(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An LSM (SELinux, AppArmor) or a folder of mode 0700 above the process's own cgroup
    denies its stat: pathlib raises PermissionError from is_dir and exists, which escaped and
    stopped the server's start (FerryServer sizes its pools first thing). A quota readable
    above the denied folder still counts."""
    root, proc = _v2(
        tmp_path,
        "/kubepods/pod1",
        {"/": "300000 100000", "/kubepods/pod1": "200000 100000"},
    )
    denied = root / "kubepods"
    real_stat = Path.stat

    def stat(self: Path, *, follow_symlinks: bool = True) -> object:
        if self == denied or denied in self.parents:
            raise PermissionError(13, "Permission denied", str(self))
        return real_stat(self, follow_symlinks=follow_symlinks)

    def read_text(self: Path, *args: object, **kwargs: object) -> str:
        stat(self)
        return real_read_text(self, *args, **kwargs)  # type: ignore[arg-type]

    real_read_text = Path.read_text
    monkeypatch.setattr(Path, "stat", stat)
    monkeypatch.setattr(Path, "read_text", read_text)
    assert cpus.quota_cores(root, proc) == 3.0
    assert cpus.quota_cores(root / "kubepods", proc) is None  # even the root is denied


def test_a_cgroup_named_in_bytes_that_are_not_utf8_is_read(tmp_path: Path) -> None:
    """A cgroup folder may be named with any bytes; /proc/self/cgroup then did not decode, and
    the UnicodeDecodeError stopped the server's start."""
    root, proc = _v2(tmp_path, "/", {"/": "max 100000"})
    folder = os.fsencode(root) + b"/caf\xe9"
    os.mkdir(folder)
    with open(folder + b"/cpu.max", "w") as f:
        f.write("150000 100000\n")
    proc.write_bytes(b"0::/caf\xe9\n")
    assert cpus.quota_cores(root, proc) == 1.5
