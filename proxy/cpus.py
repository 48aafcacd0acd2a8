"""How many CPUs this process may use, for ``--workers auto``: affinity mask and cgroup quota.

``os.cpu_count()`` is the machine's count, and a container usually sees all of the node's
cores. What it may use is less in two ways, and ``--workers auto`` takes the smaller:

* the **affinity mask** (``os.sched_getaffinity``): a CPU set (``docker run --cpuset-cpus``,
  Kubernetes' static CPU manager, ``taskset``) shows here;
* the **CPU quota** of the process's cgroup (``docker run --cpus 1``, a Kubernetes
  ``limits.cpu``): ``quota / period`` CPUs' worth of time per period, whatever the number of
  cores. cgroup v2 keeps it in ``cpu.max`` (``"50000 100000"``, or ``"max 100000"`` for none);
  v1 in ``cpu.cfs_quota_us`` (-1 for none) and ``cpu.cfs_period_us``. A limit on a parent
  cgroup binds the children too, so every level from the process's cgroup up to the mount's
  root is read and the smallest quota wins. The quota is rounded up (as the JDK does): 500m
  gives 1 worker, 1.5 CPUs 2.

A CPU *request* (Kubernetes ``requests.cpu``, cgroup ``cpu.shares``/``cpu.weight``) is a
relative weight under contention, not a limit: it does not count here.

Where a cgroup lives is read from ``/proc/self/cgroup`` (the process's path in each hierarchy)
and ``/proc/self/mountinfo`` (where each hierarchy is mounted, and which of its directories the
mount shows: in a container the mount's root is often the container's own cgroup). Every path
is taken under ``root`` so a test can build a fake ``/proc`` and ``/sys/fs/cgroup``. Nothing
here raises on a missing or odd file: without a readable quota the affinity mask decides.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import PurePosixPath

__all__ = ["CpuBudget", "cgroup_cpu_limit", "cpu_budget"]


@dataclass(frozen=True, slots=True)
class CpuBudget:
    """The CPUs this process may use, and why: ``count`` workers for ``--workers auto``."""

    count: int
    reason: str


@dataclass(frozen=True, slots=True)
class CpuLimit:
    """A cgroup CPU quota: ``cpus`` = quota / period, read from ``source``."""

    cpus: float
    source: str


def cpu_budget(root: str = "/", affinity: int | None = None) -> CpuBudget:
    """How many workers ``--workers auto`` starts, with the reason in words for the log."""
    if affinity is None:
        affinity = _affinity()
    limit = cgroup_cpu_limit(root)
    mask = f"{affinity} CPU{'s' if affinity != 1 else ''} in the affinity mask"
    if limit is None:
        return CpuBudget(max(1, affinity), f"{mask}, no cgroup CPU limit")
    quota = max(1, math.ceil(limit.cpus - 1e-9))
    text = f"cgroup CPU limit {limit.cpus:g} ({limit.source}), {mask}"
    return CpuBudget(max(1, min(affinity, quota)), text)


def _affinity() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def cgroup_cpu_limit(root: str = "/") -> CpuLimit | None:
    """The smallest CPU quota over this process's cgroups (v1 and v2), None when unlimited."""
    mounts = _mounts(_read(root, "/proc/self/mountinfo") or "")
    found: list[CpuLimit] = []
    for line in (_read(root, "/proc/self/cgroup") or "").splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if not path.startswith("/"):
            continue
        if hierarchy == "0" and controllers == "":
            mount = mounts.get("cgroup2")
            read = _v2_quota
        elif "cpu" in controllers.split(","):
            mount = mounts.get("cpu")
            read = _v1_quota
        else:
            continue
        if mount is None:
            continue
        for directory in _levels(path, *mount):
            limit = read(root, directory)
            if limit is not None:
                found.append(limit)
    return min(found, key=lambda limit: limit.cpus, default=None)


def _mounts(mountinfo: str) -> dict[str, tuple[str, str]]:
    """(mount root, mount point) of the cgroup v2 hierarchy and of v1's cpu controller."""
    found: dict[str, tuple[str, str]] = {}
    for line in mountinfo.splitlines():
        # id parent major:minor root mount-point options [optional...] - fstype source super
        left, sep, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if not sep or len(fields) < 5 or len(tail) < 3:
            continue
        root, point = _unescape(fields[3]), _unescape(fields[4])
        if tail[0] == "cgroup2":
            found.setdefault("cgroup2", (root, point))
        elif tail[0] == "cgroup" and "cpu" in tail[2].split(","):
            found.setdefault("cpu", (root, point))
    return found


def _unescape(text: str) -> str:
    """mountinfo writes space, tab, newline and backslash as octal escapes (``\\040``)."""
    if "\\" not in text:
        return text
    out: list[str] = []
    i = 0
    while i < len(text):
        code = text[i + 1 : i + 4]
        if text[i] == "\\" and len(code) == 3 and all(c in "01234567" for c in code):
            out.append(chr(int(code, 8)))
            i += 4
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def _levels(path: str, mount_root: str, mount_point: str) -> Iterator[str]:
    """The cgroup's directory under the mount point, then each parent up to the mount point.

    ``path`` is the cgroup as the process's cgroup namespace sees it; the mount shows the
    hierarchy from ``mount_root`` down. A path outside the mount (a mount of another
    namespace's cgroup) is read at the mount point itself, the closest the mount shows.
    """
    cgroup, shown = PurePosixPath(path), PurePosixPath(mount_root)
    try:
        relative = cgroup.relative_to(shown)
    except ValueError:
        relative = PurePosixPath()
    base = PurePosixPath(mount_point)
    parts = relative.parts
    for depth in range(len(parts), -1, -1):
        yield str(base.joinpath(*parts[:depth]))


def _v2_quota(root: str, directory: str) -> CpuLimit | None:
    where = f"{directory}/cpu.max"
    words = (_read(root, where) or "").split()
    if len(words) != 2 or words[0] == "max":
        return None
    return _limit(words[0], words[1], where)


def _v1_quota(root: str, directory: str) -> CpuLimit | None:
    quota = _read(root, f"{directory}/cpu.cfs_quota_us")
    period = _read(root, f"{directory}/cpu.cfs_period_us")
    if quota is None or period is None:
        return None
    return _limit(quota.strip(), period.strip(), f"{directory}/cpu.cfs_quota_us")


def _limit(quota: str, period: str, where: str) -> CpuLimit | None:
    try:
        q, p = int(quota), int(period)
    except ValueError:
        return None
    if q <= 0 or p <= 0:  # -1: no limit (v1)
        return None
    return CpuLimit(q / p, f"{where}: {q}/{p}")


def _read(root: str, path: str) -> str | None:
    try:
        with open(os.path.join(root, path.lstrip("/")), encoding="utf-8") as file:
            return file.read(1 << 20)
    except (OSError, UnicodeDecodeError):
        return None
