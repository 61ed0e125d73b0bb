"""VideoBooth in the frames-as-batch layout of host samplers (the road of ComfyUI's ``MODEL``, issue 25).

Host samplers (ComfyUI's KSampler, SamplerCustomAdvanced, core context windows) treat a video latent as a batch
of images, ``[(b f), 4, h, w]``, as AnimateDiff models do, and call the network once per conditioning with an
already scaled input ``x_t`` and a (float) timestep on the 0..999 scale. :class:`FramesAsBatchUNet` is that
network: an ``nn.Module`` around the pack's own :class:`~.unet_3d.UNet3DModel`, with no dependency on the host.

One call = one prediction of the core's :class:`~..sampling.denoiser.VideoDenoiser`, without the guidance:

* with an image prompt (the positive conditioning carries its clean latent): the exemplar is noised to the
  call's timestep with the given noise, its per-site features are captured by a plain pass with the null text,
  and the main pass runs with them injected - the conditional pass of the official sampler;
* without one (the negative conditioning): a plain pass - the official unconditional pass, which has no exemplar.

The guidance itself (channels 0-2 guided, channel 3 the conditional prediction) is :func:`guide` on host
predictions, which keep channels on axis 1 in both layouts (:func:`official_cfg`).
"""

from __future__ import annotations

import math
import re

import torch
from einops import rearrange
from torch import nn

from ..errors import SamplingError
from ..sampling.denoiser import GuidanceRule, guide
from ..sampling.schedule import q_sample
from .unet_3d import UNet3DModel


def frames_to_video(x: torch.Tensor, frames: int) -> torch.Tensor:
    """``[(b f), c, h, w]`` → ``(b, c, f, h, w)``; the leading axis must be a whole number of videos."""
    if x.ndim != 4 or x.shape[0] % frames:
        raise SamplingError(f"a frames-as-batch latent of shape {tuple(x.shape)} is not a whole number of "
                            f"{frames}-frame videos; give a latent batch that is a multiple of the frame count")
    return rearrange(x, "(b f) c h w -> b c f h w", f=frames)


def video_to_frames(x: torch.Tensor) -> torch.Tensor:
    """``(b, c, f, h, w)`` → ``[(b f), c, h, w]``."""
    return rearrange(x, "b c f h w -> (b f) c h w")


def alpha_cumprod_of_sigma(sigma: float) -> float:
    """The cumulative signal fraction ``abar`` of a k-diffusion sigma (``sigma**2 = (1 - abar) / abar``), in float64.

    Host samplers pass ``x_t = x / sqrt(1 + sigma**2)``, which is the DDPM ``x_t`` of this ``abar``; the exemplar is
    noised to the same point of the schedule."""
    if not math.isfinite(sigma) or sigma < 0:
        raise SamplingError(f"sigma {sigma!r} is not a finite non-negative number")
    return 1.0 / (1.0 + float(sigma) ** 2)


def official_cfg(cond: torch.Tensor, uncond: torch.Tensor, scale: float,
                 rule: GuidanceRule = "official") -> torch.Tensor:
    """Classifier-free guidance on host predictions ``[(b f), 4, h, w]`` (noise or ``x - denoised``; the rule is
    linear per channel, so it is the same in either): the core's :func:`guide`, whose channel axis is axis 1 in
    both layouts."""
    return guide(cond, uncond, scale, rule)


IMAGE_PROMPT_TWIN_RE = re.compile(r"^(?P<stem>.*\.attn1\.to_[kv])\.weight$")


def image_prompt_twin(key: str) -> str | None:
    """The image prompt's projection that a weight patch of ``key`` also belongs to, or None.

    A LoRA's delta on a site's ``attn1.to_k``/``to_v`` (the video tokens' key/value projection) also goes to the image
    prompt's ``attn1.to_k_image_prompt``/``to_v_image_prompt``: the image prompt's tokens are attended to together
    with frame 0's, so the two stay in one key space (the rule of the pack's own LoRA node,
    :func:`~..loading.sd_checkpoint.kv_target_modules`)."""
    match = IMAGE_PROMPT_TWIN_RE.match(key)
    return None if match is None else f"{match['stem']}_image_prompt.weight"


