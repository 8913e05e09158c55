"""MoA figures on vLLM's ``/metrics``: a Prometheus collector in the API server over
the engine processes' stats files (``engine.stats``)."""

from __future__ import annotations

from moa_vllm.engine.stats import read_stats

FAMILIES = (  # (snapshot key, Prometheus type, name, help)
    ("blocks_freed", "counter", "moa_kv_blocks_freed",
     "KV blocks returned to the pool before their request finished"),
    ("blocks_held", "gauge", "moa_kv_blocks_held", "KV blocks held by running requests"),
    ("requests_running", "gauge", "moa_requests_running", "running requests"),
    ("tokens_kept", "counter", "moa_kv_tokens_kept",
     "tokens whose KV blocks are kept for the next query of each request "
     "(block granularity), summed over scheduling steps"),
    ("tokens_dense", "counter", "moa_kv_tokens_dense",
     "tokens dense attention would keep, summed over scheduling steps"),
)


class MoaCollector:
    """Prometheus collector (API server process) over the engine stats files;
    every family is labelled by head class."""

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        kinds = {"counter": CounterMetricFamily, "gauge": GaugeMetricFamily}
        stats = read_stats()
        for key, kind, name, help_text in FAMILIES:
            family = kinds[kind](name, help_text, labels=["head_class"])
            for head_class, figures in sorted(stats.items()):
                family.add_metric([head_class], figures.get(key, 0))
            yield family
