"""The KV block size an engine serves a plan at.

A plan's windows start at multiples of its granule, so a block size that divides
the granule lets every query read whole blocks: on CPU that is what runs attention
on vLLM's own op (``cpu_op``), in the block layout vLLM's op picks by dtype and
block size. When the user gave no ``--block-size``, MoA picks a block size that
divides the granule (``choose``); one the user gave that cannot work is
refused in one line; one that works but keeps the plan off the op gets a warning
(``op_hint``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moa_vllm import envs
from moa_vllm.engine.cpu_op import on_op
from moa_vllm.engine.vllm_surface.ops import cpu_attention_isa
from moa_vllm.plan import PlanError

CANDIDATES = (16, 32, 64, 128, 256)  # multiples of 16: what the backend accepts
MEASURED = "benchmarks/results/block_size_cpu.md"  # the measurement behind the CPU choice


@dataclass(frozen=True)
class BlockSizeChoice:
    size: int
    why: str


def fits(granule: int, source: str) -> list[int]:
    """Block sizes whose blocks a query of a plan with this granule (> 1) reads whole."""
    sizes = [b for b in CANDIDATES if granule % b == 0]
    if not sizes:
        raise PlanError(f"{source}: the plan's granule ({granule} tokens) is not a multiple "
                        f"of 16, the smallest KV block size MoA serves")
    return sizes


def choose(device_type: str, dtype: torch.dtype, head_size: int, granule: int,
           default: int, source: str) -> BlockSizeChoice:
    """The block size for a plan when the user chose none (``default``: vLLM's).

    CPU: the largest block size that divides the granule and that vLLM's op lays
    out in the layout MoA reads (``vec``; ``vec16`` at 16): on SmolLM2 bf16 block 64
    decoded 6-9% faster than 16 and 32 at 4k tokens, within noise at 2k
    (``MEASURED``). On AMX, bf16 blocks of 32+ get the ``amx`` layout, which MoA does
    not read, so 16 keeps the plan on the op there. Token-exact plans (granule
    1, never on the op): 16, the smallest, whose blocks free closest to the spans.
    CUDA (our Triton kernel reads any block size): vLLM's default where it divides
    the granule, else the largest size below it that does."""
    if granule == 1:
        return BlockSizeChoice(CANDIDATES[0], "the smallest: the plan is token-exact, and "
                                              "smaller blocks free closer to its spans")
    sizes = fits(granule, source)
    if device_type == "cpu" and envs.get(envs.MOA_CPU_ATTN) == "vllm":
        readable = [b for b in sizes if on_op(dtype, b, head_size)]
        if readable:
            size = max(readable)
            return BlockSizeChoice(size, (
                f"the largest that divides the plan's granule ({granule}) and that vLLM's "
                f"CPU op lays out for MoA ('{cpu_attention_isa(dtype, size, head_size)}' "
                f"for {str(dtype).removeprefix('torch.')}): larger blocks decode as fast "
                f"or faster on the op ({MEASURED})"))
    if default in sizes:
        return BlockSizeChoice(default, "vLLM's default, which divides the plan's granule")
    size = max([b for b in sizes if b <= default] or sizes[:1])
    return BlockSizeChoice(size, f"the largest up to vLLM's default ({default}) that divides "
                                 f"the plan's granule ({granule})")


def check_user_choice(block_size: int, granule: int, source: str) -> None:
    """A ``--block-size`` that does not divide the granule cannot serve the plan."""
    if granule > 1 and granule % block_size:
        sizes = fits(granule, source)
        raise PlanError(
            f"{source}: the plan's granule ({granule} tokens) needs a KV block "
            f"size that divides it, got --block-size {block_size}; serve it with "
            f"--block-size {' or '.join(map(str, sizes))}, or leave --block-size out")


def op_hint(dtype: torch.dtype, block_size: int, head_size: int, granule: int) -> str | None:
    """Why a plan that could run on vLLM's CPU op will not at this (user-chosen) block
    size, and what would; None when it will, or when the plan or ``MOA_CPU_ATTN``
    keep it off the op anyway."""
    if granule % block_size or envs.get(envs.MOA_CPU_ATTN) != "vllm":
        return None
    if on_op(dtype, block_size, head_size):
        return None
    readable = [b for b in fits(granule, "") if on_op(dtype, b, head_size)]
    advice = (f"leave --block-size out (MoA picks {max(readable)}) to run on it" if readable
              else "no block size the granule allows avoids it")
    return (f"vLLM's CPU attention op lays {str(dtype).removeprefix('torch.')} blocks of "
            f"{block_size} tokens out for its '{cpu_attention_isa(dtype, block_size, head_size)}' "
            f"ISA, which MoA does not read: every step runs MoA's torch path (SmolLM2 decode "
            f"0.2-0.3x dense's speed); {advice}")
