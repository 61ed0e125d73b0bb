"""Samplers beyond the official DDPM: diffusers' schedulers on VideoBooth's own training schedule.

Every scheduler is configured with the schedule the model was trained on (1000 steps, betas linear from 1e-4
to 0.02, epsilon prediction) - never Stable Diffusion's scaled-linear one - with ``leading`` or ``trailing``
timestep spacing. At each step the image prompt is noised to that step's timestep (q(x_t | x_0) on the same
schedule, :class:`.noise.ImagePromptNoising`), exactly as the official sampler does for its own steps. The
official respaced DDPM (:func:`.ddpm.sample_ddpm`) remains the reference.
"""

from __future__ import annotations

from typing import Any

import torch

import numpy as np

from ..errors import SamplingError
from .denoiser import StepCallback, StepOutput, VideoDenoiser
from .known_frames import KnownFrames
from .lcm import LCM_SAMPLER
from .noise import ImagePromptNoising, NoiseSource
from .schedule import BETA_END, BETA_START, TRAIN_TIMESTEPS, base_betas

OFFICIAL_SAMPLER = "ddpm"
DIFFUSERS_SAMPLERS = {
    "ddim": "DDIMScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_ancestral": "EulerAncestralDiscreteScheduler",
    "unipc": "UniPCMultistepScheduler",
}
SAMPLERS: tuple[str, ...] = (OFFICIAL_SAMPLER, *DIFFUSERS_SAMPLERS, LCM_SAMPLER)
"""Every sampler by name; ``lcm`` is the consistency sampler of distilled LoRAs (:mod:`.lcm`)."""
SPACINGS: tuple[str, ...] = ("trailing", "leading")


def make_scheduler(name: str, spacing: str = "trailing") -> Any:
    """A diffusers scheduler ``name`` (one of :data:`DIFFUSERS_SAMPLERS`) on the linear-beta training schedule."""
    if name not in DIFFUSERS_SAMPLERS:
        raise SamplingError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    if spacing not in SPACINGS:
        raise SamplingError(f"unknown timestep spacing {spacing!r}; choose one of {', '.join(SPACINGS)}")
    import diffusers

    kwargs: dict[str, Any] = dict(num_train_timesteps=TRAIN_TIMESTEPS, beta_start=BETA_START, beta_end=BETA_END,
                                  beta_schedule="linear", prediction_type="epsilon", timestep_spacing=spacing)
    if name == "ddim":
        kwargs.update(clip_sample=False, set_alpha_to_one=True)
    if name == "dpmpp_2m":
        kwargs.update(algorithm_type="dpmsolver++", solver_order=2)
    return getattr(diffusers, DIFFUSERS_SAMPLERS[name])(**kwargs)


def sample_with_scheduler(
    denoiser: VideoDenoiser,
    name: str,
    steps: int,
    shape: tuple[int, int, int, int, int],
    noise: NoiseSource,
    generator: torch.Generator | None,
    exemplar_clean: torch.Tensor | None = None,
    callback: StepCallback | None = None,
    device: torch.device | str = "cpu",
    spacing: str = "trailing",
    eta: float = 0.0,
    image_prompt_steps: tuple[float, float] = (0.0, 1.0),
    known_latents: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sample with a diffusers scheduler; same contract as :func:`.ddpm.sample_ddpm`.

    Args:
        generator: the noise of ancestral schedulers (Euler ancestral, DDIM with eta > 0), on the CPU.
        eta: DDIM's stochasticity (0 = deterministic DDIM).
        known_latents: (b, 4, k, h, w) clean latents of frames 0..k-1, noised with the scheduler's own
            ``add_noise`` to every step's level and exact at the end (see :func:`.ddpm.sample_ddpm`).

    Returns:
        (b, 4, frames, h, w) float32 latent.
    """
    if steps < 1 or steps > TRAIN_TIMESTEPS:
        raise SamplingError(f"steps must be between 1 and {TRAIN_TIMESTEPS}, got {steps}")
    scheduler = make_scheduler(name, spacing)
    scheduler.set_timesteps(steps, device=device)
    alphas_cumprod = np.cumprod(1.0 - base_betas())  # float64, the training schedule's
    initial = noise.initial(shape).to(device)
    x = initial * scheduler.init_noise_sigma
    image_prompt = ImagePromptNoising(exemplar_clean, shape[2], noise, device, image_prompt_steps)
    timesteps = scheduler.timesteps
    total = len(timesteps)
    step_kwargs: dict[str, Any] = {"eta": eta} if name == "ddim" else {}
    known = None if known_latents is None else KnownFrames(known_latents, initial)
    if known is not None:
        x = known.at_timestep(x, scheduler, timesteps[0])
    for step, t in enumerate(timesteps):
        timestep = int(round(float(t)))
        exemplar_t = image_prompt.at(step, total, float(alphas_cumprod[timestep]))
        model_input = scheduler.scale_model_input(x, t)
        eps, eps_cond, eps_uncond = denoiser.predict(model_input, timestep, exemplar_t)
        out = scheduler.step(eps, t, x, **step_kwargs, **_generator_kwargs(scheduler, generator))
        pred_x0 = getattr(out, "pred_original_sample", None)
        x_prev = out.prev_sample.float()
        if known is not None:  # the known frames at the next timestep's level; clean after the last step
            x_prev = known.at_timestep(x_prev, scheduler, timesteps[step + 1] if step + 1 < total else None)
        if callback is not None:
            callback(step, total, StepOutput(x_prev, pred_x0 if pred_x0 is not None else x_prev, eps, eps_cond,
                                             eps_uncond, exemplar_t))
        x = x_prev
    return x


def _generator_kwargs(scheduler: Any, generator: torch.Generator | None) -> dict[str, Any]:
    """Only schedulers whose ``step`` draws noise take a generator."""
    import inspect

    return {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
