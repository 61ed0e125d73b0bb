"""The VideoBooth pipeline: load once, generate many. Used by the command line and the ComfyUI nodes.

    pipe = VideoBoothPipeline.from_models_dir("models", dtype="fp32", device="cpu")
    result = pipe.generate(GenerationRequest(prompt="a dog running on the beach", subject_word="dog",
                                             image=load_image("dog.jpg"), mask=load_mask("dog_mask.png")))
    result.frames  # (frames, height, width, 3) uint8
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .conditioning.embeddings import Conditioning, encode_exemplar, encode_image_prompt, encode_prompt
from .conditioning.image_prompt import PreparedImagePrompt
from .conditioning.subjects import prepare_photo
from .conditioning.text import WHOLE_WORD
from .conditioning.vae import decode_video, frames_to_uint8
from .loading.checkpoint import load_mapper, load_unet, parse_dtype
from .loading.models_dir import ModelFiles
from .models.mapper import Mapper
from .models.unet_3d import UNet3DModel
from .sampling.denoiser import StepCallback, VideoDenoiser
from .sampling.memory import MemoryEstimate, available_memory_bytes
from .sampling.known_frames import encode_start_frames
from .sampling.run import prepare_denoiser
# the stages the pipeline composes, also imported from here by the nodes and older callers
from .sampling.seeded import fit_exemplar, latent_shape, sample_seeded  # noqa: F401
from .sampling.windows import ContextOptions, context_options, long_video_info
from .settings import GenerationSettings, Names, SamplingOptions, check_request, log_once
from .subjects_generation import single_subject_request, subjects_conditioning

logger = logging.getLogger(__name__)


@dataclass(kw_only=True)
class GenerationRequest(GenerationSettings):
    """One video to generate. Without ``image`` (and ``subject_word``) it is plain text-to-video.

    The settings (frames, size, steps, sampler, cfg_scale, seed, options...) with their defaults and ranges are
    those of :class:`videobooth_core.settings.GenerationSettings`."""

    prompt: str
    subject_word: str | None = None
    image: torch.Tensor | None = None
    """(H, W, 3) uint8 or float in [0, 1]: the photo of the subject."""
    mask: torch.Tensor | None = None
    """(H, W) subject mask (nonzero = subject), or None."""
    bbox: tuple[float, float, float, float] | None = None
    subjects: list[Any] = field(default_factory=list)
    """More subjects, each a :class:`videobooth_core.conditioning.subjects.Subject` (word, photo, mask, bbox,
    strength, region) bound to its own word of the prompt; they follow ``image``/``subject_word`` when both are given.
    One subject in all is exactly the single-subject path."""
    start_frames: torch.Tensor | None = None
    """(n, H, W, 3) uint8 or [0, 1] float frames the video starts with, or one (H, W, 3) image: a start image
    (image-to-video) or a previous video's last frames (extension); fitted to the video's size (cover, centre
    crop), VAE-encoded, held at every step and exact at the end. They count among ``frames``."""
    start_latents: torch.Tensor | None = None
    """Instead of ``start_frames``: (1, 4, n, height/8, width/8) clean latents, e.g. a previous result's
    ``latents[:, :, -4:]`` (extension without a VAE round trip)."""
    prepared_photos: dict[Any, Any] = field(default_factory=dict, repr=False, compare=False)
    """Filled by validation, leave it out: the photos prepared once per request and kept for the conditioning
    (:func:`videobooth_core.conditioning.subjects.prepare_photo`); copies made with ``dataclasses.replace`` share it."""

    def validate(self, tokenizer: Any = None, device: Any = None, *, names: Names | None = None,
                 fine_injection: Any = None) -> list[str]:
        """The one validation (:func:`videobooth_core.settings.check_request`): raises a VideoBoothError naming
        the bad value; logs and returns the warnings (each once per process). With ``tokenizer`` the prompts are
        checked against CLIP's 77 tokens; with ``device`` the device must exist here; ``names`` and
        ``fine_injection`` as :func:`check_request` takes them."""
        warnings = check_request(self, tokenizer, device, names=names, fine_injection=fine_injection)
        for warning in warnings:
            log_once(warning, __name__)
        return warnings


@dataclass
class GenerationResult:
    latents: torch.Tensor
    """(1, 4, frames, height/8, width/8) float32, unscaled (VAE space x 0.18215)."""
    frames: torch.Tensor
    """(frames, height, width, 3) uint8."""
    prompt_used: str
    image_prompt: PreparedImagePrompt | None = None
    info: dict[str, Any] = field(default_factory=dict)


# -- the stages that compose the others, each written once (the pipeline and the ComfyUI nodes call them) --------
def load_unet_and_mapper(
    unet_path: str | Path,
    mapper_path: str | Path,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    stream_weights: bool = False,
) -> tuple[UNet3DModel, Mapper]:
    """The VideoBooth model pair, loaded and joined: the mapper's per-site key/value projections are attached to
    the UNet, which checks that the two belong together (a ModelMismatchError naming both files otherwise) and
    frees the UNet's own projections, which the released model never uses.

    ``stream_weights``: keep the UNet's weights in its safetensors file and read them block by block at every
    UNet call (same results, a fraction of the memory; see :mod:`videobooth_core.loading.streaming`).
    """
    if stream_weights:
        from .loading.streaming import load_unet_streamed

        unet = load_unet_streamed(unet_path, dtype=dtype, device=device)
    else:
        unet = load_unet(unet_path, dtype=dtype, device=device)
    mapper = load_mapper(mapper_path, dtype=dtype, device=device)
    unet.attach_projections(mapper.site_projections(), release_own=True, unet_name=Path(unet_path).name,
                            mapper_name=Path(mapper_path).name)
    return unet, mapper


@contextmanager
def progress_bar(show: bool, callback: StepCallback | None = None,
                 label: str = "VideoBooth sampling") -> Iterator[StepCallback | None]:
    """A step callback that also draws a tqdm progress bar on stderr (when ``show``), then calls ``callback``."""
    if not show:
        yield callback
        return
    from tqdm.auto import tqdm

    bar = tqdm(desc=label, unit="step", file=sys.stderr)

    def report(step: int, total: int, output: Any) -> None:
        if bar.total != total:
            bar.reset(total=total)
        bar.update(1)
        if callback is not None:
            callback(step, total, output)

    try:
        yield report
    finally:
        bar.close()


class VideoBoothPipeline:
    """All VideoBooth models on one device; each method is one stage of the pipeline, a thin call of the
    core function that the ComfyUI nodes call too."""

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
        if getattr(unet, "attached_projections", None) is None:  # a pair not joined by load_unet_and_mapper
            unet.attach_projections(mapper.site_projections(), release_own=True)

    @classmethod
    def from_files(
        cls, files: ModelFiles, dtype: str | torch.dtype = "fp32", device: str = "cpu", stream_weights: bool = False
    ) -> "VideoBoothPipeline":
        """Load every model (UNet and mapper in ``dtype``; CLIP and the VAE stay float32, they are cheap).

        ``stream_weights``: keep the UNet's weights in its safetensors file and read them block by block at
        every UNet call (same results, a fraction of the memory; see :mod:`videobooth_core.loading.streaming`).
        """
        from .loading.clip import load_clip_text_encoder, load_clip_vision_encoder
        from .conditioning.tokenizer import load_clip_tokenizer
        from .loading.vae import load_vae

        torch_dtype = parse_dtype(dtype)
        if torch_dtype == torch.float16 and torch.device(device).type == "cpu":
            logger.warning("fp16 on the CPU has no fast kernels (2 real-size steps took over 16 minutes, fp32 under 2); "
                           "use bf16 or fp32 on the CPU, fp16 on GPUs")
        unet, mapper = load_unet_and_mapper(files.unet, files.mapper, torch_dtype, device, stream_weights)
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

    def use_sd_models(self, base_checkpoint: str | Path | None = None, loras: Sequence[Any] = (),
                      kv: str | None = None) -> list[str]:
        """Personalise the spatial layers: an SD 1.x checkpoint's (:mod:`loading.sd_checkpoint`), then LoRAs merged
        (:mod:`loading.lora`; ``loras`` are ``LoraSpec`` or ``(path, strength)``; text-encoder parts go to the
        CLIP text encoder). ``kv``: ``"mapper"`` or ``"ignore"``, the K/V layers' fate (default: each loader's).
        :meth:`restore_weights` undoes all of it exactly. Returns one line per change, for logs and summaries."""
        from .loading.lora import DEFAULT_KV_MODE, LoraSpec, apply_loras
        from .loading.sd_checkpoint import load_sd_checkpoint

        lines = []
        if base_checkpoint is not None:
            self.weight_patch, report = load_sd_checkpoint(self.unet, base_checkpoint, kv=kv or "ignore",
                                                           patch=self.weight_patch)
            lines.append(f"{Path(base_checkpoint).name}: {report.describe()}")
        specs = [spec if isinstance(spec, LoraSpec) else LoraSpec(*spec) for spec in loras]
        if specs:
            self.weight_patch, report = apply_loras(self.unet, specs, text_encoder=self.text_encoder,
                                                    kv=kv or DEFAULT_KV_MODE, patch=self.weight_patch)
            lines.append(report.describe())
        return lines

    def restore_weights(self) -> None:
        """Undo :meth:`use_sd_models` exactly (the original tensors are put back)."""
        if self.weight_patch is not None:
            self.weight_patch.undo()
            self.weight_patch = None

    weight_patch: Any = None

    # -- stages ---------------------------------------------------------------------------------
    def encode_image_prompt(self, prepared: PreparedImagePrompt) -> torch.Tensor:
        """Coarse embedding: (1, 5, text width) float32 word vectors
        (:func:`conditioning.embeddings.encode_image_prompt`)."""
        return encode_image_prompt(self.vision_encoder, self.mapper, prepared)

    def encode_prompt(self, prompt: str, subject_word: str | None = None, injected: torch.Tensor | None = None,
                      subject_match: str = WHOLE_WORD) -> tuple[torch.Tensor, str]:
        """Text states (1, 77, d) float32 and the text as tokenised; with ``injected`` the subject word's
        tokens are replaced by the mapper's word vectors (:func:`conditioning.embeddings.encode_prompt`)."""
        return encode_prompt(self.text_encoder, self.tokenizer, prompt, subject_word, injected, subject_match)

    def encode_exemplar(self, prepared: PreparedImagePrompt, generator: torch.Generator) -> torch.Tensor:
        """Fine embedding source: the image prompt's VAE posterior sample x 0.18215, (1, 4, 1, 32, 32)."""
        return encode_exemplar(self.vae, prepared, generator)

    def encode_start(self, request: GenerationRequest) -> torch.Tensor | None:
        """The clean (1, 4, k, h, w) latents of the request's first frames (``start_latents``, or ``start_frames``
        VAE-encoded at the video's size), or None."""
        if request.start_latents is not None:
            return request.start_latents.float()
        if request.start_frames is not None:
            return encode_start_frames(self.vae, request.start_frames, request.height, request.width)
        return None

    def decode(self, latents: torch.Tensor, chunk_size: int = 4) -> torch.Tensor:
        """(b, 4, f, h, w) latents → (b*f, 8h, 8w, 3) uint8 frames, decoded ``chunk_size`` frames at a time."""
        return frames_to_uint8(decode_video(self.vae, latents, chunk_size))

    def condition(self, request: GenerationRequest, options: SamplingOptions) -> Conditioning:
        """The single-subject conditioning: the photo prepared (if any), its word vectors spliced into the
        prompt's text states, the negative prompt's text states."""
        prepared = None
        if request.image is not None:  # prepared by the validation before, taken from the request
            prepared = prepare_photo(request, request.image, request.mask, request.bbox)
        null_text, _ = self.encode_prompt(request.negative_prompt)
        injected = None if prepared is None else self.encode_image_prompt(prepared)
        cond_text, used = self.encode_prompt(request.prompt, request.subject_word, injected, request.subject_match)
        return Conditioning(cond_text=cond_text, null_text=null_text, prompt_used=used, image_prompt=prepared,
                            image_prompt_strength=options.image_prompt_strength, shown=prepared)

    def prepare_denoiser(self, conditioning: Conditioning, shape: tuple[int, int, int, int, int], cfg_scale: float,
                         guidance: str, options: SamplingOptions, context: ContextOptions | None = None) -> VideoDenoiser:
        """The guided denoiser (:func:`sampling.run.prepare_denoiser`) of ``conditioning``, its memory checked
        before the first step; with ``context`` a long video is denoised by windows (:mod:`sampling.windows`)."""
        denoiser, estimate = prepare_denoiser(
            self.unet, conditioning.cond_text, conditioning.null_text, shape, self.device,
            image_prompt=conditioning.image_prompt is not None, cfg_scale=cfg_scale, guidance=guidance,
            image_prompt_strength=conditioning.image_prompt_strength,
            single_frame_image_prompt=options.single_frame_image_prompt, watermark_branch=options.watermark_branch,
            batch_passes=options.batch_passes,
            resident_models=[self.mapper, self.vae, self.text_encoder, self.vision_encoder], context=context,
            subject_strengths=conditioning.subject_strengths, subject_regions=conditioning.subject_regions,
        )
        self.check_memory(estimate)
        return denoiser

    def check_memory(self, estimate: MemoryEstimate) -> MemoryEstimate:
        """Keep the sampling estimate (``last_memory_estimate``), log it, and warn when the working memory
        sampling adds to the loaded models exceeds what the device has available."""
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
    def generate(self, request: GenerationRequest, callback: StepCallback | None = None, decode: bool = True,
                 progress: bool = False) -> GenerationResult:
        """Image prompt → embeddings → sampling → frames, for one subject or several (:mod:`.subjects_generation`
        conditions those). Randomness: one CPU generator seeded with ``seed`` (initial noise first, then the VAE
        posterior sample, then per step exemplar and step noise; see :func:`sample_seeded`). ``progress=True``
        draws a progress bar of the steps on stderr; ``callback`` is called after every step either way."""
        request.validate(tokenizer=self.tokenizer)
        options = request.options or SamplingOptions()
        if request.subjects:  # one subject without a region is exactly the single-subject path
            single = single_subject_request(request, options)
            if single is not None:
                request, options = single, single.options
        conditioning = (subjects_conditioning(self, request, options) if request.subjects
                        else self.condition(request, options))
        shape = latent_shape(request.frames, request.height, request.width)
        context = context_options(request)
        denoiser = self.prepare_denoiser(conditioning, shape, request.cfg_scale, request.guidance, options, context)
        start_latents = self.encode_start(request)
        with progress_bar(progress, callback) as report:
            latents = sample_seeded(
                denoiser, request.seed, shape, self.device, sampler=request.sampler, steps=request.steps,
                spacing=request.spacing, eta=request.eta, image_prompt_steps=options.image_prompt_steps,
                callback=report, vae=self.vae, image_prompt=conditioning.image_prompt, context=context,
                start_latents=start_latents, lcm_cfg=request.lcm_cfg,
            )
        frames = self.decode(latents) if decode else torch.empty(0)
        info = self.last_memory_estimate.as_dict() if self.last_memory_estimate else {}
        info.update(long_video_info(request.frames, context, start_latents))
        info.update(conditioning.info)
        return GenerationResult(latents=latents, frames=frames, prompt_used=conditioning.prompt_used,
                                image_prompt=conditioning.shown, info=info)
