"""Noise schedule and the official sampler: linear-beta DDPM, respaced, ancestral, fixed-large variance.

VideoBooth was trained on the DDPM/ADM schedule (betas linear in beta from 1e-4 to 0.02 over 1000 steps),
not Stable Diffusion's scaled-linear one. The official sampler respaces it IDDPM-style (250 steps by
default), predicts epsilon, never clips x0 and uses the *large* variance (beta) at every step.
Coefficients are computed in float64 and rounded to float32 when used, as the official code does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import SamplingError

TRAIN_TIMESTEPS = 1000
BETA_START = 1e-4
BETA_END = 0.02


def base_betas(num_train_timesteps: int = TRAIN_TIMESTEPS) -> np.ndarray:
    """Linear betas (float64), 1e-4 → 0.02 scaled to the number of training steps (1000 → unchanged)."""
    scale = 1000 / num_train_timesteps
    return np.linspace(scale * BETA_START, scale * BETA_END, num_train_timesteps, dtype=np.float64)


def respaced_timesteps(num_train_timesteps: int, num_steps: int) -> list[int]:
    """The kept original timesteps for ``num_steps`` evenly spaced steps, ascending.

    Same rule as IDDPM's ``space_timesteps`` with one section: start at 0, stride (T-1)/(S-1) accumulated
    in float and rounded half-to-even, so 250 steps keep {0, 4, 8, ..., 995, 999}.
    """
    if not 1 <= num_steps <= num_train_timesteps:
        raise SamplingError(f"steps must be between 1 and {num_train_timesteps}, got {num_steps}")
    stride = 1 if num_steps <= 1 else (num_train_timesteps - 1) / (num_steps - 1)
    taken, position = [], 0.0
    for _ in range(num_steps):
        taken.append(round(position))
        position += stride
    return sorted(set(taken))


def q_sample(clean: torch.Tensor, noise: torch.Tensor, alpha_cumprod: float) -> torch.Tensor:
    """q(x_t | x_0): ``sqrt(abar) * clean + sqrt(1 - abar) * noise``, in ``clean``'s dtype.

    ``alpha_cumprod`` is the float64 cumulative product at the timestep; both square roots are taken in float64
    and rounded to float32, as the official code does (so every sampler noises the image prompt identically).
    """
    signal = torch.tensor(math.sqrt(alpha_cumprod), dtype=torch.float32, device=clean.device).to(clean.dtype)
    spread = torch.tensor(math.sqrt(1.0 - alpha_cumprod), dtype=torch.float32, device=clean.device).to(clean.dtype)
    return signal * clean + spread * noise


@dataclass(frozen=True)
class StepCoefficients:
    """Float32 coefficients of one ancestral step (scalars as 0-d tensors)."""

    sqrt_alphas_cumprod: torch.Tensor
    sqrt_one_minus_alphas_cumprod: torch.Tensor
    sqrt_recip_alphas_cumprod: torch.Tensor
    sqrt_recipm1_alphas_cumprod: torch.Tensor
    posterior_mean_coef1: torch.Tensor
    posterior_mean_coef2: torch.Tensor
    log_variance: torch.Tensor


class RespacedDDPM:
    """The official sampler's schedule: respaced linear-beta DDPM with fixed-large variance.

    Index ``i`` is the respaced step (0 = cleanest); ``timestep_map[i]`` is the original timestep (0..999)
    given to the UNet.
    """

    def __init__(self, num_steps: int = 250, num_train_timesteps: int = TRAIN_TIMESTEPS) -> None:
        self.base_alphas_cumprod = np.cumprod(1.0 - base_betas(num_train_timesteps))
        self.timestep_map = respaced_timesteps(num_train_timesteps, num_steps)
        betas, last = [], 1.0
        for t in self.timestep_map:
            betas.append(1.0 - self.base_alphas_cumprod[t] / last)
            last = self.base_alphas_cumprod[t]
        self.betas = np.asarray(betas, dtype=np.float64)
        self.num_steps = len(self.betas)

        alphas = 1.0 - self.betas
        ac = np.cumprod(alphas)
        ac_prev = np.append(1.0, ac[:-1])
        self.alphas_cumprod = ac
        posterior_variance = self.betas * (1.0 - ac_prev) / (1.0 - ac)
        # fixed-large variance: beta_i, with the posterior variance at index 1 standing in for index 0
        large = np.append(posterior_variance[1], self.betas[1:]) if self.num_steps > 1 else posterior_variance
        self._tables = {
            "sqrt_alphas_cumprod": np.sqrt(ac),
            "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - ac),
            "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / ac),
            "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / ac - 1.0),
            "posterior_mean_coef1": self.betas * np.sqrt(ac_prev) / (1.0 - ac),
            "posterior_mean_coef2": (1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac),
            "log_variance": np.log(np.maximum(large, 1e-20)),
        }

    def coefficients(self, index: int, device: torch.device | str = "cpu") -> StepCoefficients:
        """The float32 coefficients of respaced step ``index``."""
        return StepCoefficients(
            **{name: torch.tensor(table[index], dtype=torch.float32, device=device) for name, table in self._tables.items()}
        )

    def add_noise(self, clean: torch.Tensor, noise: torch.Tensor, index: int) -> torch.Tensor:
        """q(x_t | x_0) at respaced step ``index``: sqrt(abar) * clean + sqrt(1 - abar) * noise."""
        return q_sample(clean, noise, float(self.alphas_cumprod[index]))

    def step(
        self, eps: torch.Tensor, x_t: torch.Tensor, index: int, noise: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One ancestral step: returns (x_{t-1}, predicted x_0). ``noise`` is ignored at index 0.

        All arithmetic in float32 (the official code's dtype), whatever the latent dtype.
        """
        c = self.coefficients(index, x_t.device)
        x32, eps32 = x_t.float(), eps.float()
        pred_x0 = c.sqrt_recip_alphas_cumprod * x32 - c.sqrt_recipm1_alphas_cumprod * eps32
        mean = c.posterior_mean_coef1 * pred_x0 + c.posterior_mean_coef2 * x32
        if index > 0:
            mean = mean + torch.exp(0.5 * c.log_variance) * noise.float()
        return mean.to(x_t.dtype), pred_x0.to(x_t.dtype)
