"""A video latent from a seed, with the official order of random draws (:func:`sample_seeded`), written once
for every road: the pipeline, the ComfyUI sampler and the trainer's validation videos."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..conditioning.embeddings import encode_exemplar
from ..conditioning.image_prompt import PreparedImagePrompt
from ..errors import SamplingError
from ..settings import VAE_SCALE
from .denoiser import StepCallback, VideoDenoiser
from .run import run_sampler
from .schedulers import OFFICIAL_SAMPLER
from .windows import ContextOptions, reuse_noise

__all__ = ["fit_exemplar", "latent_shape", "sample_seeded"]


def latent_shape(frames: int, height: int, width: int) -> tuple[int, int, int, int, int]:
    """(1, 4, frames, height/8, width/8)."""
    return (1, 4, frames, height // VAE_SCALE, width // VAE_SCALE)


def fit_exemplar(exemplar: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Resize a (b, 4, 1, h, w) exemplar latent to the video's latent size (bilinear; a no-op at 256x256,
    the only size the model was trained at - other sizes are an extrapolation either way)."""
    size = (height // VAE_SCALE, width // VAE_SCALE)
    if tuple(exemplar.shape[-2:]) == size:
        return exemplar
    resized = torch.nn.functional.interpolate(exemplar[:, :, 0], size=size, mode="bilinear", align_corners=False)
    return resized[:, :, None]


def sample_seeded(
    denoiser: VideoDenoiser,
    seed: int,
    shape: tuple[int, int, int, int, int],
    device: torch.device | str,
    *,
    sampler: str = OFFICIAL_SAMPLER,
    steps: int = 250,
    spacing: str = "trailing",
    eta: float = 0.0,
    image_prompt_steps: tuple[float, float] = (0.0, 1.0),
    callback: StepCallback | None = None,
    vae: Any = None,
    image_prompt: PreparedImagePrompt | Sequence[Any] | None = None,
    exemplar_latent: torch.Tensor | None = None,
    context: ContextOptions | None = None,
    start_latents: torch.Tensor | None = None,
    lcm_cfg: float = 1.0,
) -> torch.Tensor:
    """One video latent from ``seed``, with the official order of random draws, written once so that the
    pipeline and the ComfyUI sampler give the same video for a seed: one CPU generator draws the initial noise
    z first, then the image prompt's VAE posterior sample (with ``vae`` and ``image_prompt``), then per step
    the image prompt's noise and the step's noise.

    Args:
        shape: (1, 4, frames, h, w) of the video latent.
        image_prompt: several subjects: a list of image-prompt sources, each a PreparedImagePrompt (encoded with
            ``vae``), a (vae, PreparedImagePrompt) pair or a ready clean latent; VAE draws in list order.
        exemplar_latent: instead of ``vae`` and ``image_prompt``, a clean (1, 4, 1, h', w') image-prompt latent
            (x 0.18215, e.g. from ComfyUI's VAE Encode). Either is resized to the video's latent size.
        context: the long-video windows the denoiser was prepared with; with ``noise_reuse`` the initial noise of
            later windows becomes shuffled copies of earlier frames' (a separate generator seeded with ``seed``
            draws the permutations, so the main stream is unchanged).
        start_latents: (1, 4, k, h, w) clean latents of the first k frames (start image, extension anchors).
        lcm_cfg: the guidance scale of ``sampler="lcm"`` (1: guidance-free; see :func:`.lcm.sample_lcm`).

    Returns:
        (1, 4, frames, h, w) float32 latent on ``device``.
    """
    if isinstance(image_prompt, PreparedImagePrompt) and (vae is None or exemplar_latent is not None):
        raise SamplingError("the image prompt's latent comes from either the image prompt and the VAE, or a "
                            "ready latent; give the image prompt with the VAE, or exemplar_latent alone")
    generator = torch.Generator("cpu").manual_seed(int(seed))
    initial_noise = torch.randn(shape, generator=generator)
    if context is not None and context.noise_reuse and context.applies(shape[2]):
        initial_noise = reuse_noise(initial_noise, context, torch.Generator("cpu").manual_seed(int(seed)))
    if isinstance(image_prompt, (list, tuple)):  # several subjects: one VAE draw each, in subject order
        sources = [item if isinstance(item, (tuple, torch.Tensor)) else (vae, item) for item in image_prompt]
        latents = [item if isinstance(item, torch.Tensor) else encode_exemplar(*item, generator) for item in sources]
        exemplar = torch.cat([fit_exemplar(latent, shape[3] * VAE_SCALE, shape[4] * VAE_SCALE) for latent in latents])
    else:
        exemplar = encode_exemplar(vae, image_prompt, generator) if image_prompt is not None else exemplar_latent
    if exemplar is not None:
        exemplar = fit_exemplar(exemplar, shape[3] * VAE_SCALE, shape[4] * VAE_SCALE)
    return run_sampler(denoiser, sampler, steps, shape, generator, device, initial_noise=initial_noise,
                       exemplar_clean=exemplar, callback=callback, spacing=spacing, eta=eta,
                       image_prompt_steps=image_prompt_steps,
                       known_latents=None if start_latents is None else start_latents.to(device), lcm_cfg=lcm_cfg)
