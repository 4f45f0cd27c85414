"""What the memory benchmarks measure of their own process: resident memory now and its peak, from the kernel."""

from __future__ import annotations

from pathlib import Path


def memory() -> dict[str, float]:
    """This process's resident memory now (VmRSS) and its peak (VmHWM), in MiB."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmHWM", "VmRSS"):
            fields[name] = int(value.split()[0]) / 1024
    return fields
