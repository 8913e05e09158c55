"""vLLM general-plugin entry point: runs once in every vLLM process."""

from __future__ import annotations


def register() -> None:
    """Make ``--attention-backend moa`` available. Idempotent and cheap: nothing
    changes for engines that do not ask for MoA."""
    from moa_vllm import vllm_surface

    vllm_surface.backend_member()
    vllm_surface.install_platform_hooks()
