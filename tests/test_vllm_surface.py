"""Our contact with vLLM's configuration: what MoA cannot serve is refused while
vLLM builds its config, with one message, before any engine process starts."""

from __future__ import annotations

import pytest
from moa_testing import heterogeneous_plan, start_llm

from moa_vllm.plan import PlanError


@pytest.mark.parametrize("options, message", [
    ({"kv_cache_dtype": "fp8"}, r"does not support kv_cache_dtype=fp8 \(MoA keeps"),
    ({"hf_overrides": {"sliding_window": 64}},
     r"does not support the model's own sliding window \(64 tokens; --disable-sliding-window"),
    ({"hf_overrides": {"attn_logit_softcapping": 50.0}}, r"does not support logits soft-capping"),
])
def test_unsupported_options_fail_before_the_engine(tiny_dir, tmp_path, options, message):
    with pytest.raises(PlanError, match=message) as err:
        start_llm(tiny_dir, heterogeneous_plan(tiny_dir, "position"), tmp_path, **options)
    assert "\n" not in str(err.value)
