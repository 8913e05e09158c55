"""``moa-vllm serve MODEL [--plan PLAN] [vLLM args...]``: a thin launcher of vLLM's
own OpenAI server with MoA selected, the plan resolved and checked first, and the
MoA routes allow-listed. It replaces itself with the server process (``exec``)."""

from __future__ import annotations

import json
import os
import shlex
import sys

from moa_vllm.plan import PlanError
from moa_vllm.plan_discovery import resolve_plan
from moa_vllm.plan_report import DEFAULT_BLOCK_SIZE, banner, plan_report

PLUGINS = ("moa", "moa-routes")  # our entry-point names in VLLM_PLUGINS
CONFIG_FLAG = "--additional-config"


def plugin_allow_list(current: str | None) -> str | None:
    """Endpoint plugins load only when named in VLLM_PLUGINS; once it is set, every
    plugin group honours it, so our general plugin must be named as well."""
    names = [n for n in (current or "").split(",") if n]
    if current is None:
        names = list(PLUGINS)
    names += [p for p in PLUGINS if p not in names]
    return ",".join(names)


def server_argv(model: str, vllm_args: list[str]) -> list[str]:
    argv = [sys.executable, "-P", "-m", "vllm.entrypoints.openai.api_server",
            "--model", model]
    if "--attention-backend" not in vllm_args:
        argv += ["--attention-backend", "moa"]
    return argv + vllm_args


def option_value(vllm_args: list[str], flag: str) -> tuple[str | None, list[str]]:
    """The value of ``flag`` in vLLM's arguments (``--flag V`` or ``--flag=V``) and
    the arguments without it."""
    for i, arg in enumerate(vllm_args):
        if arg == flag and i + 1 < len(vllm_args):
            return vllm_args[i + 1], vllm_args[:i] + vllm_args[i + 2:]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1], vllm_args[:i] + vllm_args[i + 1:]
    return None, vllm_args


def with_plan(vllm_args: list[str], plan: str | None) -> tuple[str | None, dict, list[str]]:
    """The plan asked for (``--plan``, else ``--additional-config``'s ``moa.plan``),
    the rest of ``--additional-config``, and vLLM's other arguments."""
    text, rest = option_value(vllm_args, CONFIG_FLAG)
    try:
        extra = json.loads(text) if text else {}
    except json.JSONDecodeError as err:
        raise PlanError(f"{CONFIG_FLAG}: not valid JSON ({err})") from None
    moa = extra.pop("moa", None) or {}
    if plan and moa.get("plan"):
        raise PlanError(f"--plan {plan} and {CONFIG_FLAG} moa.plan {moa['plan']}: give one")
    return plan or moa.get("plan"), extra, rest


def serve(model: str, plan: str | None, vllm_args: list[str], dry_run: bool = False) -> None:
    """Resolve and print the plan, then exec vLLM's server with that plan in its
    ``--additional-config`` (or, with ``dry_run``, print the command). Raises PlanError."""
    from transformers import AutoConfig

    from moa_vllm.plan import fingerprint_from_hf_config

    requested, extra, vllm_args = with_plan(vllm_args, plan)
    resolved = resolve_plan(model, fingerprint_from_hf_config(AutoConfig.from_pretrained(model)),
                            os.path.abspath(requested) if requested else None)
    block_size, _ = option_value(vllm_args, "--block-size")
    report = plan_report(resolved.plan, resolved.source, resolved.how,
                         int(block_size or DEFAULT_BLOCK_SIZE))
    print(banner(report), flush=True)
    extra["moa"] = {"plan": os.path.abspath(resolved.source)}  # the server serves this one
    argv = server_argv(model, [*vllm_args, CONFIG_FLAG, json.dumps(extra)])
    os.environ["VLLM_PLUGINS"] = plugin_allow_list(os.environ.get("VLLM_PLUGINS"))
    if dry_run:
        print(shlex.join(argv))
        return
    os.execv(argv[0], argv)
