"""The command line run as a user runs it (``python -m videobooth_core ...`` in a subprocess, or under torchrun),
for tests/test_cli.py and tests/test_jobs.py: one environment, one launcher, the check of a run, and a reader of
the frames a run writes (decoded without the pack's own reader)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SMALL = ["--frames", "4", "--width", "64", "--height", "64", "--steps", "2"]
"""A tiny generation's flags: seconds on the tiny model set."""


def cli_env(home: Path) -> dict[str, str]:
    """The environment of a run: its own home and caches, offline, one compute thread, no inherited models folder
    or torchrun variables."""
    env = dict(os.environ)
    # one compute thread per run: on a small shared machine, spinning OpenMP threads of concurrent processes slow
    # each other down several times over, and one thread per process makes ranks compute bit-identical frames
    env.update(HOME=str(home), XDG_CACHE_HOME=str(home / ".cache"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "VIDEOBOOTH_MODELS"):
        env.pop(var, None)
    return env


def cli_command(args: list, torchrun: int = 0) -> list[str]:
    """``python -m videobooth_core ARGS``, or under ``torchrun --nproc_per_node N --standalone``."""
    module = ["-m", "videobooth_core", *map(str, args)]
    if not torchrun:
        return [sys.executable, *module]
    launcher = Path(sys.executable).parent / "torchrun"
    prefix = [str(launcher)] if launcher.exists() else [sys.executable, "-m", "torch.distributed.run"]
    return [*prefix, "--nproc_per_node", str(torchrun), "--standalone", *module]


def start_cli(args: list, home: Path, torchrun: int = 0, **popen: object) -> subprocess.Popen:
    """Start a run (output captured as text unless ``popen`` says otherwise); :func:`finish` waits for it."""
    home.mkdir(parents=True, exist_ok=True)
    popen = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True, **popen}
    return subprocess.Popen(cli_command(args, torchrun), cwd=REPO, env=cli_env(home), **popen)


def finish(proc: subprocess.Popen, timeout: float = 300) -> subprocess.CompletedProcess:
    stdout, stderr = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def run_cli(args: list, home: Path, torchrun: int = 0, timeout: float = 300) -> subprocess.CompletedProcess:
    return finish(start_cli(args, home, torchrun), timeout)


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    """``result`` if the run succeeded; else fail with its exit code and output."""
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return result


def read_frames(path: Path) -> list[np.ndarray]:
    """Decoded RGB frames of a .gif/.webp (Pillow), an .mp4 (PyAV) or a folder of PNG frames."""
    from PIL import Image, ImageSequence

    if path.is_dir():
        return [np.array(Image.open(p).convert("RGB")) for p in sorted(path.glob("frame_*.png"))]
    if path.suffix == ".mp4":
        import av

        with av.open(str(path)) as container:
            return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    with Image.open(path) as image:
        return [np.array(frame.convert("RGB")) for frame in ImageSequence.Iterator(image)]
