"""Latent consistency distillation of VideoBooth (LCM / AnimateLCM's recipe, on this pack's inference code).

One clip's loss, for a solver pair (t, s) of the skipping grid (:func:`..sampling.lcm.solver_pairs`; s is ``skip``
points of the 250-step training grid below t, or 0 below the lowest point):

1. ``x_t = q_sample(x_0, eps, abar_t)``; the image prompt noised to t (the sampler's per-step noising);
2. the student, the UNet with the LoRA, guidance-free (one conditional pass, the image prompt's features injected):
   ``f_student = c_skip(t) x_t + c_out(t) x0_hat`` (:func:`..sampling.lcm.consistency_output`);
3. the frozen teacher, the same UNet without the LoRA, with the **official guidance** at a fixed scale (channels
   0-2 guided, channel 3 conditional; the unconditional pass without the image prompt): the core's own
   :meth:`..sampling.denoiser.VideoDenoiser.predict`; one DDIM ODE step from t to s
   (:func:`..sampling.lcm.ddim_step`) gives ``x_s``;
4. the target, the EMA LoRA (or, with ``target_ema`` 0, the student's current LoRA) without gradient, guidance-free
   at ``(x_s, s)`` with the image prompt noised to s: ``f_target`` (exactly ``x_s`` at s = 0, the boundary);
5. the pseudo-Huber loss ``sqrt((f_student - f_target)^2 + c^2) - c``, averaged (``c`` a setting).

Every random draw of a clip (its solver pair, its noise, the image prompt's two noises) comes from a generator
seeded by (seed, sample number): a resumed or data-parallel run draws what an uninterrupted one does.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..models.unet_3d import UNet3DModel
from ..sampling.denoiser import VideoDenoiser
from ..sampling.lcm import alphas_cumprod, consistency_output, ddim_step, solver_pairs
from ..sampling.schedule import q_sample
from .lora_train import LoraHooks, LoraLayers

DISTILL_PURPOSE = 5
"""The purpose number of the distillation's per-clip generator (after :mod:`.model`'s 1-4)."""


def huber_loss(prediction: torch.Tensor, target: torch.Tensor, c: float) -> torch.Tensor:
    """LCM's pseudo-Huber loss ``mean(sqrt((prediction - target)^2 + c^2) - c)`` (c 0: the mean absolute error)."""
    difference = prediction.float() - target.float()
    return (torch.sqrt(difference ** 2 + c * c) - c).mean()


def teacher_solver_step(teacher: VideoDenoiser, x_t: torch.Tensor, timestep: int, previous: int,
                        exemplar_t: torch.Tensor | None, table: np.ndarray | None = None) -> torch.Tensor:
    """The teacher's DDIM ODE step from ``timestep`` to ``previous`` (original timesteps): one guided prediction of
    the core's denoiser (its guidance rule and scale), then :func:`..sampling.lcm.ddim_step` on the training
    schedule. x_t (b, 4, f, h, w) float32 -> x_s of the same shape."""
    table = alphas_cumprod() if table is None else table
    eps, _, _ = teacher.predict(x_t, timestep, exemplar_t)
    alpha_t = torch.tensor(table[timestep], dtype=torch.float64)
    alpha_s = torch.tensor(table[previous], dtype=torch.float64)
    return ddim_step(x_t.float(), eps.float(), alpha_t, alpha_s)


@dataclass(frozen=True)
class DistillDraw:
    """One clip's random draws (module docstring)."""

    timestep: int
    previous: int
    noise: torch.Tensor
    exemplar_noise_t: torch.Tensor
    exemplar_noise_s: torch.Tensor


def draw(generator: torch.Generator, shape: tuple[int, ...], pairs: list[tuple[int, int]]) -> DistillDraw:
    """A clip's solver pair (uniform over the grid) and its three noises, in this order, from ``generator``."""
    index = int(torch.randint(0, len(pairs), (1,), generator=generator))
    timestep, previous = pairs[index]
    noise = torch.randn(shape, generator=generator)
    return DistillDraw(timestep, previous, noise, torch.randn(shape, generator=generator),
                       torch.randn(shape, generator=generator))


class DistillLoss:
    """The loss of the module docstring for one clip; the UNet is shared by student, teacher and target and the
    LoRA hooks choose which acts (:class:`.lora_train.LoraHooks`)."""

    def __init__(self, unet: UNet3DModel, hooks: LoraHooks, student: LoraLayers, target: LoraLayers | None,
                 guidance_scale: float, skip: int, huber_c: float) -> None:
        """``target``: the EMA LoRA, or None (the student's own weights, without gradient)."""
        self.unet, self.hooks, self.student, self.target = unet, hooks, student, target
        self.guidance_scale, self.huber_c = float(guidance_scale), float(huber_c)
        self.pairs = solver_pairs(skip)
        self.table = alphas_cumprod()

    def __call__(self, clean: torch.Tensor, exemplar_clean: torch.Tensor | None, cond_text: torch.Tensor,
                 null_text: torch.Tensor, drawn: DistillDraw) -> torch.Tensor:
        """The loss (scalar, float32) of one clip: ``clean`` (1, 4, f, h, w) latent, ``exemplar_clean`` its image
        prompt's clean latent over the frames (1, 4, f, h, w) or None, (1, 77, d) text states."""
        device = clean.device
        t, s = drawn.timestep, drawn.previous
        abar_t, abar_s = float(self.table[t]), float(self.table[s])
        x_t = q_sample(clean.float(), drawn.noise.to(device), abar_t)
        exemplar_t = exemplar_s = None
        if exemplar_clean is not None:
            exemplar_t = q_sample(exemplar_clean.float(), drawn.exemplar_noise_t.to(device), abar_t)
            exemplar_s = q_sample(exemplar_clean.float(), drawn.exemplar_noise_s.to(device), abar_s)
        free = VideoDenoiser(self.unet, cond_text, null_text, cfg_scale=1.0, guidance="all")
        with self.hooks.use(self.student):  # the student: LoRA on, with gradient
            eps, _, _ = free.predict(x_t, t, exemplar_t)
        prediction = consistency_output(x_t, eps.float(), t, abar_t)
        with torch.no_grad():
            teacher = VideoDenoiser(self.unet, cond_text, null_text, cfg_scale=self.guidance_scale, guidance="official")
            with self.hooks.use(None):
                x_s = teacher_solver_step(teacher, x_t, t, s, exemplar_t, self.table)
            if s == 0:  # the boundary: f(x, 0) = x, no model pass needed
                target = x_s
            else:
                with self.hooks.use(self.target if self.target is not None else self.student):
                    eps_s, _, _ = free.predict(x_s, s, exemplar_s)
                target = consistency_output(x_s, eps_s.float(), s, abar_s)
        return huber_loss(prediction, target, self.huber_c)


__all__ = ["DISTILL_PURPOSE", "DistillDraw", "DistillLoss", "draw", "huber_loss", "teacher_solver_step"]
