"""Gemma 3 270M, our second real model (``moa-vllm model gemma3``): the converted
model is sane (its ``<bos>`` restored) and vLLM serves it as transformers runs
it; plan discovery serves the shipped searched plan for it, and a prompt below
that plan's exact floor is token-for-token vLLM's own backend."""

from __future__ import annotations

import math

import pytest
import torch
from moa_testing import model_fingerprint, start_llm, stop_llm

from moa_vllm.tasks import english_text
from moa_vllm.plan_discovery import resolve_plan

TOKENS = 400


@pytest.fixture(scope="module")
def text_ids(gemma3_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gemma3_dir)
    ids = tok(english_text()[20000:26000])["input_ids"][:TOKENS]
    assert ids[0] == tok.bos_token_id  # the converter's fix
    return ids


def transformers_logprobs(model_dir, ids) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1].float()
    return torch.log_softmax(logits, -1)[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]


def vllm_logprobs(llm, ids) -> torch.Tensor:
    from vllm import SamplingParams

    out = llm.generate([{"prompt_token_ids": ids}],
                       SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)[0]
    return torch.tensor([next(iter(lp.values())).logprob for lp in out.prompt_logprobs[1:]])


def test_converted_model_is_sane_and_vllm_serves_it_as_transformers_runs_it(
        gemma3_dir, text_ids, tmp_path):
    reference = transformers_logprobs(gemma3_dir, text_ids)
    perplexity = math.exp(-float(reference.mean()))
    assert perplexity < 40, perplexity  # without <bos> it is about 10x worse
    llm = start_llm(gemma3_dir, None, tmp_path, backend=None, block_size=64)
    served = vllm_logprobs(llm, text_ids)
    stop_llm(llm)
    assert math.exp(-float(served.mean())) == pytest.approx(perplexity, rel=0.01)
    assert (served - reference).abs().max() < 0.05


def test_plan_discovery_serves_the_shipped_plan_and_short_prompts_stay_exact(
        gemma3_dir, text_ids, tmp_path):
    """No plan handed over: discovery picks the searched position-elastic plan whose
    density the search chose by recall, and a prompt below its exact floor is
    vLLM's own backend."""
    from vllm import SamplingParams

    fp = model_fingerprint(gemma3_dir)
    assert fp.windowed_layers and len(fp.full_layers) == 3
    found = resolve_plan(gemma3_dir, fp)
    assert found.how.startswith("shipped plans")
    assert found.plan.elastic == "position" and found.plan.provenance.method == "moa-search"
    retrieval = found.plan.provenance.details["retrieval"]
    assert retrieval["density_chosen_by"] == "auto" and retrieval["sweep"][-1]["meets_target"]
    assert found.plan.provenance.details["density"] == retrieval["sweep"][-1]["density"]
    assert found.plan.exact_floor >= 300
    prompt = {"prompt_token_ids": text_ids[:300]}
    params = SamplingParams(temperature=0, max_tokens=16)
    tokens = {}
    for name, backend in [("vllm", None), ("moa", "moa")]:
        llm = start_llm(gemma3_dir, None, tmp_path, backend=backend, block_size=64)
        tokens[name] = list(llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids)
        stop_llm(llm)
    assert tokens["moa"] == tokens["vllm"] and len(tokens["vllm"]) == 16
