"""Every video the pack reads or writes goes through this module: the command line's ``--extend`` and outputs,
batch jobs, the evaluation, the dataset tools and the trainer.

One decoder per kind of file, chosen by suffix:

- container videos (.mp4, .mov, .mkv, .webm, ...): PyAV, whose wheels ship FFmpeg's libraries (no system ffmpeg);
- animated .gif and .webp: Pillow (it reads animated WebP, which FFmpeg's decoder does not);
- a single image (.png, .jpg, .jpeg) is a one-frame video, and a folder of such images a video of its files
  sorted by name (read like an image prompt: :func:`videobooth_core.conditioning.image_prompt.load_image`).

Frames are ``(T, H, W, 3)`` uint8 RGB. Frame counts come from decoding (a container's own frame count is missing
or wrong for many files), so counts and indices always agree with what decoding yields.

Writing (:func:`write_frames`): .mp4 (H.264, yuv420p, PyAV), .gif, lossless .webp (Pillow) or a folder of PNG
frames. Nothing the user made is lost: an existing output is refused unless ``overwrite`` is given, and even then
a folder is replaced only when it holds nothing but frames this module writes (``frame_00000.png``...); a folder
is never replaced by a file nor a file by a folder. Every output appears atomically (written beside the target
under a temporary name by :func:`videobooth_core.files.atomic_path`, then renamed), so an interrupted run never
leaves a half-written file where the result should be.
"""

from __future__ import annotations

import math
import re
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .errors import OutputError, VideoError, explain
from .files import PathLike, atomic_path, check_target

if TYPE_CHECKING:  # torch is imported by the functions that return tensors: importing this module stays cheap
    import torch

CONTAINER_SUFFIXES = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v", ".mpg", ".mpeg", ".ts", ".flv", ".wmv")
ANIMATION_SUFFIXES = (".gif", ".webp")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
READ_SUFFIXES = CONTAINER_SUFFIXES + ANIMATION_SUFFIXES + IMAGE_SUFFIXES
WRITE_SUFFIXES = (".mp4", ".gif", ".webp")
"""What :func:`write_frames` writes (a path without a suffix is a folder of PNG frames)."""
FRAME_NAME = re.compile(r"frame_\d{5,}\.png")
"""Names of the files in a PNG-frame folder written here (the only content that may be replaced)."""
MP4_CRF = 10
"""H.264 quality of the outputs (0 is lossless, 51 the worst): what imageio-ffmpeg's ``quality=8`` gave before."""


@dataclass(frozen=True)
class VideoInfo:
    """What decoding a video yields: number of frames, width, height and frames per second (0 if unknown)."""

    frames: int
    width: int
    height: int
    fps: float


# -- reading ------------------------------------------------------------------------------------------------------
def iter_frames(path: PathLike) -> Iterator[np.ndarray]:
    """Yield every frame of a video, animation, image or folder of images as (H, W, 3) uint8 RGB, one at a time
    (a long video never has to fit in memory). Missing, unreadable or broken files raise :class:`VideoError`."""
    path = Path(path).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise VideoError(explain("the folder holds no .png or .jpg frames", path,
                                     "give a video file or a folder of frames"))
        return (_image(p) for p in files)
    if not path.is_file():
        raise VideoError(explain("video not found", path, "check the path"))
    suffix = path.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        return iter([_image(path)])
    if suffix in ANIMATION_SUFFIXES:
        return _pillow_frames(path)
    if suffix in CONTAINER_SUFFIXES:
        return _pyav_frames(path)
    raise VideoError(explain("not a video this pack reads", path.name,
                             "give .mp4/.mov/.mkv/.webm..., .gif, .webp, an image or a folder of PNG frames"))


def read_video(path: PathLike) -> torch.Tensor:
    """Every frame (see :func:`iter_frames` for the kinds of file) -> (T, H, W, 3) uint8."""
    return _stacked(list(iter_frames(path)), path)


def read_last_frames(path: PathLike, count: int) -> torch.Tensor:
    """The last ``count`` frames -> (min(count, T), H, W, 3) uint8; only those are kept while decoding."""
    return _stacked(list(deque(iter_frames(path), maxlen=count)), path)


