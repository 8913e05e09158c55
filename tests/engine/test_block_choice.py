"""The KV block size MoA serves a plan at: its own choice when the user gave none
(the start-up log says which and why), the user's when it can work, one line when
it cannot (``test_engine_plan``)."""

from __future__ import annotations

import pytest
import torch
from moa_testing import heterogeneous_plan, start_llm, stop_llm

from moa_vllm.engine import block_choice
from moa_vllm.engine.cpu_op import kv_format
from moa_vllm.engine.vllm_surface.entrypoints import llm_block_size
from moa_vllm.paged_kv import KVLayout


def on_op(dtype, block_size):
    return kv_format("cpu", dtype, block_size, 64).layout is KVLayout.CPU_ATTN


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cpu_choice_is_the_largest_divisor_of_the_granule_on_the_op(dtype):
    choice = block_choice.choose("cpu", dtype, 64, 64, 128, "plan")
    readable = [b for b in (16, 32, 64) if on_op(dtype, b)]
    assert choice.size == max(readable)  # vLLM's op reads vec16 at 16 on every x86 CPU
    assert 64 % choice.size == 0 and "largest that divides" in choice.why


def test_cpu_torch_path_and_cuda_keep_vllms_default_where_it_fits(monkeypatch):
    assert block_choice.choose("cuda", torch.bfloat16, 64, 64, 16, "plan").size == 16
    assert block_choice.choose("cuda", torch.bfloat16, 64, 32, 64, "plan").size == 32
    assert block_choice.choose("cpu", torch.float32, 64, 1, 128, "plan").size == 16
    monkeypatch.setenv("MOA_CPU_ATTN", "torch")
    assert block_choice.choose("cpu", torch.float32, 64, 64, 128, "plan").size == 64


def test_granule_no_block_size_divides_is_refused():
    with pytest.raises(block_choice.PlanError, match=r"granule \(24 tokens\) is not a multiple"):
        block_choice.choose("cpu", torch.float32, 64, 24, 128, "plan")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("block_size", [16, 32, 64])
def test_op_hint_names_what_runs_on_the_op(dtype, block_size):
    """The start-up warning for a user's block size appears exactly when vLLM picks a
    layout we do not read (e.g. ``amx`` for bf16 on AMX CPUs), and the block size it
    names runs on the op."""
    hint = block_choice.op_hint(dtype, block_size, 64, granule=64)
    assert (hint is None) == on_op(dtype, block_size)
    if hint is not None and "MoA picks" in hint:
        assert on_op(dtype, int(hint.rsplit("MoA picks ", 1)[1].split(")")[0]))
    assert block_choice.op_hint(dtype, block_size, 64, granule=1) is None


def test_engine_without_block_size_serves_moas_choice(tiny_dir, tmp_path):
    """No ``block_size``: vLLM's CPU platform sets 128, which a granule-64 plan cannot
    use; MoA sets its own choice and the engine runs on it (the start-up line that
    says so: ``serving/test_server``)."""
    from vllm import SamplingParams

    plan = heterogeneous_plan(tiny_dir, "prompt", sink_tokens=64, granule=64)
    llm = start_llm(tiny_dir, plan, tmp_path, block_size=None)
    try:
        chosen = llm_block_size(llm)
        assert chosen == block_choice.choose("cpu", torch.float32, 64, 64, 128, "").size
        out = llm.generate([{"prompt_token_ids": list(range(100, 400))}],
                           SamplingParams(temperature=0, max_tokens=4))
        assert len(out[0].outputs[0].token_ids) == 4
    finally:
        stop_llm(llm)
