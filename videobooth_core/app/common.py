"""What the commands share (the single run, the demo, batch jobs): the cache folder, the per-step progress bar
and the closing JSON summary of a generation. Public names only, so that no command imports another's privates."""

from __future__ import annotations

import json
import os
import resource
import sys
from pathlib import Path
from typing import Any, Callable

from ..settings import DEFAULT_ATTENTION, DEFAULT_PRECISION


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/videobooth`` (default ``~/.cache/videobooth``): the tiny demo models and the error logs."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "videobooth"


def peak_memory_mb() -> float:
    """Peak resident memory of this process (MB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def progress_callback(label: str) -> Callable[[int, int, Any], None]:
    """A step callback that draws one tqdm bar named ``label`` on stderr, opened at the first step and closed
    after the last (so that a caller running several samplings gets one bar per run)."""
    from tqdm import tqdm

    bar = None

    def callback(step: int, total: int, _output: Any) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc=label, unit="step", file=sys.stderr, leave=True)
        bar.update(1)
        if step + 1 == total:
            bar.close()

    return callback


def speed_modes(options: Any) -> list[str]:
    """The opt-in speed modes of a request's ``SamplingOptions`` (empty: the exact, official computation)."""
    if options is None:
        return []
    modes = ["single-frame-image-prompt"] if options.single_frame_image_prompt else []
    if tuple(options.image_prompt_steps) != (0.0, 1.0):
        modes.append(f"image-prompt-steps {options.image_prompt_steps[0]:g}-{options.image_prompt_steps[1]:g}")
    if not options.watermark_branch:
        modes.append("no-watermark-branch")
    return modes


def run_summary(result: Any, request: Any, seconds: float, out: Path, args: Any, latents: Path | None = None) -> str:
    """The JSON line printed after ``done: ``: where the video went (and its ``latents`` file, when written), time,
    memory (estimated and measured) and the settings that made it."""
    return json.dumps({
        "output": str(out), **({"latents": str(latents)} if latents is not None else {}),
        "seconds": round(seconds, 2), "peak_rss_mb": round(peak_memory_mb(), 1),
        "frames": request.frames, "size": [request.width, request.height], "steps": request.steps,
        "sampler": request.sampler, "cfg": request.cfg_scale, "guidance": request.guidance,
        "seed": request.seed, "dtype": getattr(args, "dtype", DEFAULT_PRECISION), "prompt_used": result.prompt_used,
        "stream_weights": getattr(args, "stream_weights", False),
        "attention": getattr(args, "attention", DEFAULT_ATTENTION),
        "speed_modes": speed_modes(request.options),
        **({"lcm_cfg": request.lcm_cfg} if getattr(args, "sampler", "ddpm") == "lcm" else {}),
        **result.info,
    })
