"""Set up the guided denoiser, estimate its memory, and run the chosen sampler: written once, used by the
pipeline, the ComfyUI sampler node and the tests.

    denoiser, estimate = prepare_denoiser(unet, cond_text, null_text, shape, device, image_prompt=True)
    latents = run_sampler(denoiser, "ddpm", 250, shape, generator, device, exemplar_clean=exemplar)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..errors import PromptError
from .ddpm import sample_ddpm
from .lcm import LCM_SAMPLER, sample_lcm
from .denoiser import GuidanceRule, StepCallback, VideoDenoiser
from .memory import MemoryEstimate, estimate_step_memory, estimate_windowed_memory
from .noise import GeneratorNoise
from .schedule import RespacedDDPM
from .schedulers import OFFICIAL_SAMPLER, sample_with_scheduler
from .windows import ContextOptions, windowed


def prepare_denoiser(
    unet: nn.Module,
    cond_text: torch.Tensor,
    null_text: torch.Tensor,
    shape: tuple[int, int, int, int, int],
    device: torch.device | str,
    *,
    image_prompt: bool,
    cfg_scale: float = 4.0,
    guidance: GuidanceRule = "official",
    image_prompt_strength: float = 1.0,
    single_frame_image_prompt: bool = False,
    watermark_branch: bool = True,
    batch_passes: bool = True,
    resident_models: Sequence[nn.Module] = (),
    context: ContextOptions | None = None,
    subject_strengths: tuple[float, ...] | None = None,
    subject_regions: tuple[tuple[float, float, float, float] | None, ...] | None = None,
) -> tuple[VideoDenoiser, MemoryEstimate]:
    """The guided denoiser of one generation and the estimate of a step's peak memory, before any step runs
    (so a host can free that much first, or warn).

    Args:
        cond_text / null_text: (1, 77, d) text states (moved to ``device``).
        shape: (b, 4, frames, h, w) of the video latent.
        image_prompt: whether the steps run the image-prompt stream (an exemplar is given).
        resident_models: other models that stay loaded while sampling (counted in the estimate's weights).
        subject_strengths / subject_regions: several subjects' image-prompt streams (see
            :class:`.denoiser.VideoDenoiser`; :func:`..conditioning.subjects.plan_fine_injection` makes them).
        context: sliding context windows for videos longer than one window (:mod:`.windows`): the denoiser
            returned is then a :class:`.windows.WindowedDenoiser` and the estimate that of one window's step.
    """
    expected = unet.config.cross_attention_dim
    if cond_text.shape[-1] != expected or null_text.shape[-1] != expected:
        raise PromptError(
            f"the text states have width {cond_text.shape[-1]} but the UNet expects {expected}; encode the prompt "
            "with the text encoder of the same model set"
        )
    device = torch.device(device)
    denoiser = VideoDenoiser(
        unet, cond_text.to(device), null_text.to(device), cfg_scale, guidance, batch_passes=batch_passes,
        single_frame_image_prompt=single_frame_image_prompt, watermark_branch=watermark_branch,
        image_prompt_strength=image_prompt_strength, subject_strengths=subject_strengths,
        subject_regions=subject_regions,
    )
    if context is not None and context.applies(shape[2]):
        return windowed(denoiser, context, shape[2]), estimate_windowed_memory(
            denoiser, tuple(shape), context, image_prompt, device, list(resident_models))
    estimate = estimate_step_memory(denoiser, tuple(shape), image_prompt, device, list(resident_models))
    return denoiser, estimate


def run_sampler(
    denoiser: VideoDenoiser,
    sampler: str,
    steps: int,
    shape: tuple[int, int, int, int, int],
    generator: torch.Generator,
    device: torch.device | str,
    *,
    initial_noise: torch.Tensor | None = None,
    exemplar_clean: torch.Tensor | None = None,
    callback: StepCallback | None = None,
    spacing: str = "trailing",
    eta: float = 0.0,
    image_prompt_steps: tuple[float, float] = (0.0, 1.0),
    known_latents: torch.Tensor | None = None,
    lcm_cfg: float = 1.0,
) -> torch.Tensor:
    """Denoise from noise to a clean video latent with ``sampler``: ``ddpm`` is the official respaced
    ancestral DDPM (:func:`.ddpm.sample_ddpm`), ``lcm`` the consistency sampler of a distilled LoRA
    (:func:`.lcm.sample_lcm`), the others diffusers samplers on the same training schedule
    (:func:`.schedulers.sample_with_scheduler`).

    Args:
        generator: every random draw after ``initial_noise`` (per step: the image prompt's noise, then the
            step's noise); seed it on the CPU so a seed gives the same video on any device.
        initial_noise: an already drawn z of ``shape`` (the official order draws it before the VAE sample),
            or None to draw it from ``generator`` first.
        exemplar_clean: (b, 4, 1, h, w) clean image-prompt latent at the video's latent size, or None.
        callback: called after every step with (step, total, StepOutput); raising from it cancels.
        known_latents: (b, 4, k, h, w) clean latents of frames 0..k-1 (a start image, a video's last frames),
            held at every step and exact at the end (:mod:`.known_frames`); None: plain sampling.
        lcm_cfg: the ``lcm`` sampler's guidance scale in place of the denoiser's (1: guidance-free, one
            conditional pass per step, as distilled); the other samplers ignore it.

    Returns:
        (b, 4, frames, h, w) float32 latent on ``device`` (VAE latents x 0.18215).
    """
    noise = GeneratorNoise(generator, device, initial_noise)
    with torch.no_grad():
        if sampler == OFFICIAL_SAMPLER:
            return sample_ddpm(denoiser, RespacedDDPM(steps), shape, noise, exemplar_clean, callback, device,
                               image_prompt_steps=image_prompt_steps, known_latents=known_latents)
        if sampler == LCM_SAMPLER:
            return sample_lcm(denoiser, steps, shape, noise, exemplar_clean, callback, device, image_prompt_steps,
                              known_latents, cfg=lcm_cfg)
        return sample_with_scheduler(denoiser, sampler, steps, shape, noise, generator, exemplar_clean, callback,
                                     device, spacing, eta, image_prompt_steps, known_latents=known_latents)
