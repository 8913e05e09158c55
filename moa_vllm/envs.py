"""Every ``MOA_*`` environment variable, in one table (vLLM's ``envs.py`` is the
model): name, what it does, its default. Read them through ``get``. The README's
"Configuration" table is ``markdown_table()`` (``python -m moa_vllm.envs`` prints it;
``tests/test_docs.py`` checks they match)."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class EnvVar:
    name: str
    default: str | None
    doc: str


VARIABLES: tuple[EnvVar, ...] = (
    EnvVar("MOA_PLAN", None,
           "plan file an engine serves (after additional_config's moa.plan, before the "
           "model directory's moa_plan.json and the shipped plans)"),
    EnvVar("MOA_PLANS_DIR", None,
           "extra folder of plans searched by fingerprint before the packaged ones"),
    EnvVar("MOA_STATS_DIR", None,
           "folder where engine processes write their KV counters for /metrics "
           "(set by the front end to a fresh temporary folder when unset)"),
    EnvVar("MOA_KV_LOG", "0",
           "1: log each finished request's early-freed blocks per head class"),
    EnvVar("MOA_KEEP_ALL_BLOCKS", "0",
           "1: debug switch, free no block (spans still apply): the exactness "
           "reference for freeing, and a way to rule freeing out"),
    EnvVar("MOA_CPU_ATTN", "vllm",
           "read once at engine start: vllm: on CPU, plans whose granule is a multiple "
           "of the block size run every step (prefill and decode) on vLLM's own attention "
           "op over each head's live blocks; torch: always our torch path (the reference, "
           "and a way to rule the op out); triton: MoA's Triton kernel, what CUDA runs "
           "(on CPU under Triton's interpreter: tests)"),
    EnvVar("MOA_ALLOW_UNTESTED_VLLM", "0",
           "1: serve MoA on a vLLM release outside the supported range (a warning "
           "instead of the start-up refusal; its internals are still checked)"),
    EnvVar("MOA_PLAN_CACHE", None,
           "stage cache of `plan search` (default: ~/.cache/moa-vllm/plan-search)"),
    EnvVar("MOA_EVAL_KV_BYTES", str(2 << 30), "KV-cache bytes of each `moa-vllm eval` engine"),
)
_BY_NAME = {v.name: v for v in VARIABLES}

MOA_PLAN = "MOA_PLAN"
MOA_PLANS_DIR = "MOA_PLANS_DIR"
MOA_STATS_DIR = "MOA_STATS_DIR"
MOA_KV_LOG = "MOA_KV_LOG"
MOA_KEEP_ALL_BLOCKS = "MOA_KEEP_ALL_BLOCKS"
MOA_CPU_ATTN = "MOA_CPU_ATTN"
MOA_ALLOW_UNTESTED_VLLM = "MOA_ALLOW_UNTESTED_VLLM"
MOA_PLAN_CACHE = "MOA_PLAN_CACHE"
MOA_EVAL_KV_BYTES = "MOA_EVAL_KV_BYTES"


def get(name: str) -> str | None:
    """The variable's value, or its default; unknown names are a bug."""
    var = _BY_NAME[name]
    value = os.environ.get(name)
    return value if value else var.default


def markdown_table() -> str:
    """The README's table of these variables, so the two cannot drift apart."""
    rows = ["| variable | default | what it does |", "| --- | --- | --- |"]
    rows += [f"| `{v.name}` | {'-' if v.default is None else f'`{v.default}`'} | {v.doc} |"
             for v in VARIABLES]
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown_table())
