"""The machine a result was measured on, as every results file records it."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def machine() -> str:
    """CPU model, the ISA features vLLM's CPU op picks by, and the core count."""
    model, flags = platform.machine(), set()
    if Path("/proc/cpuinfo").is_file():
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    isa = [f for f in ("avx512f", "avx512_bf16", "amx_tile") if f in flags]
    return f"{model} ({', '.join(isa) or 'no AVX-512'}), {os.cpu_count()} cpus"
