"""``moa-vllm serve MODEL [--plan PLAN] [vLLM args...]``: a thin launcher of vLLM's
own OpenAI server with MoA selected, the plan resolved and checked first, and the
MoA routes allow-listed. Its banner reports the densities ``/v1/moa/plan`` will: it
builds the engine's config from the same arguments, as the server does, so MoA's
config hook settles the same plan and block size. It replaces itself with the
server process (``exec``)."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import sys

from moa_vllm.plan import PlanError
from moa_vllm.plan_discovery import resolve_plan
from moa_vllm.plan_report import banner

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


def server_args(model: str, vllm_args: list[str]) -> list[str]:
    args = ["--model", model]
    if "--attention-backend" not in vllm_args:
        args += ["--attention-backend", "moa"]
    return args + vllm_args


@contextlib.contextmanager
def stdout_to_stderr():
    """vLLM logs to stdout while it builds a config: stdout stays the banner and
    (dry run) the command."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


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
    """Resolve the plan, print it as the engine will serve it, then exec vLLM's server
    with that plan in its ``--additional-config`` (or, with ``dry_run``, print the
    command). Raises PlanError."""
    from transformers import AutoConfig

    from moa_vllm.plan import fingerprint_from_hf_config

    requested, extra, vllm_args = with_plan(vllm_args, plan)
    resolved = resolve_plan(model, fingerprint_from_hf_config(AutoConfig.from_pretrained(model)),
                            os.path.abspath(requested) if requested else None)
    from moa_vllm.engine.engine_plan import served_plan  # vLLM: once the plan is good
    from moa_vllm.engine.vllm_surface.entrypoints import server_engine_config

    extra["moa"] = {"plan": os.path.abspath(resolved.source)}  # the server serves this one
    args = server_args(model, [*vllm_args, CONFIG_FLAG, json.dumps(extra)])
    os.environ["VLLM_PLUGINS"] = plugin_allow_list(os.environ.get("VLLM_PLUGINS"))
    with stdout_to_stderr():
        config = server_engine_config(args)
    if (served := served_plan(config)) is not None:
        # the engine is handed the plan's path; the banner says how discovery found it
        report = served.report(config.cache_config.block_size)
        print(banner(report.model_copy(update={"how": resolved.how})), flush=True)
    argv = [sys.executable, "-P", "-m", "vllm.entrypoints.openai.api_server", *args]
    if dry_run:
        print(shlex.join(argv))
        return
    os.execv(argv[0], argv)
