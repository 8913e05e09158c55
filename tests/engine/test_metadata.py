"""The metadata builders in a real engine: what a CUDA graph replays must live in
buffers that stay put, and hold the values of the current step (the Triton path,
chosen at start-up with ``MOA_CPU_ATTN=triton``: Triton's interpreter on CPU);
each path's metadata holds only what its implementation reads."""

from __future__ import annotations

import pytest
import torch
from moa_testing import heterogeneous_plan, start_llm, stop_llm

from moa_vllm.engine.metadata import (
    CpuOpMetadata,
    TorchMetadata,
    TritonMetadata,
    TritonMetadataBuilder,
)
from moa_vllm.engine.vllm_surface.kv_heads import kv_head_of

PROMPT_LENS = [30, 75, 140]


@pytest.fixture(scope="module")
def builds(tiny_dir, tmp_path_factory):
    """Every build of a prompt-elastic engine serving three prompts together:
    (builder, metadata, the prompt lengths it staged)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    plan = heterogeneous_plan(tiny_dir, "prompt", seed=5)
    records = []
    original = TritonMetadataBuilder.build

    def recording_build(self, *args, **kwargs):
        md = original(self, *args, **kwargs)
        staged = None if md.prompt_lens is None else md.prompt_lens.tolist()
        records.append((self, md, staged))
        return md

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MOA_CPU_ATTN", "triton")
        mp.setattr(TritonMetadataBuilder, "build", recording_build)
        llm = start_llm(tiny_dir, plan, tmp_path_factory.mktemp("plans"))
        prompts = [TokensPrompt(prompt_token_ids=list(range(7, 7 + n))) for n in PROMPT_LENS]
        llm.generate(prompts, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
                     use_tqdm=False)
        stop_llm(llm)
    return plan, records


def test_prompt_lengths_are_staged_in_the_builders_own_buffer(builds):
    _, records = builds
    decodes = [staged for _, md, staged in records if md.max_query_len == 1 and md.num_reqs == 3]
    assert len(decodes) >= 5, "expected the three requests to decode together"
    for staged in decodes:
        assert sorted(staged) == PROMPT_LENS
    for builder, md, _ in records:
        assert md.prompt_lens.data_ptr() == builder.prompt_lens.data_ptr()


def test_spans_are_built_once_per_layer_on_the_device(builds):
    plan, records = builds
    builders = {id(b): b for b, _, _ in records}.values()  # one per KV-cache group
    layers = {name: spans for b in builders for name, spans in b.layer_rules.items()}
    assert sorted(kv_head_of(name) for name in layers) == [
        (layer, 0) for layer in range(plan.model.num_layers)]  # each layer once, by its KV head 0
    for name, spans in layers.items():
        expected = plan.layer_spans(kv_head_of(name)[0])
        assert torch.equal(spans.alpha.cpu(), expected.alpha)
        assert torch.equal(spans.beta_q.cpu(), expected.beta_q)
        assert spans.params == expected.params
    for b, md, _ in records:
        for name, heads in md.layer_heads.items():  # the same tensors every step
            assert heads is b.layer_heads[name] and heads.spans is b.layer_rules[name]


def test_decode_splits_follow_the_batch_not_the_length_under_full_graphs(builds):
    from vllm.config import CUDAGraphMode

    from moa_kernels import choose_num_splits

    builder = builds[1][0][0]
    config = builder.vllm_config.compilation_config
    assert builder._decode_splits(2, 1) is None  # no graphs on CPU: the kernel decides
    saved = config.cudagraph_mode
    try:
        config.cudagraph_mode = CUDAGraphMode.FULL_AND_PIECEWISE
        splits = builder._decode_splits(2, 1)
        assert splits == choose_num_splits(2, builder.num_kv_heads, 1, None, builder.device)
        assert splits > choose_num_splits(2, builder.num_kv_heads, 1, 64, builder.device)
        assert builder._decode_splits(2, 7) is None  # prefill: never captured whole
    finally:
        config.cudagraph_mode = saved


def test_each_path_metadata_holds_only_its_own_fields():
    from dataclasses import fields

    def own(cls):
        return {f.name for f in fields(cls)} - {f.name for f in fields(cls.__mro__[1])}

    assert own(TorchMetadata) == {"layer_spans"}
    assert own(CpuOpMetadata) == {"op_runs"}  # no stacked tables staged on CPU
    assert own(TritonMetadata) == {"num_splits", "head_tables", "layer_heads"}
