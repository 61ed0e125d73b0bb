"""Writing frames: .mp4 (ffmpeg from the imageio-ffmpeg wheel), .gif, .webp, or a folder of PNGs.

Every output appears atomically: written under a temporary name, then renamed, so an interrupted run
never leaves a half-written file where the result should be.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from ..errors import VideoBoothError

VIDEO_SUFFIXES = (".mp4", ".gif", ".webp")


def check_output_path(path: str | os.PathLike) -> Path:
    """Validate an output path before any heavy work: a known suffix, or a folder for PNG frames."""
    path = Path(path)
    if path.suffix and path.suffix.lower() not in VIDEO_SUFFIXES:
        raise VideoBoothError(
            f"unsupported output {path.name!r}: use .mp4, .gif or .webp, or a path without a suffix for PNG frames"
        )
    if not path.parent.exists():
        raise VideoBoothError(f"the output folder {path.parent} does not exist; create it first")
    if path.suffix.lower() == ".mp4":
        _ffmpeg()
    return path


def _ffmpeg() -> str:
    try:
        import imageio_ffmpeg
    except ImportError:
        raise VideoBoothError("writing .mp4 needs the imageio-ffmpeg package: `pip install imageio-ffmpeg` "
                              "(or write .gif / .webp)") from None
    return imageio_ffmpeg.get_ffmpeg_exe()


def write_frames(frames: torch.Tensor, path: str | os.PathLike, fps: float = 8.0) -> Path:
    """Write (frames, height, width, 3) uint8 frames to ``path`` (see the module docstring for formats)."""
    path = check_output_path(path)
    array = frames.cpu().numpy()
    suffix = path.suffix.lower()
    tmp_dir = Path(tempfile.mkdtemp(prefix=".videobooth-", dir=path.parent))
    try:
        if not suffix:
            for i, frame in enumerate(array):
                _pil(frame).save(tmp_dir / f"frame_{i:05d}.png")
            if path.exists():
                shutil.rmtree(path) if path.is_dir() else path.unlink()
            os.replace(tmp_dir, path)
            return path
        tmp = tmp_dir / f"video{suffix}"
        if suffix == ".mp4":
            _write_mp4(array, tmp, fps)
        else:
            images = [_pil(frame) for frame in array]
            extra = {"lossless": True} if suffix == ".webp" else {}
            images[0].save(tmp, save_all=True, append_images=images[1:], duration=int(round(1000 / fps)), loop=0, **extra)
        os.replace(tmp, path)
        return path
    finally:
        if tmp_dir.exists():
            shutil.rmtree(tmp_dir, ignore_errors=True)


def _pil(frame):
    from PIL import Image

    return Image.fromarray(frame)


def _write_mp4(array, path: Path, fps: float) -> None:
    import imageio_ffmpeg

    height, width = array.shape[1:3]
    # yuv420p needs even sizes: pad by one pixel where needed
    writer = imageio_ffmpeg.write_frames(str(path), (width, height), fps=fps, codec="libx264", pix_fmt_out="yuv420p",
                                         macro_block_size=2, quality=8)
    writer.send(None)
    for frame in array:
        writer.send(frame.copy(order="C"))
    writer.close()
