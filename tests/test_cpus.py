"""``--workers auto``: the CPUs a container may use, read from a fake /proc and /sys/fs/cgroup."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from proxy.cpus import cgroup_cpu_limit, cpu_budget


def write(root: Path, path: str, text: str) -> None:
    target = root / path.lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text)


V2_MOUNT = "30 24 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n"
V1_MOUNTS = (
    "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n"
    "32 31 0:29 {root} /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct\n"
    "35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n"
)


def v2_root(tmp_path: Path, cpu_max: str, cgroup: str = "/") -> Path:
    """A container on cgroup v2 with its own cgroup namespace (Docker's and podman's default)."""
    write(tmp_path, "/proc/self/mountinfo", V2_MOUNT)
    write(tmp_path, "/proc/self/cgroup", f"0::{cgroup}\n")
    write(tmp_path, f"/sys/fs/cgroup{cgroup.rstrip('/')}/cpu.max", cpu_max)
    return tmp_path


def v1_root(tmp_path: Path, quota: str, period: str = "100000") -> Path:
    """A container on cgroup v1: the cpu hierarchy is mounted from the container's own cgroup."""
    cgroup = "/docker/0123abcd"
    write(tmp_path, "/proc/self/mountinfo", V1_MOUNTS.format(root=cgroup))
    write(
        tmp_path,
        "/proc/self/cgroup",
        f"5:memory:{cgroup}\n4:cpu,cpuacct:{cgroup}\n1:name=systemd:{cgroup}\n0::/\n",
    )
    write(tmp_path, "/sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us", quota + "\n")
    write(tmp_path, "/sys/fs/cgroup/cpu,cpuacct/cpu.cfs_period_us", period + "\n")
    return tmp_path


def test_cgroup_v2_quota_limits_the_workers(tmp_path: Path) -> None:
    root = v2_root(tmp_path, "100000 100000\n")
    budget = cpu_budget(str(root), affinity=16)
    assert budget.count == 1
    assert "cgroup CPU limit 1 (/sys/fs/cgroup/cpu.max: 100000/100000)" in budget.reason
    assert "16 CPUs in the affinity mask" in budget.reason


def test_cgroup_v1_quota_limits_the_workers(tmp_path: Path) -> None:
    root = v1_root(tmp_path, "200000")
    budget = cpu_budget(str(root), affinity=16)
    assert budget.count == 2
    assert "/sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us: 200000/100000" in budget.reason


def test_a_fraction_of_a_cpu_rounds_up(tmp_path: Path) -> None:
    # Kubernetes' limits.cpu 500m is quota 50000 per 100000; 1500m is 150000.
    assert cpu_budget(str(v2_root(tmp_path / "a", "50000 100000")), affinity=16).count == 1
    assert cpu_budget(str(v1_root(tmp_path / "b", "150000")), affinity=16).count == 2


def test_no_quota_leaves_the_affinity_mask(tmp_path: Path) -> None:
    v2 = cpu_budget(str(v2_root(tmp_path / "v2", "max 100000\n")), affinity=6)
    v1 = cpu_budget(str(v1_root(tmp_path / "v1", "-1")), affinity=6)
    for budget in (v1, v2):
        assert budget.count == 6
        assert budget.reason == "6 CPUs in the affinity mask, no cgroup CPU limit"


def test_the_affinity_mask_wins_when_it_is_smaller(tmp_path: Path) -> None:
    budget = cpu_budget(str(v2_root(tmp_path, "400000 100000")), affinity=2)
    assert budget.count == 2


def test_a_parent_cgroups_quota_binds_the_child(tmp_path: Path) -> None:
    # No cgroup namespace: the process sees its full path; the pod's cgroup has the limit.
    write(tmp_path, "/proc/self/mountinfo", V2_MOUNT)
    write(tmp_path, "/proc/self/cgroup", "0::/kubepods/pod1/ctr\n")
    write(tmp_path, "/sys/fs/cgroup/kubepods/pod1/ctr/cpu.max", "max 100000\n")
    write(tmp_path, "/sys/fs/cgroup/kubepods/pod1/cpu.max", "300000 100000\n")
    write(tmp_path, "/sys/fs/cgroup/kubepods/cpu.max", "max 100000\n")
    limit = cgroup_cpu_limit(str(tmp_path))
    assert limit is not None and limit.cpus == 3
    assert limit.source == "/sys/fs/cgroup/kubepods/pod1/cpu.max: 300000/100000"


def test_hybrid_hierarchy_reads_the_v1_cpu_controller(tmp_path: Path) -> None:
    root = v1_root(tmp_path, "100000")
    with (root / "proc/self/mountinfo").open("a") as mountinfo:
        mountinfo.write("40 31 0:40 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n")
    assert cpu_budget(str(root), affinity=8).count == 1


def test_mount_points_with_escaped_spaces(tmp_path: Path) -> None:
    write(tmp_path, "/proc/self/mountinfo", "30 24 0:26 / /my\\040cgroup rw - cgroup2 none rw\n")
    write(tmp_path, "/proc/self/cgroup", "0::/\n")
    write(tmp_path, "/my cgroup/cpu.max", "200000 100000\n")
    limit = cgroup_cpu_limit(str(tmp_path))
    assert limit is not None and limit.cpus == 2


@pytest.mark.parametrize(
    "cpu_max", ["", "garbage", "100000", "0 100000", "100000 0", "-5 100000", "max"]
)
def test_unreadable_or_odd_files_mean_no_limit(tmp_path: Path, cpu_max: str) -> None:
    assert cgroup_cpu_limit(str(v2_root(tmp_path, cpu_max))) is None


def test_no_proc_at_all_means_no_limit(tmp_path: Path) -> None:
    assert cgroup_cpu_limit(str(tmp_path)) is None
    assert cpu_budget(str(tmp_path), affinity=3).count == 3


def test_this_machine() -> None:
    budget = cpu_budget()
    assert 1 <= budget.count <= len(os.sched_getaffinity(0))
    assert "affinity mask" in budget.reason
