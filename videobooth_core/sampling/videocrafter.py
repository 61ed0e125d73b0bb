"""The official VideoCrafter DDIM sampler (``lvdm/models/samplers/ddim.py`` of AILab-CVC/VideoCrafter), exactly:
its schedule, its timesteps, its float32/float64 mix, the ``use_scale`` x0 scale, and classifier-free guidance.

What it does, and this code does the same (file:line in the official repository at 11bcd76):

* betas ``linspace(sqrt(0.00085), sqrt(0.012), 1000) ** 2`` in float64, ``alphas_cumprod`` kept as float32
  (the model's buffer);
* timesteps ``range(0, 1000, 1000 // S) + 1`` (utils_diffusion.py:58-67), visited from the noisiest: 1..981 for
  S = 50. Their count is not always S (S = 30 gives 31), and for S where ``1000 // S`` divides 999 (3, 9, 27,
  36, 37, 101-111, 251-333) the last timestep is 1000 and the official code fails; those are refused here;
* ``a_prev`` of the last step is ``alphas_cumprod[0]``, not 1 (utils_diffusion.py:78);
* every coefficient is rounded to float32 (``torch.full``, ddim.py:264-267); ``sigma`` is computed in float64;
* ``use_scale`` (ddpm3d.py:362-376, ddim.py:280-287): ``pred_x0`` is divided by ``scale[t]`` (the returned
  ``pred_x0`` is the divided one) and ``x_prev = sqrt(a_prev) * scale[t_prev] * pred_x0 + dir_xt + noise``;
* guidance ``e = e_u + s (e_c - e_u)`` with the unconditional context (the empty prompt; for I2V, plus the image
  tokens of an all-zero image) and the same fps in both branches (ddim.py:236, funcs.py:21-38);
* noise: ``x_T`` first, then one standard-normal draw per step, the last included (ddim.py:145, 276).

The two guidance branches run as one batch-2 UNet call (the official code makes two calls; the results differ by
float32 rounding only, ~1e-6 of the output's size).

The pack's fast samplers (:data:`FAST_SAMPLERS`, diffusers schedulers through :func:`.schedulers.run_scheduler`)
run on the same model through a variance-preserving view of its process (:func:`variance_preserving_schedule`):
a ``use_scale`` checkpoint was trained on ``x_t = sqrt(a_t) s_t x0 + sqrt(1 - a_t) eps``, whose variance is
``n_t^2 = a_t s_t^2 + 1 - a_t``, not 1; ``x_t / n_t = sqrt(a~_t) x0 + sqrt(1 - a~_t) eps`` with
``a~_t = a_t s_t^2 / n_t^2`` is an ordinary DDPM process with the same ``x0`` and the same ``eps``, so any
eps-prediction scheduler runs on it with betas from ``a~`` while the UNet is fed ``n_t`` times its sample. Without
``use_scale`` (``s = 1``, ``n = 1``) this is SD's plain schedule. Proof in the tests: the diffusers DDIM on this
schedule (eta 0, the official timesteps) reproduces :func:`sample_videocrafter_ddim` up to float rounding.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..errors import SamplingError, explain
from .noise import NoiseSource
from .schedulers import DIFFUSERS_SAMPLERS

if TYPE_CHECKING:
    from .windows import ContextOptions

TRAIN_TIMESTEPS = 1000
LINEAR_START = 0.00085
LINEAR_END = 0.012
SCALE_MID_STEP = 400
"""``use_scale``: the x0 scale goes linearly from 1 to ``scale_b`` over the first 400 timesteps, then stays."""
OFFICIAL_SAMPLER = "ddim"
"""VideoCrafter's exact sampler is the official DDIM (VideoBooth's is its DDPM, ``ddpm``): the name of the
algorithm each paper's code runs. The diffusers DDIM would be the same sampler again, so it is not offered."""
FAST_SAMPLERS: tuple[str, ...] = tuple(name for name in DIFFUSERS_SAMPLERS if name != OFFICIAL_SAMPLER)
"""The pack's diffusers samplers that apply to VideoCrafter (on its schedule: :func:`variance_preserving_schedule`)."""
SAMPLERS: tuple[str, ...] = (OFFICIAL_SAMPLER, *FAST_SAMPLERS)
REFUSED_SAMPLERS: tuple[tuple[str, str], ...] = (
    ("lcm", "the consistency sampler needs a distilled (LCM) LoRA, and none exists for VideoCrafter; for a fast "
            "run use dpmpp_2m with 25 steps"),
    ("ddpm", "that is VideoBooth's official sampler; VideoCrafter's official one is ddim (the default), its fast "
             "ones dpmpp_2m, euler, euler_ancestral and unipc"),
)
"""The pack's other sampler names, refused for VideoCrafter with their reason (``settings.Setting.refused``)."""
FAST_SPACING = "trailing"
"""The fast samplers' timesteps: the pack's spacing (from timestep 999 down; the official DDIM's grid starts lower,
at 1000 - 1000 // steps + 1)."""


