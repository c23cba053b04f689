"""What this machine offers inference, read without importing torch (the launcher sizes its
nodes' thread pools with it before any node loads torch)."""

from __future__ import annotations

import contextlib
import os
import platform
from pathlib import Path


def cpu_facts() -> tuple[str, frozenset[str]]:
    """(CPU model name, feature flags) from /proc/cpuinfo; where there is none, the model
    platform gives and no flags."""
    model, flags = "", frozenset()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            key = key.strip().lower()
            if key in ("model name", "cpu model") and not model:
                model = value.strip()
            elif key in ("flags", "features") and not flags:  # x86 / Arm
                flags = frozenset(value.split())
    return model or platform.processor() or platform.machine(), flags


def native_bf16() -> bool:
    """Whether this CPU does bf16 arithmetic in hardware (x86 AVX512_BF16 or AMX-BF16, Arm
    BF16). Elsewhere torch and OpenVINO emulate it, 12x slower than fp32 (measured)."""
    return bool(cpu_facts()[1] & {"avx512_bf16", "amx_bf16", "bf16"})


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity where the OS has one), at least 1."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, cores or 1)
