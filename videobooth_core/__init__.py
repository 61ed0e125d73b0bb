"""VideoBooth core: a self-contained reimplementation of VideoBooth (arXiv 2312.00777).

Depends only on torch, diffusers, transformers, safetensors and einops; never on a host application.
Importing this package is cheap: heavy modules are imported by the functions that need them.
"""

from .errors import (
    CheckpointError,
    DeviceError,
    ImagePromptError,
    JobsError,
    OutOfMemory,
    OutputError,
    PromptError,
    SamplingError,
    VideoBoothError,
)

__all__ = [
    "CheckpointError",
    "DeviceError",
    "ImagePromptError",
    "JobsError",
    "OutOfMemory",
    "OutputError",
    "PromptError",
    "SamplingError",
    "VideoBoothError",
]
__version__ = "0.1.0"
