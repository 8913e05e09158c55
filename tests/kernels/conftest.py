"""Kernel tests: Triton's interpreter on CPU-only machines (set up by
``tests/conftest.py``, before anything imports triton), GPU otherwise."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

HAS_CUDA = torch.cuda.is_available()

_ROOT = Path(__file__).resolve().parents[2]
# The kernel package lives under the source root `triton_kernels/` (import name
# `moa_kernels`); the oracle in `moa_vllm/`. The repo root goes last and only if
# `moa_vllm` is not installed: never shadow an installed package with the folder
# `triton_kernels/` (a namespace package vLLM could mistake for OpenAI's kernels).
_KERNELS = str(_ROOT / "triton_kernels")
if _KERNELS not in sys.path:
    sys.path.insert(0, _KERNELS)
try:
    import moa_vllm  # noqa: F401
except ImportError:
    sys.path.append(str(_ROOT))

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def device() -> str:
    return "cuda" if HAS_CUDA else "cpu"
