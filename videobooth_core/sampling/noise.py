"""A sampling run's randomness, in the official order: the initial latent, then per step the image prompt's
noise and the update's noise; and the image prompt's per-step noising (written once, for every sampler).

All of it comes from a :class:`NoiseSource`, by default a caller-supplied ``torch.Generator``
(:class:`GeneratorNoise`; seed it on the CPU for results that match across devices).
"""

from __future__ import annotations

from typing import Protocol

import torch

from ..errors import SamplingError
from .known_frames import KnownFrames
from .schedule import q_sample


class NoiseSource(Protocol):
    """Where the loops' random numbers come from (a generator, or recorded tensors in tests)."""

    def initial(self, shape: tuple[int, ...]) -> torch.Tensor: ...
    def exemplar(self, step: int, shape: tuple[int, ...]) -> torch.Tensor: ...
    def step(self, step: int, shape: tuple[int, ...]) -> torch.Tensor: ...


class GeneratorNoise:
    """Standard normal noise from a ``torch.Generator`` in the order z, then per step exemplar, step noise.

    Noise is drawn on the generator's device (seed it on the CPU for results that match across devices)
    and moved to ``device``.
    """

    def __init__(
        self, generator: torch.Generator, device: torch.device | str = "cpu", initial_noise: torch.Tensor | None = None
    ) -> None:
        """``initial_noise``: an already drawn z (the official order draws z before the VAE sample)."""
        self.generator = generator
        self.device = torch.device(device)
        self.initial_noise = initial_noise

    def _draw(self, shape: tuple[int, ...]) -> torch.Tensor:
        noise = torch.randn(shape, generator=self.generator, device=self.generator.device, dtype=torch.float32)
        return noise.to(self.device)

    def initial(self, shape: tuple[int, ...]) -> torch.Tensor:
        if self.initial_noise is not None:
            if tuple(self.initial_noise.shape) != tuple(shape):
                raise SamplingError(f"initial noise has shape {tuple(self.initial_noise.shape)}, expected {tuple(shape)}")
            return self.initial_noise.to(self.device)
        return self._draw(shape)

    def exemplar(self, step: int, shape: tuple[int, ...]) -> torch.Tensor:
        return self._draw(shape)

    def step(self, step: int, shape: tuple[int, ...]) -> torch.Tensor:
        return self._draw(shape)


class ImagePromptNoising:
    """The image prompt (exemplar) at every step: its clean latent, repeated over the frames, noised to the step's
    timestep with fresh, per-frame independent noise - the official exemplar stream's input, for any sampler.

    The noise is drawn at every step, inside the injection window or not, so every setting consumes the same
    random stream (and the step noise that follows stays the same).
    """

    def __init__(
        self,
        clean: torch.Tensor | None,
        frames: int,
        noise: NoiseSource,
        device: torch.device | str = "cpu",
        image_prompt_steps: tuple[float, float] = (0.0, 1.0),
    ) -> None:
        """Args:
            clean: (b, 4, 1, h, w) clean image-prompt latent (VAE sample x 0.18215), or None (no image prompt:
                nothing is drawn). Several subjects: one row per subject, noised by one draw per step (subject-major),
                so one subject draws exactly as the single image prompt.
            frames: frames of the video latent.
            image_prompt_steps: (start, end) fractions of the schedule (0 = first step) where the image prompt is
                injected; (0, 1) is the official behaviour.
        """
        self.clean = None if clean is None else (
            clean.to(device=device, dtype=torch.float32).expand(-1, -1, frames, -1, -1))
        self.noise, self.device, self.image_prompt_steps = noise, device, image_prompt_steps

    def at(self, step: int, total: int, alpha_cumprod: float) -> torch.Tensor | None:
        """The noised image prompt (b, 4, frames, h, w) float32 for step ``step`` of ``total`` (0 = first), whose
        timestep has the cumulative product ``alpha_cumprod``; None without an image prompt or outside the window."""
        if self.clean is None:
            return None
        drawn = self.noise.exemplar(step, tuple(self.clean.shape)).to(self.device)
        start, end = self.image_prompt_steps
        if not start <= step / total < end:
            return None
        return q_sample(self.clean, drawn, alpha_cumprod)


def start_sampling(
    shape: tuple[int, int, int, int, int],
    noise: NoiseSource,
    device: torch.device | str,
    exemplar_clean: torch.Tensor | None,
    image_prompt_steps: tuple[float, float],
    known_latents: torch.Tensor | None,
    first_alpha_cumprod: float,
) -> tuple[torch.Tensor, ImagePromptNoising, KnownFrames | None]:
    """The start the respaced DDPM and the consistency loops share: the initial latent (the run's first draw), the
    image prompt's per-step noising, and the known frames put into the initial latent at the first step's level.

    Args:
        shape: (b, 4, frames, h, w) of the video latent.
        exemplar_clean: (b, 4, 1, h, w) clean image-prompt latent, or None.
        known_latents: (b, 4, k, h, w) clean latents of frames 0..k-1, or None.
        first_alpha_cumprod: the cumulative product of the first (noisiest) step's timestep.

    Returns:
        The initial x (b, 4, frames, h, w) on ``device``, the image prompt's noising, the known frames (None
        without ``known_latents``).
    """
    x = noise.initial(shape).to(device)
    image_prompt = ImagePromptNoising(exemplar_clean, shape[2], noise, device, image_prompt_steps)
    known = None if known_latents is None else KnownFrames(known_latents, x)
    if known is not None:
        x = known.at_level(x, first_alpha_cumprod)
    return x, image_prompt, known
