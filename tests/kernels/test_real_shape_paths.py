"""Head size 128 at the 8B models' geometry (hidden 4096, MLP 14336, 32 query / 8 KV
heads of 128; two of the 32 layers, through ``hf_overrides``) with the shipped
converted Llama-3-8B-Instruct-262k plan's rules of two of its layers: vLLM's CPU op
(MoA's default on CPU) and the Triton kernel (under the interpreter, the launch
CUDA runs) answer alike, as the model read densely answers up to the first query
whose spans skip a key, and unlike it from there on.

Random weights at unit scale (vLLM's dummy ones are 1e-3: attention would not show
in the log-probabilities); the plan's exact floor is lowered to 0 so its spans cut
a 330-token prompt (the forward runs on one core: each engine takes ~25 s)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from moa_testing import FP32_LOGPROB_ATOL, start_llm, stop_llm, token_logprobs
from published_configs import published_model_dir

from moa_vllm.plan import fingerprint_from_hf_config, load_plan

ROOT = Path(__file__).resolve().parents[2]
PLAN = ROOT / "plans" / "llama-3-8b-instruct-262k-moa-converted.json"
LAYERS = 2
RULES_OF = [23, 25]  # the plan's layers whose spans cut short prompts (and keep others whole)
PROMPT_LEN = 330
# two of its layers, and a vocabulary of 4096 tied to the embedding (the fingerprint
# sees neither; the prompts' and answers' ids stay below it)
OVERRIDES = {"num_hidden_layers": LAYERS, "vocab_size": 4096, "tie_word_embeddings": True}


@pytest.fixture(scope="module")
def model_dir(smollm2_dir, tmp_path_factory) -> Path:
    return published_model_dir("gradientai--Llama-3-8B-Instruct-262k", smollm2_dir,
                               tmp_path_factory.mktemp("llama-3-8b-geometry"))


@pytest.fixture(scope="module")
def plans(model_dir):
    """Two layers of the shipped plan's rules (windows of 177 tokens at 330 beside
    whole ones), and the same model read densely (every rule wider than the
    prompts)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    config.num_hidden_layers = LAYERS
    shipped = load_plan(PLAN)
    moa = shipped.model_copy(update={
        "model": fingerprint_from_hf_config(config), "rules": [shipped.rules[i] for i in RULES_OF],
        "head_classes": None, "max_head_classes": 4, "exact_floor": 0})
    assert len({r for row in moa.rules for r in row}) >= 2  # heterogeneous
    dense = moa.model_copy(update={"rules": [[(1 << 20, 0.0)] * 8] * LAYERS})
    return moa, dense


def unit_scale_weights(param: torch.Tensor, *args, **kwargs) -> None:
    """Norm weights (and the KV scales) 1, matrices uniform with unit output
    variance; seeded by shape so that every engine gets the same model."""
    generator = torch.Generator().manual_seed(param.numel() % (1 << 31))
    with torch.no_grad():
        if param.dim() <= 1:
            param.fill_(1.0)
            return
        bound = (3.0 / param.shape[-1]) ** 0.5
        values = torch.rand(param.shape, generator=generator, dtype=torch.float32)
        param.copy_(((values * 2 - 1) * bound).to(param.dtype))


def run(model_dir, plan, tmp, triton: bool) -> tuple[list, dict]:
    """Greedy tokens with their log-probabilities, the prompt's first (index ``t``:
    the token after position ``t``), and how often each attention path ran."""
    from vllm import SamplingParams
    from vllm.model_executor.model_loader import dummy_loader

    import moa_kernels
    from moa_vllm.engine import impl

    calls = {"op": 0, "triton": 0}

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dummy_loader, "initialize_single_dummy_weight", unit_scale_weights)
        mp.setattr(impl, "span_attention", counted("op", impl.span_attention))
        mp.setattr(moa_kernels, "span_attention_paged",
                   counted("triton", moa_kernels.span_attention_paged))
        if triton:
            mp.setenv("MOA_CPU_ATTN", "triton")
        llm = start_llm(model_dir, plan, tmp, load_format="dummy",
                        hf_overrides=OVERRIDES, block_size=None,
                        max_num_batched_tokens=256, max_model_len=1024)
        try:
            prompts = [{"prompt_token_ids": [(37 * i) % 3900 + 100 for i in range(PROMPT_LEN)]}]
            params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True, logprobs=0,
                                    prompt_logprobs=0)
            outputs = llm.generate(prompts, params, use_tqdm=False)
        finally:
            stop_llm(llm)
    return token_logprobs(outputs), calls


def test_cpu_op_and_triton_kernel_agree_at_head_size_128(model_dir, plans, tmp_path):
    moa, dense = plans
    op_runs, op_calls = run(model_dir, moa, tmp_path, triton=False)
    triton_runs, triton_calls = run(model_dir, moa, tmp_path, triton=True)
    dense_runs, _ = run(model_dir, dense, tmp_path, triton=False)
    assert op_calls["op"] > 0 and op_calls["triton"] == 0
    assert triton_calls["triton"] > 0 and triton_calls["op"] == 0
    ((ids_o, lp_o),), ((ids_k, lp_k),), ((_, lp_d),) = op_runs, triton_runs, dense_runs
    assert ids_k == ids_o
    assert lp_k == pytest.approx(lp_o, abs=FP32_LOGPROB_ATOL)  # fp32, another order
    # up to the first query whose window starts past the sinks the spans hold every
    # key, and the model answers as it does densely; from there on, far from it
    cut = first_cut(moa)
    assert 0 < cut < PROMPT_LEN - 1
    assert lp_o[:cut] == pytest.approx(lp_d[:cut], abs=FP32_LOGPROB_ATOL)
    assert max(abs(a - b) for a, b in zip(lp_o[cut:], lp_d[cut:])) > 50 * FP32_LOGPROB_ATOL


def first_cut(plan) -> int:
    """The first prompt position where some head of some layer skips a key."""
    n = torch.tensor([PROMPT_LEN])
    return min(t for t in range(PROMPT_LEN) for layer in range(LAYERS)
               if (plan.layer_spans(layer).first_keys(torch.tensor([t]), n)
                   > plan.sink_tokens).any())
