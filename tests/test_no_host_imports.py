"""The core never imports the host application, and importing the pack does no heavy work."""

from __future__ import annotations

import ast
import json
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


def _from_imports(path: Path) -> list[tuple[str, list[str]]]:
    """``(absolute module, imported names)`` of every ``from ... import`` in ``path`` (relative ones resolved)."""
    package = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            module = ".".join([*base, *(node.module.split(".") if node.module else [])])
            found.append((module, [alias.name for alias in node.names]))
    return found


def test_only_the_application_imports_the_application_and_nobody_imports_privates() -> None:
    """videobooth_core.app (command line, demo, jobs, video output) sits on top of the library: the library, the
    trainer and the nodes never import it (the entry point ``__main__`` excepted); and no module imports another
    module's private names."""
    files = sorted((REPO / "videobooth_core").rglob("*.py")) + sorted((REPO / "nodes").glob("*.py"))
    app_users, private = [], []
    for path in files:
        relative = path.relative_to(REPO)
        for module, names in _from_imports(path):
            targets = [module] + [f"{module}.{n}" for n in names]
            if relative.parts[:2] != ("videobooth_core", "app") \
                    and relative != Path("videobooth_core/__main__.py") \
                    and any(t == "videobooth_core.app" or t.startswith("videobooth_core.app.") for t in targets):
                app_users.append(f"{relative}: {module} {names}")
            folder = REPO.joinpath(*module.split("."))
            private += [f"{relative}: {module}.{n}" for n in names
                        if n.startswith("_") and not (folder / f"{n}.py").exists() and n != "__version__"]
    assert not app_users, app_users
    assert not private, private


def test_the_trainer_uses_the_stages_not_the_pipeline() -> None:
    """The trainer is built on the core's stages (conditioning, sampling, loading), like the pipeline, not on top
    of it: no module of videobooth_core.training imports videobooth_core.pipeline or videobooth_core.app."""
    upward = []
    files = sorted((REPO / "videobooth_core" / "training").glob("*.py"))
    assert len(files) > 5
    for path in files:
        for module, names in _from_imports(path):
            targets = [module] + [f"{module}.{n}" for n in names]
            if any(t in ("videobooth_core.app", "videobooth_core.pipeline") or t.startswith("videobooth_core.app.")
                   for t in targets):
                upward.append(f"{path.name}: {module} {names}")
    assert not upward, upward


def test_importing_the_core_and_the_pack_is_cheap() -> None:
    """One fresh interpreter (the point: nothing imported before) loads the core's entry points and the pack the
    way ComfyUI does (its folder as a package); neither may pull in transformers or diffusers."""
    code = ("import importlib, importlib.util, json, sys\n"
            "for name in ('videobooth_core', 'videobooth_core.app.cli', 'videobooth_core.pipeline',\n"
            "             'videobooth_core.loading', 'videobooth_core.settings', 'videobooth_core.loading.checkpoint',\n"
            "             'videobooth_core.loading.streaming', 'videobooth_core.conditioning.clip',\n"
            "             'videobooth_core.conditioning.vae', 'videobooth_core.conditioning.tokenizer',\n"
            "             'videobooth_core.loading.clip', 'videobooth_core.loading.vae', 'videobooth_core.video_io',\n"
            "             'videobooth_core.app.tiny'):\n"
            "    importlib.import_module(name)\n"
            "heavy_after_core = sorted(m for m in ('transformers', 'diffusers') if m in sys.modules)\n"
            f"spec = importlib.util.spec_from_file_location('vbpack', {str(REPO / '__init__.py')!r},\n"
            f"                                              submodule_search_locations=[{str(REPO)!r}])\n"
            "pack = importlib.util.module_from_spec(spec); sys.modules['vbpack'] = pack\n"
            "spec.loader.exec_module(pack)\n"
            "print(json.dumps({'core': heavy_after_core, 'nodes': sorted(pack.NODE_CLASS_MAPPINGS),\n"
            "                  'pack': sorted(m for m in ('transformers', 'diffusers') if m in sys.modules)}))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                         check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["core"] == [], f"importing the core loaded {result['core']}"
    assert result["pack"] == [], f"importing the pack loaded {result['pack']}"
    assert len(result["nodes"]) >= 11 and all(n.startswith("VideoBooth") for n in result["nodes"]), result["nodes"]
