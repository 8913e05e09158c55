"""Serving: ``launcher`` (``moa-vllm serve``), ``routes`` (``/v1/moa/plan``, an
endpoint plugin of vLLM's OpenAI server) and ``metrics`` (MoA figures on ``/metrics``)."""
