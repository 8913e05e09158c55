"""Shared fixtures (helpers to start engines live in ``moa_testing``)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from moa_testing import cpu_holds_fp8

# The scheduler (and its block pool) in this process, so tests can read it.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

# Triton's interpreter where no CUDA device is there. It must be set before triton
# is first imported, and the engine tests import vLLM (which imports triton) at
# collection, before tests/kernels/ is collected.
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

ROOT = Path(__file__).resolve().parent.parent
MODELS = Path(os.environ.get("MOA_TEST_MODELS", ROOT / ".models"))


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    from moa_vllm.models import build_smollm2

    return build_smollm2(MODELS / "smollm2")


@pytest.fixture(scope="session")
def gemma3_dir() -> Path:
    from moa_vllm.models import build_gemma3

    return build_gemma3(MODELS / "gemma3")


@pytest.fixture(scope="session")
def tiny_dir(smollm2_dir) -> Path:
    from moa_vllm.models import build_tiny_model

    return build_tiny_model(MODELS / "tiny", smollm2_dir)


@pytest.fixture(scope="session")
def tiny_model_of(smollm2_dir):
    """Tiny random models of the other families (``models.TINY_FAMILIES``), built
    on first use."""
    from moa_vllm.models import build_tiny_model

    return lambda family: build_tiny_model(MODELS / f"tiny-{family}", smollm2_dir, family)


@pytest.fixture(scope="session")
def wheel(tmp_path_factory) -> Path:
    """moa-vllm's wheel, built the way users and the Docker image build it."""
    from packaging_checks import build_wheel

    return build_wheel(ROOT, tmp_path_factory.mktemp("wheel"))


@pytest.fixture(scope="session")
def wheel_venv(wheel, tmp_path_factory) -> Path:
    """A fresh venv with only the wheel installed (``--no-deps``); the test venv's
    site-packages provides the dependencies, not our editable install."""
    from packaging_checks import install_in_fresh_venv

    return install_in_fresh_venv(wheel, tmp_path_factory.mktemp("wheel-venv"))


@pytest.fixture
def cpu_fp8() -> None:
    """For tests of fp8 arithmetic on vLLM's CPU op: skipped where the op holds no fp8
    (it needs AVX-512 or AMX); there ``test_engine_plan`` checks MoA refuses fp8
    before the engine starts."""
    if not cpu_holds_fp8():
        pytest.skip("vLLM's CPU op holds no fp8 KV cache on this CPU (AVX-512 or AMX "
                    "needed); test_engine_plan checks MoA refuses it")
