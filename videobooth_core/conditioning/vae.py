"""Encoding images to the Stable Diffusion VAE's scaled latents and decoding them (loading the VAE:
:mod:`videobooth_core.loading.vae`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from einops import rearrange

from ..errors import SamplingError, VideoBoothError, explain
from ..loading.vae import SD_VAE_SCALING_FACTOR

if TYPE_CHECKING:
    import diffusers

__all__ = ["SD_VAE_SCALING_FACTOR", "decode_video", "frames_to_uint8", "vae_decode", "vae_encode",
           "vae_scaling_factor"]


def vae_scaling_factor(vae: diffusers.AutoencoderKL, scaling_factor: float | None) -> float:
    """``scaling_factor`` if given, else the VAE config's, else SD 1.x's 0.18215."""
    if scaling_factor is not None:
        return float(scaling_factor)
    return float(getattr(vae.config, "scaling_factor", None) or SD_VAE_SCALING_FACTOR)


def vae_encode(
    vae: diffusers.AutoencoderKL,
    pixels: torch.Tensor,
    generator: torch.Generator | None = None,
    sample: bool = True,
    scaling_factor: float | None = None,
) -> torch.Tensor:
    """Encode images to scaled latents, as the official code does (``latent_dist.sample() * 0.18215``).

    Args:
        vae: the VAE.
        pixels: ``(N, 3, H, W)`` in ``[-1, 1]``; H and W divisible by the VAE downscale (8).
        generator: draws the posterior noise (on the generator's device, CPU for ``None``), then moved to the
            VAE's device, so results do not depend on the accelerator.
        sample: draw ``mean + std * randn`` (True) or return the posterior mean (False).
        scaling_factor: defaults to ``vae.config.scaling_factor`` (0.18215 for SD 1.x).

    Returns:
        Latents ``(N, latent_channels, H/8, W/8)`` in the VAE's dtype, times the scaling factor.
    """
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    if pixels.ndim != 4 or pixels.shape[1] != vae.config.in_channels:
        raise VideoBoothError(explain(f"vae_encode expects pixels of shape (N, {vae.config.in_channels}, H, W); got",
                                      tuple(pixels.shape), "convert images to channels-first batches"))
    if pixels.shape[-1] % factor or pixels.shape[-2] % factor:
        raise VideoBoothError(explain(f"vae_encode expects H and W divisible by {factor}; got",
                                      tuple(pixels.shape[-2:]), f"resize or crop the images to a multiple of {factor}"))
    param = next(vae.parameters())
    with torch.no_grad():
        dist = vae.encode(pixels.to(device=param.device, dtype=param.dtype)).latent_dist
        latents = dist.mean
        if sample:
            noise_device = generator.device if generator is not None else torch.device("cpu")
            noise = torch.randn(dist.mean.shape, generator=generator, device=noise_device, dtype=dist.mean.dtype)
            latents = dist.mean + dist.std * noise.to(dist.mean.device)
    return latents * vae_scaling_factor(vae, scaling_factor)


def vae_decode(
    vae: diffusers.AutoencoderKL,
    latents: torch.Tensor,
    chunk_size: int = 8,
    scaling_factor: float | None = None,
) -> torch.Tensor:
    """Decode scaled latents to images, ``chunk_size`` frames at a time to bound memory.

    Args:
        vae: the VAE.
        latents: ``(N, latent_channels, h, w)`` scaled latents (e.g. video frames flattened into N).
        chunk_size: frames decoded per VAE call (>= 1).
        scaling_factor: defaults to ``vae.config.scaling_factor``; latents are divided by it.

    Returns:
        Pixels ``(N, 3, 8h, 8w)``, nominally in ``[-1, 1]`` (not clamped), in the VAE's dtype.
    """
    if latents.ndim != 4 or latents.shape[1] != vae.config.latent_channels:
        raise VideoBoothError(explain(
            f"vae_decode expects latents of shape (N, {vae.config.latent_channels}, h, w); got", tuple(latents.shape),
            "flatten frames into the batch axis ('b c f h w -> (b f) c h w')"))
    if chunk_size < 1:
        raise VideoBoothError(f"vae_decode chunk_size must be >= 1, got {chunk_size}.")
    param = next(vae.parameters())
    scaled = latents.to(device=param.device, dtype=param.dtype) / vae_scaling_factor(vae, scaling_factor)
    out = None
    with torch.no_grad():
        for start in range(0, scaled.shape[0], chunk_size):
            part = vae.decode(scaled[start:start + chunk_size]).sample
            if out is None:  # written in place: the frames are held once, never as parts plus their concatenation
                out = part.new_empty((scaled.shape[0], *part.shape[1:]))
            out[start:start + part.shape[0]] = part
            del part
    return out


@torch.no_grad()
def decode_video(
    vae: Any, latents: torch.Tensor, chunk_size: int = 8, on_chunk: Callable[[int, int], None] | None = None
) -> torch.Tensor:
    """Video latents → frames, ``chunk_size`` frames per VAE call (the VAE's working memory is one chunk's).

    Args:
        vae: the SD 1.x ``diffusers.AutoencoderKL``.
        latents: (b, 4, f, h, w) VAE latents x 0.18215.
        on_chunk: called after every chunk with (frames done, total frames); raising from it cancels.

    Returns:
        (b * f, 8h, 8w, 3) float32 frames in [0, 1] on the CPU, all frames of video 0 first.
    """
    if latents.ndim != 5:
        raise SamplingError(f"decode_video expects latents of shape (batch, 4, frames, h, w), got "
                            f"{tuple(latents.shape)}; add the missing batch or frame axis")
    if chunk_size < 1:
        raise SamplingError(f"chunk_size must be at least 1, got {chunk_size}")
    flat = rearrange(latents, "b c f h w -> (b f) c h w")
    total = flat.shape[0]
    frames = None
    for start in range(0, total, chunk_size):
        pixels = vae_decode(vae, flat[start:start + chunk_size], chunk_size=chunk_size)
        # [-1, 1] -> [0, 1]: bit for bit the official writer's x * 0.5 + 0.5 (halving is exact in floating point)
        unit = rearrange(((pixels.float() + 1.0) / 2.0).clamp(0.0, 1.0), "n c h w -> n h w c").cpu()
        if frames is None:  # written in place: the frames are held once, never as parts plus their concatenation
            frames = unit.new_empty((total, *unit.shape[1:]))
        frames[start:start + unit.shape[0]] = unit
        if on_chunk is not None:
            on_chunk(start + unit.shape[0], total)
    return frames


def frames_to_uint8(frames: torch.Tensor) -> torch.Tensor:
    """(n, H, W, 3) frames in [0, 1] → uint8 as the official writer rounds them (x * 255 + 0.5, truncated)."""
    return (frames * 255 + 0.5).clamp(0, 255).to(torch.uint8)
