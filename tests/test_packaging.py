"""The wheel must not install an import name `triton_kernels`: vLLM takes that
for OpenAI's MoE kernel package and imports its submodules for gpt-oss."""

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


def test_plugin_entry_point_is_registered():
    from importlib.metadata import entry_points

    eps = entry_points(group="vllm.general_plugins")
    assert any(ep.value == "moa_vllm.registration:register" for ep in eps)
