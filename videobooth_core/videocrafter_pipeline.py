"""VideoCrafter1/2 generation, the Python API: a checkpoint of any of the four released kinds, a prompt (and for
image-to-video a start image) in, frames out, with the official sampler and defaults, or one of the pack's fast
samplers (``sampler="dpmpp_2m", steps=25``; README: VideoCrafter1 and VideoCrafter2 has the import line):

    pipe = VideoCrafterPipeline.from_models_dir("models")            # finds models/videocrafter/*.ckpt
    result = pipe.generate(VideoCrafterRequest(prompt="a panda playing guitar", seed=123))
    result.frames  # (frames, height, width, 3) uint8
    pipe.generate(VideoCrafterRequest(prompt="a panda playing guitar", frames=64, context_window=16))  # long video

Every stage is the one the tests compare with the official code: :mod:`.loading.videocrafter` (checkpoint, UNet,
projector), :mod:`.conditioning.openclip_text` (prompt -> context), :mod:`.sampling.videocrafter` (the official DDIM,
the fast samplers on the same schedule), the SD VAE
of :mod:`.loading.vae` (decoded frame by frame, ``z / 0.18215``). Frames are turned to uint8 as the official
``save_videos`` does: clamp to [-1, 1], ``(x + 1) / 2 * 255`` truncated.

Sizes: any height and width the UNet accepts (multiples of 8 x 2^(levels-1): 64 for the released models), not
only the released 320x512 / 576x1024; frames from 1 to 64 in one UNet call (the released models were trained on 16;
temporal attention has no positional limit except VC1's relative positions, which clamp beyond 16), up to 256 with
context windows (``context_window``: windows of consecutive frames fused at every step, :func:`context_options`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .errors import CheckpointError, ImagePromptError, SamplingError, explain
from .loading.videocrafter import (
    KIND_NAMES,
    load_image_projector,
    load_videocrafter_unet,
    missing_encoders,
    read_videocrafter_checkpoint,
)
from .models.videocrafter.config import KIND_I2V_512_V1, RELEASED_SAMPLING, SamplingDefaults
from .sampling.noise import GeneratorNoise, NoiseSource
from .sampling.videocrafter import (
    OFFICIAL_SAMPLER,
    VideoCrafterDDIM,
    guided_unet,
    sample_videocrafter_ddim,
    sample_videocrafter_scheduler,
    windowed_eps,
)
from .sampling.windows import CONTIGUOUS, ContextOptions, check_context
from .settings import VIDEOCRAFTER_MAX_FRAMES, Names, VideoCrafterSettings, flag_names

logger = logging.getLogger(__name__)

MAX_FRAMES = VIDEOCRAFTER_MAX_FRAMES
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_ENCODER_SIZE = 224


@dataclass
class VideoCrafterRequest(VideoCrafterSettings):
    """One generation: a prompt (and for image-to-video a start image) and the settings of
    :class:`~.settings.VideoCrafterSettings` (defaults, ranges: :data:`~.settings.VIDEOCRAFTER_SETTINGS`); ``None``
    takes the kind's official value (:data:`RELEASED_SAMPLING`)."""

    prompt: str
    start_image: torch.Tensor | None = None
    """Image-to-video only: ``(H, W, 3)`` float in [0, 1] or uint8, resized to the video's size as the official
    loader does (bilinear), then encoded by the image encoder."""

    def resolved(self, defaults: SamplingDefaults) -> "VideoCrafterRequest":
        return replace(self, height=self.height or defaults.height, width=self.width or defaults.width,
                       fps=self.fps if self.fps is not None else defaults.fps)


@dataclass
class VideoCrafterResult:
    frames: torch.Tensor
    """``(frames, height, width, 3)`` uint8."""
    latents: torch.Tensor
    """``(1, 4, frames, height / 8, width / 8)`` float32, the sampler's output."""
    request: VideoCrafterRequest


def size_multiple(unet: torch.nn.Module) -> int:
    """Pixel sizes must be multiples of this: the VAE's 8 times the UNet's downsampling."""
    return 8 * 2 ** (len(unet.config.channel_mult) - 1)


