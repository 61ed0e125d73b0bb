"""The sampling loop: classifier-free guidance, per-step image-prompt (exemplar) noising, ancestral updates.

One guided step, as the official pipeline computes it:
1. the clean exemplar latent (repeated over the frames) is noised to the step's timestep with fresh,
   per-frame independent noise;
2. the UNet runs on it with the null text and its per-site ``attn1`` inputs are captured (frame 0) -
   batched with the unconditional pass, which needs no image prompt;
3. the conditional pass runs with the subject prompt and the captured features injected;
4. guidance: channels 0-2 ``uncond + s * (cond - uncond)``, channel 3 the raw conditional prediction
   (the official rule), or all four channels guided (``guidance="all"``);
5. the scheduler's ancestral update with fresh noise (drawn at every step, unused at the last).

All randomness comes from a :class:`NoiseSource`, by default a caller-supplied ``torch.Generator``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol

import torch

from ..errors import SamplingError
from .schedule import RespacedDDPM
from ..models.unet_3d import UNet3DModel

GuidanceRule = Literal["official", "all"]
GUIDANCE_RULES: tuple[str, ...] = ("official", "all")


class NoiseSource(Protocol):
    """Where the loop's random numbers come from (a generator, or recorded tensors in tests)."""

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


def guide(eps_cond: torch.Tensor, eps_uncond: torch.Tensor, scale: float, rule: GuidanceRule = "official") -> torch.Tensor:
    """Classifier-free guidance on (b, 4, f, h, w) predictions.

    ``"official"``: channels 0-2 guided, channel 3 the conditional prediction (the official code's rule,
    inherited from DiT's learned-sigma split); ``"all"``: every channel guided.
    """
    guided = eps_uncond + scale * (eps_cond - eps_uncond)
    if rule == "official":
        return torch.cat([guided[:, :3], eps_cond[:, 3:]], dim=1)
    if rule == "all":
        return guided
    raise SamplingError(f"unknown guidance rule {rule!r}; choose one of {GUIDANCE_RULES}")


@dataclass
class StepOutput:
    """Everything one guided step computed (latents float32, (b, 4, f, h, w))."""

    x_prev: torch.Tensor
    pred_x0: torch.Tensor
    eps: torch.Tensor
    eps_cond: torch.Tensor
    eps_uncond: torch.Tensor | None
    exemplar_t: torch.Tensor | None


StepCallback = Callable[[int, int, StepOutput], None]
"""Called after every step with (step number from 0, total steps, the step's output)."""


class VideoDenoiser:
    """Runs the UNet for one guided step (steps 1-4 of the module docstring)."""

    def __init__(
        self,
        unet: UNet3DModel,
        cond_text: torch.Tensor,
        null_text: torch.Tensor,
        cfg_scale: float = 4.0,
        guidance: GuidanceRule = "official",
        batch_passes: bool = True,
        single_frame_image_prompt: bool = False,
        watermark_branch: bool = True,
        image_prompt_strength: float = 1.0,
    ) -> None:
        """Args:
            cond_text / null_text: (1, 77, d) text states.
            batch_passes: batch the unconditional and image-prompt passes into one UNet call (same math;
                False follows the official call order).
            single_frame_image_prompt: opt-in speed mode: run the image-prompt stream on one frame instead
                of all (an approximation: the official stream mixes its independently noised frames).
            watermark_branch: False skips the watermark-removal branch (opt-in speed mode, changes output).
            image_prompt_strength: scales the image prompt's injection (1 = official).
        """
        if guidance not in GUIDANCE_RULES:
            raise SamplingError(f"unknown guidance rule {guidance!r}; choose one of {GUIDANCE_RULES}")
        self.unet = unet
        self.cond_text = cond_text
        self.null_text = null_text
        self.cfg_scale = float(cfg_scale)
        self.guidance = guidance
        self.batch_passes = batch_passes
        self.single_frame_image_prompt = single_frame_image_prompt
        self.watermark_branch = watermark_branch
        self.image_prompt_strength = float(image_prompt_strength)

    def predict(
        self, x_t: torch.Tensor, timestep: int, exemplar_t: torch.Tensor | None, exemplar_timestep: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Return (guided eps, eps_cond, eps_uncond) for x_t (b, 4, f, h, w) at an original timestep.

        ``exemplar_t`` is the noised exemplar (b, 4, f, h, w) or None (text only);
        ``exemplar_timestep`` defaults to ``timestep``.
        """
        unet = self.unet
        dtype = next(unet.parameters()).dtype
        batch = x_t.shape[0]
        x_in = x_t.to(dtype)
        null = self.null_text.to(dtype).expand(batch, -1, -1)
        cond = self.cond_text.to(dtype).expand(batch, -1, -1)
        t = torch.full((batch,), timestep, dtype=torch.long, device=x_t.device)
        need_uncond = self.cfg_scale != 1.0 or self.guidance == "official"
        features = None
        eps_uncond = None
        head = {"watermark_branch": self.watermark_branch}
        if exemplar_t is not None and self.single_frame_image_prompt:
            exemplar_t = exemplar_t[:, :, :1]
        if exemplar_t is not None:
            te = torch.full((batch,), exemplar_timestep if exemplar_timestep is not None else timestep,
                            dtype=torch.long, device=x_t.device)
            # a stream of another frame count (single-frame mode) cannot share a batch with the video
            if self.batch_passes and need_uncond and exemplar_t.shape[2] == x_t.shape[2]:
                eps_uncond, captured = unet(
                    torch.cat([x_in, exemplar_t.to(dtype)]), torch.cat([t, te]), torch.cat([null, null]),
                    capture_image_prompt_features=True, head_batch=batch, **head,
                )
                features = {site: value[batch:] for site, value in captured.items()}
            else:
                _, features = unet(exemplar_t.to(dtype), te, null, capture_image_prompt_features=True, head_batch=0)
        eps_cond, _ = unet(x_in, t, cond, image_prompt_features=features,
                           image_prompt_strength=self.image_prompt_strength, **head)
        if need_uncond and eps_uncond is None:
            eps_uncond, _ = unet(x_in, t, null, **head)
        eps_cond = eps_cond.float()
        if eps_uncond is None:
            return eps_cond, eps_cond, None
        eps_uncond = eps_uncond.float()
        return guide(eps_cond, eps_uncond, self.cfg_scale, self.guidance), eps_cond, eps_uncond


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
    if exemplar_clean is not None:
        exemplar_clean = exemplar_clean.to(device=device, dtype=torch.float32).expand(-1, -1, shape[2], -1, -1)
    total = schedule.num_steps
    for step, index in enumerate(reversed(range(total))):
        timestep = schedule.timestep_map[index]
        exemplar_t = None
        in_range = image_prompt_steps[0] <= step / total < image_prompt_steps[1]
        if exemplar_clean is not None:
            # drawn even when unused, so every setting consumes the same random stream
            exemplar_noise = noise.exemplar(step, tuple(exemplar_clean.shape)).to(device)
            if in_range:
                exemplar_t = schedule.add_noise(exemplar_clean, exemplar_noise, index)
        eps, eps_cond, eps_uncond = denoiser.predict(x, timestep, exemplar_t)
        step_noise = noise.step(step, shape).to(device)
        x_prev, pred_x0 = schedule.step(eps, x, index, step_noise)
        if callback is not None:
            callback(step, total, StepOutput(x_prev, pred_x0, eps, eps_cond, eps_uncond, exemplar_t))
        x = x_prev
    return x
