"""Writing frames: .mp4 (ffmpeg from the imageio-ffmpeg wheel), .gif, .webp, or a folder of PNGs.

Nothing the user made is lost: an existing output is refused unless ``overwrite`` is given, and even then a
folder is replaced only when it holds nothing but frames this module writes (``frame_00000.png``...); a folder
is never replaced by a file nor a file by a folder. Every output appears atomically: written beside the target
under a temporary name (:func:`videobooth_core.files.atomic_path`), then renamed, so an interrupted run never
leaves a half-written file where the result should be.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import torch

from ..errors import OutputError, explain
from ..files import atomic_path, check_target

VIDEO_SUFFIXES = (".mp4", ".gif", ".webp")
FRAME_NAME = re.compile(r"frame_\d{5,}\.png")
"""Names of the files in a PNG-frame folder written here (the only content that may be replaced)."""


def is_frame_folder(path: Path) -> bool:
    """True if ``path`` is a folder holding only PNG frames this module writes (no other file, no subfolder)."""
    return path.is_dir() and all(entry.is_file() and not entry.is_symlink() and FRAME_NAME.fullmatch(entry.name)
                                 for entry in path.iterdir())


def check_output_path(path: str | os.PathLike, overwrite: bool = False, fps: float | None = None) -> Path:
    """Validate an output path before any heavy work: a known suffix (or none, for a folder of PNG frames), an
    existing parent folder, nothing of the user's replaced (see the module docstring), a positive ``fps``.
    Returns the path as given (relative stays relative)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix and suffix not in VIDEO_SUFFIXES:
        raise OutputError(explain("unsupported output", path.name,
                                  "use .mp4, .gif or .webp, or a path without a suffix for a folder of PNG frames"))
    if not path.parent.exists():
        raise OutputError(explain("the output's folder does not exist", path.parent, "create it first"))
    check_target(path, overwrite=overwrite, replaceable=is_frame_folder, folder=not suffix)
    if fps is not None and not (math.isfinite(fps) and fps > 0):
        raise OutputError(explain("the frame rate must be a positive number", fps, "e.g. --fps 8"))
    if suffix == ".mp4":
        _ffmpeg()
    return path


def _ffmpeg() -> str:
    try:
        import imageio_ffmpeg
    except ImportError:
        raise OutputError("writing .mp4 needs the imageio-ffmpeg package: `pip install imageio-ffmpeg` "
                          "(or write .gif / .webp)") from None
    return imageio_ffmpeg.get_ffmpeg_exe()


def write_frames(frames: torch.Tensor, path: str | os.PathLike, fps: float = 8.0, overwrite: bool = False) -> Path:
    """Write (frames, height, width, 3) uint8 frames to ``path`` (formats and the rules on existing outputs: see
    the module docstring). A failed write (disk full, no permission) is an :class:`OutputError` and leaves no
    temporary file behind."""
    path = check_output_path(path, overwrite=overwrite, fps=fps)
    array = frames.cpu().numpy()
    suffix = path.suffix.lower()
    try:
        with atomic_path(path, folder=not suffix) as tmp:
            if not suffix:
                for i, frame in enumerate(array):
                    _pil(frame).save(tmp / f"frame_{i:05d}.png")
            elif suffix == ".mp4":
                _write_mp4(array, tmp, fps)
            else:
                images = [_pil(frame) for frame in array]
                extra = {"lossless": True} if suffix == ".webp" else {}
                images[0].save(tmp, format=suffix[1:].upper(), save_all=True, append_images=images[1:],
                               duration=int(round(1000 / fps)), loop=0, **extra)
    except OSError as error:  # disk full, permissions, ffmpeg failing: the user can fix these
        reason = " ".join((error.strerror or str(error)).split())
        raise OutputError(explain(f"cannot write the output ({reason})", path,
                                  "check free space and permissions of its folder, or choose another place")) from error
    return path


def _pil(frame):
    from PIL import Image

    return Image.fromarray(frame)


def _write_mp4(array, path: Path, fps: float) -> None:
    import imageio_ffmpeg

    height, width = array.shape[1:3]
    # yuv420p needs even sizes: pad by one pixel where needed; "-f mp4" because the temporary name has no .mp4
    writer = imageio_ffmpeg.write_frames(str(path), (width, height), fps=fps, codec="libx264", pix_fmt_out="yuv420p",
                                         macro_block_size=2, quality=8, output_params=["-f", "mp4"])
    writer.send(None)
    for frame in array:
        writer.send(frame.copy(order="C"))
    writer.close()
