"""The vLLM engine plugin: what runs inside vLLM's processes.

The plugin's entry point, ``moa_vllm.registration``, sits above this package and
wires it together.

- ``configure``: the platform's config hook: resolves the plan once in the front
  end and sets the options MoA needs (block size, prefix caching);
- ``engine_plan``: the typed record of the plan an engine serves, carried in
  ``additional_config`` (read only: ``EnginePlan.from_config`` never configures);
- ``block_choice``: the KV block size for a plan;
- ``backend`` / ``metadata`` / ``impl``: the attention backend, which chooses one
  implementation per engine (Triton, vLLM's CPU op, or the torch path), each
  path's per-step metadata and builder, and its impl;
- ``cpu_op``: prefill and decode on vLLM's own CPU attention op, each KV head
  over compacted block tables of its span (granule-aligned plans);
- ``kv_cache``: the KV-cache spec and manager that free blocks outside the spans;
- ``stats``: the managers' counters, written for ``/metrics``;
- ``vllm_surface/``: every vLLM internal we touch, by role (patches, KV-head layers,
  config, manager internals, ops, entry points) and the supported releases
  (``contacts``); the bottom: it imports nothing of ours.
"""
