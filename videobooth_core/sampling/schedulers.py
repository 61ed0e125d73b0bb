"""Samplers beyond the official DDPM: diffusers' schedulers on VideoBooth's own training schedule.

Every scheduler is configured with the schedule the model was trained on (1000 steps, betas linear from 1e-4
to 0.02, epsilon prediction) - never Stable Diffusion's scaled-linear one - with ``leading`` or ``trailing``
timestep spacing. At each step the image prompt is noised to that step's timestep (q(x_t | x_0) on the same
schedule, :class:`.noise.ImagePromptNoising`), exactly as the official sampler does for its own steps. The
official respaced DDPM (:func:`.ddpm.sample_ddpm`) remains the reference.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
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


def make_scheduler(name: str, spacing: str = "trailing", schedule: Mapping[str, Any] | None = None) -> Any:
    """A diffusers scheduler ``name`` (one of :data:`DIFFUSERS_SAMPLERS`) on the linear-beta training schedule.

    ``schedule``: another model's training schedule as scheduler arguments, replacing VideoBooth's betas (and any
    other default here), e.g. VideoCrafter's ``trained_betas`` (:func:`.videocrafter.scheduler_schedule`); an
    argument this scheduler does not take (``set_alpha_to_one`` is DDIM's) is left out."""
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
    cls = getattr(diffusers, DIFFUSERS_SAMPLERS[name])
    if schedule is not None:
        import inspect

        takes = inspect.signature(cls.__init__).parameters
        kwargs.update({key: value for key, value in schedule.items() if key in takes})
    return cls(**kwargs)


def prepare_scheduler(name: str, steps: int, spacing: str = "trailing", device: torch.device | str = "cpu",
                      schedule: Mapping[str, Any] | None = None) -> Any:
    """:func:`make_scheduler` with its ``steps`` timesteps set (SamplingError for a count out of range)."""
    if steps < 1 or steps > TRAIN_TIMESTEPS:
        raise SamplingError(f"steps must be between 1 and {TRAIN_TIMESTEPS}, got {steps}")
    scheduler = make_scheduler(name, spacing, schedule)
    scheduler.set_timesteps(steps, device=device)
    return scheduler


Predict = Callable[[torch.Tensor, int, int, int], "tuple[torch.Tensor, Any]"]
"""``(model_input, timestep, step, total) -> (guided eps, what the caller keeps for its hook)``."""
AfterStep = Callable[[int, int, torch.Tensor, "torch.Tensor | None", torch.Tensor, Any], torch.Tensor]
"""``(step, total, x_prev, pred_x0 or None, eps, kept) -> the latent the next step starts from``."""


def run_scheduler(scheduler: Any, name: str, x: torch.Tensor, predict: Predict, after: AfterStep | None = None, *,
                  eta: float = 0.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """The loop of every diffusers sampler, for any model family: from ``x`` (the starting latent in the
    scheduler's own space, i.e. noise times ``init_noise_sigma``) through ``scheduler.timesteps``.

    Args:
        predict: the model's guided noise prediction for the scheduler-scaled input at an integer timestep.
        after: called with every step's output; returns the latent the next step starts from (e.g. the known
            frames put back), and reports the step.
        eta: DDIM's stochasticity (``name == "ddim"`` only); ``generator``: the noise of the schedulers whose
            ``step`` draws some (Euler ancestral, DDIM with eta > 0).

    Returns:
        The last step's latent, float32.
    """
    timesteps = scheduler.timesteps
    total = len(timesteps)
    step_kwargs: dict[str, Any] = {"eta": eta} if name == "ddim" else {}
    for step, t in enumerate(timesteps):
        timestep = int(round(float(t)))
        model_input = scheduler.scale_model_input(x, t)
        eps, kept = predict(model_input, timestep, step, total)
        out = scheduler.step(eps, t, x, **step_kwargs, **_generator_kwargs(scheduler, generator))
        x_prev = out.prev_sample.float()
        x = after(step, total, x_prev, getattr(out, "pred_original_sample", None), eps, kept) if after else x_prev
    return x


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
    scheduler = prepare_scheduler(name, steps, spacing, device)
    alphas_cumprod = np.cumprod(1.0 - base_betas())  # float64, the training schedule's
    initial = noise.initial(shape).to(device)
    x = initial * scheduler.init_noise_sigma
    image_prompt = ImagePromptNoising(exemplar_clean, shape[2], noise, device, image_prompt_steps)
    timesteps = scheduler.timesteps
    known = None if known_latents is None else KnownFrames(known_latents, initial)
    if known is not None:
        x = known.at_timestep(x, scheduler, timesteps[0])

    def predict(model_input: torch.Tensor, timestep: int, step: int, total: int) -> tuple[torch.Tensor, Any]:
        exemplar_t = image_prompt.at(step, total, float(alphas_cumprod[timestep]))
        eps, eps_cond, eps_uncond = denoiser.predict(model_input, timestep, exemplar_t)
        return eps, (eps_cond, eps_uncond, exemplar_t)

    def after(step: int, total: int, x_prev: torch.Tensor, pred_x0: torch.Tensor | None, eps: torch.Tensor,
              kept: Any) -> torch.Tensor:
        if known is not None:  # the known frames at the next timestep's level; clean after the last step
            x_prev = known.at_timestep(x_prev, scheduler, timesteps[step + 1] if step + 1 < total else None)
        if callback is not None:
            callback(step, total, StepOutput(x_prev, pred_x0 if pred_x0 is not None else x_prev, eps, *kept))
        return x_prev

    return run_scheduler(scheduler, name, x, predict, after, eta=eta, generator=generator)


def _generator_kwargs(scheduler: Any, generator: torch.Generator | None) -> dict[str, Any]:
    """Only schedulers whose ``step`` draws noise take a generator."""
    import inspect

    return {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
