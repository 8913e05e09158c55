"""Where a result comes from, as every results file records it: the machine (CPU
model and the ISA features vLLM's CPU op picks by, or the GPU), the date, the
command, the commit and the plan files' sha256.

Standard library only: the GPU benchmarks load this file on hosts without vLLM
(torch is read only where it is already imported)."""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parents[2]
RESULTS = "benchmarks/results"  # writing results does not make the code differ from the commit


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


def gpu() -> str | None:
    """The first CUDA device's name, if torch is loaded and sees one."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_name(0)


def commit() -> str | None:
    """The checkout's commit, ``+changes`` when its code differs from it (files under
    benchmarks/results/ aside); None outside a git checkout."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=CHECKOUT, capture_output=True, text=True,
                              check=True).stdout.strip()
    try:
        head = git("rev-parse", "HEAD")
        changed = git("status", "--porcelain", "--untracked-files=no", "--", ".",
                      f":(exclude){RESULTS}")
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+changes" if changed else "")


def command(argv: list[str] | None = None) -> str:
    """The command line as a user types it: ``python benchmarks/x.py ...`` or
    ``moa-vllm eval ...``."""
    argv = list(sys.argv if argv is None else argv)
    head = ["python", argv[0]] if argv[0].endswith(".py") else [Path(argv[0]).name]
    return shlex.join(head + argv[1:])


def sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def provenance(plans=(), argv: list[str] | None = None) -> dict:
    """The record every results file carries. ``plans``: the plan files the run
    served (``NAME=PATH`` or a path), each with its sha256."""
    try:
        vllm = importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        vllm = None
    paths = [str(p).rpartition("=")[2] for p in plans if p]
    return {"machine": machine(), "gpu": gpu(), "date": time.strftime("%Y-%m-%d"),
            "command": command(argv), "commit": commit(), "vllm": vllm,
            "plans": {p: sha256(p) for p in paths}}


def provenance_lines(record: dict) -> list[str]:
    """The record as the header lines of a markdown result (each a line of its own)."""
    where = record["machine"] + (f"; GPU {record['gpu']}" if record["gpu"] else "")
    lines = [f"Machine: {where}; vLLM {record['vllm'] or 'not installed'}.",
             f"{record['date']}, commit {record['commit'] or 'unknown'}: `{record['command']}`"]
    lines += [f"Plan `{p}` sha256 {digest}" for p, digest in record["plans"].items()]
    return [line + "  " for line in lines]
