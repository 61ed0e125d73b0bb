"""The official sampling loop: the respaced ancestral DDPM of :mod:`.schedule`, from pure noise to a clean latent.

Per step: the image prompt noised to the step's timestep (:class:`.noise.ImagePromptNoising`), one guided
prediction (:class:`.denoiser.VideoDenoiser`), the ancestral update with fresh noise (drawn at every step,
unused at the last).
"""

from __future__ import annotations

import torch

from .denoiser import StepCallback, StepOutput, VideoDenoiser
from .noise import NoiseSource, start_sampling
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
    known_latents: torch.Tensor | None = None,
) -> torch.Tensor:
    """The official sampling loop (ancestral respaced DDPM), from pure noise to a clean latent.

    Args:
        shape: (b, 4, frames, h, w) of the video latent.
        exemplar_clean: (b, 4, 1, h, w) clean image-prompt latent (VAE sample x 0.18215), or None.
        callback: called after every step (progress, previews, cancellation by raising).
        image_prompt_steps: (start, end) fractions of the schedule (0 = first step) where the image prompt
            is injected; (0, 1) is the official behaviour, (0, 0.5) an opt-in speed mode.
        known_latents: (b, 4, k, h, w) clean latents of frames 0..k-1 (a start image, a video's last frames):
            those frames follow their noised latents at every step and are exactly these at the end
            (:class:`.known_frames.KnownFrames`); None: every frame from noise.

    Returns:
        (b, 4, frames, h, w) float32 latent (unscaled, i.e. still x 0.18215 VAE space).
    """
    total = schedule.num_steps
    x, image_prompt, known = start_sampling(shape, noise, device, exemplar_clean, image_prompt_steps, known_latents,
                                            float(schedule.alphas_cumprod[total - 1]))
    for step, index in enumerate(reversed(range(total))):
        timestep = schedule.timestep_map[index]
        exemplar_t = image_prompt.at(step, total, float(schedule.alphas_cumprod[index]))
        eps, eps_cond, eps_uncond = denoiser.predict(x, timestep, exemplar_t)
        step_noise = noise.step(step, shape).to(device)
        x_prev, pred_x0 = schedule.step(eps, x, index, step_noise)
        if known is not None:  # the known frames at the level x_prev has reached; clean after the last step
            x_prev = known.at_level(x_prev, float(schedule.alphas_cumprod[index - 1]) if index > 0 else None)
        if callback is not None:
            callback(step, total, StepOutput(x_prev, pred_x0, eps, eps_cond, eps_uncond, exemplar_t))
        x = x_prev
    return x
