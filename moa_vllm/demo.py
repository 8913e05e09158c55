"""`make demo`: serve SmolLM2 with MoA through vLLM's OpenAI server, ask one
question over a long passage, print the answer and the KV blocks MoA returned
to vLLM's pool, then stop the server."""

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

PASSAGE = (
    "The lighthouse keeper wrote in his log every evening. He noted the wind, "
    "the ships that passed, and the colour of the sea. "
)
FACT = "The keeper's cat was called Biscuit, and she slept on the logbook."
QUESTION = "What was the keeper's cat called?"


def server_command(model: str, port: int) -> list[str]:
    return [
        sys.executable, "-P", "-m", "vllm.entrypoints.openai.api_server",
        "--model", model, "--served-model-name", "smollm2",
        "--attention-backend", "moa", "--port", str(port),
        "--dtype", "float32", "--enforce-eager", "--max-model-len", "4096",
        "--block-size", "16", "--max-num-seqs", "4",
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


def kv_savings(log_text: str) -> tuple[int, int]:
    """(blocks returned early, blocks allocated) summed over span classes."""
    early = total = 0
    for m in re.finditer(r"MoA KV: request \S+ span class \d+: (\d+) of (\d+) blocks", log_text):
        early += int(m.group(1))
        total += int(m.group(2))
    return early, total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True)
    parser.add_argument("--plan", default=str(Path(__file__).resolve().parent.parent
                                              / "plans" / "smollm2-135m-uniform-0.5.json"))
    parser.add_argument("--port", type=int, default=8011)
    args = parser.parse_args(argv)

    env = {**os.environ, "MOA_PLAN": args.plan, "MOA_KV_LOG": "1", "HF_HUB_OFFLINE": "1"}
    base = f"http://127.0.0.1:{args.port}"
    log = Path(tempfile.mkdtemp(prefix="moa-demo-")) / "server.log"
    print(f"starting vLLM's OpenAI server with --attention-backend moa, plan {args.plan}")
    print(f"(server log: {log})", end="", flush=True)
    with open(log, "w") as sink:
        server = subprocess.Popen(server_command(args.model, args.port), env=env,
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
        print(f"A: {reply['choices'][0]['message']['content'].strip()}")
        time.sleep(1)  # the engine logs the finished request's blocks
        early, total = kv_savings(log.read_text())
        if total:
            print(f"KV blocks returned to vLLM's pool before the request finished: "
                  f"{early} of {total} ({100 * early / total:.0f}%)")
        else:
            print("no MoA KV log lines found (is the plugin installed?)")
    finally:
        server.terminate()
        server.wait(timeout=60)
        print("server stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