def read_frames(path: PathLike, indices: Sequence[int]) -> torch.Tensor:
    """The frames at ``indices`` (any order, repeats allowed) -> (len(indices), H, W, 3) uint8.

    Decodes sequentially up to the largest index and keeps only the wanted frames (videos are short clips); an
    index past the end raises :class:`VideoError`.
    """
    if len(indices) == 0:
        raise VideoError("read_frames needs at least one frame index")
    wanted = {int(i) for i in indices}
    if min(wanted) < 0:
        raise VideoError(explain("frame indices must be >= 0; got", min(wanted), "count frames from 0"))
    kept: dict[int, np.ndarray] = {}
    last = max(wanted)
    for number, frame in enumerate(iter_frames(path)):
        if number in wanted:
            kept[number] = frame
        if number >= last:
            break
    if last not in kept:
        raise VideoError(explain(f"the video has fewer than {last + 1} decodable frames (frame {last} was asked for)",
                                 path, "rebuild the entry or re-encode the video"))
    import torch

    return torch.from_numpy(np.stack([kept[int(i)] for i in indices]))


def video_info(path: PathLike) -> VideoInfo:
    """Decode the whole video once to count its frames, and read its size and frame rate."""
    count, shape = 0, None
    for frame in iter_frames(path):
        count += 1
        shape = frame.shape
    if count == 0 or shape is None:
        raise VideoError(explain("the video has no decodable frame", path, "re-encode or remove it"))
    return VideoInfo(frames=count, width=int(shape[1]), height=int(shape[0]), fps=_frame_rate(Path(path)))


def _stacked(frames: list[np.ndarray], path: PathLike) -> torch.Tensor:
    if not frames:
        raise VideoError(explain("no frames could be read from", path, "check the file"))
    if len({frame.shape for frame in frames}) > 1:
        raise VideoError(explain("the frames differ in size", path, "give frames of one size"))
    import torch

    return torch.from_numpy(np.stack(frames)).contiguous()


def _image(path: Path) -> np.ndarray:
    from .conditioning.image_prompt import load_image
    from .errors import ImagePromptError

    try:
        return load_image(path).numpy()
    except ImagePromptError as error:
        raise VideoError(str(error)) from error


def _pillow_frames(path: Path) -> Iterator[np.ndarray]:
    from PIL import Image, ImageSequence

    try:
        with Image.open(path) as image:
            for frame in ImageSequence.Iterator(image):
                yield np.asarray(frame.convert("RGB"))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise VideoError(explain(f"cannot read the animation ({error})", path, "re-encode it or give .mp4")) from error


def _av():
    try:
        import av
    except ImportError:
        raise VideoError("reading and writing .mp4 needs PyAV: `pip install av` (its wheels ship their own FFmpeg)"
                         ) from None
    return av


def _pyav_frames(path: Path) -> Iterator[np.ndarray]:
    av = _av()
    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, OSError, ValueError) as error:
        raise VideoError(explain(f"cannot read the video ({error})", path,
                                 "use a valid video file (mp4, mkv, webm, ...)")) from error
    try:
        if not container.streams.video:
            raise VideoError(explain("no video stream in", path, "use a video file"))
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        try:
            for frame in container.decode(stream):
                yield frame.to_ndarray(format="rgb24")
        except (av.error.FFmpegError, OSError, ValueError) as error:
            raise VideoError(explain(f"the video is broken ({error})", path, "re-encode or remove it")) from error
    finally:
        container.close()


def _frame_rate(path: Path) -> float:
    """Frames per second as the file states it: the container's average rate, an animation's frame duration."""
    suffix = path.suffix.lower()
    if suffix in CONTAINER_SUFFIXES:
        av = _av()
        with av.open(str(path)) as container:
            rate = container.streams.video[0].average_rate
        return float(rate) if rate else 0.0
    if suffix in ANIMATION_SUFFIXES:
        from PIL import Image

        with Image.open(path) as image:
            image.load()  # WebP states the duration of its first frame only once it is decoded
            duration = image.info.get("duration") or 0
        return 1000.0 / duration if duration else 0.0
    return 0.0