def image_prompt_noise(seed: int, timestep: float, shape: tuple[int, ...]) -> torch.Tensor:
    """The image prompt's noise for one call, drawn on the CPU from ``(seed, timestep)`` alone (float32).

    A host calls the network without telling it which step it is at, may call it several times per step (context
    windows, second-order samplers) and may be cancelled and rerun; keying the draw on the seed and the timestep
    gives every call of one step the same exemplar, and a rerun the same video."""
    key = (int(seed) * 1_000_003 + int(round(float(timestep) * 64))) % (2**63 - 1)
    return torch.randn(shape, generator=torch.Generator().manual_seed(key), dtype=torch.float32)


class FramesAsBatchUNet(nn.Module):
    """The VideoBooth UNet with the frames-as-batch interface of host samplers.

    ``forward(x, timesteps, context, frames=..., image_prompt=..., image_prompt_noise=..., ...)`` returns the
    noise prediction ``[(b f), 4, h, w]``.

    The UNet's modules are registered here under their own names (``down_blocks.0...``), so a host that patches
    weights by ``state_dict`` name (ComfyUI's LoRA loaders map ``lora_unet_down_blocks_0_..._attn1_to_k`` to
    ``down_blocks.0....attn1.to_k.weight``) finds them where they act: the mapper's key/value projections, which the
    released model attends with, are registered as each site's ``attn1``/``attn2`` ``to_k``/``to_v`` (the UNet's own,
    never used, were released when they were attached), and the image prompt's as ``attn1.to_k_image_prompt`` /
    ``to_v_image_prompt``. The same modules stay in use by reference, so a patched weight is the weight used.
    """

    def __init__(self, unet: UNet3DModel) -> None:
        super().__init__()
        if unet.attached_projections is not None:
            if not unet.released_own_projections:
                raise SamplingError("attach the mapper's projections with release_own=True before wrapping the UNet: "
                                    "its own attn1/attn2 to_k/to_v would otherwise shadow the ones in use")
            for site in unet.attention_sites:
                block, projections = site.transformer_blocks[0], unet.attached_projections[site.site]
                block.attn1.to_k, block.attn1.to_v = projections.attn1_key, projections.attn1_value
                block.attn1.to_k_image_prompt = projections.image_prompt_key
                block.attn1.to_v_image_prompt = projections.image_prompt_value
                block.attn2.to_k, block.attn2.to_v = projections.text_key, projections.text_value
        for name, child in unet.named_children():
            self.add_module(name, child)
        self.__dict__["video_unet"] = unet  # by reference: its modules are registered above under their own names

    @property
    def dtype(self) -> torch.dtype:
        return next(self.video_unet.parameters()).dtype

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor,
        frames: int,
        image_prompt: torch.Tensor | None = None,
        image_prompt_noise: torch.Tensor | None = None,
        image_prompt_alpha_cumprod: float | None = None,
        null_context: torch.Tensor | None = None,
        image_prompt_strength: float = 1.0,
        watermark_branch: bool = True,
    ) -> torch.Tensor:
        """Predict the noise of a frames-as-batch latent.

        Args:
            x: ``[(b f), 4, h, w]`` the scaled noisy latent ``x_t`` (what a host passes after its
                ``calculate_input``).
            timesteps: ``[(b f)]`` or a scalar, the timestep on the 0..999 training scale (float or integer; the
                embedding is the same for an integral float). Every frame of a video must share one.
            context: ``(b, 77, d)`` or ``[(b f), 77, d]`` text states (a host repeats a cond over the batch).
            frames: frames per video ``f``.
            image_prompt: ``(b, 4, 1, h, w)`` the clean image-prompt latent (VAE sample x 0.18215), or None (the
                unconditional pass, or plain text-to-video).
            image_prompt_noise: ``(b, 4, f, h, w)`` standard normal noise for this call's exemplar (independent per
                frame, as the official stream); required with ``image_prompt``.
            image_prompt_alpha_cumprod: ``abar`` of this call's timestep (float64 as the schedule computes it);
                required with ``image_prompt``.
            null_context: ``(1 or b, 77, d)`` the null prompt's text states, for the exemplar pass.
            image_prompt_strength: scales the injection (1 = official).
            watermark_branch: False skips the watermark-removal branch (opt-in speed mode).

        Returns:
            ``[(b f), 4, h, w]`` noise prediction, in the weights' dtype.
        """
        dtype = self.dtype
        video = frames_to_video(x, frames).to(dtype)
        batch = video.shape[0]
        t = self._per_video(timesteps, batch, frames, x.device)
        text = self._per_video_context(context, batch, frames).to(dtype)
        features = None
        if image_prompt is not None:
            if image_prompt_noise is None or image_prompt_alpha_cumprod is None or null_context is None:
                raise SamplingError("an image prompt needs its noise, its alpha_cumprod and the null text states")
            clean = image_prompt.to(device=x.device, dtype=torch.float32).expand(-1, -1, frames, -1, -1)
            if tuple(image_prompt_noise.shape) != tuple(clean.shape):
                raise SamplingError(f"image-prompt noise has shape {tuple(image_prompt_noise.shape)}, expected "
                                    f"{tuple(clean.shape)}")
            exemplar_t = q_sample(clean, image_prompt_noise.to(device=x.device, dtype=torch.float32),
                                  image_prompt_alpha_cumprod)
            null = null_context.to(device=x.device, dtype=dtype).expand(batch, -1, -1)
            features = self.video_unet.capture_image_prompt_features(exemplar_t.to(dtype), t, null)
        eps = self.video_unet(video, t, text, image_prompt_features=features,
                              image_prompt_strength=image_prompt_strength,
                        watermark_branch=watermark_branch)
        return video_to_frames(eps)

    def call_activation_bytes(self, batch: int, height: int, width: int, image_prompt: bool = True) -> int:
        """Peak activation bytes of one call on ``batch`` frames of ``height`` x ``width`` latents, measured on a
        storage-free twin (what a host's memory planning needs): with ``image_prompt`` the conditional call, whose
        exemplar pass runs the UNet a second time, the worst case of a step's calls."""
        from ..sampling.memory import meta_twin, peak_activation_bytes

        twin = FramesAsBatchUNet(meta_twin(self.video_unet))
        meta, dtype = torch.device("meta"), self.dtype
        x = torch.empty((batch, 4, height, width), device=meta, dtype=dtype)
        context = torch.empty((1, 77, self.video_unet.config.cross_attention_dim), device=meta, dtype=dtype)
        extra = {}
        if image_prompt:
            extra = {"image_prompt": torch.empty((1, 4, 1, height, width), device=meta),
                     "image_prompt_noise": torch.empty((1, 4, batch, height, width), device=meta),
                     "image_prompt_alpha_cumprod": 0.5, "null_context": context}
        return peak_activation_bytes(lambda: twin(x, torch.tensor(500.0, device=meta), context, batch, **extra))

    @staticmethod
    def _per_video(timesteps: torch.Tensor | float, batch: int, frames: int, device: torch.device) -> torch.Tensor:
        """(b,) timesteps from a scalar or one per frame (which must agree within each video)."""
        t = torch.as_tensor(timesteps, device=device).reshape(-1)
        if t.numel() == 1:
            return t.expand(batch)
        if t.numel() != batch * frames:
            raise SamplingError(f"{t.numel()} timesteps for {batch} videos of {frames} frames; give one per frame "
                                f"or one in all")
        per_video = t.reshape(batch, frames)
        if not bool((per_video == per_video[:, :1]).all()):
            raise SamplingError("the frames of one video have different timesteps; a video is denoised as a whole")
        return per_video[:, 0]

    @staticmethod
    def _per_video_context(context: torch.Tensor, batch: int, frames: int) -> torch.Tensor:
        """(b, 77, d) text states from one per video or one per frame (the same within each video)."""
        if context.shape[0] == batch:
            return context
        if context.shape[0] == batch * frames:
            return context[::frames]
        if context.shape[0] == 1:
            return context.expand(batch, -1, -1)
        raise SamplingError(f"{context.shape[0]} text states for {batch} videos of {frames} frames")
