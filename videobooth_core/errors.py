"""Errors raised by the VideoBooth core: one hierarchy, one message template.

Every error is a ``VideoBoothError`` (a ``ValueError``) whose message says what is wrong, names the offending
value and says how to fix it, so that hosts (ComfyUI, the command line) can show it to the user verbatim as
one line. :func:`explain` writes messages in that shape: ``"<what is wrong>: <value>; <the fix>"``.

This module imports nothing heavy (no torch): the command line classifies failures with it before, and
after, the models are loaded.
"""

from __future__ import annotations

from typing import Any


def explain(what: str, value: Any, fix: str) -> str:
    """The one message template: ``"<what is wrong>: <value>; <the fix>"`` (value shown with ``repr`` for
    strings and paths, so spaces and empty values stay visible)."""
    shown = repr(str(value)) if isinstance(value, (str, bytes)) or hasattr(value, "__fspath__") else str(value)
    return f"{what}: {shown}; {fix}"


class VideoBoothError(ValueError):
    """Base class of every error the core raises on bad input, bad files or a failed run the user can fix."""


class CheckpointError(VideoBoothError):
    """A weight file is missing, unreadable, unsafe, truncated, or of the wrong kind."""


class ModelMismatchError(CheckpointError):
    """The UNet and the mapper do not belong together (different releases, sizes or precisions)."""


class ModelConfigError(VideoBoothError):
    """A model configuration (passed in code, an official config, or one stored in a weight file) describes no
    model that can be built."""


class ImagePromptError(VideoBoothError):
    """The image prompt (image, mask or bounding box) cannot be used."""


class PromptError(VideoBoothError):
    """The text prompt or subject word cannot be used."""


class SamplingError(VideoBoothError):
    """Sampling settings (frames, size, steps, sampler, guidance) are invalid."""


class OutputError(VideoBoothError):
    """An output path cannot be written without destroying something, or cannot be written at all."""


class VideoError(VideoBoothError):
    """A video, animation or folder of frames cannot be read, or frames cannot be encoded."""


class JobsError(VideoBoothError):
    """The jobs file, or one of its lines, cannot be used."""


class DeviceError(VideoBoothError):
    """The requested device (``cpu``, ``cuda``, ``cuda:N``...) does not exist or cannot be used here."""


class OutOfMemory(VideoBoothError):
    """A generation ran out of memory (GPU or CPU); the message names the settings that need less."""


OUT_OF_MEMORY_FIX = ("use less memory: --stream-weights (the UNet's weights read from disk block by block), "
                     "--dtype bf16, fewer --frames, or a smaller --width/--height")


def out_of_memory(error: BaseException, where: str = "while generating") -> OutOfMemory | None:
    """An :class:`OutOfMemory` for ``error`` if it is an out-of-memory failure (``torch.OutOfMemoryError`` on a
    GPU, ``MemoryError``, or the CPU allocator's ``RuntimeError: ... not enough memory``), else ``None``.
    Recognised by type name and message, so torch need not be imported to classify."""
    names = {cls.__name__ for cls in type(error).__mro__}
    text = " ".join(str(error).split())
    if not ({"OutOfMemoryError", "MemoryError"} & names or (
            isinstance(error, RuntimeError) and ("not enough memory" in text or "out of memory" in text.lower()))):
        return None
    detail = text[:200] + ("..." if len(text) > 200 else "")
    return OutOfMemory(explain(f"out of memory {where}", detail or type(error).__name__, OUT_OF_MEMORY_FIX))


class DatasetError(VideoBoothError):
    """A training dataset, one of its videos, captions or masks, or a dataset command's input cannot be used."""


class EvaluationError(VideoBoothError):
    """An evaluation input (videos, the evaluation set, the metric models, a ranking metric) cannot be used."""


class TrainingError(VideoBoothError):
    """A bad training setting, dataset entry or checkpoint."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (a cluster scheduler's or ``kill``'s stop) turned into an interruption, so that a long run ends as it
    does on Ctrl-C (the trainer writes its checkpoint first); the command line exits with 143 (128 + SIGTERM)."""
