"""``moa-vllm serve MODEL [--plan PLAN] [vLLM args...]``: a thin launcher of vLLM's
own OpenAI server with MoA selected, the plan resolved and checked first, and the
MoA routes allow-listed. It replaces itself with the server process (``exec``)."""

from __future__ import annotations

import os
import sys

from moa_vllm.plan_discovery import PLAN_ENV, ResolvedPlan, resolve_plan

PLUGINS = ("moa", "moa-routes")  # our entry-point names in VLLM_PLUGINS


def plugin_allow_list(current: str | None) -> str | None:
    """Endpoint plugins load only when named in VLLM_PLUGINS; once it is set, every
    plugin group honours it, so our general plugin must be named as well."""
    names = [n for n in (current or "").split(",") if n]
    if current is None:
        names = list(PLUGINS)
    names += [p for p in PLUGINS if p not in names]
    return ",".join(names)


def describe(resolved: ResolvedPlan, block_size: int) -> str:
    from moa_vllm.routes import plan_report

    report = plan_report(
        {"plan": resolved.plan.model_dump(mode="json"), "source": resolved.source,
         "how": resolved.how},
        block_size,
    )
    lines = [
        f"MoA plan: {resolved.source} (from {resolved.how}; "
        f"{report.provenance.method}, elastic={report.elastic}, "
        f"{report.sink_tokens} sinks, {len(report.span_classes)} span classes)",
    ]
    lines += [
        f"  at {d.length:>6} tokens: average density {d.average_density:.3f}, "
        f"allocated density {d.allocated_density:.3f} (block size {block_size})"
        for d in report.densities
    ]
    return "\n".join(lines)


def server_argv(model: str, vllm_args: list[str]) -> list[str]:
    argv = [sys.executable, "-P", "-m", "vllm.entrypoints.openai.api_server",
            "--model", model]
    if "--attention-backend" not in vllm_args:
        argv += ["--attention-backend", "moa"]
    return argv + vllm_args


def block_size_of(vllm_args: list[str], default: int = 16) -> int:
    for i, arg in enumerate(vllm_args):
        if arg == "--block-size" and i + 1 < len(vllm_args):
            return int(vllm_args[i + 1])
        if arg.startswith("--block-size="):
            return int(arg.split("=", 1)[1])
    return default


def serve(model: str, plan: str | None, vllm_args: list[str], dry_run: bool = False) -> None:
    """Resolve and print the plan, then exec vLLM's server (or, with ``dry_run``,
    print the command). Raises PlanError."""
    from moa_vllm.plan import fingerprint_from_hf_config
    from transformers import AutoConfig

    if plan:
        os.environ[PLAN_ENV] = os.path.abspath(plan)
    resolved = resolve_plan(model, fingerprint_from_hf_config(AutoConfig.from_pretrained(model)))
    os.environ[PLAN_ENV] = os.path.abspath(resolved.source)  # the server serves this one
    os.environ["VLLM_PLUGINS"] = plugin_allow_list(os.environ.get("VLLM_PLUGINS"))
    print(describe(resolved, block_size_of(vllm_args)), flush=True)
    argv = server_argv(model, vllm_args)
    if dry_run:
        print(" ".join(argv))
        return
    os.execv(argv[0], argv)
