"""The training peak-memory check, made before the first step (``--no-memory-check`` skips it).

Estimate = resident weights (UNet, VAE, CLIP towers, mapper) + the trained parameters' gradients, AdamW moments
and EMA copy + the peak of one step's activations, measured by a dry run of the step (the trainer's image-prompt
pass, prediction, loss and backward, with gradient checkpointing as configured) on a storage-free ``meta`` twin
of the UNet under the sampling memory estimate's :class:`~..sampling.memory.LiveTensorTracker`, + the CPU
runtime. Under bf16/fp16 the twin runs in that dtype (autocast keeps a few reductions in float32: a slight
under-count). Attention on ``meta`` takes PyTorch's math form, whose score matrices the backward keeps: an
over-count next to the fused kernels on GPUs, so the check errs on the side of stopping.
"""

from __future__ import annotations

import gc
import logging
from typing import Any

import torch

from ..errors import explain
from ..sampling.memory import (CPU_RUNTIME_BYTES, LiveTensorTracker, MemoryEstimate, current_rss_bytes,
                               available_memory_bytes, meta_twin, resident_weight_bytes)
from ..settings import VAE_SCALE
from .config import TrainConfig, TrainingError

logger = logging.getLogger(__name__)

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def estimate_training_memory(config: TrainConfig, models: dict[str, Any], params: list[torch.nn.Parameter],
                             device: torch.device | str) -> MemoryEstimate:
    """Peak memory of one training step of ``config`` (per process) with ``models`` (:func:`.loop.load_training_models`)
    and the trained ``params``."""
    unet = models["unet"]
    twin = meta_twin(unet)
    twin.gradient_checkpointing = config.gradient_checkpointing
    dtype = _DTYPES.get(config.mixed_precision, next(unet.parameters()).dtype)
    twin.to(dtype)
    trained = {id(p) for p in params}
    for site, projections in (twin.attached_projections or {}).items():
        source = unet.attached_projections[site]
        for name in projections.__dataclass_fields__:
            linear = getattr(projections, name).to(dtype)
            linear.weight.requires_grad_(id(getattr(source, name).weight) in trained)
    meta = torch.device("meta")
    b, size, frames = config.batch_size, config.size // VAE_SCALE, config.frames
    width = twin.config.cross_attention_dim
    latent = (b, twin.config.in_channels, frames, size, size)
    noisy, noise = torch.empty(latent, device=meta, dtype=dtype), torch.empty(latent, device=meta, dtype=dtype)
    timesteps = torch.zeros((b,), dtype=torch.long, device=meta)
    null = torch.empty((b, 77, width), device=meta, dtype=dtype)
    states = torch.empty((b, 77, width), device=meta, dtype=dtype, requires_grad=True)  # from the mapper's splice

    def step() -> None:
        features = None
        if config.stage == 2:
            exemplar = torch.empty(latent, device=meta, dtype=dtype)
            features = twin.capture_image_prompt_features(exemplar, timesteps, null)
        prediction = twin(noisy, timesteps, states, image_prompt_features=features)
        loss = torch.nn.functional.mse_loss(prediction.float(), noise.float())
        loss.backward()

    tracker = LiveTensorTracker()
    collecting = gc.isenabled()
    gc.collect()
    gc.disable()  # a collection in mid-step would free cyclic garbage at a random moment: a random peak
    try:
        with tracker:
            step()
    finally:
        if collecting:
            gc.enable()
    trained_bytes = sum(p.numel() * p.element_size() for p in params)
    # the UNet's attached projections are the mapper's own modules, counted with it
    frozen = [models[name] for name in ("unet", "vae", "text", "vision", "mapper")]
    # weights + gradients, AdamW's two moments and the EMA copy of the trained parameters
    weights = resident_weight_bytes(frozen) + 4 * trained_bytes
    runtime = 0
    if torch.device(device).type == "cpu":
        resident = current_rss_bytes()
        runtime = max(CPU_RUNTIME_BYTES, resident - weights if resident is not None else 0)
    return MemoryEstimate(weights, tracker.peak_bytes, runtime, str(device))


def added_bytes(estimate: MemoryEstimate, params: list[torch.nn.Parameter]) -> int:
    """What a step adds to loaded models: its activations and the trained parameters' gradients, AdamW moments
    and EMA copy (allocated when training starts)."""
    return estimate.activations_bytes + 4 * sum(p.numel() * p.element_size() for p in params)


def check_training_memory(config: TrainConfig, models: dict[str, Any], params: list[torch.nn.Parameter],
                          device: torch.device | str, available: int | None = None) -> MemoryEstimate:
    """Raise :class:`TrainingError` (naming the estimate, what is free and the fixes) when what one step of this
    run adds to the loaded models (activations; gradients, AdamW moments and EMA of the trained parameters) exceeds
    ``available`` (default: the free memory on ``device``, from which the loaded models are already taken);
    returns the estimate."""
    estimate = estimate_training_memory(config, models, params, device)
    needed = added_bytes(estimate, params)
    available = available_memory_bytes(device) if available is None else available
    logger.info("%s; the step adds %.2f GB to the loaded models (free: %s)", estimate.describe(), needed / 2**30,
                "unknown" if available is None else f"{available / 2**30:.2f} GB")
    if available is not None and needed > available:
        fixes = []
        if not config.gradient_checkpointing:
            fixes.append("--gradient-checkpointing")
        if config.mixed_precision == "no" and config.dtype == "float32":
            fixes.append("--mixed-precision bf16")
        if config.batch_size > 1:
            fixes.append(f"--batch-size {max(1, config.batch_size // 2)} with --grad-accum "
                         f"{config.grad_accum * 2} (the same global batch)")
        fixes.append("fewer --frames or a smaller --size (off the official recipe)")
        raise TrainingError(explain(
            f"too little memory on {estimate.device} for this training step ({estimate.describe()}): it adds "
            f"{needed / 2**30:.2f} GB to the loaded models, free is",
            f"{available / 2**30:.2f} GB", "use " + ", ".join(fixes) + " (or --no-memory-check to try anyway)"))
    return estimate
