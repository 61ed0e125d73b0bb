"""The consistency sampler (multistep LCM) on VideoBooth's own schedule, and the consistency maths that the
distillation stage (:mod:`..training.distill`) trains with: written once, used by both.

The timesteps come from a *skipping grid* of the 250-step respaced grid the model was trained on
(:func:`.schedule.respaced_timesteps`): every ``skip``-th point of it, ending at its noisiest timestep 999
(``skip=5``: 50 points 16, 36, ..., 999). The distillation's DDIM solver jumps from one point to the one below
it, so the student learns to map any point of this grid to the clean latent; the sampler then visits a few of
the same points, noisiest first (LCM's multistep sampling):

    x = z
    for each chosen point t (descending):
        x0 = f(x, t) = c_skip(t) * x + c_out(t) * x0_hat(x, t)      # the consistency function
        x = sqrt(abar(t_next)) * x0 + sqrt(1 - abar(t_next)) * fresh noise   (not after the last point)
    return x0                                                       # the last step's x0, exactly

``c_skip``/``c_out`` are LCM's boundary-condition parameterisation (``sigma_data`` 0.5, timesteps scaled by 10,
as diffusers' ``LCMScheduler``): ``f(x, 0) = x`` exactly, and ``f`` is very nearly the x0 prediction elsewhere.

Guidance-free by default: the distilled student runs one conditional pass per step (the teacher's official
guidance is distilled into the LoRA); ``cfg > 1`` adds the unconditional pass and the official guidance rule.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import numpy as np
import torch

from ..errors import SamplingError, explain
from .denoiser import StepCallback, StepOutput, VideoDenoiser
from .noise import NoiseSource, start_sampling
from .schedule import TRAIN_TIMESTEPS, base_betas, respaced_timesteps

LCM_SAMPLER = "lcm"
TRAINED_GRID = 250
"""The respaced grid VideoBooth was trained on (the official scripts draw timesteps from it)."""
DEFAULT_SKIP = 5
"""Grid points per solver step: 250 / 5 = 50 solver points, LCM's 50-step DDIM solver."""
MAX_STEPS = TRAINED_GRID // DEFAULT_SKIP
"""The most steps the sampler takes on the default grid: one per solver point."""
SIGMA_DATA = 0.5
TIMESTEP_SCALING = 10.0
"""LCM's boundary-condition constants (diffusers' ``LCMScheduler`` defaults)."""


def alphas_cumprod() -> np.ndarray:
    """The training schedule's cumulative alpha products (float64, 1000 entries)."""
    return np.cumprod(1.0 - base_betas(TRAIN_TIMESTEPS))


def solver_timesteps(skip: int = DEFAULT_SKIP, grid: int = TRAINED_GRID) -> list[int]:
    """Ascending original timesteps of the skipping grid: points ``skip-1, 2*skip-1, ..., grid-1`` of the
    ``grid``-step respaced grid (so the noisiest, 999, is always a point)."""
    if not isinstance(skip, int) or not 1 <= skip <= grid:
        raise SamplingError(explain("the solver skip must be a whole number from 1 to the grid's steps", skip,
                                    f"use {DEFAULT_SKIP} (50 solver points on the 250-step grid)"))
    points = respaced_timesteps(TRAIN_TIMESTEPS, grid)
    return points[skip - 1::skip]


def solver_pairs(skip: int = DEFAULT_SKIP, grid: int = TRAINED_GRID) -> list[tuple[int, int]]:
    """(t, s) for every solver point t, ascending: s the grid point ``skip`` points below t, or 0 (the boundary)
    below the lowest point."""
    points = respaced_timesteps(TRAIN_TIMESTEPS, grid)
    return [(points[i], points[i - skip] if i >= skip else 0) for i in range(skip - 1, grid, skip)]


def lcm_timesteps(steps: int, skip: int = DEFAULT_SKIP) -> list[int]:
    """The sampler's ``steps`` timesteps, descending: every ``len // steps``-th solver point from 999 down (as
    diffusers' ``LCMScheduler`` picks them from its 50-point grid)."""
    points = solver_timesteps(skip)[::-1]
    if not isinstance(steps, int) or not 1 <= steps <= len(points):
        raise SamplingError(explain(f"the lcm sampler takes 1 to {len(points)} steps; got", steps,
                                    "use --steps 4 (1, 2, 4 or 8 are the distilled settings)"))
    stride = len(points) // steps
    return points[::stride][:steps]


def grid_positions(steps: int, skip: int = DEFAULT_SKIP) -> list[int]:
    """Where the sampler's ``steps`` timesteps (:func:`lcm_timesteps`, descending) sit in the skipping grid
    (:func:`solver_timesteps`, ascending): the indices a host that keeps the grid as its table (ComfyUI's
    discrete sampling, one sigma per grid point) reads its sigmas at."""
    points = solver_timesteps(skip)
    return [points.index(timestep) for timestep in lcm_timesteps(steps, skip)]


def consistency_coefficients(timestep: int) -> tuple[float, float]:
    """(c_skip, c_out) of LCM's boundary-condition parameterisation at an original timestep: (1, 0) at 0."""
    scaled = float(timestep) * TIMESTEP_SCALING
    c_skip = SIGMA_DATA ** 2 / (scaled ** 2 + SIGMA_DATA ** 2)
    c_out = scaled / math.sqrt(scaled ** 2 + SIGMA_DATA ** 2)
    return c_skip, c_out


