"""No Docker engine runs here: lint the Dockerfile, and run what the image runs
(its entrypoint and arguments, compose's command) outside Docker."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "docker" / "Dockerfile"
MOA_VLLM = str(Path(sys.executable).parent / "moa-vllm")


def instruction(name: str) -> list[str]:
    lines = [ln for ln in DOCKERFILE.read_text().splitlines() if ln.startswith(name + " ")]
    assert len(lines) == 1, f"one {name} expected"
    return json.loads(lines[0][len(name) + 1:])


def test_hadolint_is_clean():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.fail("hadolint is part of the test extra; install it")
    result = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_base_image_is_pinned():
    base = next(ln for ln in DOCKERFILE.read_text().splitlines() if ln.startswith("FROM "))
    assert base.startswith("FROM vllm/vllm-openai:v") and ":latest" not in base


@pytest.mark.parametrize("source", ["dockerfile", "compose"])
def test_image_command_resolves_the_plan_and_selects_moa(source, smollm2_dir, tmp_path):
    if source == "dockerfile":
        argv = instruction("ENTRYPOINT") + instruction("CMD")
    else:
        compose = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
        service = compose["services"]["moa-vllm"]
        assert service["deploy"]["resources"]["reservations"]["devices"][0]["driver"] == "nvidia"
        assert "/health" in " ".join(service["healthcheck"]["test"])
        argv = instruction("ENTRYPOINT") + service["command"]
    assert argv[:2] == ["moa-vllm", "serve"]
    args = [str(smollm2_dir) if a == "/models/model" else a for a in argv[2:]]
    env = {"PATH": str(Path(sys.executable).parent), "HF_HUB_OFFLINE": "1",
           "MOA_PLANS_DIR": str(ROOT / "plans"), "HOME": str(tmp_path)}
    result = subprocess.run([MOA_VLLM, "serve", *args, "--dry-run"], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "MoA plan:" in result.stdout and "shipped plans" in result.stdout
    command = result.stdout.strip().splitlines()[-1]
    assert "vllm.entrypoints.openai.api_server" in command
    assert "--attention-backend moa" in command and "--port 8000" in command