class VideoCrafterPipeline:
    """A loaded VideoCrafter model: UNet, VAE, text encoder and tokenizer (+ image encoder and projector for I2V)."""

    def __init__(self, kind: str, unet, vae, text_encoder, tokenizer, *, projector=None, image_encoder=None,
                 device: str | torch.device = "cpu") -> None:
        self.kind, self.unet, self.vae = kind, unet, vae
        self.text_encoder, self.tokenizer = text_encoder, tokenizer
        self.projector, self.image_encoder = projector, image_encoder
        self.device = torch.device(device)
        self.defaults = RELEASED_SAMPLING[kind]

    @classmethod
    def from_files(cls, checkpoint: str | os.PathLike, tokenizer: str | os.PathLike, *,
                   text_encoder: str | os.PathLike | None = None, image_encoder: str | os.PathLike | None = None,
                   dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                   weights_device: str | torch.device | None = None) -> "VideoCrafterPipeline":
        """Load from a ``model.ckpt`` (or its safetensors conversion), the CLIP tokenizer folder, and the text /
        image encoder files when the checkpoint lacks them (see :func:`.loading.videocrafter.missing_encoders`).

        ``device`` is where :meth:`generate` computes; ``weights_device`` (default ``device``) where the modules are
        loaded, for a host that moves them to ``device`` itself before generating (ComfyUI's memory management
        keeps them on its offload device between runs)."""
        from .conditioning.openclip_text import load_videocrafter_text_encoder
        from .conditioning.tokenizer import load_clip_tokenizer
        from .loading.vae import load_vae

        kind, state = read_videocrafter_checkpoint(checkpoint)
        # what neither the checkpoint nor a given file provides is named before anything heavy loads
        still = [m for m in missing_encoders(kind, state)
                 if not ((text_encoder and "text encoder" in m) or (image_encoder and "image encoder" in m))]
        if still:
            raise CheckpointError(explain(f"the {KIND_NAMES[kind]} checkpoint lacks {'; '.join(still)}", checkpoint,
                                          "give those files (--text-encoder / --image-encoder) or use the released "
                                          "model.ckpt, which carries them"))
        tok = load_clip_tokenizer(tokenizer)
        compute, device = device, device if weights_device is None else weights_device
        _, unet = load_videocrafter_unet(checkpoint, state_dict=state, dtype=dtype, device=device)
        vae = load_vae(checkpoint, dtype=torch.float32, device=device)
        text = load_videocrafter_text_encoder(state, source=checkpoint, text_encoder_path=text_encoder,
                                              device=device)
        projector = image = None
        if kind == KIND_I2V_512_V1:
            projector = load_image_projector(checkpoint, state, dtype=dtype, device=device)
            image = load_videocrafter_image_encoder(state, source=checkpoint, image_encoder_path=image_encoder,
                                                    device=device)
        return cls(kind, unet, vae, text, tok, projector=projector, image_encoder=image, device=compute)

    @classmethod
    def from_models_dir(cls, models_dir: str | os.PathLike, model: str | None = None, **kwargs) -> "VideoCrafterPipeline":
        """Load the VideoCrafter model of ``models_dir`` (``videocrafter/`` or ``checkpoints/``; ``model`` names one
        when there are several) with the folder's CLIP tokenizer."""
        from .loading.models_dir import find_tokenizer_dir

        path, _ = pick_videocrafter_model(models_dir, model)
        return cls.from_files(path, find_tokenizer_dir(Path(models_dir)), **kwargs)

    # -- stages ------------------------------------------------------------------------------------------
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """``(len(prompts), 77, 1024)`` penultimate-layer OpenCLIP context in the UNet's dtype."""
        from .conditioning.openclip_text import encode_penultimate, tokenize_openclip

        return encode_penultimate(self.text_encoder, tokenize_openclip(self.tokenizer, prompts)).to(self.unet.dtype)

    def image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """``(b, 3, H, W)`` in [-1, 1] -> the projector's ``(b, 16, 1024)`` image context (official preprocessing:
        :func:`antialiased_resize` to 224, CLIP normalisation; last-layer tokens without ``ln_post``)."""
        pixels = antialiased_resize(images.float(), (IMAGE_ENCODER_SIZE, IMAGE_ENCODER_SIZE))
        mean = torch.tensor(CLIP_MEAN, device=pixels.device)[:, None, None]
        std = torch.tensor(CLIP_STD, device=pixels.device)[:, None, None]
        pixels = (((pixels + 1) / 2) - mean) / std
        encoder_dtype = next(self.image_encoder.parameters()).dtype
        with torch.no_grad():
            tokens = self.image_encoder(pixels.to(self.device, encoder_dtype)).last_hidden_state
            return self.projector(tokens.to(self.projector.latents.dtype)).to(self.unet.dtype)

    def estimate_memory(self, request: VideoCrafterRequest):
        """The peak memory of one guided step of ``request`` (a dry run on the meta device; see
        :func:`.sampling.videocrafter.estimate_videocrafter_step_memory`), counting every loaded model."""
        from .sampling.videocrafter import estimate_videocrafter_step_memory

        request = self.check(request)
        shape = (1, 4, request.frames, request.height // 8, request.width // 8)
        tokens = 77 + (self.projector.config.num_queries if self.projector is not None else 0)
        others = [m for m in (self.vae, self.text_encoder, self.projector, self.image_encoder) if m is not None]
        return estimate_videocrafter_step_memory(self.unet, shape, tokens, self.device, others,
                                                 context_window=request.context_window)

    def check(self, request: VideoCrafterRequest, names: Names | None = None) -> VideoCrafterRequest:
        """The request with the kind's defaults filled in, every value checked against this model (named as
        ``names`` calls it: see :func:`check_request`)."""
        return check_request(request, self.kind, size_multiple(self.unet), names=names)

    def generate(self, request: VideoCrafterRequest, callback: Callable[[int, int, Any], None] | None = None,
                 noise: NoiseSource | None = None) -> VideoCrafterResult:
        """Generate one video.

        Args:
            callback: ``callback(step, total, record)`` after every step (``step`` from 0; ``record`` the
                step's :class:`~.sampling.videocrafter.StepRecord`).
            noise: the run's draws (default: a CPU ``torch.Generator`` seeded with ``request.seed``: ``x_T``
                then one draw per step, the official order).
        """
        from .conditioning.vae import vae_decode

        request = self.check(request)
        defaults = self.defaults
        context = self.encode_prompts([request.prompt])
        uncond = self.encode_prompts([request.negative_prompt])
        if self.kind == KIND_I2V_512_V1:
            image = _start_image_tensor(request.start_image, request.height, request.width)
            context = torch.cat([context, self.image_tokens(image)], dim=1)
            uncond = torch.cat([uncond, self.image_tokens(torch.zeros(1, 3, IMAGE_ENCODER_SIZE, IMAGE_ENCODER_SIZE))],
                               dim=1)
        fps = torch.tensor([request.fps], device=self.device)
        shape = (1, 4, request.frames, request.height // 8, request.width // 8)
        if noise is None:
            noise = GeneratorNoise(torch.Generator().manual_seed(request.seed), self.device)
        total = step_count(request)
        on_step = (lambda record: callback(record.index, total, record)) if callback else None
        with torch.no_grad():
            eps = windowed_eps(guided_unet(self.unet, context, uncond, fps), context_options(request))
            latents = _sample(request, defaults, eps, shape, noise, self.device, on_step)
            pixels = vae_decode(self.vae, latents.float()[0].permute(1, 0, 2, 3))  # (f, 3, H, W) in about [-1, 1]
        frames = ((pixels.float().clamp(-1, 1) + 1) / 2 * 255).to(torch.uint8).permute(0, 2, 3, 1).cpu()
        return VideoCrafterResult(frames=frames, latents=latents.float().cpu(), request=request)


def check_request(request: VideoCrafterRequest, kind: str, multiple: int = 64, *,
                  names: Names | None = None) -> VideoCrafterRequest:
    """``request`` with the kind's official defaults filled in, every value checked (its range from
    :data:`~.settings.VIDEOCRAFTER_SETTINGS`, named as ``names`` calls it: a flag, a jobs key, a widget); needs no
    model (only the size multiple depends on it: 64 for the released UNets), so a command line checks it before
    loading one.

    Raises:
        SamplingError, ImagePromptError: the value, and the fix, named.
    """
    request.check(names)
    check_videocrafter_context(request, names)
    request = request.resolved(RELEASED_SAMPLING[kind])
    for name in ("height", "width"):
        value = getattr(request, name)
        if value < multiple or value % multiple:
            raise SamplingError(explain(f"the video {name} must be a multiple of {multiple}", value,
                                        f"use e.g. {max(multiple, round(value / multiple) * multiple)}"))
    if request.sampler == OFFICIAL_SAMPLER:  # steps and eta, with the official schedule's own limits
        VideoCrafterDDIM(request.steps, request.eta)
    if (request.start_image is None) == (kind == KIND_I2V_512_V1):
        raise ImagePromptError(explain(
            "the image-to-video model needs a start image" if kind == KIND_I2V_512_V1 else
            f"a start image needs the image-to-video model ({KIND_NAMES[KIND_I2V_512_V1]}); this is",
            KIND_NAMES[kind], "give --start-image" if kind == KIND_I2V_512_V1 else
            "use the Image2Video-512 checkpoint, or leave the start image out"))
    return request


def context_options(request: VideoCrafterRequest) -> ContextOptions | None:
    """The context windows of ``request`` (windows of consecutive frames, :data:`~.sampling.windows.CONTIGUOUS`),
    or None without ``context_window`` (every frame in one UNet call, the official path)."""
    if request.context_window is None:
        return None
    return ContextOptions(request.context_window, request.context_overlap, request.context_fuse, schedule=CONTIGUOUS)


def check_videocrafter_context(request: VideoCrafterRequest, names: Names | None = None) -> None:
    """The context window, overlap and fuse mode together (overlap below the window), named as ``names`` calls
    them; videos of more than :data:`MAX_FRAMES` frames need windows (one UNet call over all of them would hold
    the attention of every frame at once, and VC1's relative positions clamp beyond 16 frames)."""
    say = (lambda key: names(key) or flag_names(key)) if names is not None else flag_names
    if request.context_window is not None:
        check_context(request.context_window, request.context_overlap, request.context_fuse, say, schedule=CONTIGUOUS)
    elif request.frames > MAX_FRAMES:
        raise SamplingError(explain(f"more than {MAX_FRAMES} frames need context windows", request.frames,
                                    f"give {say('context_window')} 16 (the trained length), or at most {MAX_FRAMES} "
                                    f"{say('frames')}"))
def step_count(request: VideoCrafterRequest) -> int:
    """The UNet steps ``request`` runs: ``steps`` for a fast sampler; the official DDIM's timesteps, which are not
    always ``steps`` (30 gives 31: :func:`.sampling.videocrafter.ddim_timesteps`)."""
    if request.sampler == OFFICIAL_SAMPLER:
        return len(VideoCrafterDDIM(request.steps, request.eta))
    return request.steps


def _sample(request: VideoCrafterRequest, defaults: SamplingDefaults, eps_function, shape: tuple[int, ...],
            noise: NoiseSource, device: torch.device, on_step) -> torch.Tensor:
    """The request's sampler from noise to the clean latent: the official DDIM, or a fast one on the same model
    (the kind's ``use_scale`` schedule either way, the same guidance and ``x_T``)."""
    scale = defaults.x0_scale
    if request.sampler == OFFICIAL_SAMPLER:
        return sample_videocrafter_ddim(eps_function, VideoCrafterDDIM(request.steps, request.eta, **scale), shape,
                                        noise, guidance=request.guidance, device=device, on_step=on_step)
    return sample_videocrafter_scheduler(eps_function, request.sampler, request.steps, shape, noise,
                                         guidance=request.guidance, device=device, on_step=on_step, **scale)


def _gaussian_kernel(size: int, sigma: float) -> torch.Tensor:
    offsets = torch.arange(size, dtype=torch.float32) - size // 2
    kernel = torch.exp(-offsets ** 2 / (2 * sigma ** 2))
    return kernel / kernel.sum()


def antialiased_resize(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The official image embedder's resize (``kornia.geometry.resize(..., 'bicubic', align_corners=True,
    antialias=True)``): when shrinking, a Gaussian blur first (per axis sigma ``(factor - 1) / 2``, at least 0.001;
    an odd kernel of ``max(4 sigma, 3)`` taps; reflected borders), then bicubic interpolation with aligned corners.

    ``images`` ``(b, c, H, W)`` float -> ``(b, c, *size)``."""
    height, width = images.shape[-2:]
    factors = (height / size[0], width / size[1])
    if max(factors) > 1:
        sigmas = [max((f - 1.0) / 2.0, 0.001) for f in factors]
        taps = [int(max(4.0 * s, 3)) for s in sigmas]
        taps = [t if t % 2 else t + 1 for t in taps]
        taps = [1 if n == 1 else t for n, t in zip((height, width), taps)]
        channels = images.shape[1]
        (tap_h, tap_w), (sigma_h, sigma_w) = taps, sigmas
        if tap_w > 1:  # along the width first, then the height, as kornia's separable filter
            kernel = _gaussian_kernel(tap_w, sigma_w).to(images).view(1, 1, 1, tap_w).expand(channels, 1, 1, tap_w)
            images = F.conv2d(F.pad(images, (tap_w // 2, tap_w // 2, 0, 0), mode="reflect"), kernel, groups=channels)
        if tap_h > 1:
            kernel = _gaussian_kernel(tap_h, sigma_h).to(images).view(1, 1, tap_h, 1).expand(channels, 1, tap_h, 1)
            images = F.conv2d(F.pad(images, (0, 0, tap_h // 2, tap_h // 2), mode="reflect"), kernel, groups=channels)
    return F.interpolate(images, size, mode="bicubic", align_corners=True)


def _start_image_tensor(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``(H, W, 3)`` uint8 or [0, 1] float -> ``(1, 3, height, width)`` in [-1, 1], resized bilinearly (the
    official ``load_image_batch`` resizes with cv2 INTER_LINEAR to the video's size)."""
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ImagePromptError(explain("the start image must be (height, width, 3)", tuple(image.shape),
                                       "give one RGB image"))
    pixels = image.float() / 255.0 if image.dtype == torch.uint8 else image.float()
    pixels = F.interpolate(pixels.permute(2, 0, 1)[None], (height, width), mode="bilinear", align_corners=False)
    return pixels * 2 - 1


def load_videocrafter_image_encoder(checkpoint, *, source, image_encoder_path=None, device="cpu"):
    """The OpenCLIP ViT-H/14 image encoder: from ``image_encoder_path`` (a transformers-layout CLIP vision file such
    as ComfyUI's ``clip_vision_h``) or the checkpoint's ``embedder.model.visual.*`` (OpenCLIP layout, converted)."""
    from .conditioning.openclip_text import build_openclip_vision_encoder
    from .loading.clip import load_clip_vision_encoder
    from .loading.videocrafter import IMAGE_ENCODER_PREFIX

    if image_encoder_path is not None:
        return load_clip_vision_encoder(image_encoder_path, device=device)
    prefix = IMAGE_ENCODER_PREFIX + "visual."
    tower = {k[len(prefix):]: v for k, v in checkpoint.items() if k.startswith(prefix)}
    if not tower:
        raise CheckpointError(explain(
            f"the image-to-video checkpoint holds no image encoder ('{prefix}*')", source,
            "use the released Image2Video-512 model.ckpt, or give ComfyUI's clip_vision_h file (--image-encoder)"))
    return build_openclip_vision_encoder(tower, source=source, device=device)


def find_videocrafter_models(models_dir: str | os.PathLike) -> list[tuple[Path, str]]:
    """Every VideoCrafter checkpoint in ``models_dir/videocrafter`` and ``models_dir/checkpoints``, with its kind
    (told by keys: safetensors headers, pickles read weights-only and memory-mapped)."""
    from .loading.videocrafter import detect_videocrafter_kind
    from .loading.weight_files import (PICKLE_SUFFIXES, SAFETENSORS_SUFFIXES, read_safetensors_header,
                                       read_state_dict, unwrap_state_dict)

    found = []
    for sub in ("videocrafter", "checkpoints"):
        folder = Path(models_dir) / sub
        if not folder.is_dir():
            continue
        for path in sorted(folder.iterdir()):
            suffix = path.suffix.lower()
            try:
                if suffix in SAFETENSORS_SUFFIXES:
                    keys = read_safetensors_header(path).entries.keys()
                elif suffix in PICKLE_SUFFIXES:
                    keys = unwrap_state_dict(read_state_dict(path), ("state_dict", "module"), source=path).keys()
                else:
                    continue
            except CheckpointError:
                continue
            kind = detect_videocrafter_kind({k.removeprefix("_forward_module.") for k in keys})
            if kind:
                found.append((path, kind))
    return found


def pick_videocrafter_model(models_dir: str | os.PathLike, model: str | None = None) -> tuple[Path, str]:
    """The VideoCrafter checkpoint to use: the only one, or the one whose file name (or kind) is ``model``."""
    found = find_videocrafter_models(models_dir)
    listing = ", ".join(f"{p.name} ({kind})" for p, kind in found)
    if model:
        chosen = [(p, k) for p, k in found if model in (p.name, p.stem, k)]
        if len(chosen) != 1:
            raise CheckpointError(explain(f"--model matches {len(chosen)} of the VideoCrafter models found "
                                          f"({listing or 'none'})", model, "give one file name or kind"))
        return chosen[0]
    if not found:
        raise CheckpointError(explain("no VideoCrafter checkpoint in videocrafter/ or checkpoints/ of", models_dir,
                                      "put a released model.ckpt (or its conversion) in models/videocrafter/"))
    if len(found) > 1:
        raise CheckpointError(explain(f"several VideoCrafter models ({listing}) in", models_dir,
                                      "choose one with --model NAME (file name or kind)"))
    return found[0]
