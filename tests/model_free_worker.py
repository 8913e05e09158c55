"""A vLLM worker that builds the model's layers but never runs them.

vLLM 0.33's CUDA wheel has no CPU kernels (its CPU worker stops at
``torch.ops._C.init_cpu_memory_env``), so on a CPU machine every part of a 0.33
engine can run except the worker. With ``worker_cls`` pointing here, an ``LLM``
runs vLLM's own front end, platform and config hooks, executor, engine core,
KV-cache planning, scheduler, KV-cache manager and coordinators, around a worker
that builds the real model's layers, weights left unset (so MoA's KV slot layers
and specs are vLLM's), reports their specs through vLLM's own model runner code,
and answers each scheduled request with a fixed token as a runner would: a token
once its prompt (or recomputed history) is complete, none for a prefill chunk.

The same worker runs on every vLLM version ``make test`` exercises, so the block
counts a test reads are comparable across versions and with the real engine.
"""

from __future__ import annotations

import socket
from types import SimpleNamespace

import torch
from vllm.config import VllmConfig, set_current_vllm_config
from vllm.v1.outputs import ModelRunnerOutput
from vllm.v1.worker.gpu_model_runner import GPUModelRunner
from vllm.v1.worker.worker_base import CompilationTimes, WorkerBase

WORKER_CLS = f"{__name__}.ModelFreeWorker"
TOKEN = 100  # what every request "generates"; tests set ignore_eos


class ModelFreeWorker(WorkerBase):
    def __init__(self, vllm_config: VllmConfig, local_rank: int = 0, rank: int = 0,
                 distributed_init_method: str | None = None, is_driver_worker: bool = True,
                 **kwargs) -> None:
        super().__init__(vllm_config=vllm_config, local_rank=local_rank, rank=rank,
                         distributed_init_method=distributed_init_method,
                         is_driver_worker=is_driver_worker)
        self.model = None
        self.tokens: dict[str, int] = {}  # request id -> tokens it has (prompt + generated)

    def init_device(self) -> None:
        from vllm.distributed import (
            ensure_model_parallel_initialized,
            init_distributed_environment,
        )

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        init_distributed_environment(world_size=1, rank=0, local_rank=0,
                                     distributed_init_method=f"tcp://127.0.0.1:{port}",
                                     backend="gloo")
        ensure_model_parallel_initialized(1, 1)
        self.device = torch.device("cpu")

    def load_model(self, *args, **kwargs) -> None:
        from vllm.model_executor.model_loader.utils import initialize_model

        # On the CPU, not the meta device: vLLM caches layers such as rotary
        # embeddings across engines, and a later real engine would reuse them.
        with set_current_vllm_config(self.vllm_config), torch.device("cpu"):
            self.model = initialize_model(vllm_config=self.vllm_config)

    def get_model(self):
        return self.model

    def get_kv_cache_spec(self):
        runner = SimpleNamespace(vllm_config=self.vllm_config, shared_kv_cache_layers={})
        return GPUModelRunner.get_kv_cache_spec(runner)

    def determine_available_memory(self) -> int:
        return self.vllm_config.cache_config.kv_cache_memory_bytes

    def initialize_from_config(self, kv_cache_config) -> None:
        self.kv_cache_config = kv_cache_config

    def compile_or_warm_up_model(self) -> CompilationTimes:
        return CompilationTimes(language_model=0.0, encoder=0.0)

    def execute_model(self, scheduler_output) -> None:
        self.scheduled = scheduler_output
        return None

    def sample_tokens(self, grammar_output) -> ModelRunnerOutput:
        out = self.scheduled
        for rid in out.finished_req_ids:
            self.tokens.pop(rid, None)
        computed = {r.req_id: r.num_computed_tokens for r in out.scheduled_new_reqs}
        for r in out.scheduled_new_reqs:
            self.tokens[r.req_id] = len(r.prompt_token_ids)
        cached = out.scheduled_cached_reqs
        computed.update(zip(cached.req_ids, cached.num_computed_tokens))
        req_ids = list(out.num_scheduled_tokens)
        sampled = []
        for rid in req_ids:
            if computed[rid] + out.num_scheduled_tokens[rid] >= self.tokens[rid]:
                self.tokens[rid] += 1
                sampled.append([TOKEN])
            else:
                sampled.append([])
        return ModelRunnerOutput(req_ids=req_ids,
                                 req_id_to_index={r: i for i, r in enumerate(req_ids)},
                                 sampled_token_ids=sampled)

    def get_supported_tasks(self) -> tuple[str, ...]:
        return ("generate",)

    def check_health(self) -> None:
        return None

    def shutdown(self) -> None:
        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

        cleanup_dist_env_and_memory()
