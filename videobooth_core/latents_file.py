"""The latents file of a generation (``generate --save-latents``, the jobs key ``save_latents``): the sampler's final
latents, before the VAE decode, next to the video, so that ``evaluate --reference`` can compute the latent MSE of a
video to its reference (:mod:`videobooth_core.evaluation.compare`) without a VAE round trip of the decoded frames.

The file is named after the output, ``OUT`` + :data:`LATENTS_SUFFIX` (``dog.mp4`` -> ``dog.mp4.latents.safetensors``,
a PNG-frames folder ``waves`` -> ``waves.latents.safetensors`` beside it): the output's own suffix stays in the
name, so ``dog.gif`` and ``dog.mp4`` never share one. It holds one float32 tensor ``latents`` of shape
(b, 4, frames, height/8, width/8) (``GenerationResult.latents``: b = 1).

Every road writes through :func:`write_result` (the command line, batch jobs, the Python API), after checking the
target with :func:`check_latents_target` before any model loads: an existing latents file is refused as an existing
video is (``--overwrite`` replaces both).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .errors import OutputError
from .files import PathLike, atomic_path, check_target

LATENTS_KEY = "latents"
"""The tensor's name in a latents file."""
LATENTS_SUFFIX = ".latents.safetensors"
"""Appended to the output's name (its suffix kept)."""


def latents_path(output: PathLike) -> Path:
    """Where the latents of the video written to ``output`` go: ``output`` + :data:`LATENTS_SUFFIX`, beside it."""
    output = Path(output)
    return output.with_name(output.name + LATENTS_SUFFIX)


def check_latents_target(output: PathLike, overwrite: bool = False, flag: str = "--overwrite") -> Path:
    """Refuse, before any heavy work, a latents file of ``output`` that exists (unless ``overwrite``) or cannot be
    written (:func:`videobooth_core.files.check_target`, an OutputError naming it and the fix). -> its path."""
    path = latents_path(output)
    try:
        check_target(path, overwrite=overwrite, flag=flag)
    except OutputError as error:
        raise OutputError(f"the video's latents file (save_latents): {error}") from None
    return path


def save_latents(path: PathLike, latents: torch.Tensor) -> Path:
    """Write ``latents`` (any shape; float32 as written, e.g. (1, 4, f, h, w)) atomically as a ``.safetensors``
    holding one tensor ``latents`` (what ``evaluate`` reads). -> the path."""
    from safetensors.torch import save_file

    path = Path(path)
    with atomic_path(path) as tmp:
        save_file({LATENTS_KEY: latents.detach().to("cpu", torch.float32).contiguous()}, str(tmp))
    return path


def write_result(result: Any, output: PathLike, fps: float, *, overwrite: bool = False,
                 save: bool = False) -> Path | None:
    """Write a generation's video (``result.frames``: (f, H, W, 3) uint8, by
    :func:`videobooth_core.video_io.write_frames`) to ``output`` and, with ``save``, its final latents
    (``result.latents``: (b, 4, f, h, w)) to :func:`latents_path` of it. The one writer of the command line, batch
    jobs and the Python API. -> the latents file's path, or None without ``save`` (nothing else written then)."""
    from .video_io import write_frames

    if save:  # checked before the video is written: a refused latents file leaves no new video either
        check_latents_target(output, overwrite=overwrite)
    write_frames(result.frames, output, fps, overwrite=overwrite)
    return save_latents(latents_path(output), result.latents) if save else None
