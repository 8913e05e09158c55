"""moa-vllm: Mixture of Attention Spans as a vLLM attention backend.

Modules, one concern each:
- ``span_mask``: the exact mask semantics (the one definition of W and of who
  attends to whom) and ``SpanParams``, what every head of a plan shares;
- ``plan``: plan format v1 (pydantic), loading, fingerprints, baselines;
- ``plan_discovery``: which plan serves a model;
- ``span_classes``: head classes, the KV heads (layer, KV head) of one KV-cache group;
  average and allocated density;
- ``plan_report``: the one density report;
- ``paged_kv``: vLLM's paged KV layout; ``oracle``: the torch reference every
  kernel and backend test compares to;
- ``tasks``: the long-context prompts the eval and the search's validation share;
- ``envs``: every ``MOA_*`` environment variable;
- ``registration``: the vLLM plugin's entry point, which wires engine and serving;
- ``engine/``: the vLLM plugin (registration, the served plan, backend, metadata,
  impl, KV-cache spec and manager, and ``vllm_surface/``: every contact with vLLM
  internals, by role);
- ``serving/``: ``moa-vllm serve``, ``/v1/moa/plan``, ``/metrics``;
- ``evaluation/``: ``moa-vllm eval``; ``planner/``: ``moa-vllm plan search``;
- ``cli``: the ``moa-vllm`` command; ``demo``: ``make demo``.
"""

__version__ = "0.1.0"
