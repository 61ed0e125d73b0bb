"""Peak-memory estimate of a guided denoising step, made before sampling starts.

The estimate is a *dry run*: the same step (same code path, batching, speed modes, feed-forward chunks) runs
on a twin of the UNet on PyTorch's ``meta`` device, where tensors have shapes but no storage, while a dispatch
mode records when every intermediate tensor is created and freed. Its peak of live bytes plus the resident
weights is the estimate; it costs about a second at the released size and no real memory.

On the CPU the process's own memory besides the weights (Python, PyTorch, libraries) is added, as measured
(at least :data:`CPU_RUNTIME_BYTES`). Not counted: kernel workspaces (small next to the activations) and the
allocator's slack (see :func:`videobooth_core.allocator.apply_allocator`).
"""

from __future__ import annotations

import dataclasses
import os
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from ..models.attention import SiteProjections

CPU_RUNTIME_BYTES = 300 * 2**20
"""Least process memory besides the weights assumed on the CPU (Python + PyTorch); the estimate uses what the
process holds beyond its weights when that is more (diffusers, transformers and the encoders' buffers)."""


class LiveTensorTracker(TorchDispatchMode):
    """Tracks the bytes held by tensors created while it is active, and their peak.

    Storage is the unit: views and in-place results share their input's storage and add nothing. Tensors
    created before the tracker (weights, inputs) are not counted.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live_bytes = 0
        self.peak_bytes = 0
        self._storages: dict[int, list[int]] = {}  # storage id -> [bytes, live tensors]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - the dispatch protocol
        kwargs = kwargs or {}
        inputs = {_storage_id(t) for t in _tensors((args, kwargs))}
        out = func(*args, **kwargs)
        for tensor in _tensors(out):
            key = _storage_id(tensor)
            if key in inputs and key not in self._storages:
                continue  # an alias of a tensor from outside (a weight's transpose, a view of an input)
            entry = self._storages.get(key)
            if entry is None:
                entry = self._storages[key] = [tensor.untyped_storage().nbytes(), 0]
                self.live_bytes += entry[0]
                self.peak_bytes = max(self.peak_bytes, self.live_bytes)
            entry[1] += 1
            weakref.finalize(tensor, self._release, key)
        return out

    def _release(self, key: int) -> None:
        entry = self._storages.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.live_bytes -= entry[0]
            del self._storages[key]


def _tensors(tree: Any) -> list[torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, (list, tuple)):
        return [t for item in tree for t in _tensors(item)]
    if isinstance(tree, dict):
        return [t for item in tree.values() for t in _tensors(item)]
    return []


def _storage_id(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage()._cdata


def peak_activation_bytes(run: Callable[[], Any]) -> int:
    """Peak bytes of the tensors ``run`` creates (on any device, ``meta`` included), under inference mode.

    Under inference mode composite operators reach the tracker whole, so attention counts its output only, as
    the fused kernels allocate (on ``meta`` its math form, with score matrices, runs untracked beneath)."""
    tracker = LiveTensorTracker()
    with torch.inference_mode(), tracker:
        result = run()
        del result
    return tracker.peak_bytes


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes, per part. ``total_bytes`` is what to expect as peak (GPU memory, or process memory on the CPU)."""

    weights_bytes: int
    activations_bytes: int
    runtime_bytes: int
    device: str

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.activations_bytes + self.runtime_bytes

    def describe(self) -> str:
        gb = 2**30
        parts = f"weights {self.weights_bytes / gb:.2f} GB + activations {self.activations_bytes / gb:.2f} GB"
        if self.runtime_bytes:
            parts += f" + runtime {self.runtime_bytes / gb:.2f} GB"
        return f"estimated peak memory on {self.device}: {self.total_bytes / gb:.2f} GB ({parts})"

    def as_dict(self) -> dict[str, float]:
        mb = 2**20
        return {"estimated_peak_mb": round(self.total_bytes / mb, 1), "estimated_weights_mb": round(self.weights_bytes / mb, 1),
                "estimated_activations_mb": round(self.activations_bytes / mb, 1)}


def resident_weight_bytes(modules: list[nn.Module]) -> int:
    """Bytes of the distinct parameters and buffers of ``modules`` that have real storage (meta ones excluded)."""
    seen: set[int] = set()
    total = 0
    for module in modules:
        for tensor in [*module.parameters(), *module.buffers()]:
            if tensor.device.type == "meta" or id(tensor) in seen:
                continue
            seen.add(id(tensor))
            total += tensor.numel() * tensor.element_size()
    return total


