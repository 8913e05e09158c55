"""The package as users install it: a wheel with every module and plan, working
from outside the repo; and no import name `triton_kernels` (vLLM takes that for
OpenAI's MoE kernel package and imports its submodules for gpt-oss)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def probe(code: str, cwd: Path) -> str:
    return subprocess.run(
        [sys.executable, "-P", "-c", code], cwd=cwd, capture_output=True, text=True,
        check=True,
    ).stdout.strip()


def test_triton_kernels_import_name_is_not_ours(tmp_path):
    code = (
        "import importlib.util as u; s = u.find_spec('triton_kernels');"
        "print('none' if s is None else list(s.submodule_search_locations or [s.origin]))"
    )
    found = probe(code, tmp_path)
    assert str(ROOT / "triton_kernels") not in found
    code = "import moa_kernels, pathlib; print(pathlib.Path(moa_kernels.__file__).parent)"
    assert probe(code, tmp_path) == str(ROOT / "triton_kernels" / "moa_kernels")


def test_vllm_does_not_see_our_folder_as_triton_kernels(tmp_path):
    code = "from vllm.utils.import_utils import has_triton_kernels as h; print(h())"
    assert probe(code, ROOT) == "False"


def test_wheel_holds_every_module_and_plan(wheel):
    from packaging_checks import missing_from_wheel

    assert not missing_from_wheel(wheel)


def test_installed_wheel_serves_its_packaged_plans(wheel_venv, smollm2_dir, tmp_path):
    """A user's `pip install`: the CLI, a packaged plan, and plan discovery by
    fingerprint, from outside the repo."""
    from packaging_checks import run_outside_repo

    result = run_outside_repo(wheel_venv, ["moa-vllm", "--help"], tmp_path)
    assert result.returncode == 0 and "plan" in result.stdout, result.stderr
    code = ("import json, moa_vllm; from moa_vllm.plan_discovery import packaged_plans_dir;"
            "print(json.dumps([moa_vllm.__file__, str(packaged_plans_dir())]))")
    result = run_outside_repo(wheel_venv, ["python", "-c", code], tmp_path)
    assert result.returncode == 0, result.stderr
    module, plans = map(Path, json.loads(result.stdout))
    site = wheel_venv.parent / "lib"
    assert site in module.parents and site in plans.parents  # not the repo's
    shipped = plans / "smollm2-135m-moa-0.5.json"
    result = run_outside_repo(wheel_venv, ["moa-vllm", "plan", "show", str(shipped)], tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["model"]["architecture"] == "LlamaForCausalLM"
    code = ("import sys; from transformers import AutoConfig;"
            "from moa_vllm.plan import fingerprint_from_hf_config as f;"
            "from moa_vllm.plan_discovery import resolve_plan;"
            "r = resolve_plan(sys.argv[1], f(AutoConfig.from_pretrained(sys.argv[1])));"
            "print(r.source); print(r.how)")
    result = run_outside_repo(wheel_venv, ["python", "-c", code, str(smollm2_dir)], tmp_path)
    assert result.returncode == 0, result.stderr
    source, how = result.stdout.strip().splitlines()
    assert Path(source).parent == plans and how.startswith("shipped plans")


def test_entry_points_and_the_backend_path_resolve():
    """The names vLLM and the shell reach us by: entry points, and the backend
    class path vLLM imports in every process."""
    import importlib
    from importlib.metadata import entry_points

    from moa_vllm.engine.vllm_surface.interface import BACKEND_PATH

    ours = [ep for group in ("vllm.general_plugins", "vllm.endpoint_plugins", "console_scripts")
            for ep in entry_points(group=group) if ep.value.startswith("moa_vllm.")]
    assert {ep.name for ep in ours} == {"moa", "moa-routes", "moa-vllm"}
    for ep in ours:
        assert callable(ep.load())
    module, _, name = BACKEND_PATH.rpartition(".")
    assert getattr(importlib.import_module(module), name).get_name() == "MOA"
