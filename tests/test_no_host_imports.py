"""The core never imports the host application, and importing the pack does no heavy work."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HOST_MODULES = {"comfy", "comfy_extras", "comfy_api", "folder_paths", "nodes", "server", "latent_preview",
                "node_helpers", "execution"}


def _imported_roots(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def test_core_never_imports_the_host() -> None:
    files = sorted((REPO / "videobooth_core").rglob("*.py"))
    assert len(files) > 10
    offenders = {str(f.relative_to(REPO)): sorted(_imported_roots(f) & HOST_MODULES) for f in files}
    assert not {k: v for k, v in offenders.items() if v}, offenders


def test_detector_catches_a_host_import(tmp_path) -> None:
    sample = tmp_path / "bad.py"
    sample.write_text("def f():\n    import comfy.model_management\n    from folder_paths import get_full_path\n")
    assert _imported_roots(sample) >= {"comfy", "folder_paths"}


def test_importing_the_core_is_cheap() -> None:
    code = ("import sys, videobooth_core, videobooth_core.app.cli, videobooth_core.pipeline;"
            "heavy = [m for m in ('transformers', 'diffusers') if m in sys.modules];"
            "print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"importing the core loaded {out.stdout.strip()}"
