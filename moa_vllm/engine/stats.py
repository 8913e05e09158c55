"""KV counters of the engine processes, for ``/metrics`` (``serving.metrics``).

The KV managers run in the engine-core process, ``/metrics`` is served by the
API server: the engine side writes its counters to a small JSON file per process
(throttled, atomic rename) in ``$MOA_STATS_DIR``; the API server reads them at
scrape time (``read_stats``).
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

from moa_vllm import envs

STATS_DIR_ENV = envs.MOA_STATS_DIR
FLUSH_SECONDS = 0.5


def ensure_stats_dir() -> Path:
    """Called in the front-end process before the engine starts (children inherit)."""
    if not os.environ.get(STATS_DIR_ENV):
        os.environ[STATS_DIR_ENV] = tempfile.mkdtemp(prefix="moa-stats-")
    return Path(os.environ[STATS_DIR_ENV])


class EngineStats:
    """Counters of this engine process, per head class."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.blocks_freed = defaultdict(int)  # returned to the pool before finish
        self.blocks_held = defaultdict(dict)  # class -> request -> blocks now held
        self.tokens_kept = defaultdict(int)  # tokens whose blocks are kept
        self.tokens_dense = defaultdict(int)  # ... under dense attention
        self.requests_finished = defaultdict(int)
        self._last_flush = 0.0

    def record_step(self, head_class: int, request_id: str, held: int, freed: int,
                    kept: int, dense: int) -> None:
        with self._lock:
            self.blocks_freed[head_class] += freed
            self.blocks_held[head_class][request_id] = held
            self.tokens_kept[head_class] += kept
            self.tokens_dense[head_class] += dense
        self.maybe_flush()

    def record_finish(self, head_class: int, request_id: str) -> None:
        with self._lock:
            self.blocks_held[head_class].pop(request_id, None)
            self.requests_finished[head_class] += 1
        self.maybe_flush(force=True)

    def snapshot(self) -> dict:
        with self._lock:
            classes = sorted(set(self.blocks_freed) | set(self.blocks_held)
                             | set(self.requests_finished))
            return {
                str(c): {
                    "blocks_freed": self.blocks_freed[c],
                    "blocks_held": sum(self.blocks_held[c].values()),
                    "requests_running": len(self.blocks_held[c]),
                    "tokens_kept": self.tokens_kept[c],
                    "tokens_dense": self.tokens_dense[c],
                    "requests_finished": self.requests_finished[c],
                }
                for c in classes
            }

    def maybe_flush(self, force: bool = False) -> None:
        directory = os.environ.get(STATS_DIR_ENV)
        now = time.monotonic()
        if not directory or (not force and now - self._last_flush < FLUSH_SECONDS):
            return
        self._last_flush = now
        path = Path(directory) / f"engine-{os.getpid()}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.snapshot()))
        os.replace(tmp, path)


ENGINE_STATS = EngineStats()


def read_stats(directory: str | os.PathLike | None = None) -> dict[str, dict]:
    """Per head class, summed over the engine processes that wrote stats."""
    directory = directory or os.environ.get(STATS_DIR_ENV)
    total: dict[str, dict] = defaultdict(lambda: defaultdict(int))
    if not directory:
        return {}
    for path in Path(directory).glob("engine-*.json"):
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue  # being replaced right now
        for head_class, figures in data.items():
            for key, value in figures.items():
                total[head_class][key] += value
    return {c: dict(f) for c, f in total.items()}
