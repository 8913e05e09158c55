"""The plan an engine serves: resolved once while vLLM builds its config, carried
in ``additional_config``; what MoA cannot serve is refused there, with one
message, before any engine process starts."""

from __future__ import annotations

import pytest
from moa_testing import cpu_holds_fp8, heterogeneous_plan, start_llm, stop_llm

from moa_vllm.plan import PlanError


@pytest.mark.parametrize("options, message", [
    ({"kv_cache_dtype": "fp8", "hf_overrides": {"head_dim": 16}},
     r"does not support kv_cache_dtype=fp8 on this CPU \(FP8 KV cache requires head_size "
     r"divisible by 32"),
    ({"hf_overrides": {"sliding_window": 64}},
     r"does not support the model's own sliding window on every layer \(64 tokens; "
     r"--disable-sliding-window"),
    ({"hf_overrides": {"attn_logit_softcapping": 50.0}}, r"does not support logits soft-capping"),
])
def test_unsupported_options_fail_before_the_engine(tiny_dir, tmp_path, options, message):
    with pytest.raises(PlanError, match=message) as err:
        start_llm(tiny_dir, heterogeneous_plan(tiny_dir, "position"), tmp_path, **options)
    assert "\n" not in str(err.value)


def test_fp8_where_vllms_cpu_op_holds_none_fails_before_the_engine(tiny_dir, tmp_path):
    """vLLM's CPU op holds fp8 only on AVX-512 or AMX: there MoA serves an fp8 cache,
    elsewhere it refuses it in one line, before the engine starts."""
    plan = heterogeneous_plan(tiny_dir, "position")
    if cpu_holds_fp8():
        stop_llm(start_llm(tiny_dir, plan, tmp_path, kv_cache_dtype="fp8", block_size=32))
        return
    with pytest.raises(PlanError, match=r"does not support kv_cache_dtype=fp8 on this CPU "
                       r"\(FP8 KV cache on CPU requires x86 with AVX-512 or AMX") as err:
        start_llm(tiny_dir, plan, tmp_path, kv_cache_dtype="fp8", block_size=32)
    assert "\n" not in str(err.value)


def test_fp8_on_blocks_vllms_op_cannot_hold_fails_before_the_engine(tiny_dir, tmp_path,
                                                                    cpu_fp8):
    with pytest.raises(PlanError, match=r"an fp8 KV cache on CPU needs a KV block size that "
                       r"is a multiple of 32 \(vLLM's op has no fp8 path below that\), got 16"):
        start_llm(tiny_dir, heterogeneous_plan(tiny_dir, "position"), tmp_path,
                  kv_cache_dtype="fp8", block_size=16)


def test_granule_the_block_size_does_not_divide_fails_before_the_engine(tiny_dir, tmp_path):
    plan = heterogeneous_plan(tiny_dir, "prompt", sink_tokens=64, granule=64)
    with pytest.raises(PlanError, match=r"granule \(64 tokens\) needs a KV block size that "
                       r"divides it, got --block-size 128; serve it with --block-size 16 or "
                       r"32 or 64, or leave --block-size out$") as err:
        start_llm(tiny_dir, plan, tmp_path, block_size=128)
    assert "\n" not in str(err.value)


def test_bad_additional_config_entry_is_refused(tiny_dir):
    with pytest.raises(PlanError, match=r'additional_config\["moa"\] takes \{"plan": PATH\}'):
        start_llm(tiny_dir, additional_config={"moa": {"plans": "x.json"}})


def test_two_engines_in_one_process_serve_their_own_plans(tiny_dir, tmp_path, monkeypatch):
    """Each engine is handed its plan in ``additional_config`` (no ``MOA_PLAN``), and
    its layers serve that plan's spans."""
    from moa_vllm.engine.engine_plan import EnginePlan
    from moa_vllm.engine.metadata import MoaAttentionMetadataBuilder
    from moa_vllm.engine.vllm_surface.kv_heads import kv_head_of

    monkeypatch.delenv("MOA_PLAN", raising=False)
    built: list[MoaAttentionMetadataBuilder] = []
    original = MoaAttentionMetadataBuilder.__init__

    def recording_init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        built.append(self)

    monkeypatch.setattr(MoaAttentionMetadataBuilder, "__init__", recording_init)
    for seed in (1, 2):
        plan = heterogeneous_plan(tiny_dir, "position", seed=seed)
        path = tmp_path / f"plan-{seed}.json"
        plan.save(path)
        built.clear()
        llm = start_llm(tiny_dir, additional_config={"moa": {"plan": str(path)}})
        try:
            served = EnginePlan.from_config(llm.llm_engine.vllm_config)
            assert (served.source, served.how) == (str(path), "additional_config")
            assert served.plan.rules == plan.rules
            covered = sorted(kv_head_of(name)[0] for b in built for name in b.layer_rules)
            assert covered == list(range(plan.model.num_layers))
            for builder in built:
                for name, spans in builder.layer_rules.items():
                    expected = plan.layer_spans(kv_head_of(name)[0])
                    assert spans.alpha.tolist() == expected.alpha.tolist(), name
                    assert spans.beta_q.tolist() == expected.beta_q.tolist(), name
        finally:
            stop_llm(llm)
    assert heterogeneous_plan(tiny_dir, "position", seed=1).rules != plan.rules
