"""Install the runtime requirements of the vLLM wheel in this venv (installed with
``--no-deps``), less the packages that only carry GPU kernels or GPU runtimes:
the GPU extra's vLLM then runs on a CPU machine up to its worker (``make test``'s
second environment). Torch is pinned by the Makefile."""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys

# CUDA kernels, GPU runtimes and media decoders; torch is installed beforehand.
GPU_ONLY = re.compile(
    r"^(torch|torchaudio|torchvision|torchcodec|pynvvideocodec|flashinfer-python|"
    r"apache-tvm-ffi|tilelang|nvidia-.*|nvtx|fastsafetensors|instanttensor|quack-kernels|"
    r"tokenspeed-mla|humming-kernels|numba)$")


def requirements() -> list[str]:
    keep = []
    for spec in importlib.metadata.requires("vllm") or []:
        if "extra ==" in spec:
            continue
        name = re.split(r"[\s;<>=!~\[]", spec, maxsplit=1)[0].lower().replace("_", "-")
        if not GPU_ONLY.match(name):
            keep.append(spec)
    return keep


if __name__ == "__main__":
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", *requirements()], check=True)
