"""The vLLM engine plugin: what runs inside vLLM's processes.

- ``registration``: the general-plugin entry point, the one registration moment;
- ``engine_plan``: the typed record of the plan an engine serves, resolved once in
  the front end and carried in ``additional_config``;
- ``backend`` / ``metadata`` / ``impl``: the attention backend, its per-step
  metadata and builder, and the impl that calls the kernels;
- ``cpu_op``: prefill and decode on vLLM's own CPU attention op, each KV head
  over compacted block tables of its span (granule-aligned plans);
- ``kv_cache``: the KV-cache spec and manager that free blocks outside the spans;
- ``stats``: the managers' counters, written for ``/metrics``;
- ``vllm_surface``: every vLLM internal we touch (the bottom: imports nothing of ours).
"""
