"""The planner's masked forward (validation loss, masked generation) against the
torch oracle of the mask."""

from __future__ import annotations

import pytest
import torch
from hf_oracle import load_oracle_model, oracle_logprobs
from moa_testing import heterogeneous_plan

from moa_vllm.planner import profile as P


@pytest.mark.parametrize("elastic", ["prompt", "position"])
def test_masked_generate_matches_oracle(tiny_dir, elastic):
    """KV-cached generation (one query over many keys) picks the tokens the oracle's
    full recompute picks, and the spans cut the prompt (dense differs)."""
    model, tok = P.load_model(tiny_dir, threads=2)
    oracle = load_oracle_model(tiny_dir)
    plan = heterogeneous_plan(tiny_dir, elastic, seed=3)
    ids = torch.randint(100, 5000, (300,), generator=torch.Generator().manual_seed(0)).tolist()
    ours = P.masked_generate(model, tok, plan, ids, max_new_tokens=6)
    ref = list(ids)
    for _ in range(6):
        ref.append(int(oracle_logprobs(oracle, plan, ref, len(ids))[-1].argmax()))
    assert ours == ref[len(ids):]
    loss = P.masked_answer_loss(model, plan, ref, len(ids))
    lp = oracle_logprobs(oracle, plan, ref, len(ids))
    want = -float(sum(lp[p - 1, ref[p]] for p in range(len(ids), len(ref)))) / 6
    assert loss == pytest.approx(want, rel=1e-4)
    assert P.masked_generate(model, tok, None, ids, max_new_tokens=6) != ours


def test_masked_completes_is_greedy_recall(smollm2_dir):
    """The search's recall check answers as greedy generation under the same mask
    does: dense recalls a fact from the middle of 1.5k tokens of prose, a window
    that cannot reach it does not."""
    from transformers import AutoConfig

    from moa_vllm.plan import fingerprint_from_hf_config, uniform_plan
    from moa_vllm.tasks import make_samples

    model, tok = P.load_model(smollm2_dir, threads=2)
    narrow = uniform_plan(fingerprint_from_hf_config(AutoConfig.from_pretrained(smollm2_dir)),
                          0.15, length=1536)
    sample = make_samples(tok, ["recall"], [1536], [0.5], 1)[0]
    ids = tok(sample.prompt)["input_ids"]
    recalled = {}
    for name, plan in (("dense", None), ("narrow", narrow)):
        greedy = tok.decode(P.masked_generate(model, tok, plan, ids, max_new_tokens=8))
        recalled[name] = P.masked_completes(model, tok, plan, sample.prompt, sample.answer)
        assert recalled[name] == greedy.startswith(" " + sample.answer)
    assert recalled == {"dense": True, "narrow": False}
