"""Describe the machine a benchmark ran on: every bench/results/<name>.json carries this under
"machine", so a figure can always be read next to the hardware and software that produced it.

Linux-first (reads /proc and /sys); every field degrades to None elsewhere instead of failing.
"""

from __future__ import annotations

import datetime
import os
import platform
import socket
import sys
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path
from typing import Any

_DEFAULT_PACKAGES = ("numpy", "pyzmq", "msgpack")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")  # jiffies per second, the unit of proc_jiffies()


def proc_jiffies(pid: int) -> int:
    """CPU time of every thread of pid so far (utime + stime), in jiffies; 0 once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    return int(fields[11]) + int(fields[12])


def descendants(pid: int) -> dict[int, str]:
    """pid's child processes, theirs and so on: {pid: command name} (/proc's comm)."""
    children: dict[int, list[int]] = {}
    names: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        names[int(entry.name)] = stat[stat.index("(") + 1:stat.rindex(")")]
        children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry.name))
    found: dict[int, str] = {}
    todo = list(children.get(pid, []))
    while todo:
        child = todo.pop()
        found[child] = names.get(child, "")
        todo += children.get(child, [])
    return found


def describe(extra_packages: Iterable[str] = ()) -> dict[str, Any]:
    """CPU, cores, caches, memory, OS, Python, package versions, load and date, as a JSON-able map."""
    cpuinfo = _cpuinfo()
    return {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "hostname": socket.gethostname(),
        "cpu": {
            "model": cpuinfo.get("model name") or platform.processor() or None,
            "arch": platform.machine(),
            "logical_cores": os.cpu_count(),
            "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
            else os.cpu_count(),
            "physical_cores": _physical_cores(),
            "mhz": _float(cpuinfo.get("cpu MHz")),
            "caches": _caches(),
            "hypervisor": "hypervisor" in cpuinfo.get("flags", "").split(),
        },
        "memory": {
            "total_bytes": _meminfo("MemTotal"),
            "available_bytes": _meminfo("MemAvailable"),
            "dev_shm_free_bytes": _statvfs_free("/dev/shm"),
            "transparent_hugepages": _sys_choice("/sys/kernel/mm/transparent_hugepage/enabled"),
            "shmem_hugepages": _sys_choice("/sys/kernel/mm/transparent_hugepage/shmem_enabled"),
        },
        "os": {
            "system": platform.system(),
            "kernel": platform.release(),
            "distribution": _os_release(),
            "platform": platform.platform(),
        },
        "python": {
            "version": platform.python_version(),
            "implementation": platform.python_implementation(),
            "executable": sys.executable,
        },
        "packages": _packages([*_DEFAULT_PACKAGES, *extra_packages]),
        "load_avg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def summary(machine: dict[str, Any]) -> str:
    """One line for a table header, e.g. 'AMD EPYC, 2 cores, 23.4 GiB, Linux 6.8, Python 3.11.9'."""
    cpu, mem, pkgs = machine["cpu"], machine["memory"], machine["packages"]
    total = mem.get("total_bytes")
    parts = [
        str(cpu.get("model")),
        f"{cpu.get('usable_cores')} cores",
        f"{total / 2**30:.1f} GiB" if total else "? GiB",
        f"{machine['os']['system']} {machine['os']['kernel']}",
        f"Python {machine['python']['version']}",
        ", ".join(f"{k} {v}" for k, v in pkgs.items() if v),
    ]
    return ", ".join(parts)


# --- readers ---------------------------------------------------------------------------------
def _read(path: str) -> str | None:
    try:
        return Path(path).read_text()
    except OSError:
        return None


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo."""
    text = _read("/proc/cpuinfo") or ""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields


def _physical_cores() -> int | None:
    text = _read("/proc/cpuinfo")
    if not text:
        return None
    cores = set()
    phys = core = None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "physical id":
            phys = value.strip()
        elif key == "core id":
            core = value.strip()
        elif not line.strip() and core is not None:
            cores.add((phys, core))
            phys = core = None
    if core is not None:
        cores.add((phys, core))
    return len(cores) or None


def _caches() -> dict[str, str]:
    """Cache sizes of cpu0, e.g. {'L1d': '32K', 'L2': '512K', 'L3': '32768K'}."""
    out: dict[str, str] = {}
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    for index in sorted(base.glob("index*")):
        level = _read(str(index / "level"))
        kind = _read(str(index / "type"))
        size = _read(str(index / "size"))
        if not (level and kind and size):
            continue
        suffix = {"Data": "d", "Instruction": "i"}.get(kind.strip(), "")
        out[f"L{level.strip()}{suffix}"] = size.strip()
    return out


def _meminfo(key: str) -> int | None:
    for line in (_read("/proc/meminfo") or "").splitlines():
        name, _, value = line.partition(":")
        if name == key:
            parts = value.split()
            return int(parts[0]) * (1024 if len(parts) > 1 and parts[1] == "kB" else 1)
    return None


def _statvfs_free(path: str) -> int | None:
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def _sys_choice(path: str) -> str | None:
    """The bracketed choice of a sysfs setting like 'always [madvise] never'."""
    text = _read(path)
    if text is None:
        return None
    for word in text.split():
        if word.startswith("[") and word.endswith("]"):
            return word[1:-1]
    return text.strip()


def _os_release() -> str | None:
    for line in (_read("/etc/os-release") or "").splitlines():
        if line.startswith("PRETTY_NAME="):
            return line.partition("=")[2].strip().strip('"')
    return None


def _packages(names: Iterable[str]) -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    if "pyzmq" in versions:
        try:
            import zmq

            versions["libzmq"] = zmq.zmq_version()
        except ImportError:
            versions["libzmq"] = None
    return versions


def _float(text: str | None) -> float | None:
    try:
        return float(text) if text is not None else None
    except ValueError:
        return None


if __name__ == "__main__":
    import json

    print(json.dumps(describe(), indent=2))
