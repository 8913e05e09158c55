"""`make demo`: serve SmolLM2 with MoA through `moa-vllm serve` (vLLM's OpenAI
server) with the plan a user gets by default (plan discovery: the best shipped
searched plan), ask one question over a long passage, print the answer and the KV
blocks MoA returned to vLLM's pool (read from the server's ``/metrics``), then
stop it."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from moa_vllm.plan_discovery import resolve_plan

PASSAGE = (
    "The lighthouse keeper wrote in his log every evening. He noted the wind, "
    "the ships that passed, and the colour of the sea. "
)
FACT = "The keeper's cat was called Biscuit, and she slept on the logbook."
QUESTION = "What was the keeper's cat called? Answer with the name only."
ANSWER = "Biscuit"


def server_command(model: str, plan: str | None, port: int) -> list[str]:
    """``moa-vllm serve``; without ``plan`` it serves what plan discovery finds."""
    return [
        sys.executable, "-P", "-m", "moa_vllm.cli", "serve", model,
        *(["--plan", plan] if plan else []), "--served-model-name", "smollm2", "--port", str(port),
        "--dtype", "float32", "--enforce-eager", "--max-model-len", "4096",
        "--max-num-seqs", "4",
        "--kv-cache-memory-bytes", str(1 << 30),
    ]


def http(url: str, payload: dict | None = None, timeout: float = 300) -> dict | str:
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(
        url, data=data, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        body = response.read().decode()
    return json.loads(body) if payload is not None else body


def wait_healthy(base: str, server: subprocess.Popen, log: Path, limit: float = 600) -> None:
    start = time.time()
    while time.time() - start < limit:
        if server.poll() is not None:
            tail = "\n".join(log.read_text().splitlines()[-15:])
            raise SystemExit(f"the server exited (code {server.returncode}):\n{tail}")
        try:
            http(f"{base}/health", timeout=2)
            return
        except OSError:
            print(".", end="", flush=True)
            time.sleep(2)
    raise SystemExit("the server did not become healthy in time")


def blocks_freed(metrics_text: str) -> dict[str, float]:
    """``moa_kv_blocks_freed`` per head class, from Prometheus' text format."""
    pattern = r'^moa_kv_blocks_freed(?:_total)?\{head_class="(\d+)"\} (\S+)$'
    return {m.group(1): float(m.group(2))
            for m in re.finditer(pattern, metrics_text, flags=re.MULTILINE)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True)
    parser.add_argument("--plan", help="default: plan discovery (what `moa-vllm serve` picks)")
    parser.add_argument("--port", type=int, default=8011)
    args = parser.parse_args(argv)

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    base = f"http://127.0.0.1:{args.port}"
    log = Path(tempfile.mkdtemp(prefix="moa-demo-")) / "server.log"
    from transformers import AutoConfig

    from moa_vllm.plan import fingerprint_from_hf_config

    shown = args.plan or resolve_plan(
        args.model, fingerprint_from_hf_config(AutoConfig.from_pretrained(args.model))).source
    print(f"starting moa-vllm serve (vLLM's OpenAI server, --attention-backend moa), "
          f"plan {shown}")
    print(f"(server log: {log})", end="", flush=True)
    with open(log, "w") as sink:
        server = subprocess.Popen(server_command(args.model, args.plan, args.port), env=env,
                                  stdout=sink, stderr=subprocess.STDOUT)
    try:
        wait_healthy(base, server, log)
        print("\nserver is up")
        passage = PASSAGE * 60 + FACT + " " + PASSAGE * 3
        reply = http(f"{base}/v1/chat/completions", {
            "model": "smollm2",
            "messages": [{"role": "user", "content": f"{passage}\n\n{QUESTION}"}],
            "temperature": 0, "max_tokens": 40,
        })
        usage = reply["usage"]
        print(f"Q ({usage['prompt_tokens']} prompt tokens): {QUESTION}")
        answer = reply["choices"][0]["message"]["content"].strip()
        print(f"A: {answer}")
        print(f"(the passage says {ANSWER}: the answer "
              f"{'names it' if ANSWER.lower() in answer.lower() else 'misses it'})")
        time.sleep(1)  # the engine flushes its counters when a request finishes
        freed = blocks_freed(http(f"{base}/metrics"))
        if freed:
            tokens = usage["prompt_tokens"] + usage["completion_tokens"]
            block_size = json.loads(http(f"{base}/v1/moa/plan"))["block_size"]  # MoA's choice
            dense = len(freed) * -(-tokens // block_size)  # blocks dense attention holds
            early = int(sum(freed.values()))
            print(f"KV blocks returned to vLLM's pool before the request finished: "
                  f"{early} of {dense} ({100 * early / dense:.0f}%, "
                  f"{len(freed)} head classes, from /metrics)")
        else:
            print("no MoA figures on /metrics (is the plugin installed?)")
    finally:
        server.terminate()
        server.wait(timeout=60)
        print("server stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
