"""How many CPUs this process may really use, and how to split them among pool workers.

``os.cpu_count()`` is the host's core count: in a container limited by a CFS
quota (cgroup ``cpu.max`` / ``cpu.cfs_quota_us``) or pinned by a cpuset
(affinity) it can be many times what the process gets. Libraries that size
their thread pools from it (OpenMP, MKL, torch intra-op) then run far more
busy threads than there are CPUs; spin-waiting OpenMP workers are throttled
by the quota or fight each other, and throughput collapses. The effective
count is the minimum of the affinity mask and every cgroup quota on the way
from this process's cgroup up to the root, and never less than one.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

DEFAULT_CGROUP_ROOT = Path("/sys/fs/cgroup")
DEFAULT_PROC_CGROUP = Path("/proc/self/cgroup")

# cgroup v1 mounts the cpu controller under one of these names (distro dependent).
_V1_CPU_DIRS = ("cpu", "cpu,cpuacct", "cpuacct,cpu")


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _quota_cpus(quota: float, period: float) -> int | None:
    """Whole CPUs a CFS quota allows; ``None`` for no limit.

    Floor rather than round up: 1.5 CPUs of quota run two spinning threads
    into throttling, one thread never does.
    """
    if quota <= 0 or period <= 0:
        return None
    return max(1, math.floor(quota / period))


def _cgroup_paths(proc_cgroup: Path) -> tuple[str | None, dict[str, str]]:
    """This process's cgroup: (v2 unified path, {v1 controller: path}) from /proc/self/cgroup."""
    text = _read(proc_cgroup)
    unified: str | None = None
    v1: dict[str, str] = {}
    if text is None:
        return unified, v1
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":
            unified = path
        for controller in controllers.split(","):
            if controller:
                v1[controller] = path
    return unified, v1


def _ancestors(root: Path, rel: str | None) -> list[Path]:
    """``root/rel`` and each parent up to ``root`` (a limit anywhere above applies too)."""
    dirs = [root]
    if rel:
        parts = [p for p in rel.strip("/").split("/") if p]
        dirs += [root.joinpath(*parts[:i]) for i in range(1, len(parts) + 1)]
    return dirs


def _v2_limit(root: Path, rel: str | None) -> int | None:
    limits: list[int] = []
    for d in _ancestors(root, rel):
        text = _read(d / "cpu.max")
        if text is None:
            continue
        fields = text.split()
        if not fields or fields[0] == "max":
            continue
        try:
            period = float(fields[1]) if len(fields) > 1 else 100_000.0
            cpus = _quota_cpus(float(fields[0]), period)
        except ValueError:
            continue
        if cpus is not None:
            limits.append(cpus)
    return min(limits) if limits else None


def _v1_limit(root: Path, rel: str | None) -> int | None:
    limits: list[int] = []
    for name in _V1_CPU_DIRS:
        base = root / name
        if not base.is_dir():
            continue
        for d in _ancestors(base, rel):
            quota, period = _read(d / "cpu.cfs_quota_us"), _read(d / "cpu.cfs_period_us")
            if quota is None or period is None:
                continue
            try:
                cpus = _quota_cpus(float(quota), float(period))  # quota -1 = unlimited
            except ValueError:
                continue
            if cpus is not None:
                limits.append(cpus)
    return min(limits) if limits else None


def cgroup_cpu_limit(cgroup_root: Path = DEFAULT_CGROUP_ROOT,
                     proc_cgroup: Path = DEFAULT_PROC_CGROUP) -> int | None:
    """Whole CPUs allowed by the CFS quota (cgroup v2, else v1); ``None`` when unlimited."""
    unified, v1 = _cgroup_paths(proc_cgroup)
    limits = [lim for lim in (_v2_limit(cgroup_root, unified),
                              _v1_limit(cgroup_root, v1.get("cpu")))
              if lim is not None]
    return min(limits) if limits else None


def _affinity_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux: the host count is all we know
        return os.cpu_count() or 1


def available_cpus(cgroup_root: Path = DEFAULT_CGROUP_ROOT,
                   proc_cgroup: Path = DEFAULT_PROC_CGROUP,
                   affinity: int | None = None) -> int:
    """CPUs this process can really use: min(affinity, cgroup quota), at least 1.

    ``cgroup_root``, ``proc_cgroup`` and ``affinity`` are parameters so tests
    can feed fake files and masks.
    """
    cpus = affinity if affinity is not None else _affinity_cpus()
    limit = cgroup_cpu_limit(cgroup_root, proc_cgroup)
    if limit is not None:
        cpus = min(cpus, limit)
    return max(1, cpus)


def threads_per_worker(pool_size: int, cpus: int | None = None) -> int:
    """Intra-op threads for each of ``pool_size`` processes sharing the available CPUs."""
    if pool_size < 1:
        raise ValueError(f"pool_size must be >= 1, got {pool_size}")
    total = available_cpus() if cpus is None else cpus
    return max(1, total // pool_size)