def meta_twin(unet: nn.Module) -> nn.Module:
    """A storage-free copy of a :class:`~videobooth_core.models.unet_3d.UNet3DModel` (same config, dtype, attached
    projections, attention backends)."""
    from ..models.unet_3d import UNet3DModel

    dtype = next(unet.parameters()).dtype
    with torch.device("meta"):
        twin = UNet3DModel(unet.config).to(dtype)
    if unet.attached_projections is not None:
        twin.attach_projections(
            {site: SiteProjections(**{name: _meta_linear(getattr(projections, name))
                                      for name in SiteProjections.__dataclass_fields__})
             for site, projections in unet.attached_projections.items()},
            release_own=unet.released_own_projections,
        )
    for name, module in unet.named_modules():  # by name: the twin has the same modules (released ones too)
        if hasattr(module, "backend"):
            twin.get_submodule(name).backend = module.backend
    return twin.requires_grad_(False)


def meta_denoiser(denoiser: Any) -> Any:
    """A :class:`~.denoiser.VideoDenoiser` with every setting of ``denoiser`` on the meta twin of
    its UNet: it runs the same step without storage (memory estimate, FLOP count)."""
    from .denoiser import VideoDenoiser

    meta = torch.device("meta")
    return VideoDenoiser(
        meta_twin(denoiser.unet), denoiser.cond_text.to(meta), denoiser.null_text.to(meta), denoiser.cfg_scale,
        denoiser.guidance, batch_passes=denoiser.batch_passes,
        single_frame_image_prompt=denoiser.single_frame_image_prompt, watermark_branch=denoiser.watermark_branch,
        image_prompt_strength=denoiser.image_prompt_strength, subject_strengths=denoiser.subject_strengths,
        subject_regions=denoiser.subject_regions,
    )


def _meta_linear(linear: nn.Linear) -> nn.Linear:
    with torch.device("meta"):
        return nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None,
                         dtype=linear.weight.dtype)


def estimate_step_memory(
    denoiser: Any,
    shape: tuple[int, int, int, int, int],
    image_prompt: bool,
    device: torch.device | str,
    extra_modules: list[nn.Module] | None = None,
) -> MemoryEstimate:
    """Estimate the peak memory of one guided step of ``denoiser`` (a :class:`~.denoiser.VideoDenoiser`).

    Args:
        shape: (b, 4, frames, h, w) of the video latent.
        image_prompt: whether the step runs the image-prompt stream.
        device: where sampling runs (decides whether the CPU runtime is added).
        extra_modules: other resident models to count (the mapper, encoders).
    """
    dry = meta_denoiser(denoiser)
    meta = torch.device("meta")
    x_t = torch.empty(shape, device=meta)
    streams = getattr(denoiser, "image_prompt_streams", 1)  # several subjects: one image-prompt stream each
    exemplar = torch.empty((shape[0] * streams, *shape[1:]), device=meta) if image_prompt else None
    activations = peak_activation_bytes(lambda: dry.predict(x_t, 500, exemplar))
    weights = resident_weight_bytes([denoiser.unet, *_projection_modules(denoiser.unet), *(extra_modules or [])])
    streamer = getattr(denoiser.unet, "weight_streamer", None)
    if streamer is not None:  # streamed weights: one block resident at a time
        weights += streamer.largest_unit_bytes
    device = torch.device(device)
    runtime = 0
    if device.type == "cpu":  # what this process holds besides the weights (libraries, encoders' buffers)
        resident = current_rss_bytes()
        runtime = max(CPU_RUNTIME_BYTES, resident - weights if resident is not None else 0)
    return MemoryEstimate(weights, activations, runtime, str(device))


def estimate_windowed_memory(
    denoiser: Any,
    shape: tuple[int, int, int, int, int],
    context: Any,
    image_prompt: bool,
    device: torch.device | str,
    extra_modules: list[nn.Module] | None = None,
) -> MemoryEstimate:
    """The peak of one step of a long video denoised by context windows (:mod:`.windows`): one window's guided
    step (``context.window`` frames; the image-prompt stream, captured once per step, is no larger than the
    window's batched pass) plus what the step holds for the whole video, in float32: the sample, the noised image
    prompt, the three fused predictions and the known frames with their noise (start image, extension anchors).
    Bounded by the window: the per-video part is about 1 MB per 16 frames at 256 x 256."""
    window_shape = (shape[0], shape[1], min(shape[2], context.window), shape[3], shape[4])
    estimate = estimate_step_memory(denoiser, window_shape, image_prompt, device, extra_modules)
    video_bytes = shape[0] * shape[1] * shape[2] * shape[3] * shape[4] * 4
    held = video_bytes * (4 + int(image_prompt) + 2)
    return dataclasses.replace(estimate, activations_bytes=estimate.activations_bytes + held)


def current_rss_bytes() -> int | None:
    """Resident memory of this process now (Linux), or None."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _projection_modules(unet: nn.Module) -> list[nn.Module]:
    """The mapper's projections the UNet attends with (not its own modules, so not in ``unet.parameters()``)."""
    projections = unet.attached_projections or {}
    return [getattr(p, name) for p in projections.values() for name in SiteProjections.__dataclass_fields__]


def available_memory_bytes(device: torch.device | str) -> int | None:
    """Free memory where sampling runs: a CUDA device's free memory, or the system's MemAvailable on the CPU
    (Linux); None when unknown."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as meminfo:
                for line in meminfo:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
    return None
