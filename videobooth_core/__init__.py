"""VideoBooth core: a self-contained reimplementation of VideoBooth (arXiv 2312.00777) that reproduces the
official code number for number, for the ComfyUI nodes (``nodes/``) and headless use: the command line
(``python -m videobooth_core``), the Python API (:class:`videobooth_core.pipeline.VideoBoothPipeline`), batch jobs
and the trainer.

Folders, in the order data flows through a generation: ``loading`` (weight files, one module per model family),
``models`` (the 3D UNet and the mapper), ``conditioning`` (image prompt, text, the frozen encoders' features),
``sampling`` (denoiser, samplers, long videos, memory estimate), then ``pipeline`` (load once, generate many) with
``subjects_generation`` (several subjects' conditioning); ``settings`` holds every setting's default and range and
the one validation; ``errors``, ``files``, ``video_io`` and ``allocator`` serve them all. On top: ``app`` (command
line, batch jobs, demo, tiny model sets), ``dataset``, ``evaluation`` and ``training``.

Depends on torch, diffusers, transformers, safetensors, einops, numpy, Pillow and PyAV; never on a host
application. Importing this package is cheap: heavy modules are imported by the functions that need them.
"""

from .errors import (
    CheckpointError,
    DatasetError,
    DeviceError,
    EvaluationError,
    ImagePromptError,
    JobsError,
    ModelConfigError,
    ModelMismatchError,
    OutOfMemory,
    OutputError,
    PromptError,
    SamplingError,
    TrainingError,
    VideoBoothError,
    VideoError,
)

__all__ = [
    "CheckpointError",
    "DatasetError",
    "DeviceError",
    "EvaluationError",
    "ImagePromptError",
    "JobsError",
    "ModelConfigError",
    "ModelMismatchError",
    "OutOfMemory",
    "OutputError",
    "PromptError",
    "SamplingError",
    "TrainingError",
    "VideoBoothError",
    "VideoError",
]
__version__ = "0.1.0"
