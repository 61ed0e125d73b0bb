"""Errors raised by the VideoBooth core.

Every error is a ``VideoBoothError`` (a ``ValueError``) whose message names the offending value and
says how to fix it, so that hosts (ComfyUI, the command line) can show it to the user verbatim.
"""


class VideoBoothError(ValueError):
    """Base class of every error the core raises on bad input or bad files."""


class CheckpointError(VideoBoothError):
    """A weight file is missing, unreadable, unsafe, truncated, or of the wrong kind."""


class ImagePromptError(VideoBoothError):
    """The image prompt (image, mask or bounding box) cannot be used."""


class PromptError(VideoBoothError):
    """The text prompt or subject word cannot be used."""


class SamplingError(VideoBoothError):
    """Sampling settings (frames, size, steps, sampler, guidance) are invalid."""


class OutputError(VideoBoothError):
    """An output path cannot be written without destroying something, or cannot be written at all."""
