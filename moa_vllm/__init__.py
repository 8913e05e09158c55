"""moa-vllm: Mixture of Attention Spans as a vLLM attention backend.

Modules, one concern each:
- ``span_mask``: the exact mask semantics (the one definition of W and of who
  attends to whom);
- ``plan``: plan format v1 (pydantic), loading, fingerprints, baselines;
- ``plan_discovery``: which plan serves a model;
- ``span_classes``: layers grouped into KV-cache groups, allocated density;
- ``oracle``: the torch reference every kernel and backend test compares to;
- ``backend`` / ``metadata`` / ``impl``: the vLLM attention backend;
- ``kv_cache``: KV-cache spec + manager that frees blocks outside the spans;
- ``vllm_surface``: every contact with vLLM internals;
- ``registration``: the vLLM plugin entry point; ``cli``: the ``moa-vllm`` command.
"""

__version__ = "0.1.0"
