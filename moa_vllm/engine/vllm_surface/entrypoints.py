"""vLLM's entry points from outside the engine: an offline ``LLM``'s in-process
scheduler and shutdown (tests, benchmarks and the eval read its block pool), and the
engine config the OpenAI server builds from its arguments (``moa-vllm serve``'s
banner).

vLLM files (relative to the ``vllm`` package):
- ``v1/engine/llm_engine.py``: an offline ``LLM``'s in-process scheduler and its
  engine core's shutdown; ``cache_config.kv_cache_max_concurrency`` (the logged
  maximum concurrency); the scheduler's ``running`` list and ``_preempt_request``
  (tests force preemption).
- ``engine/arg_utils.py``: ``AsyncEngineArgs`` (``add_cli_args``, ``from_cli_args``,
  ``create_engine_config``).
"""

from __future__ import annotations

from moa_vllm.engine.vllm_surface.interface import VllmConfig

def llm_scheduler(llm):
    """The scheduler of an offline ``LLM`` whose engine core runs in this process
    (``VLLM_ENABLE_V1_MULTIPROCESSING=0``): tests and benchmarks read its block pool."""
    return llm.llm_engine.engine_core.engine_core.scheduler


def preempt_newest(scheduler) -> str:
    """Preempt the newest running request between steps, as the scheduler does when
    the pool runs dry (tests force preemption with it)."""
    import time

    request = scheduler.running.pop()
    scheduler._preempt_request(request, time.monotonic())
    return request.request_id


def llm_max_concurrency(llm) -> float:
    """The "maximum concurrency for max_model_len tokens per request" an offline
    ``LLM``'s engine logged at start-up (``v1/core/kv_cache_utils.py``
    ``update_kv_cache_capacity`` stores it in ``cache_config``)."""
    return llm_scheduler(llm).vllm_config.cache_config.kv_cache_max_concurrency


def llm_block_size(llm) -> int:
    """The KV block size an offline ``LLM``'s engine settled on."""
    return llm.llm_engine.vllm_config.cache_config.block_size


def shutdown_llm(llm) -> None:
    """Stop an offline ``LLM``'s engine processes now (not at garbage collection)."""
    import gc

    engine_core = getattr(llm.llm_engine, "engine_core", None)
    if engine_core is not None:
        engine_core.shutdown()
    del llm
    gc.collect()


def server_engine_config(args: list[str]) -> VllmConfig:
    """The engine config vLLM's OpenAI server builds from its arguments (the
    server's own options ignored), config hooks included."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.usage.usage_lib import UsageContext
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    known, _ = AsyncEngineArgs.add_cli_args(FlexibleArgumentParser()).parse_known_args(args)
    engine_args = AsyncEngineArgs.from_cli_args(known)
    return engine_args.create_engine_config(usage_context=UsageContext.OPENAI_API_SERVER)
