"""Servers as operators run them, for the serving benchmarks: ``vllm serve`` under
one KV budget, driven by vLLM's own client (``vllm bench serve``), with running
requests, preemptions and KV usage read from its ``/metrics`` while it runs."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from moa_vllm.evaluation.runner import kv_bytes_per_token

VLLM = str(Path(sys.executable).parent / "vllm")
SERVED_NAME = "bench"


def dense_budget_bytes(model_dir: str | Path, dtype: str, requests: int, tokens: int,
                       block_size: int) -> int:
    """A KV budget that holds ``requests`` dense requests of ``tokens`` tokens in
    blocks of ``block_size``, plus the pool's null block."""
    blocks = requests * -(-tokens // block_size) + 1
    return blocks * block_size * kv_bytes_per_token(model_dir, dtype)


def moa_server_args(spec: str) -> tuple[str, list[str]]:
    """``[NAME=]PLAN`` -> (name, the ``vllm serve`` arguments that serve that plan)."""
    name, _, path = spec.rpartition("=")
    config = json.dumps({"moa": {"plan": str(Path(path).resolve())}})
    return name or Path(path).stem, ["--attention-backend", "moa",
                                     "--additional-config", config]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metric_values(text: str) -> dict[str, float]:
    """Prometheus text: each ``vllm:`` family summed over its labels."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        m = re.match(r"(vllm:[a-z_]+?)(_total)?(\{[^}]*\})? ([0-9.eE+-]+)$", line)
        if m:
            values[m[1]] = values.get(m[1], 0.0) + float(m[4])
    return values


COUNTERS = ("vllm:num_preemptions", "vllm:prefix_cache_hits", "vllm:prefix_cache_queries")


@dataclass
class Sampler:
    """Polls ``/metrics`` while a client runs: the most requests running at once, the
    KV pool's use per running request then, and how much each counter grew
    (preemptions, prefix-cache hits and queries, in tokens)."""

    base: str
    pool_bytes: int
    period_s: float = 0.5
    peak_running: int = 0
    kv_per_request: list[float] = field(default_factory=list)
    grew: dict[str, float] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)

    def read(self) -> dict[str, float]:
        with urllib.request.urlopen(f"{self.base}/metrics", timeout=10) as response:
            return metric_values(response.read().decode())

    def _poll(self) -> None:
        while not self._stop.is_set():
            try:
                v = self.read()
            except OSError:
                v = {}
            running = int(v.get("vllm:num_requests_running", 0))
            if running > self.peak_running:
                self.peak_running, self.kv_per_request = running, []
            if running and running == self.peak_running:
                usage = v.get("vllm:kv_cache_usage_perc", 0.0)
                self.kv_per_request.append(usage * self.pool_bytes / running)
            self._stop.wait(self.period_s)

    def __enter__(self) -> Sampler:
        self._start = self.read()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        end = self.read()
        self.grew = {c: end.get(c, 0.0) - self._start.get(c, 0.0) for c in COUNTERS}


class Server:
    """``vllm serve MODEL [args]`` in its own process; its log is kept in a file.
    ``VLLM_CPU_KVCACHE_SPACE`` is unset: on CPU it would override the KV budget."""

    def __init__(self, model: str | Path, args: list[str], log: Path,
                 start_timeout_s: float = 900) -> None:
        self.model, self.args, self.log = str(model), args, log
        self.start_timeout_s = start_timeout_s
        self.base = ""

    def __enter__(self) -> Server:
        port = free_port()
        env = {k: v for k, v in os.environ.items() if k != "VLLM_CPU_KVCACHE_SPACE"}
        env.update(PYTHONSAFEPATH="1", VLLM_LOGGING_LEVEL="INFO")
        self._log = open(self.log, "w")
        self.proc = subprocess.Popen(
            [VLLM, "serve", self.model, "--served-model-name", SERVED_NAME,
             "--port", str(port), *self.args],
            env=env, stdout=self._log, stderr=subprocess.STDOUT)
        self.base = f"http://127.0.0.1:{port}"
        deadline = time.time() + self.start_timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited at start-up:\n{self.log_tail()}")
            try:
                urllib.request.urlopen(f"{self.base}/health", timeout=2)
                return self
            except OSError:
                if time.time() > deadline:
                    self.__exit__()
                    raise RuntimeError(f"server did not start:\n{self.log_tail()}")
                time.sleep(2)

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self._log.close()

    def log_tail(self, chars: int = 3000) -> str:
        return self.log.read_text()[-chars:]

    def logged(self, pattern: str) -> str | None:
        """The first group of ``pattern`` in the server's log."""
        m = re.search(pattern, self.log.read_text())
        return m[1] if m else None

    def max_concurrency_logged(self) -> float | None:
        value = self.logged(r"Maximum concurrency for [\d,]+ tokens per request: ([\d.]+)x")
        return float(value) if value else None


def bench_serve(base: str, tokenizer: str | Path, bench_args: list[str]) -> dict:
    """One ``vllm bench serve`` run against ``base``: its saved result."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [VLLM, "bench", "serve", "--backend", "vllm", "--base-url", base,
               "--model", SERVED_NAME, "--tokenizer", str(tokenizer),
               "--percentile-metrics", "ttft,tpot,itl", "--metric-percentiles", "50,99",
               "--save-result", "--result-dir", tmp, "--result-filename", "result.json",
               "--disable-tqdm", *bench_args]
        done = subprocess.run(cmd, capture_output=True, text=True,
                              env={**os.environ, "PYTHONSAFEPATH": "1"})
        if done.returncode != 0:
            raise RuntimeError(f"vllm bench serve failed:\n{done.stdout[-2000:]}"
                               f"\n{done.stderr[-2000:]}")
        return json.loads((Path(tmp) / "result.json").read_text())


def measure(server: Server, tokenizer: str | Path, bench_args: list[str],
            pool_bytes: int) -> dict:
    """One client run against a started server: latency and throughput from
    ``vllm bench serve``, concurrency, preemptions, prefix-cache hits and KV from
    ``/metrics``."""
    with Sampler(server.base, pool_bytes) as sampler:
        result = bench_serve(server.base, tokenizer, bench_args)
    kv = sorted(sampler.kv_per_request)
    queries = sampler.grew["vllm:prefix_cache_queries"]
    return {
        "completed": result["completed"], "failed": result.get("failed", 0),
        "output_tok_s": result["output_throughput"],
        "ttft_median_s": result["median_ttft_ms"] / 1e3,
        "ttft_p99_s": result["p99_ttft_ms"] / 1e3,
        "tpot_median_ms": result["median_tpot_ms"], "tpot_p99_ms": result["p99_tpot_ms"],
        "peak_running": sampler.peak_running,
        "preemptions": int(sampler.grew["vllm:num_preemptions"]),
        "prefix_hit_rate": sampler.grew["vllm:prefix_cache_hits"] / queries if queries else 0.0,
        "kv_mib_per_request": kv[len(kv) // 2] / 2**20 if kv else None,
        "logged_max_concurrency": server.max_concurrency_logged(),
        "block_size": server.logged(r"MoA: KV block size (\d+)") or "vLLM default",
    }


def markdown_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> list[str]:
    """Rows as a markdown table; ``columns``: (title, key, format spec)."""
    def cell(row, key, spec):
        value = row.get(key)
        return "-" if value is None else format(value, spec)

    return (["| " + " | ".join(title for title, _, _ in columns) + " |",
             "|" + "---|" * len(columns)]
            + ["| " + " | ".join(cell(row, key, spec) for _, key, spec in columns) + " |"
               for row in rows])


def ratios(row: dict, base: dict, keys: list[str]) -> dict:
    """``row[key] / base[key]`` for each key (None where either is missing or 0)."""
    return {k: row[k] / base[k] if row.get(k) and base.get(k) else None for k in keys}
