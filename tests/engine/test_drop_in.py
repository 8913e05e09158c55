"""MoA as an operator turns it on: ``LLM(model, attention_backend="moa")`` and no
other MoA option (no block size, no plan: the shipped default), and a prompt under
the plan's exact floor is served exactly as dense vLLM serves it."""

from __future__ import annotations

import random

import pytest
from moa_testing import stop_llm

from moa_vllm.engine.stats import ENGINE_STATS

OPTIONS = dict(dtype="float32", enforce_eager=True, max_model_len=4096, max_num_seqs=2,
               kv_cache_memory_bytes=768 << 20, seed=0)
FILLER = ["The grass is green. The sky is blue. The sun is yellow. Here we go. ",
          "Ships sail past the harbour wall while gulls circle the old lighthouse. "]


def passkey_prompt(tokenizer, words: int) -> list[int]:
    """A chat prompt with a 5-digit key in the middle of a repetitive filler."""
    rng = random.Random(words)
    key = rng.randrange(10000, 99999)
    filler = (FILLER[words % 2] * words)[: words * 7].split(". ")
    middle = len(filler) // 2
    text = ". ".join(filler[:middle] + [f"The pass key is {key}. Remember it"]
                     + filler[middle:])
    messages = [{"role": "user", "content": text + "\nWhat is the pass key?"}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def freed_blocks() -> int:
    return sum(c["blocks_freed"] for c in ENGINE_STATS.snapshot().values())


@pytest.fixture(scope="module")
def runs(smollm2_dir):
    """Greedy tokens and log-probs, MoA then dense, and the blocks MoA freed."""
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    prompts = {"short": passkey_prompt(tokenizer, 340), "long": passkey_prompt(tokenizer, 1000)}
    params = SamplingParams(temperature=0, max_tokens=16, logprobs=0)
    out = {"lengths": {k: len(v) for k, v in prompts.items()}}
    for backend in ("moa", "dense"):
        kwargs = {"attention_backend": "moa"} if backend == "moa" else {}
        llm = LLM(model=str(smollm2_dir), **kwargs, **OPTIONS)
        try:
            if backend == "moa":
                from moa_vllm.engine.engine_plan import EnginePlan

                out["plan"] = EnginePlan.from_config(llm.llm_engine.vllm_config).plan
            for name, ids in prompts.items():
                before = freed_blocks()
                (result,) = llm.generate([{"prompt_token_ids": ids}], params)
                sample = result.outputs[0]
                out[backend, name] = (list(sample.token_ids),
                                      [lp[t].logprob for t, lp in zip(sample.token_ids,
                                                                      sample.logprobs)])
                out[backend, name, "freed"] = freed_blocks() - before
        finally:
            stop_llm(llm)
    return out


def test_prompt_under_the_floor_is_exact(runs):
    assert runs["lengths"]["short"] <= runs["plan"].exact_floor
    tokens, logprobs = runs["moa", "short"]
    dense_tokens, dense_logprobs = runs["dense", "short"]
    assert tokens == dense_tokens
    assert max(abs(a - b) for a, b in zip(logprobs, dense_logprobs)) <= 2e-3
    assert runs["moa", "short", "freed"] == 0  # every head kept every key


def test_prompt_over_the_floor_keeps_only_the_spans(runs):
    assert runs["lengths"]["long"] > runs["plan"].exact_floor
    assert runs["moa", "long", "freed"] > 0
