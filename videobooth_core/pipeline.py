"""The VideoBooth pipeline: load once, generate many. Used by the command line and the ComfyUI nodes.

    pipe = VideoBoothPipeline.from_models_dir("models", dtype="fp32", device="cpu")
    result = pipe.generate(GenerationRequest(prompt="a dog running on the beach", subject_word="dog",
                                             image=load_image("dog.jpg"), mask=load_mask("dog_mask.png")))
    result.frames  # (frames, height, width, 3) uint8
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from .loading.checkpoint import load_mapper, load_unet, parse_dtype
from .errors import SamplingError
from .conditioning.image_prompt import PreparedImagePrompt, prepare_image_prompt
from .models.mapper import Mapper, clip_vision_features
from .sampling.memory import MemoryEstimate, available_memory_bytes, estimate_step_memory
from .loading.models_dir import ModelFiles
from .sampling.schedulers import OFFICIAL_SAMPLER, SAMPLERS, SPACINGS, sample_with_scheduler
from .sampling.loop import GUIDANCE_RULES, GeneratorNoise, StepCallback, VideoDenoiser, sample_ddpm
from .sampling.schedule import RespacedDDPM
from .conditioning.text import NULL_PROMPT, encode_text, prepare_subject_prompt, tokenize
from .models.unet_3d import UNet3DModel

logger = logging.getLogger(__name__)

VAE_SCALE = 8
"""Pixels per latent cell."""


@dataclass(frozen=True)
class SamplingOptions:
    """Opt-in speed modes (each changes the result; measured deviations are in the README) and injection control."""

    single_frame_image_prompt: bool = False
    """Run the image-prompt stream on one frame instead of all (about a quarter less compute per step)."""
    image_prompt_steps: tuple[float, float] = (0.0, 1.0)
    """(start, end) fractions of the schedule where the image prompt is injected; (0, 1) is official."""
    watermark_branch: bool = True
    """False skips the watermark-removal branch (the released model always runs it)."""
    image_prompt_strength: float = 1.0
    """Scales the image prompt's update of frame 0's values in cross-frame attention (1 = official)."""
    batch_passes: bool = True
    """Batch the unconditional and image-prompt passes (same result up to float rounding)."""

    def __post_init__(self) -> None:
        start, end = self.image_prompt_steps
        if not 0.0 <= start <= end <= 1.0:
            raise SamplingError(f"image_prompt_steps must satisfy 0 <= start <= end <= 1, got {self.image_prompt_steps}")
        if not 0.0 <= self.image_prompt_strength <= 2.0:
            raise SamplingError(f"image prompt strength must be between 0 and 2, got {self.image_prompt_strength}")


@dataclass
class GenerationRequest:
    """One video to generate. Without ``image`` (and ``subject_word``) it is plain text-to-video."""

    prompt: str
    subject_word: str | None = None
    image: torch.Tensor | None = None
    """(H, W, 3) uint8 or float in [0, 1]: the photo of the subject."""
    mask: torch.Tensor | None = None
    """(H, W) subject mask (nonzero = subject), or None."""
    bbox: tuple[float, float, float, float] | None = None
    negative_prompt: str = NULL_PROMPT
    """The unconditional prompt; the official pipeline uses the literal "None"."""
    frames: int = 16
    width: int = 256
    height: int = 256
    steps: int = 250
    cfg_scale: float = 4.0
    guidance: str = "official"
    seed: int = 10
    image_prompt_padding: int = 0
    sampler: str = "ddpm"
    """``ddpm`` (official) or a diffusers sampler (see samplers.SAMPLERS)."""
    spacing: str = "trailing"
    """Timestep spacing of the diffusers samplers (``trailing`` or ``leading``)."""
    eta: float = 0.0
    options: "SamplingOptions" = None  # type: ignore[assignment]

    def validate(self) -> None:
        if self.frames < 1:
            raise SamplingError(f"frames must be at least 1, got {self.frames}")
        for name, value in (("width", self.width), ("height", self.height)):
            if value < VAE_SCALE or value % VAE_SCALE:
                raise SamplingError(
                    f"{name} must be a positive multiple of {VAE_SCALE}, got {value}; "
                    f"try {max(VAE_SCALE, round(value / VAE_SCALE) * VAE_SCALE)}"
                )
        if self.steps < 1 or self.steps > 1000:
            raise SamplingError(f"steps must be between 1 and 1000, got {self.steps}")
        if self.guidance not in GUIDANCE_RULES:
            raise SamplingError(f"guidance must be one of {GUIDANCE_RULES}, got {self.guidance!r}")
        if self.sampler not in SAMPLERS:
            raise SamplingError(f"unknown sampler {self.sampler!r}; choose one of {', '.join(SAMPLERS)}")
        if self.spacing not in SPACINGS:
            raise SamplingError(f"unknown timestep spacing {self.spacing!r}; choose one of {', '.join(SPACINGS)}")
        if (self.image is None) != (self.subject_word is None):
            raise SamplingError(
                "an image prompt needs both the image and the subject word (the prompt's word naming the subject); "
                "give both, or neither for text-to-video"
            )


@dataclass
class GenerationResult:
    latents: torch.Tensor
    """(1, 4, frames, height/8, width/8) float32, unscaled (VAE space x 0.18215)."""
    frames: torch.Tensor
    """(frames, height, width, 3) uint8."""
    prompt_used: str
    image_prompt: PreparedImagePrompt | None = None
    info: dict[str, Any] = field(default_factory=dict)


def latent_shape(frames: int, height: int, width: int) -> tuple[int, int, int, int, int]:
    """(1, 4, frames, height/8, width/8)."""
    return (1, 4, frames, height // VAE_SCALE, width // VAE_SCALE)


def fit_exemplar(exemplar: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Resize a (b, 4, 1, h, w) exemplar latent to the video's latent size (bilinear; a no-op at 256x256,
    the only size the model was trained at - other sizes are an extrapolation either way)."""
    size = (height // VAE_SCALE, width // VAE_SCALE)
    if tuple(exemplar.shape[-2:]) == size:
        return exemplar
    resized = torch.nn.functional.interpolate(exemplar[:, :, 0], size=size, mode="bilinear", align_corners=False)
    return resized[:, :, None]


class VideoBoothPipeline:
    """All VideoBooth models on one device; each method is one stage of the pipeline."""

    def __init__(
        self,
        unet: UNet3DModel,
        mapper: Mapper,
        vae: Any,
        text_encoder: Any,
        vision_encoder: Any,
        tokenizer: Any,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.unet, self.mapper, self.vae = unet, mapper, vae
        self.text_encoder, self.vision_encoder, self.tokenizer = text_encoder, vision_encoder, tokenizer
        self.device, self.dtype = torch.device(device), dtype
        self.unet.attach_projections(self.mapper.site_projections(), release_own=True)

    @classmethod
    def from_files(
        cls, files: ModelFiles, dtype: str | torch.dtype = "fp32", device: str = "cpu", stream_weights: bool = False
    ) -> "VideoBoothPipeline":
        """Load every model (UNet and mapper in ``dtype``; CLIP and the VAE stay float32, they are cheap).

        ``stream_weights``: keep the UNet's weights in its safetensors file and read them block by block at
        every UNet call (same results, a fraction of the memory; see :mod:`videobooth_core.loading.streaming`).
        """
        from .loading.encoders import load_clip_text_encoder, load_clip_tokenizer, load_clip_vision_encoder, load_vae

        torch_dtype = parse_dtype(dtype)
        if torch_dtype == torch.float16 and torch.device(device).type == "cpu":
            logger.warning("fp16 on the CPU has no fast kernels (2 real-size steps took over 16 minutes, fp32 under 2); "
                           "use bf16 or fp32 on the CPU, fp16 on GPUs")
        if stream_weights:
            from .loading.streaming import load_unet_streamed

            unet = load_unet_streamed(files.unet, dtype=torch_dtype, device=device)
        else:
            unet = load_unet(files.unet, dtype=torch_dtype, device=device)
        mapper = load_mapper(files.mapper, dtype=torch_dtype, device=device)
        vae = load_vae(files.vae, dtype=torch.float32, device=device)
        text = load_clip_text_encoder(files.clip_text, dtype=torch.float32, device=device)
        vision = load_clip_vision_encoder(files.clip_vision, dtype=torch.float32, device=device)
        tokenizer = load_clip_tokenizer(files.tokenizer)
        return cls(unet, mapper, vae, text, vision, tokenizer, device, torch_dtype)

    @classmethod
    def from_models_dir(
        cls, models_dir: str, dtype: str | torch.dtype = "fp32", device: str = "cpu", stream_weights: bool = False,
        **overrides,
    ) -> "VideoBoothPipeline":
        return cls.from_files(ModelFiles.from_models_dir(models_dir, **overrides), dtype, device, stream_weights)

    # -- stages ---------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_image_prompt(self, prepared: PreparedImagePrompt) -> torch.Tensor:
        """Coarse embedding: CLIP vision features → mapper → (1, 5, text width) word vectors (float32)."""
        features = clip_vision_features(self.vision_encoder, prepared.clip_pixels.to(self.device))
        mapper_param = next(self.mapper.parameters())
        return self.mapper([f.to(mapper_param.device, mapper_param.dtype) for f in features]).float()

    @torch.no_grad()
    def encode_prompt(self, prompt: str, subject_word: str | None = None, injected: torch.Tensor | None = None) -> tuple[torch.Tensor, str]:
        """Text states (1, 77, d) float32 and the text as tokenised; with ``injected`` the subject word's
        tokens are replaced by the mapper's word vectors."""
        if subject_word is None or injected is None:
            return encode_text(self.text_encoder, tokenize(self.tokenizer, prompt)).last_hidden_state.float(), prompt
        subject = prepare_subject_prompt(self.tokenizer, prompt, subject_word)
        states = encode_text(self.text_encoder, subject.input_ids, injected, subject.placeholder_ids).last_hidden_state
        return states.float(), subject.text

    @torch.no_grad()
    def encode_exemplar(self, prepared: PreparedImagePrompt, generator: torch.Generator) -> torch.Tensor:
        """Fine embedding source: the 256-pixel image prompt's VAE posterior sample x 0.18215, (1, 4, 1, 32, 32)."""
        from .loading.encoders import vae_encode

        latent = vae_encode(self.vae, prepared.vae_pixels.to(self.device), generator=generator, sample=True)
        return latent[:, :, None].float()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, chunk_size: int = 4) -> torch.Tensor:
        """(b, 4, f, h, w) latents → (b*f, 8h, 8w, 3) uint8 frames, decoded ``chunk_size`` frames at a time."""
        from .loading.encoders import vae_decode

        flat = latents.permute(0, 2, 1, 3, 4).reshape(-1, *latents.shape[1:2], *latents.shape[3:])
        pixels = vae_decode(self.vae, flat.to(self.device, torch.float32), chunk_size=chunk_size)
        # the official writer: (x * 0.5 + 0.5) * 255 + 0.5, clamped, truncated to uint8
        return ((pixels * 0.5 + 0.5) * 255 + 0.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu()

    def sample(
        self,
        cond_text: torch.Tensor,
        null_text: torch.Tensor,
        exemplar_clean: torch.Tensor | None,
        frames: int,
        height: int,
        width: int,
        steps: int,
        cfg_scale: float,
        guidance: str,
        generator: torch.Generator,
        callback: StepCallback | None = None,
        initial_noise: torch.Tensor | None = None,
        sampler: str = OFFICIAL_SAMPLER,
        spacing: str = "trailing",
        eta: float = 0.0,
        options: SamplingOptions | None = None,
    ) -> torch.Tensor:
        """The denoising loop from a (1, 4, frames, height/8, width/8) noise draw.

        ``sampler="ddpm"`` is the official respaced ancestral DDPM (sampling.sample_ddpm); the others are
        diffusers schedulers on the same training schedule (samplers.sample_with_scheduler).
        """
        options = options or SamplingOptions()
        denoiser = VideoDenoiser(
            self.unet, cond_text.to(self.device), null_text.to(self.device), cfg_scale, guidance,
            batch_passes=options.batch_passes, single_frame_image_prompt=options.single_frame_image_prompt,
            watermark_branch=options.watermark_branch, image_prompt_strength=options.image_prompt_strength,
        )
        shape = latent_shape(frames, height, width)
        self.check_memory(denoiser, shape, exemplar_clean is not None)
        noise = GeneratorNoise(generator, self.device, initial_noise)
        with torch.no_grad():
            if sampler == OFFICIAL_SAMPLER:
                return sample_ddpm(denoiser, RespacedDDPM(steps), shape, noise, exemplar_clean, callback, self.device,
                                   image_prompt_steps=options.image_prompt_steps)
            return sample_with_scheduler(denoiser, sampler, steps, shape, noise, generator, exemplar_clean, callback,
                                         self.device, spacing, eta, options.image_prompt_steps)

    def check_memory(self, denoiser: VideoDenoiser, shape: tuple[int, ...], image_prompt: bool) -> MemoryEstimate:
        """Estimate the sampling peak before the first step (kept in ``last_memory_estimate``); log it, and warn
        when the working memory sampling adds to the loaded models exceeds what the device has available."""
        estimate = estimate_step_memory(denoiser, tuple(shape), image_prompt, self.device,
                                        [self.mapper, self.vae, self.text_encoder, self.vision_encoder])
        self.last_memory_estimate = estimate
        logger.info(estimate.describe())
        available = available_memory_bytes(self.device)  # the loaded weights are already taken out of it
        if available is not None and estimate.activations_bytes > available:
            logger.warning(
                "%s: sampling needs about %.2f GB beyond the loaded models, more than the %.2f GB available, so it may "
                "fail or swap. Lower it with fewer frames or a smaller size, bf16 (fp16 on GPUs), or free memory by "
                "streaming the UNet's weights (--stream-weights / stream_weights=True)",
                estimate.describe(), estimate.activations_bytes / 2**30, available / 2**30,
            )
        return estimate

    last_memory_estimate: MemoryEstimate | None = None

    # -- everything -----------------------------------------------------------------------------
    def generate(self, request: GenerationRequest, callback: StepCallback | None = None, decode: bool = True) -> GenerationResult:
        """Image prompt → embeddings → sampling → frames. Randomness: one CPU generator seeded with ``seed``
        (initial noise first, then the VAE posterior sample, then per step exemplar and step noise)."""
        request.validate()
        generator = torch.Generator("cpu").manual_seed(int(request.seed))
        initial_noise = torch.randn(latent_shape(request.frames, request.height, request.width), generator=generator)
        prepared = None
        exemplar = None
        injected = None
        if request.image is not None:
            prepared = prepare_image_prompt(request.image, request.mask, request.bbox, request.image_prompt_padding)
        null_text, _ = self.encode_prompt(request.negative_prompt)
        if prepared is not None:
            injected = self.encode_image_prompt(prepared)
        cond_text, used = self.encode_prompt(request.prompt, request.subject_word, injected)
        if prepared is not None:
            exemplar = fit_exemplar(self.encode_exemplar(prepared, generator), request.height, request.width)
        latents = self.sample(cond_text, null_text, exemplar, request.frames, request.height, request.width,
                              request.steps, request.cfg_scale, request.guidance, generator, callback, initial_noise,
                              request.sampler, request.spacing, request.eta, request.options)
        frames = self.decode(latents) if decode else torch.empty(0)
        info = self.last_memory_estimate.as_dict() if self.last_memory_estimate else {}
        return GenerationResult(latents=latents, frames=frames, prompt_used=used, image_prompt=prepared, info=info)
