"""The official sampling loop: the respaced ancestral DDPM of :mod:`.schedule`, from pure noise to a clean latent.

Per step: the image prompt noised to the step's timestep (:class:`.noise.ImagePromptNoising`), one guided
prediction (:class:`.denoiser.VideoDenoiser`), the ancestral update with fresh noise (drawn at every step,
unused at the last).
"""

from __future__ import annotations

import torch

from .denoiser import StepCallback, StepOutput, VideoDenoiser
from .noise import ImagePromptNoising, NoiseSource
from .schedule import RespacedDDPM


def sample_ddpm(
    denoiser: VideoDenoiser,
    schedule: RespacedDDPM,
    shape: tuple[int, int, int, int, int],
    noise: NoiseSource,
    exemplar_clean: torch.Tensor | None = None,
    callback: StepCallback | None = None,
    device: torch.device | str = "cpu",
    image_prompt_steps: tuple[float, float] = (0.0, 1.0),
) -> torch.Tensor:
    """The official sampling loop (ancestral respaced DDPM), from pure noise to a clean latent.

    Args:
        shape: (b, 4, frames, h, w) of the video latent.
        exemplar_clean: (b, 4, 1, h, w) clean image-prompt latent (VAE sample x 0.18215), or None.
        callback: called after every step (progress, previews, cancellation by raising).
        image_prompt_steps: (start, end) fractions of the schedule (0 = first step) where the image prompt
            is injected; (0, 1) is the official behaviour, (0, 0.5) an opt-in speed mode.

    Returns:
        (b, 4, frames, h, w) float32 latent (unscaled, i.e. still x 0.18215 VAE space).
    """
    x = noise.initial(shape).to(device)
    image_prompt = ImagePromptNoising(exemplar_clean, shape[2], noise, device, image_prompt_steps)
    total = schedule.num_steps
    for step, index in enumerate(reversed(range(total))):
        timestep = schedule.timestep_map[index]
        exemplar_t = image_prompt.at(step, total, float(schedule.alphas_cumprod[index]))
        eps, eps_cond, eps_uncond = denoiser.predict(x, timestep, exemplar_t)
        step_noise = noise.step(step, shape).to(device)
        x_prev, pred_x0 = schedule.step(eps, x, index, step_noise)
        if callback is not None:
            callback(step, total, StepOutput(x_prev, pred_x0, eps, eps_cond, eps_uncond, exemplar_t))
        x = x_prev
    return x
