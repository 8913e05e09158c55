"""``moa-vllm eval``: ``runner`` (over the shared ``moa_vllm.tasks``: retrieval prompts,
fidelity windows): one engine per method, accuracy, fidelity and KV memory in one
report."""
