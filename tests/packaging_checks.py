"""Building and installing the wheel as users do (shared by the packaging and
Docker tests)."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def build_wheel(source: Path, out: Path) -> Path:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out),
                    str(source)], check=True, capture_output=True, text=True)
    (wheel,) = out.glob("moa_vllm-*.whl")
    return wheel


def expected_wheel_files(source: Path = ROOT) -> set[str]:
    """What the wheel must hold: every module of ``moa_vllm`` and ``moa_kernels``
    and every shipped plan (``plans/`` maps to ``moa_vllm/plans/``)."""
    files = {str(p.relative_to(source)) for p in (source / "moa_vllm").rglob("*.py")}
    kernels = source / "triton_kernels"
    files |= {str(p.relative_to(kernels)) for p in (kernels / "moa_kernels").rglob("*.py")}
    files |= {f"moa_vllm/plans/{p.name}" for p in (source / "plans").glob("*.json")}
    return files


def missing_from_wheel(wheel: Path, source: Path = ROOT) -> set[str]:
    with zipfile.ZipFile(wheel) as z:
        return expected_wheel_files(source) - set(z.namelist())


def install_in_fresh_venv(wheel: Path, where: Path) -> Path:
    """``where/venv`` with the wheel installed by its own pip; returns its ``bin``."""
    venv = where / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = Path(subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True).stdout.strip())
    # A plain path line: the test venv's .pth files (our editable finder) do not run.
    (site / "test_venv_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps",
                    "--force-reinstall", str(wheel)], check=True, capture_output=True,
                   text=True, cwd=where)
    return venv / "bin"


def run_outside_repo(bin_dir: Path, argv: list[str], cwd: Path, **env) -> subprocess.CompletedProcess:
    """A command of the fresh venv, from a folder outside the repo, with no
    ``MOA_*`` variable and no path into the repo."""
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith(("MOA_", "PYTHON", "VIRTUAL_ENV"))}
    clean.update(PATH=f"{bin_dir}{os.pathsep}{clean.get('PATH', '')}", HF_HUB_OFFLINE="1",
                 **env)
    return subprocess.run(argv, cwd=cwd, env=clean, capture_output=True, text=True, timeout=300)
