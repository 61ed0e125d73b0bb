"""``pip install .`` installs the core and its ``videobooth`` command, and both work from any folder.

A subprocess is the point here: the package is built from a copy of the source (what a ``git+URL`` install
sees) into a fresh virtual environment, then used from an unrelated folder. Offline and fast: no build
isolation and no dependency resolution; the fresh environment reuses this one's packages (torch, diffusers...)
through a ``.pth`` file placed after its own site-packages, so what it imports as ``videobooth_core`` is the
installed copy.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# what a git+URL checkout holds that matters to the build: the core, and the pack's ComfyUI side (__init__.py,
# nodes/) that sits beside it and must not end up in site-packages
BUILD_INPUTS = ("pyproject.toml", "README.md", "LICENSE", "videobooth_core", "__init__.py", "nodes")


def _run(args: list, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    result = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
                            check=False)
    assert result.returncode == 0, f"{args} failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
    return result


def test_pip_install_gives_the_core_and_the_videobooth_command(tmp_path: Path) -> None:
    source = tmp_path / "source"
    source.mkdir()
    for name in BUILD_INPUTS:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(REPO / name, source / name)

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], tmp_path, dict(os.environ))
    python = venv / "bin" / "python"
    site = Path(sysconfig.get_path("purelib", vars={"base": str(venv), "platbase": str(venv)}))
    assert site.is_dir(), site
    (site / "zz_parent_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["PIP_NO_INDEX"] = "1"  # offline: nothing may be fetched
    _run([python, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", source], tmp_path, env)

    installed = sorted(p.name for p in site.iterdir() if not p.name.endswith((".dist-info", ".pth")))
    assert installed == ["videobooth_core"], installed

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    help_text = _run([venv / "bin" / "videobooth", "--help"], elsewhere, env).stdout
    for command in ("generate", "demo", "convert", "make-tiny"):
        assert command in help_text, (command, help_text)
    code = ("import videobooth_core; from videobooth_core.pipeline import VideoBoothPipeline, GenerationRequest; "
            "print(videobooth_core.__file__)")
    where = Path(_run([python, "-c", code], elsewhere, env).stdout.strip())
    assert where.is_relative_to(site), where
