"""No Docker engine runs here: lint the Dockerfile, build the wheel from exactly
what the image copies (the same command as the image), check its contents, and run
what the image runs (its entrypoint and arguments, compose's command) from that
wheel installed in a fresh venv, outside the repo."""

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


def test_image_installs_the_wheel_of_what_it_copies(tmp_path):
    from packaging_checks import build_wheel, missing_from_wheel

    lines = DOCKERFILE.read_text().splitlines()
    context = tmp_path / "context"  # the build context as the image sees it
    for line in (ln for ln in lines if ln.startswith("COPY ")):
        *sources, dest = line.split()[1:]
        for name in sources:
            target = context / dest / Path(name).name if dest.endswith("/") else context / dest
            target.parent.mkdir(parents=True, exist_ok=True)
            if (ROOT / name).is_dir():
                shutil.copytree(ROOT / name, target, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy(ROOT / name, target)
    run = " ".join(lines[next(i for i, ln in enumerate(lines) if ln.startswith("RUN pip wheel")):])
    assert "pip wheel --no-cache-dir --no-deps -w /tmp/wheels ." in run
    assert "pip install --no-cache-dir --no-deps /tmp/wheels/moa_vllm-*.whl" in run
    wheel = build_wheel(context, tmp_path / "wheel")
    assert not missing_from_wheel(wheel)


@pytest.mark.parametrize("source", ["dockerfile", "compose"])
def test_image_command_resolves_the_plan_and_selects_moa(source, wheel_venv, smollm2_dir,
                                                          tmp_path):
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
    from packaging_checks import run_outside_repo

    result = run_outside_repo(wheel_venv, ["moa-vllm", "serve", *args, "--dry-run"], tmp_path,
                              HOME=str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "MoA plan:" in result.stdout and "shipped plans" in result.stdout
    command = result.stdout.strip().splitlines()[-1]
    assert "vllm.entrypoints.openai.api_server" in command
    assert "--attention-backend moa" in command and "--port 8000" in command