def alphas_cumprod(linear_start: float = LINEAR_START, linear_end: float = LINEAR_END,
                   num_timesteps: int = TRAIN_TIMESTEPS) -> torch.Tensor:
    """The training schedule's cumulative alphas ``(num_timesteps,)`` float32 (computed in float64, stored as
    the official model's float32 buffer)."""
    betas = np.linspace(linear_start ** 0.5, linear_end ** 0.5, num_timesteps, dtype=np.float64) ** 2
    return torch.tensor(np.cumprod(1.0 - betas), dtype=torch.float32)


def x0_scale_array(scale_b: float, fix_scale_bug: bool, num_timesteps: int = TRAIN_TIMESTEPS) -> torch.Tensor:
    """``scale_arr`` float32: ``linspace(1, scale_b, 400)`` then ``scale_b`` repeated; without ``fix_scale_bug``
    the tail is ``num_timesteps`` long (1400 entries; only the first 1000 are ever indexed)."""
    tail = num_timesteps - SCALE_MID_STEP if fix_scale_bug else num_timesteps
    values = np.concatenate([np.linspace(1.0, scale_b, SCALE_MID_STEP), np.full(tail, scale_b)])
    return torch.tensor(values, dtype=torch.float32)


def ddim_timesteps(steps: int, num_timesteps: int = TRAIN_TIMESTEPS) -> np.ndarray:
    """The official uniform DDIM timesteps, ascending (``range(0, T, T // steps) + 1``).

    Raises:
        SamplingError: ``steps`` out of range, or one for which the official sampler would index past the
            schedule (the last timestep would be ``T``).
    """
    if not 1 <= steps <= num_timesteps // 2:
        raise SamplingError(explain("DDIM steps out of range", steps,
                                    f"use 1 to {num_timesteps // 2} steps (the official default is 50)"))
    stride = num_timesteps // steps
    timesteps = np.arange(0, num_timesteps, stride, dtype=np.int64) + 1
    if timesteps[-1] >= num_timesteps:
        works = [s for s in range(1, num_timesteps // 2 + 1) if (num_timesteps - 1) % (num_timesteps // s)]
        below, above = [s for s in works if s < steps][-1:], [s for s in works if s > steps][:1]
        ok = below + above
        raise SamplingError(explain(
            f"the official DDIM schedule breaks at this step count (stride {stride} reaches timestep "
            f"{timesteps[-1]}, past the last one, {num_timesteps - 1})", steps,
            f"use {' or '.join(map(str, ok))} steps instead"))
    return timesteps


@dataclass(frozen=True)
class DDIMStep:
    """Float32 coefficients of one DDIM step (0-d tensors), as ``p_sample_ddim`` builds them."""

    timestep: int
    alpha: torch.Tensor
    alpha_prev: torch.Tensor
    sigma: torch.Tensor
    sqrt_one_minus_alpha: torch.Tensor
    scale: torch.Tensor | None
    scale_prev: torch.Tensor | None


class VideoCrafterDDIM:
    """The official DDIM schedule for ``steps`` steps; :meth:`steps` lists them from the noisiest."""

    def __init__(self, steps: int = 50, eta: float = 1.0, *, use_scale: bool = False, scale_b: float = 0.3,
                 fix_scale_bug: bool = False, linear_start: float = LINEAR_START,
                 linear_end: float = LINEAR_END) -> None:
        if not 0.0 <= eta <= 1.0:
            raise SamplingError(explain("DDIM eta out of range", eta, "use 0 (deterministic) to 1 (the official default)"))
        self.eta = eta
        self.alphas_cumprod = alphas_cumprod(linear_start, linear_end)
        self.timesteps = ddim_timesteps(steps)
        self.scale_arr = x0_scale_array(scale_b, fix_scale_bug) if use_scale else None
        cumprod = self.alphas_cumprod
        # as make_ddim_sampling_parameters: alphas float32 (torch), alphas_prev float64 (numpy) of the float32
        # values with alphas_cumprod[0] first, sigma computed in float64
        self.ddim_alphas = cumprod[self.timesteps]
        self.ddim_alphas_prev = np.asarray([cumprod[0].item()] + cumprod[self.timesteps[:-1]].tolist())
        # (1 - alphas) is a float32 torch operation there, the rest float64
        alphas64, one_minus64 = self.ddim_alphas.double().numpy(), (1 - self.ddim_alphas).double().numpy()
        self.ddim_sigmas = eta * np.sqrt((1 - self.ddim_alphas_prev) / one_minus64
                                         * (1 - alphas64 / self.ddim_alphas_prev))
        self.ddim_sqrt_one_minus_alphas = torch.sqrt(1.0 - self.ddim_alphas)
        if self.scale_arr is not None:
            self.ddim_scale_arr = self.scale_arr[self.timesteps]
            self.ddim_scale_arr_prev = np.asarray([self.scale_arr[0].item()]
                                                  + self.scale_arr[self.timesteps[:-1]].tolist())

    def __len__(self) -> int:
        return len(self.timesteps)

    def steps(self) -> list[DDIMStep]:
        """The steps in sampling order (noisiest first)."""
        f32 = lambda value: torch.tensor(float(value), dtype=torch.float32)  # noqa: E731 - torch.full's rounding
        out = []
        for index in reversed(range(len(self.timesteps))):
            scaled = self.scale_arr is not None
            out.append(DDIMStep(
                timestep=int(self.timesteps[index]), alpha=f32(self.ddim_alphas[index]),
                alpha_prev=f32(self.ddim_alphas_prev[index]), sigma=f32(self.ddim_sigmas[index]),
                sqrt_one_minus_alpha=f32(self.ddim_sqrt_one_minus_alphas[index]),
                scale=f32(self.ddim_scale_arr[index]) if scaled else None,
                scale_prev=f32(self.ddim_scale_arr_prev[index]) if scaled else None))
        return out


def ddim_update(x: torch.Tensor, eps: torch.Tensor, step: DDIMStep, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One official DDIM update (``p_sample_ddim`` after the UNet).

    Args:
        x: the latent entering the step ``(b, c, f, h, w)``.
        eps: the guided noise prediction, same shape.
        noise: a standard-normal draw of the same shape (scaled by sigma here).

    Returns:
        ``(x_prev, pred_x0)``; with ``use_scale``, ``pred_x0`` is already divided by the step's scale.
    """
    coeff = {name: getattr(step, name).to(x.device, x.dtype) for name in ("alpha", "alpha_prev", "sigma",
                                                                          "sqrt_one_minus_alpha")}
    pred_x0 = (x - coeff["sqrt_one_minus_alpha"] * eps) / coeff["alpha"].sqrt()
    dir_xt = (1.0 - coeff["alpha_prev"] - coeff["sigma"] ** 2).sqrt() * eps
    noise = coeff["sigma"] * noise.to(x.device, x.dtype)
    if step.scale is None:
        return coeff["alpha_prev"].sqrt() * pred_x0 + dir_xt + noise, pred_x0
    pred_x0 = pred_x0 / step.scale.to(x.device, x.dtype)
    x_prev = coeff["alpha_prev"].sqrt() * step.scale_prev.to(x.device, x.dtype) * pred_x0 + dir_xt + noise
    return x_prev, pred_x0


EpsFunction = Callable[[torch.Tensor, torch.Tensor], "tuple[torch.Tensor, torch.Tensor]"]
"""``(x, timesteps) -> (eps_cond, eps_uncond)``."""


def guided_unet(unet: torch.nn.Module, context: torch.Tensor, uncond_context: torch.Tensor,
                fps: torch.Tensor | int | None = None) -> EpsFunction:
    """The two guidance branches as one batch-2 call of ``unet`` (``forward(x, t, context, fps)``).

    ``context`` / ``uncond_context``: ``(b, tokens, dim)`` (I2V: 77 text tokens then the image tokens); ``fps``
    reaches both branches, as in the official code."""
    def eps(x: torch.Tensor, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch = x.shape[0]
        both_fps = torch.cat([fps, fps]) if isinstance(fps, torch.Tensor) else fps
        out = unet(torch.cat([x, x]), torch.cat([timesteps, timesteps]),
                   torch.cat([context, uncond_context]).to(x.device), both_fps)
        return out[:batch], out[batch:]
    return eps


def windowed_eps(eps_function: EpsFunction, options: "ContextOptions | None") -> EpsFunction:
    """``eps_function`` run window by window (long videos): the latent's frames are split into the
    :data:`~.windows.CONTIGUOUS` windows of ``options`` (consecutive frames: the temporal convolutions and relative
    positions see neighbours side by side, as in a trained 16-frame video), each window's two guidance branches
    computed as :func:`guided_unet` computes them (the same context, image tokens and fps for every window), and
    each branch fused with :func:`~.windows.fuse_window_predictions` (the house's weights). The DDIM arithmetic is
    untouched: only how eps is predicted changes. With ``options`` None, or a latent no longer than one window,
    ``eps_function`` itself runs (bit for bit the plain path).

    Raises:
        SamplingError: ``options`` of the frame-0 schedule (VideoBooth's; VideoCrafter has no frame-0 attention).
    """
    from .windows import CONTIGUOUS, fuse_window_predictions

    if options is None:
        return eps_function
    if options.schedule != CONTIGUOUS:
        raise SamplingError(explain("VideoCrafter's context windows are windows of consecutive frames; got the "
                                    "schedule", options.schedule, f"use ContextOptions(..., schedule='{CONTIGUOUS}')"))

    def eps(x: torch.Tensor, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        frames = x.shape[2]
        if not options.applies(frames):
            return eps_function(x, timesteps)

        def predict(window: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
            return eps_function(x[:, :, window[0]:window[-1] + 1], timesteps)  # consecutive frames: a slice

        eps_cond, eps_uncond = fuse_window_predictions(frames, options, predict, dim=2)
        return eps_cond, eps_uncond
    return eps
def guide(eps_cond: torch.Tensor, eps_uncond: torch.Tensor, guidance: float) -> torch.Tensor:
    """The official classifier-free guidance ``e_u + s (e_c - e_u)`` (every sampler's)."""
    return eps_uncond + guidance * (eps_cond - eps_uncond)


@dataclass
class StepRecord:
    """What one step saw and produced (for callbacks, previews and the parity tests)."""

    index: int
    timestep: int
    x_in: torch.Tensor
    eps_cond: torch.Tensor
    eps_uncond: torch.Tensor
    x_prev: torch.Tensor
    pred_x0: torch.Tensor


def sample_videocrafter_ddim(
    eps_function: EpsFunction,
    schedule: VideoCrafterDDIM,
    shape: tuple[int, ...],
    noise: NoiseSource,
    *,
    guidance: float = 12.0,
    device: str | torch.device = "cpu",
    on_step: Callable[[StepRecord], None] | None = None,
) -> torch.Tensor:
    """The official DDIM loop from noise to a clean latent.

    Args:
        eps_function: the UNet's two guidance branches (:func:`guided_unet`).
        shape: the latent ``(b, 4, frames, height / 8, width / 8)``.
        noise: the run's draws in the official order (``initial``, then ``step(i)``; a seeded
            :class:`~.noise.GeneratorNoise`, or recorded tensors).
        guidance: the classifier-free guidance scale (1: the unconditional branch is still computed, as unused).
        on_step: called after every step with its :class:`StepRecord`.

    Returns:
        The final latent ``shape`` float32 (to decode: divide by 0.18215, then the VAE frame by frame).
    """
    x = noise.initial(tuple(shape)).to(device)
    for i, step in enumerate(schedule.steps()):
        timesteps = torch.full((shape[0],), step.timestep, dtype=torch.long, device=device)
        eps_cond, eps_uncond = eps_function(x, timesteps)
        eps = guide(eps_cond, eps_uncond, guidance)
        x_prev, pred_x0 = ddim_update(x, eps, step, noise.step(i, tuple(shape)))
        if on_step is not None:
            on_step(StepRecord(i, step.timestep, x, eps_cond, eps_uncond, x_prev, pred_x0))
        x = x_prev
    return x


def variance_preserving_schedule(use_scale: bool = False, scale_b: float = 0.3,
                                 fix_scale_bug: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The model's process seen as a variance-preserving one: ``(a~, n)``, float64 ``(1000,)`` each, with
    ``x_t = n_t * (sqrt(a~_t) x0 + sqrt(1 - a~_t) eps)`` (module docstring). ``a`` is the official float32 buffer's
    values and ``s`` its ``scale_arr``'s; without ``use_scale``, ``a~ = a`` and ``n = 1`` exactly.

    ``a~`` decreases strictly (its signal-to-noise ratio ``a s^2 / (1 - a)`` does: ``a / (1 - a)`` strictly and ``s``
    never grows), so it is a valid cumulative-alpha schedule."""
    alphas = alphas_cumprod().double().numpy()
    if not use_scale:
        return alphas, np.ones_like(alphas)
    scale2 = x0_scale_array(scale_b, fix_scale_bug)[:TRAIN_TIMESTEPS].double().numpy() ** 2
    norm2 = alphas * scale2 + 1.0 - alphas
    return alphas * scale2 / norm2, np.sqrt(norm2)


def scheduler_schedule(vp_alphas: np.ndarray) -> dict[str, object]:
    """:func:`.schedulers.make_scheduler`'s ``schedule`` for cumulative alphas ``vp_alphas``: the betas
    ``1 - a~_t / a~_{t-1}``, the official timestep offset (``leading`` spacing gives ``range(0, 1000, 1000 // S) +
    1``) and, for DDIM, the official last step to ``a~_0`` (not 1)."""
    betas = 1.0 - vp_alphas / np.concatenate([[1.0], vp_alphas[:-1]])
    return {"trained_betas": betas, "steps_offset": 1, "set_alpha_to_one": False}


def sample_videocrafter_scheduler(
    eps_function: EpsFunction,
    name: str,
    steps: int,
    shape: tuple[int, ...],
    noise: NoiseSource,
    *,
    guidance: float = 12.0,
    use_scale: bool = False,
    scale_b: float = 0.3,
    fix_scale_bug: bool = False,
    spacing: str = FAST_SPACING,
    eta: float = 0.0,
    device: str | torch.device = "cpu",
    on_step: Callable[[StepRecord], None] | None = None,
) -> torch.Tensor:
    """A diffusers sampler ``name`` on the model's variance-preserving schedule (:func:`variance_preserving_schedule`),
    same contract as :func:`sample_videocrafter_ddim`: the same guidance, the same ``x_T`` (then Euler ancestral's
    per-step noise from the same generator), the clean latent out. The UNet sees the trained
    process's ``x_t = n_t * x~_t``; its eps is the scheduler's.

    Args:
        name: one of :data:`FAST_SAMPLERS` (or ``ddim``: the diffusers DDIM, the tests' proof of the schedule).
        spacing: the scheduler's timestep spacing (:data:`FAST_SPACING`; ``leading`` is the official grid).
        eta: the diffusers DDIM's (the other schedulers have none).
        on_step: called after every step; its record's ``x_in`` is the UNet's input ``x_t``, ``x_prev`` the
            scheduler's next sample (in its own space) and ``pred_x0`` the official ``(x_t - sqrt(1 - a_t) e) /
            (sqrt(a_t) s_t)``.

    Returns:
        The final latent ``shape`` float32 (``n_0 = 1``: the scheduler's last sample is the model's).
    """
    from .schedulers import prepare_scheduler, run_scheduler

    vp_alphas, norms = variance_preserving_schedule(use_scale, scale_b, fix_scale_bug)
    scheduler = prepare_scheduler(name, steps, spacing, device, scheduler_schedule(vp_alphas))
    # the official x_T (a standard-normal draw in the trained space) seen in the scheduler's space: divided by n at
    # the first timestep (0.9988 at timestep 999 for scale_b 0.7), then the scheduler's own initial scaling
    first = int(round(float(scheduler.timesteps[0])))
    x = noise.initial(tuple(shape)).to(device) / float(norms[first]) * scheduler.init_noise_sigma

    def predict(model_input: torch.Tensor, timestep: int, step: int, total: int):
        x_t = model_input * float(norms[timestep])  # the trained process's sample (times 1.0 without use_scale)
        eps_cond, eps_uncond = eps_function(x_t, torch.full((shape[0],), timestep, dtype=torch.long, device=device))
        return guide(eps_cond, eps_uncond, guidance), (timestep, x_t, eps_cond, eps_uncond)

    def after(step: int, total: int, x_prev: torch.Tensor, pred_x0, eps: torch.Tensor, kept) -> torch.Tensor:
        if on_step is not None:
            timestep, x_t, eps_cond, eps_uncond = kept
            signal, level = (float(v) for v in (np.sqrt(vp_alphas[timestep]) * norms[timestep],
                                                np.sqrt(1.0 - vp_alphas[timestep]) * norms[timestep]))
            on_step(StepRecord(step, timestep, x_t, eps_cond, eps_uncond, x_prev, (x_t - level * eps) / signal))
        return x_prev

    return run_scheduler(scheduler, name, x, predict, after, eta=eta, generator=getattr(noise, "generator", None))


def estimate_videocrafter_step_memory(
    unet: torch.nn.Module,
    shape: tuple[int, int, int, int, int],
    context_tokens: int,
    device: torch.device | str,
    extra_modules: list[torch.nn.Module] | None = None,
    context_window: int | None = None,
):
    """The peak memory of one guided step (the batch-2 UNet call of :func:`guided_unet`), estimated before sampling
    by a dry run of the same code on a storage-free twin of ``unet`` (:mod:`.memory`): the live activations'
    peak, plus the resident weights of ``unet`` and ``extra_modules``, plus on the CPU the process's runtime.

    Args:
        unet: a :class:`~..models.videocrafter.unet.VideoCrafterUNet` (its config and dtype are what count).
        shape: the latent ``(b, 4, frames, h, w)``.
        context_tokens: 77, or 77 + 16 with the I2V image tokens.
        context_window: with fewer frames than ``shape`` has (:func:`windowed_eps`), the dry run is one window's
            (windows run one after another), plus what the step holds for the whole video in float32: the sample,
            the fused cond and uncond, the guided eps, the noise draw and the next sample.

    Returns:
        A :class:`~.memory.MemoryEstimate` (``describe()`` gives the one-line summary).
    """
    from ..models.videocrafter.unet import VideoCrafterUNet
    from .memory import CPU_RUNTIME_BYTES, MemoryEstimate, current_rss_bytes, peak_activation_bytes, resident_weight_bytes

    held = 0
    if context_window is not None and shape[2] > context_window:
        held = 6 * math.prod(shape) * 4
        shape = (shape[0], shape[1], context_window, shape[3], shape[4])
    meta = torch.device("meta")
    with meta:
        twin = VideoCrafterUNet(unet.config).to(unet.dtype)
        context = torch.empty(shape[0], context_tokens, unet.config.context_dim, dtype=unet.dtype)
        x = torch.empty(shape, dtype=torch.float32)
        timesteps = torch.full((shape[0],), 501, dtype=torch.long)
        fps = torch.full((shape[0],), 28, dtype=torch.long)
    eps = guided_unet(twin, context, context, fps)
    activations = peak_activation_bytes(lambda: eps(x, timesteps)) + held
    weights = resident_weight_bytes([unet, *(extra_modules or [])])
    runtime = 0
    if torch.device(device).type == "cpu":
        resident = current_rss_bytes()
        runtime = max(CPU_RUNTIME_BYTES, resident - weights if resident is not None else 0)
    return MemoryEstimate(weights, activations, runtime, str(device))
