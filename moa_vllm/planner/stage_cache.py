"""The one cache of every stage of `plan search`, under the work directory.

A stage's result is stored under the hash of its *inputs*: a frozen dataclass per
stage (``planner.stages``) whose fields are everything its computation reads, so
its key is derived from them and no option can be left out of it. An interrupted
search resumes where it stopped; a second density reuses the profiles."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from moa_vllm import envs

log = logging.getLogger("moa_vllm.planner")


def key_hash(obj) -> str:
    """Hash of a stage's inputs (dataclasses as their fields, any JSON value)."""
    if dataclasses.is_dataclass(obj):
        obj = dataclasses.asdict(obj)
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_id(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, int(st.st_mtime)]


def model_id(model_dir: str, dtype: str) -> dict:
    """What every stage's result depends on about the model: its files, and the
    dtype it runs in unless the default fp32 (so fp32 caches stay valid). The
    device is left out: it changes rounding, not what a stage computes."""
    d = Path(model_dir)
    files = {f.name: file_id(f) for f in sorted(d.iterdir())
             if f.is_file() and f.suffix in (".json", ".safetensors", ".bin")}
    key = {"path": str(d.resolve()), "files": files}
    return key if dtype == "float32" else {**key, "dtype": dtype}


def default_work_dir() -> Path:
    xdg = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return Path(envs.get(envs.MOA_PLAN_CACHE) or xdg / "moa-vllm" / "plan-search")


class StageCache:
    """``get(stage, inputs, compute)`` returns the stored result for ``inputs`` or
    computes, times and stores it. A result is a JSON value and a dict of arrays
    (one ``.npz`` file each)."""

    def __init__(self, work: Path) -> None:
        work.mkdir(parents=True, exist_ok=True)
        self.work = work
        self.seconds: dict[str, float] = {}  # stages computed in this run
        self.cached_seconds: dict[str, float] = {}  # stages reused: their original time

    @contextmanager
    def timed(self, stage: str):
        t0 = time.perf_counter()
        yield
        dt = time.perf_counter() - t0
        self.seconds[stage] = round(self.seconds.get(stage, 0.0) + dt, 2)
        log.info("stage %s: %.1f s", stage, dt)

    def get(self, stage: str, inputs,
            compute: Callable[[], tuple[Any, dict[str, np.ndarray]]]
            ) -> tuple[Any, dict[str, np.ndarray]]:
        path = self.work / f"{stage}-{key_hash(inputs)}.npz"
        if path.is_file():
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(str(z["__meta__"]))
                arrays = {k: z[k] for k in z.files if k != "__meta__"}
            self.cached_seconds[stage] = round(
                self.cached_seconds.get(stage, 0.0) + meta["seconds"], 2)
            return meta["value"], arrays
        t0 = time.perf_counter()
        with self.timed(stage):
            value, arrays = compute()
        meta = {"value": value, "seconds": round(time.perf_counter() - t0, 2)}
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, __meta__=json.dumps(meta), **arrays)
        os.replace(tmp, path)
        return value, arrays