def predicted_x0(x_t: torch.Tensor, eps: torch.Tensor, alpha_cumprod: float | torch.Tensor) -> torch.Tensor:
    """x0 from an epsilon prediction: ``(x_t - sqrt(1 - abar) eps) / sqrt(abar)`` (float32 for float32 inputs)."""
    abar = torch.as_tensor(alpha_cumprod, dtype=torch.float64)
    return (x_t - (1 - abar) ** 0.5 * eps) / abar ** 0.5


def consistency_output(x_t: torch.Tensor, eps: torch.Tensor, timestep: int, alpha_cumprod: float) -> torch.Tensor:
    """``f(x_t, t) = c_skip(t) * x_t + c_out(t) * x0_hat`` (b, 4, f, h, w): the consistency function of an
    epsilon-predicting model (exactly ``x_t`` at t = 0)."""
    c_skip, c_out = consistency_coefficients(timestep)
    if c_out == 0.0:
        return x_t
    return c_skip * x_t + c_out * predicted_x0(x_t, eps, alpha_cumprod)


def ddim_step(x_t: torch.Tensor, eps: torch.Tensor, alpha_t: torch.Tensor,
              alpha_prev: torch.Tensor) -> torch.Tensor:
    """One deterministic DDIM (eta 0) step of the probability-flow ODE from the level ``alpha_t`` to ``alpha_prev``
    (0-d tensors of the cumulative products), in the arithmetic order of the pack's ``ddim`` sampler (diffusers'
    ``DDIMScheduler.step``), so the two agree bit for bit on the same coefficients."""
    pred_original = (x_t - (1 - alpha_t) ** 0.5 * eps) / alpha_t ** 0.5
    direction = (1 - alpha_prev - 0.0) ** 0.5 * eps
    return alpha_prev ** 0.5 * pred_original + direction


def with_guidance(denoiser: Any, cfg: float) -> Any:
    """A shallow copy of ``denoiser`` (a :class:`.denoiser.VideoDenoiser`, or a windowed one around it) at guidance
    ``cfg``: 1 is guidance-free (one conditional pass, no unconditional one); above 1 the denoiser's own rule."""
    if not math.isfinite(cfg) or cfg < 1.0:
        raise SamplingError(explain("the lcm sampler's guidance scale must be at least 1", cfg,
                                    "use --lcm-cfg 1 (guidance-free, the distilled setting) or a small value like 1.5"))
    inner = getattr(denoiser, "inner", None)
    if inner is not None:  # a WindowedDenoiser: the same windows around a re-guided inner denoiser
        outer = copy.copy(denoiser)
        outer.inner = with_guidance(inner, cfg)
        return outer
    guided = copy.copy(denoiser)
    guided.cfg_scale = float(cfg)
    if cfg == 1.0:
        guided.guidance = "all"  # at scale 1 every rule is the conditional prediction: skip the unconditional pass
    return guided


def sample_lcm(
    denoiser: VideoDenoiser,
    steps: int,
    shape: tuple[int, int, int, int, int],
    noise: NoiseSource,
    exemplar_clean: torch.Tensor | None = None,
    callback: StepCallback | None = None,
    device: torch.device | str = "cpu",
    image_prompt_steps: tuple[float, float] = (0.0, 1.0),
    known_latents: torch.Tensor | None = None,
    cfg: float = 1.0,
    skip: int = DEFAULT_SKIP,
) -> torch.Tensor:
    """Multistep consistency sampling (module docstring); same contract as :func:`.ddpm.sample_ddpm`.

    Randomness: the initial z, then per step the image prompt's noise and the re-noising noise (drawn at every
    step, unused after the last), the official order. The callback's ``pred_x0`` is the step's consistency output
    and ``x_prev`` the next step's input (the result itself after the last step).

    Args:
        cfg: guidance scale; 1 (default) runs one conditional pass per step.
        skip: grid points per solver step of the skipping grid the LoRA was distilled on.

    Returns:
        (b, 4, frames, h, w) float32 latent: the last step's consistency output.
    """
    timesteps = lcm_timesteps(steps, skip)
    table = alphas_cumprod()
    guided = with_guidance(denoiser, cfg)
    x, image_prompt, known = start_sampling(shape, noise, device, exemplar_clean, image_prompt_steps, known_latents,
                                            float(table[timesteps[0]]))
    total = len(timesteps)
    denoised = x
    for step, timestep in enumerate(timesteps):
        abar = float(table[timestep])
        exemplar_t = image_prompt.at(step, total, abar)
        eps, eps_cond, eps_uncond = guided.predict(x, timestep, exemplar_t)
        denoised = consistency_output(x.float(), eps.float(), timestep, abar)
        step_noise = noise.step(step, shape).to(device)
        if step + 1 < total:
            following = float(table[timesteps[step + 1]])
            x_next = (math.sqrt(following) * denoised + math.sqrt(1.0 - following) * step_noise.float())
            if known is not None:
                x_next = known.at_level(x_next, following)
        else:
            if known is not None:
                denoised = known.at_level(denoised, None)
            x_next = denoised
        if callback is not None:
            callback(step, total, StepOutput(x_next, denoised, eps, eps_cond, eps_uncond, exemplar_t))
        x = x_next
    return denoised