# -- writing ------------------------------------------------------------------------------------------------------
def is_frame_folder(path: Path) -> bool:
    """True if ``path`` is a folder holding only PNG frames this module writes (no other file, no subfolder)."""
    return path.is_dir() and all(entry.is_file() and not entry.is_symlink() and FRAME_NAME.fullmatch(entry.name)
                                 for entry in path.iterdir())


def check_output_path(path: PathLike, overwrite: bool = False, fps: float | None = None) -> Path:
    """Validate an output path before any heavy work: a known suffix (or none, for a folder of PNG frames), an
    existing parent folder, nothing of the user's replaced (see the module docstring), a positive ``fps``.
    Returns the path as given (relative stays relative)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix and suffix not in WRITE_SUFFIXES:
        raise OutputError(explain("unsupported output", path.name,
                                  "use .mp4, .gif or .webp, or a path without a suffix for a folder of PNG frames"))
    if not path.parent.exists():
        raise OutputError(explain("the output's folder does not exist", path.parent, "create it first"))
    check_target(path, overwrite=overwrite, replaceable=is_frame_folder, folder=not suffix)
    if fps is not None and not (math.isfinite(fps) and fps > 0):
        raise OutputError(explain("the frame rate must be a positive number", fps, "e.g. --fps 8"))
    if suffix == ".mp4":
        check_mp4_writer()
    return path


def check_mp4_writer() -> None:
    """Raise :class:`OutputError` if .mp4 cannot be written here (PyAV missing, or built without libx264)."""
    try:
        av = _av()
    except VideoError as error:
        raise OutputError(f"{error} (or write .gif / .webp)") from None
    if "libx264" not in av.codecs_available:
        raise OutputError("writing .mp4 needs PyAV with the libx264 encoder (its PyPI wheels have it): "
                          "`pip install --force-reinstall av`, or write .gif / .webp")


def write_frames(frames: torch.Tensor, path: PathLike, fps: float = 8.0, overwrite: bool = False) -> Path:
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
                write_mp4(tmp, _even(array), fps, crf=MP4_CRF)
            else:
                images = [_pil(frame) for frame in array]
                extra = {"lossless": True} if suffix == ".webp" else {}
                images[0].save(tmp, format=suffix[1:].upper(), save_all=True, append_images=images[1:],
                               duration=int(round(1000 / fps)), loop=0, **extra)
    except (OSError, VideoError) as error:  # disk full, permissions, the encoder failing: the user can fix these
        reason = " ".join((getattr(error, "strerror", None) or str(error)).split())
        raise OutputError(explain(f"cannot write the output ({reason})", path,
                                  "check free space and permissions of its folder, or choose another place")) from error
    return path


def write_mp4(path: PathLike, frames: np.ndarray, fps: float = 8.0, crf: int = 18) -> None:
    """Write (T, H, W, 3) uint8 RGB frames as H.264 (yuv420p) in an MP4 container, whatever ``path``'s suffix.

    Odd sizes are refused (yuv420p needs even width and height). Deterministic: the same frames give the same
    bytes (single-threaded encoder, no timestamps from the clock).
    """
    av = _av()
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[3] != 3 or frames.dtype != np.uint8:
        raise VideoError(f"frames must be (T, H, W, 3) uint8; got {frames.shape} {frames.dtype}")
    height, width = int(frames.shape[1]), int(frames.shape[2])
    if height % 2 or width % 2:
        raise VideoError(f"H.264 needs even frame sizes; got {width}x{height}: crop or pad by one pixel")
    try:
        with av.open(str(path), mode="w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1000))
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            stream.options = {"crf": str(crf), "preset": "medium", "threads": "1"}
            for array in frames:
                for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(array), format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
    except av.error.FFmpegError as error:
        raise VideoError(explain(f"the encoder failed ({error})", path, "check the frames and the disk")) from error


def _even(array: np.ndarray) -> np.ndarray:
    """Pad an odd height or width by repeating the last row or column (yuv420p needs even sizes)."""
    height, width = array.shape[1:3]
    return np.pad(array, ((0, 0), (0, height % 2), (0, width % 2), (0, 0)), mode="edge")


def _pil(frame: np.ndarray):
    from PIL import Image

    return Image.fromarray(frame)
