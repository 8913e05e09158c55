"""``moa-vllm eval``: ``tasks`` (retrieval prompts, fidelity windows) and ``runner``
(one engine per method, accuracy, fidelity and KV memory in one report)."""
