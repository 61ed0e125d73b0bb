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
from collections.abc import Sequence

import torch
from einops import rearrange
from torch import nn

from ..errors import SamplingError
from ..sampling.denoiser import GuidanceRule, guide
from ..sampling.schedule import q_sample
from .subjects import Region
from .unet_3d import ControlResiduals, UNet3DModel


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


def known_frames_latent(known: torch.Tensor, frames: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A host latent whose first frames are known (a start image, a video's last frames) and a mask of the rest.

    Host samplers with inpainting (ComfyUI's ``noise_mask``) replace the masked-out part of ``x`` before every call by
    the latent noised with the run's own initial noise to the call's level, and the prediction there by the latent:
    along the frames axis that is the core's :class:`~..sampling.known_frames.KnownFrames` replacement.

    Args:
        known: ``[k, 4, h, w]`` latents of frames ``0..k-1`` (any scale; the host's own).
        frames: the video's frame count ``f > k``.

    Returns:
        (``[f, 4, h, w]`` the known frames then zeros, ``[f, 1, h, w]`` float32 mask: 0 on the known frames, 1 on those
        to generate).
    """
    from ..sampling.known_frames import check_known_frames

    if known.ndim != 4 or known.shape[1] != 4:
        raise SamplingError(f"known frames must be SD 1.x latents (frames, 4, h, w); got {tuple(known.shape)}")
    count = known.shape[0]
    check_known_frames(count, frames)
    samples = torch.zeros((frames, *known.shape[1:]), dtype=known.dtype, device=known.device)
    samples[:count] = known
    mask = torch.ones((frames, 1, *known.shape[2:]), dtype=torch.float32, device=known.device)
    mask[:count] = 0.0
    return samples, mask


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
        image_prompt_strength: float | Sequence[float] = 1.0,
        watermark_branch: bool = True,
        image_prompt_regions: Sequence[Region | None] | None = None,
        image_prompt_skip: torch.Tensor | None = None,
        skip_residuals: Sequence[torch.Tensor | None] | None = None,
        middle_residual: torch.Tensor | None = None,
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
            image_prompt_strength: scales the injection (1 = official). Several subjects: one strength per subject
                (a sequence of s), and then ``image_prompt`` / ``image_prompt_noise`` hold s streams per video stacked
                subject-major on the batch axis (``(s b)``), as the core denoiser's several-subjects path.
            watermark_branch: False skips the watermark-removal branch (opt-in speed mode).
            image_prompt_regions: several subjects: one (x1, y1, x2, y2) box in frame fractions or None per subject.
            image_prompt_skip: ``(b,)`` bool, True for the videos of the call that run without the image prompt (the
                unconditional pass sharing a call with the conditional one); None: every video takes it.
            skip_residuals / middle_residual: a ControlNet's residuals ``[(b f), c, h', w']`` (or None), one per skip
                connection in SD 1.x's ``input_blocks`` order and one for the middle block, added where SD 1.x's UNet
                adds them (:class:`~.unet_3d.ControlResiduals`); the exemplar pass takes none (zeros where it shares a
                call).

        Returns:
            ``[(b f), 4, h, w]`` noise prediction, in the weights' dtype.
        """
        dtype = self.dtype
        video = frames_to_video(x, frames).to(dtype)
        batch = video.shape[0]
        t = self._per_video(timesteps, batch, frames, x.device)
        text = self._per_video_context(context, batch, frames).to(dtype)
        control = None
        if skip_residuals is not None or middle_residual is not None:
            control = ControlResiduals([None if r is None else frames_to_video(r, frames) for r in skip_residuals or ()],
                                       None if middle_residual is None else frames_to_video(middle_residual, frames))
        if image_prompt is None:
            return video_to_frames(self.video_unet(video, t, text, watermark_branch=watermark_branch, control=control))
        if image_prompt_noise is None or image_prompt_alpha_cumprod is None or null_context is None:
            raise SamplingError("an image prompt needs its noise, its alpha_cumprod and the null text states")
        subjects = not isinstance(image_prompt_strength, (int, float))
        streams = len(image_prompt_strength) if subjects else 1
        skip = torch.zeros(batch, dtype=torch.bool) if image_prompt_skip is None else \
            image_prompt_skip.reshape(-1).to(device="cpu", dtype=torch.bool)
        if skip.shape[0] != batch:
            raise SamplingError(f"image_prompt_skip has {skip.shape[0]} entries for {batch} videos; give one per video")
        on = torch.nonzero(~skip).flatten()
        off = torch.nonzero(skip).flatten()
        rows = (torch.arange(streams).view(-1, 1) * batch + on.view(1, -1)).flatten()  # subject-major, on videos
        clean = image_prompt.to(device=x.device, dtype=torch.float32).expand(-1, -1, frames, -1, -1)
        if tuple(image_prompt_noise.shape) != tuple(clean.shape) or clean.shape[0] != streams * batch:
            raise SamplingError(f"{streams} image-prompt stream(s) per video for {batch} videos of {frames} frames "
                                f"need image-prompt latents and noise of {streams * batch} rows of {frames} frames; got "
                                f"{tuple(clean.shape)} and {tuple(image_prompt_noise.shape)}")
        exemplar_t = q_sample(clean[rows.to(x.device)], image_prompt_noise.to(device=x.device, dtype=torch.float32)[
            rows.to(x.device)], image_prompt_alpha_cumprod).to(dtype)
        null = null_context.to(device=x.device, dtype=dtype)
        null = null[:1].expand(rows.numel(), -1, -1) if subjects or null.shape[0] == 1 else null[rows.to(x.device)]
        t_rows = t[on.to(x.device)].repeat(streams)
        off_, on_ = off.to(x.device), on.to(x.device)
        if off.numel():  # the videos without the image prompt share the exemplar pass's UNet call (as the core's)
            eps_off, features = self.video_unet.predict_and_capture(
                video[off_], t[off_], text[off_], exemplar_t, t_rows, null, watermark_branch=watermark_branch,
                control=None if control is None else control.select(off_))
        else:
            eps_off, on_ = None, None
            features = self.video_unet.capture_image_prompt_features(exemplar_t, t_rows, null)
        count = on.numel()
        if subjects:
            features = [{site: f[i * count:(i + 1) * count] for site, f in features.items()} for i in range(streams)]
        if count == 0:
            return video_to_frames(eps_off)
        select = (lambda tensor: tensor) if on_ is None else (lambda tensor: tensor[on_])
        eps_on = self.video_unet(select(video), select(t), select(text), image_prompt_features=features,
                                 image_prompt_strength=image_prompt_strength, image_prompt_regions=image_prompt_regions,
                                 watermark_branch=watermark_branch,
                                 control=control if control is None or on_ is None else control.select(on_))
        if eps_off is None:
            return video_to_frames(eps_on)
        eps = torch.empty((batch, *eps_on.shape[1:]), dtype=eps_on.dtype, device=eps_on.device)
        eps[on_], eps[off.to(x.device)] = eps_on, eps_off
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
