"""Frames whose clean latents are known before sampling: a start image (image-to-video: frame 0) or the last
frames of a previous video (extension: frames 0..k-1 of the continued video).

At every step the known frames of the sample are replaced by their clean latents noised to the level the sample
has reached (with the run's initial noise of those frames, so no extra random draws), and exactly by the clean
latents after the last step; the other frames are denoised attending to them (frame 0 is what every frame
attends to in VideoBooth's cross-frame attention, so a known frame 0 anchors the whole video). This is the
replacement method of inpainting samplers, applied along the time axis.

    known = KnownFrames(clean, initial_noise)      # clean (b, 4, k, h, w)
    x = known.at_level(x, alpha_cumprod)           # the official DDPM loop
    x = known.at_timestep(x, scheduler, t)         # diffusers' samplers (their own noising)
    x = known.at_level(x, None)                    # after the last step: exactly the clean latents
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange

from ..errors import SamplingError, explain
from .schedule import q_sample


def check_known_frames(count: int, frames: int, what: str = "start frames") -> None:
    """SamplingError unless ``count`` known frames leave at least one frame to generate among ``frames``."""
    if count < 1:
        raise SamplingError(explain(f"the {what} hold no frame", count, "give at least one frame"))
    if count >= frames:
        raise SamplingError(explain(
            f"{count} {what} leave no frame to generate in a video of", frames,
            f"raise --frames above {count} (the known frames count among the video's frames) or anchor on fewer "
            "frames (--extend-frames)"))


def check_long_video(request: Any, names: Any = None) -> None:
    """The long-video settings of a request, before any model loads: the context window and overlap work
    together, and the start frames (``start_frames`` (n, H, W, 3) or ``start_latents`` (1, 4, n, h, w), not both)
    leave at least one frame to generate. ``names``: how the caller's road names the settings (the flags when None)."""
    from ..settings import VAE_SCALE
    from .windows import check_context

    check_context(request.context_window, request.context_overlap, request.context_fuse,
                  *([names] if names is not None else []))
    frames_given = getattr(request, "start_frames", None)
    latents_given = getattr(request, "start_latents", None)
    if frames_given is not None and latents_given is not None:
        raise SamplingError("the start of the video comes from either frames (a start image, a video's last frames) "
                            "or latents; give one of start_frames and start_latents")
    if frames_given is not None:
        if not isinstance(frames_given, torch.Tensor) or frames_given.ndim not in (3, 4) or frames_given.shape[-1] != 3:
            raise SamplingError(explain("start_frames must be RGB frames (n, H, W, 3) or one image (H, W, 3); got",
                                        getattr(frames_given, "shape", type(frames_given).__name__),
                                        "give uint8 or [0, 1] float RGB pixels"))
        count = 1 if frames_given.ndim == 3 else frames_given.shape[0]
    elif latents_given is not None:
        if not isinstance(latents_given, torch.Tensor) or latents_given.ndim != 5 or latents_given.shape[1] != 4:
            raise SamplingError(explain("start_latents must be (1, 4, n, height/8, width/8); got",
                                        getattr(latents_given, "shape", type(latents_given).__name__),
                                        "pass the latents of a previous result (result.latents[:, :, -n:])"))
        expected = (request.height // VAE_SCALE, request.width // VAE_SCALE)
        if tuple(latents_given.shape[3:]) != expected:
            raise SamplingError(explain(f"start_latents must match the video's latent size {expected}; got",
                                        tuple(latents_given.shape[3:]), "generate at the size of the previous video"))
        count = latents_given.shape[2]
    else:
        return
    check_known_frames(count, request.frames)


class KnownFrames:
    """The known frames' clean latents and their noise; replaces frames ``0..k-1`` of a sample."""

    def __init__(self, clean: torch.Tensor, initial_noise: torch.Tensor) -> None:
        """Args:
            clean: (b, 4, k, h, w) clean latents (VAE space x 0.18215) of frames 0..k-1.
            initial_noise: the run's (b, 4, frames, h, w) initial noise (its first k frames noise the known ones).
        """
        if clean.ndim != 5 or clean.shape[1] != initial_noise.shape[1] or clean.shape[3:] != initial_noise.shape[3:]:
            raise SamplingError(explain(
                "the known frames' latents must be (batch, 4, frames, h, w) at the video's latent size "
                f"{tuple(initial_noise.shape[3:])}; got", tuple(clean.shape),
                "encode the start image or video frames at the video's size (height/8, width/8)"))
        count = clean.shape[2]
        check_known_frames(count, initial_noise.shape[2])
        self.count = count
        self.clean = clean.to(device=initial_noise.device, dtype=torch.float32).expand(initial_noise.shape[0], -1, -1,
                                                                                        -1, -1)
        self.noise = initial_noise[:, :, :count].float().clone()

    def _replace(self, x: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
        out = x.clone()
        out[:, :, :self.count] = frames.to(x.dtype)
        return out

    def at_level(self, x: torch.Tensor, alpha_cumprod: float | None) -> torch.Tensor:
        """``x`` (b, 4, frames, h, w) with the known frames noised to ``alpha_cumprod`` (q(x_t | x_0), as the
        official schedule noises), or exactly clean for None."""
        if alpha_cumprod is None:
            return self._replace(x, self.clean)
        return self._replace(x, q_sample(self.clean, self.noise, alpha_cumprod))

    def at_timestep(self, x: torch.Tensor, scheduler: Any, timestep: torch.Tensor | None) -> torch.Tensor:
        """``x`` with the known frames noised by a diffusers ``scheduler`` to ``timestep`` (its own
        parameterisation, e.g. Euler's sigma space), or exactly clean for None."""
        if timestep is None:
            return self._replace(x, self.clean)
        noised = scheduler.add_noise(self.clean, self.noise, torch.as_tensor(timestep).reshape(1))
        return self._replace(x, noised)


def fit_frames(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Frames (n, H, W, 3), uint8 or float in [0, 1], resized to cover ``height`` x ``width`` and centre-cropped
    (the aspect ratio kept), as (n, 3, height, width) float32 in [-1, 1] for the VAE."""
    if frames.ndim == 3:
        frames = frames[None]
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise SamplingError(explain("start frames must be RGB images (frames, H, W, 3); got", tuple(frames.shape),
                                    "give an RGB image or video frames"))
    pixels = rearrange(frames, "n h w c -> n c h w")
    pixels = pixels.float() / 255.0 if pixels.dtype == torch.uint8 else pixels.float()
    scale = max(height / pixels.shape[2], width / pixels.shape[3])
    size = (max(height, round(pixels.shape[2] * scale)), max(width, round(pixels.shape[3] * scale)))
    if size != tuple(pixels.shape[2:]):
        pixels = F.interpolate(pixels, size=size, mode="bilinear", antialias=True, align_corners=False)
    top, left = (size[0] - height) // 2, (size[1] - width) // 2
    pixels = pixels[:, :, top:top + height, left:left + width]
    return pixels.clamp(0.0, 1.0) * 2.0 - 1.0


def encode_start_frames(vae: Any, frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Known frames' clean latents: ``frames`` (n, H, W, 3) fitted to the video's size and VAE-encoded one frame
    at a time (the posterior mean, so no random draw: the seed's noise order stays that of a plain run).

    Returns:
        (1, 4, n, height/8, width/8) float32 latents x the VAE's scaling factor.
    """
    from ..conditioning.vae import vae_encode

    pixels = fit_frames(frames, height, width)
    latents = [vae_encode(vae, pixels[i:i + 1], sample=False).float().cpu() for i in range(pixels.shape[0])]
    return rearrange(torch.cat(latents), "n c h w -> 1 c n h w")
