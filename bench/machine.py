"""What machine a benchmark line comes from: CPU model and the ISA extensions that matter."""

from __future__ import annotations

import platform

_ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_int8")


def cpu_description() -> dict[str, object]:
    """{"cpu": model name, "cores": logical CPUs, "isa": the relevant flags present}."""
    model, flags, cores = platform.processor() or platform.machine(), set(), 0
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name":
                    model, cores = value.strip(), cores + 1
                elif key == "flags" and not flags:
                    flags = set(value.split())
    except OSError:  # not Linux: the platform string is all we have
        pass
    return {"cpu": model, "cores": cores or None, "isa": [f for f in _ISA_FLAGS if f in flags]}
