"""VideoBooth as a native ComfyUI ``MODEL`` (issue 25): KSampler, SamplerCustomAdvanced, the core LoRA loaders,
ModelSamplingDiscrete, context windows and ComfyUI's memory management take it like any SD 1.x model.

* **VideoBooth Native Loader** builds a ``comfy.model_base.BaseModel`` around the pack's own UNet
  (:class:`~..videobooth_core.models.frames_as_batch.FramesAsBatchUNet`: frames as batch, ``[F, 4, h, w]``, as
  AnimateDiff), with VideoBooth's schedule (linear betas 1e-4 → 0.02, ComfyUI's ``sqrt_linear``) and the SD 1.x latent
  format, in ComfyUI's ``ModelPatcher`` (not ``CoreModelPatcher``, see :func:`build_native_model`). The official
  guidance (channels 0-2 guided, channel 3 the conditional prediction) is ComfyUI's ``sampler_cfg_function`` hook, on
  by default.
* **VideoBooth Native Conditioning** is the coarse path on ComfyUI's own ``CLIP``: the mapper's 5 word vectors go
  into the token list in place of the subject word's tokens (embedding entries, as textual inversion), laid out by
  the core's own splice; and the fine path's exemplar latent travels in the positive conditioning
  (``conditioning_set_values``), which the model turns into call arguments (``extra_conds``). The negative
  conditioning carries no exemplar, so ComfyUI runs the unconditional pass without it, as the official sampler.

Only ComfyUI symbols present in 0.3.64 and in the 2026 releases are used; where they differ they are feature-tested
(see the README's table). Nothing of ComfyUI or torch is patched.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from ..videobooth_core.conditioning.embeddings import encode_image_prompt
from ..videobooth_core.conditioning.image_prompt import PreparedImagePrompt
from ..videobooth_core.conditioning.subjects import (
    prepare_subjects_prompt,
    spliced_subjects_positions,
    subjects_fit_warnings,
)
from ..videobooth_core.conditioning.text import (
    NULL_PROMPT,
    prepare_subject_prompt,
    prompt_fit_warnings,
    spliced_positions,
)
from ..videobooth_core.conditioning.vae import vae_encode
from ..videobooth_core.errors import SamplingError, VideoBoothError, explain
from ..videobooth_core.models.frames_as_batch import (
    FramesAsBatchUNet,
    alpha_cumprod_of_sigma,
    image_prompt_noise,
    image_prompt_twin,
    official_cfg,
)
from ..videobooth_core.sampling.schedule import BETA_END, BETA_START, TRAIN_TIMESTEPS
from ..videobooth_core.sampling.seeded import fit_exemplar
from ..videobooth_core.sampling.windows import FUSE_MODES, ContextOptions, fuse_window_predictions
from ..videobooth_core.settings import SETTINGS, VAE_SCALE, widget
from . import _bridge as bridge
from ._types import CLIP_VISION, EXEMPLAR, IMAGE_PROMPT, Exemplar, VideoBoothCLIPVision
from .long_video import VideoBoothContextOptions
from .subjects import SUBJECTS, NodeSubject, sampler_subjects
from .loaders import DEVICES, PRECISIONS, CachingLoader, file_input, load_model_pair, precision_tooltip

try:  # inside ComfyUI
    import comfy.conds as comfy_conds
    import comfy.latent_formats as comfy_latent_formats
    import comfy.model_base as comfy_model_base
    import comfy.model_patcher as comfy_model_patcher
    import comfy.supported_models_base as comfy_supported_models_base
    import node_helpers
except ImportError:  # tests, other hosts
    comfy_conds = comfy_latent_formats = comfy_model_base = comfy_model_patcher = None
    comfy_supported_models_base = node_helpers = None

logger = logging.getLogger(__name__)

IMAGE_PROMPT_KEY = "videobooth_image_prompt"
"""Conditioning key of the exemplar latent: (1, 4, h, w) clean, at core scale (raw SD latent x 0.18215)."""
NULL_TEXT_KEY = "videobooth_null_text"
STRENGTH_KEY = "videobooth_image_prompt_strength"
STEPS_KEY = "videobooth_image_prompt_steps"
SEED_KEY = "videobooth_seed"
SIGMA_RANGE_KEY = "videobooth_sigma_range"
REGIONS_KEY = "videobooth_image_prompt_regions"
SKIP_KEY = "videobooth_image_prompt_skip"
"""1 on the negative conditioning: it carries the positive's exemplar so ComfyUI can batch the two into one call, and
the model runs the negative without it (the official unconditional pass)."""

SAMPLING_SETTINGS = {"beta_schedule": "sqrt_linear", "linear_start": BETA_START, "linear_end": BETA_END,
                     "timesteps": TRAIN_TIMESTEPS}
"""VideoBooth's schedule in ComfyUI's words: ``sqrt_linear`` is linear in beta (SD's own ``linear`` is linear in
sqrt(beta)), the DDPM schedule the model was trained on."""


def _require_comfy(what: str) -> None:
    if comfy_model_base is None:
        raise VideoBoothError(f"{what} runs inside ComfyUI only (comfy.model_base was not found); outside it use the "
                              "pack's VideoBooth Sampler road or the command line")


class ComfyVideoBoothUNet(FramesAsBatchUNet):
    """:class:`FramesAsBatchUNet` called the way ``BaseModel._apply_model`` calls a ``diffusion_model``.

    ``exemplar_noise(seed, timestep, shape)`` draws the image prompt's noise of a call (keyed on the sampler's seed
    and the call's timestep by default); an instance may replace it, e.g. to replay another road's draws.
    """

    exemplar_noise = staticmethod(image_prompt_noise)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None = None,
                control: Any = None, transformer_options: dict | None = None, **conds: Any) -> torch.Tensor:
        """x: ``[(chunks f), 4, h, w]``, one chunk per conditioning in the call (``cond_or_uncond``)."""
        residuals = _control_residuals(control)
        options = transformer_options or {}
        chunks = max(1, len(options.get("cond_or_uncond") or [0]))
        frames = x.shape[0] // chunks
        image_prompt = conds.get(IMAGE_PROMPT_KEY)
        if image_prompt is None or not self._inject_now(options, conds.get(SIGMA_RANGE_KEY)):
            return super().forward(x, timesteps, context, frames, **residuals)
        sigma = float(torch.as_tensor(options["sigmas"]).reshape(-1)[0])
        timestep = float(torch.as_tensor(timesteps).reshape(-1)[0])
        per_video = image_prompt[::frames]  # a cond is repeated over the frames: one row per video
        strength = conds.get(STRENGTH_KEY, 1.0)
        if per_video.ndim == 5:  # several subjects: (videos, s, 4, h, w) -> subject-major streams
            streams = per_video.shape[1]
            per_video = per_video.transpose(0, 1).reshape(-1, *per_video.shape[2:])
        else:
            streams, strength = 1, float(strength)
        # at the video's latent size, as the pack's sampler (fit_exemplar: a no-op when the sizes match)
        per_video = fit_exemplar(per_video.unsqueeze(2), x.shape[2] * VAE_SCALE, x.shape[3] * VAE_SCALE)[:, :, 0]
        videos = per_video.shape[0] // streams
        skip = conds.get(SKIP_KEY)
        # one draw per stream, the same for every video of the call: a step's exemplar does not depend on how the
        # host batched its conditionings
        noise = self.exemplar_noise(int(conds.get(SEED_KEY) or 0), timestep,
                                    (streams, per_video.shape[1], frames, *per_video.shape[2:]))
        return super().forward(
            x, timesteps, context, frames, image_prompt=per_video.unsqueeze(2),
            image_prompt_noise=noise.repeat_interleave(videos, dim=0),
            image_prompt_alpha_cumprod=alpha_cumprod_of_sigma(sigma), null_context=conds[NULL_TEXT_KEY][::frames],
            image_prompt_strength=strength, image_prompt_regions=conds.get(REGIONS_KEY),
            image_prompt_skip=None if skip is None else skip[::frames] > 0, **residuals)

    @staticmethod
    def _inject_now(options: dict, sigma_range: tuple[float, float] | None) -> bool:
        """Inside the injection window (by noise level, as ComfyUI's own timestep ranges)."""
        if sigma_range is None or "sigmas" not in options:
            return True
        sigma = float(torch.as_tensor(options["sigmas"]).reshape(-1)[0])
        high, low = sigma_range
        return low < sigma <= high


def _control_residuals(control: dict | None) -> dict:
    """ComfyUI's ControlNet output (``{"input": [...], "middle": [...], "output": [...]}``, read by SD 1.x's UNet as
    ``openaimodel.apply_control`` does, without popping the caller's lists) as FramesAsBatchUNet's keyword arguments:
    ``output`` are the skip connections' residuals in ``input_blocks`` order, ``middle`` the middle block's."""
    if not control:
        return {}
    if any(residual is not None for residual in control.get("input") or ()):
        raise SamplingError("this control adds residuals inside the down path (a T2I-Adapter or similar), which the "
                            "VideoBooth native model does not take; use an SD 1.x ControlNet (ControlNet Loader, Apply "
                            "ControlNet) or disconnect it")
    middle = list(control.get("middle") or ())
    return {"skip_residuals": list(control.get("output") or ()), "middle_residual": middle[-1] if middle else None}


if comfy_model_base is not None:
    class VideoBoothNativeConfig(comfy_supported_models_base.BASE):
        """The model config: no UNet is built by ComfyUI (the pack loads its own), SD 1.x latents, VideoBooth's
        schedule."""

        unet_config = {"disable_unet_model_creation": True}
        unet_extra_config = {}
        latent_format = comfy_latent_formats.SD15
        sampling_settings = SAMPLING_SETTINGS
        memory_usage_factor = 2.0  # unused: memory_required measures the calls themselves
        supported_inference_dtypes = [torch.float16, torch.bfloat16, torch.float32]

    class VideoBoothNativeModel(comfy_model_base.BaseModel):
        """``BaseModel`` around :class:`ComfyVideoBoothUNet`; the mapper's MLPs ride along (not registered: the
        native conditioning node runs them) as ``videobooth_mapper``."""

        def __init__(self, model_config: Any, unet: torch.nn.Module, mapper: torch.nn.Module,
                     device: torch.device | None = None) -> None:
            super().__init__(model_config, model_type=comfy_model_base.ModelType.EPS, device=device)
            self.diffusion_model = ComfyVideoBoothUNet(unet)
            self.__dict__["videobooth_mapper"] = mapper

        def memory_required(self, input_shape: Any, cond_shapes: dict | None = None, **_: Any) -> float:
            """Bytes one call on ``input_shape`` ([frames, 4, h, w]) needs beyond the weights, measured on the
            model's storage-free twin with the exemplar pass counted (cached per shape)."""
            shape = tuple(int(d) for d in input_shape)
            cache = self.__dict__.setdefault("videobooth_memory", {})
            if shape not in cache:
                cache[shape] = self.diffusion_model.call_activation_bytes(shape[0], shape[2], shape[3])
            return cache[shape]

        def extra_conds(self, **kwargs: Any) -> dict:
            out = super().extra_conds(**kwargs)
            latent = kwargs.get(IMAGE_PROMPT_KEY)
            if latent is None:
                return out
            start, end = kwargs.get(STEPS_KEY, (0.0, 1.0))
            strength = kwargs.get(STRENGTH_KEY, 1.0)
            out[IMAGE_PROMPT_KEY] = comfy_conds.CONDRegular(latent)
            out[NULL_TEXT_KEY] = comfy_conds.CONDRegular(kwargs[NULL_TEXT_KEY])
            out[STRENGTH_KEY] = comfy_conds.CONDConstant(
                tuple(float(s) for s in strength) if isinstance(strength, (tuple, list)) else float(strength))
            out[SEED_KEY] = comfy_conds.CONDConstant(int(kwargs.get("seed") or 0))
            out[SIGMA_RANGE_KEY] = comfy_conds.CONDConstant((float(self.model_sampling.percent_to_sigma(start)),
                                                             float(self.model_sampling.percent_to_sigma(end))))
            if kwargs.get(REGIONS_KEY) is not None:
                out[REGIONS_KEY] = comfy_conds.CONDConstant(kwargs[REGIONS_KEY])
            # a flag per item, repeated over the frames and concatenated like the latent, so the positive and the
            # negative (which carries the same exemplar with the flag set) can share one call
            out[SKIP_KEY] = comfy_conds.CONDRegular(torch.tensor([1.0 if kwargs.get(SKIP_KEY) else 0.0]))
            return out


def official_guidance(args: dict) -> torch.Tensor:
    """ComfyUI's ``sampler_cfg_function``: the official rule on ``x - denoised`` (linear per channel, so the same
    rule as on the noise), channels 0-2 guided, channel 3 the conditional."""
    return official_cfg(args["cond"], args["uncond"], args["cond_scale"])


_PATCHER_CLASSES: dict[type, type] = {}


def _patcher_class(base: type) -> type:
    """``base`` (ComfyUI's patcher class) whose weight patches on a site's ``attn1.to_k``/``to_v`` also reach
    the image prompt's projections (:func:`image_prompt_twin`), so core LoRA loaders act as the pack's LoRA node.
    A subclass, made once per base: ComfyUI's own classes are left as they are."""
    if base not in _PATCHER_CLASSES:
        class VideoBoothModelPatcher(base):
            def add_patches(self, patches: dict, strength_patch: float = 1.0, strength_model: float = 1.0,
                            *args: Any, **kwargs: Any) -> list:
                twins = {}
                for key, patch in patches.items():
                    name, rest = (key, ()) if isinstance(key, str) else (key[0], tuple(key[1:]))
                    twin = image_prompt_twin(name)
                    if twin is not None:
                        twins[twin if not rest else (twin, *rest)] = patch
                return super().add_patches({**patches, **twins}, strength_patch, strength_model, *args, **kwargs)

        _PATCHER_CLASSES[base] = VideoBoothModelPatcher
    return _PATCHER_CLASSES[base]


def build_native_model(unet: torch.nn.Module, mapper: torch.nn.Module, dtype: torch.dtype,
                       load_device: torch.device, offload_device: torch.device, guidance: bool = True) -> Any:
    """A ComfyUI ``MODEL`` (patcher) for a loaded UNet + mapper pair (projections attached, own ones released)."""
    _require_comfy("the VideoBooth native model")
    config = VideoBoothNativeConfig({"disable_unet_model_creation": True})
    config.set_inference_dtype(dtype, None)
    model = VideoBoothNativeModel(config, unet, mapper)
    # ComfyUI's legacy ModelPatcher, not CoreModelPatcher: in 2026 releases CoreModelPatcher becomes the dynamic-VRAM
    # patcher when comfy-aimdo is present, which applies weight patches (LoRAs) only to comfy.ops layers and would
    # silently drop them on this model's plain torch layers; the legacy patcher applies them to any layer
    patcher = _patcher_class(comfy_model_patcher.ModelPatcher)(model, load_device=load_device,
                                                               offload_device=offload_device)
    if guidance:
        patcher.set_model_sampler_cfg_function(official_guidance)
    return patcher


class VideoBoothNativeLoader(CachingLoader):
    DESCRIPTION = ("Loads the VideoBooth UNet and mapper as a native ComfyUI MODEL, for KSampler, "
                   "SamplerCustomAdvanced, LoraLoaderModelOnly, ModelSamplingDiscrete and context windows. Latents "
                   "are frames as batch (an Empty Latent Image with batch_size = frames). Pair it with VideoBooth "
                   "Native Conditioning.")
    CATEGORY = "VideoBooth/native"
    FUNCTION = "load"
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The VideoBooth model as a ComfyUI MODEL (its mapper rides along for the conditioning).",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "unet_name": file_input(bridge.VIDEOBOOTH_FOLDER, "videobooth_unet", "The VideoBooth 3D UNet."),
            "mapper_name": file_input(bridge.VIDEOBOOTH_FOLDER, "videobooth_mapper",
                                       "The VideoBooth mapper (its attention projections are part of the model)."),
            "precision": (PRECISIONS, {"default": "auto", "tooltip": precision_tooltip(
                "fp16 (or bf16) on a GPU that supports it, fp32 on the CPU")}),
            "device": (DEVICES, {"default": "auto", "tooltip": (
                "auto: ComfyUI's compute device, managed by ComfyUI like any model; cpu: keep it on the CPU.")}),
            "official_guidance": ("BOOLEAN", {"default": True, "tooltip": (
                "On: the official guidance (latent channels 0-2 guided, channel 3 the conditional prediction), "
                "through ComfyUI's CFG hook. Off: ComfyUI's plain CFG on every channel.")}),
        }}

    @classmethod
    def IS_CHANGED(cls, unet_name: str, mapper_name: str, **_: Any) -> str:
        return bridge.file_signature(bridge.VIDEOBOOTH_FOLDER, unet_name, mapper_name)

    def load(self, unet_name: str, mapper_name: str, precision: str, device: str,
             official_guidance: bool = True) -> tuple[Any]:
        _require_comfy("VideoBooth Native Loader")
        key = (bridge.file_signature(bridge.VIDEOBOOTH_FOLDER, unet_name, mapper_name), precision, device)
        pair = self._cached(key, lambda: load_model_pair(unet_name, mapper_name, precision, device))
        # a fresh patcher per run: its options (the guidance hook) are this node's, its weights are shared
        return (build_native_model(pair.unet, pair.mapper, pair.dtype, pair.load_device, pair.offload_device,
                                   official_guidance),)


def mapper_of(model: Any) -> torch.nn.Module:
    mapper = getattr(getattr(model, "model", None), "videobooth_mapper", None)
    if mapper is None:
        raise VideoBoothError(explain("VideoBooth Native Conditioning needs the MODEL of VideoBooth Native Loader "
                                      "(it holds the mapper); the connected model is", type(getattr(model, "model",
                                                                                                model)).__name__,
                                      "connect the model output of VideoBooth Native Loader (LoRA and other model "
                                      "nodes in between are fine)"))
    return mapper


def _hf_tokenizer(clip: Any) -> tuple[Any, str]:
    """The transformers CLIP tokenizer inside ComfyUI's SD 1.x ``CLIP`` and the key of its token lists."""
    keys = list(clip.tokenize("").keys())
    inner = getattr(getattr(clip, "tokenizer", None), f"clip_{keys[0]}", None) if len(keys) == 1 else None
    tokenizer = getattr(inner, "tokenizer", None)
    if tokenizer is None or not callable(tokenizer):
        raise VideoBoothError(explain("VideoBooth Native Conditioning needs an SD 1.x CLIP (CLIP ViT-L/14, the text "
                                      "encoder VideoBooth was trained with); the connected CLIP has token lists",
                                      keys, "load clip_l with Load CLIP (type stable_diffusion) or the CLIP of an "
                                      "SD 1.x checkpoint"))
    return tokenizer, keys[0]


class VideoBoothNativeConditioning:
    DESCRIPTION = ("The VideoBooth prompt as CONDITIONING for KSampler: the subject word's tokens are replaced by the "
                   "image prompt's 5 word vectors before ComfyUI's CLIP runs (the coarse path), and the image "
                   "prompt's latent rides in the positive conditioning, noised at every step and injected by the "
                   "model (the fine path). The negative output is the unconditional text, without the image prompt.")
    CATEGORY = "VideoBooth/native"
    FUNCTION = "encode"
    RETURN_TYPES = ("CONDITIONING", "CONDITIONING")
    RETURN_NAMES = ("positive", "negative")
    OUTPUT_TOOLTIPS = ("The prompt with the subject's vectors and the image prompt's latent.",
                       "The negative prompt (no image prompt, as the official unconditional pass).")

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "clip": ("CLIP", {"tooltip": "ComfyUI's SD 1.x CLIP (clip_l), VideoBooth's text encoder."}),
                "model": ("MODEL", {"tooltip": "The model of VideoBooth Native Loader (its mapper is used here)."}),
                "clip_vision": (CLIP_VISION, {"tooltip": "The CLIP ViT-L/14 vision encoder (VideoBooth CLIP "
                                                         "Vision Loader)."}),
                "image_prompt": (IMAGE_PROMPT, {"tooltip": "The prepared image prompt from VideoBooth Image Prompt."}),
                "prompt": ("STRING", {"default": "a dog running on the beach", "multiline": True, "tooltip": (
                    "What happens in the video; it must contain the subject word.")}),
                "subject_word": ("STRING", {"default": "dog", "tooltip": (
                    "The prompt's word (or words) naming the subject, e.g. 'dog' or 'teddy bear'; replaced by the "
                    "image prompt's word vectors.")}),
                "negative_prompt": ("STRING", {"default": NULL_PROMPT, "multiline": True, "tooltip": (
                    "The unconditional text; the official pipeline uses the literal word 'None'.")}),
            },
            "optional": {
                "exemplar": (EXEMPLAR, {"tooltip": (
                    "The fine path from VideoBooth Latent Injection (its latent, or the image prompt through its "
                    "VAE, and its strength, start and end); unconnected: the coarse path only.")}),
                "subjects": (SUBJECTS, {"tooltip": (
                    "More subjects from VideoBooth Subjects: each word is replaced by its own photo's vectors and each "
                    "exemplar injected with its own strength and region, as on the pack's Sampler.")}),
            },
        }

    def encode(self, clip: Any, model: Any, clip_vision: VideoBoothCLIPVision, image_prompt: PreparedImagePrompt,
               prompt: str, subject_word: str, negative_prompt: str, exemplar: Exemplar | None = None,
               subjects: tuple[NodeSubject, ...] | None = None) -> tuple[list, list]:
        _require_comfy("VideoBooth Native Conditioning")
        mapper = mapper_of(model)
        tokenizer, key = _hf_tokenizer(clip)
        words = [subject_word, *(s.word for s in subjects or ())]
        # the 77-token and word checks, and the fine plan, before any model runs
        if subjects:
            spliced = prepare_subjects_prompt(tokenizer, prompt, words)
            warnings = subjects_fit_warnings(tokenizer, prompt, words)
        else:
            subject = prepare_subject_prompt(tokenizer, prompt, subject_word)
            warnings = prompt_fit_warnings(tokenizer, prompt, subject_word)
        planned = sampler_subjects(exemplar, tuple(subjects or ()))
        for warning in warnings:
            logger.warning("VideoBooth Native Conditioning: %s", warning)
        bridge.activate([clip_vision.managed])
        own = encode_image_prompt(clip_vision.vision_encoder, mapper, image_prompt).float().cpu()
        if subjects:
            vectors = [own, *(s.words.float().cpu() for s in subjects)]
            positions = spliced_subjects_positions(spliced.input_ids, spliced.placeholder_ids, spliced.order,
                                                   own.shape[1])
            entries = _token_entries(spliced.input_ids[0].tolist(), positions, torch.cat([v[0] for v in vectors]))
        else:
            entries = _token_entries(subject.input_ids[0].tolist(), spliced_positions(
                subject.input_ids, subject.placeholder_ids, own.shape[1]), own[0])
        positive = clip.encode_from_tokens({key: [entries]}, return_pooled=True, return_dict=True)
        negative = clip.encode_from_tokens(clip.tokenize(negative_prompt), return_pooled=True, return_dict=True)
        positive_conditioning = [[positive.pop("cond"), positive]]
        negative_conditioning = [[negative.pop("cond"), negative]]
        if planned.sources:
            if planned.vaes:
                bridge.activate(planned.vaes)
            latents = [_exemplar_latent(source) for source in planned.sources]
            if planned.plan.subject_strengths is None:  # one stream: the official single-exemplar path
                values = {IMAGE_PROMPT_KEY: latents[0][:, :, 0], STRENGTH_KEY: planned.plan.strength}
            else:
                sizes = sorted({tuple(latent.shape[-2:]) for latent in latents})
                if len(sizes) > 1:
                    raise VideoBoothError(explain(
                        "the subjects' exemplars run as one batch and need one latent size; their (height/8, width/8) "
                        "are", sizes, "give every VideoBooth Latent Injection an image prompt (or latent) of one size"))
                values = {IMAGE_PROMPT_KEY: torch.stack([latent[:, :, 0] for latent in latents], dim=1),
                          STRENGTH_KEY: planned.plan.subject_strengths, REGIONS_KEY: planned.plan.subject_regions}
            values.update({NULL_TEXT_KEY: negative_conditioning[0][0], STEPS_KEY: planned.window})
            positive_conditioning = node_helpers.conditioning_set_values(positive_conditioning, values)
            # the negative carries the same exemplar, flagged: ComfyUI then batches both into one call, and the model
            # runs the negative without it (the official unconditional pass shares the exemplar pass's UNet call)
            negative_conditioning = node_helpers.conditioning_set_values(negative_conditioning,
                                                                         {**values, SKIP_KEY: True})
        return positive_conditioning, negative_conditioning


def _token_entries(ids: list[int], positions: list[int], words: torch.Tensor) -> list[tuple[Any, float]]:
    """ComfyUI's token list for one 77-token chunk: the token of each kept position, each run of word vectors as one
    embedding entry (ComfyUI inserts an entry's rows in place), weight 1 everywhere (the core's encoding)."""
    entries: list[tuple[Any, float]] = []
    run: list[int] = []
    for position in [*positions, None]:
        if position is not None and position < 0:
            run.append(-position - 1)
            continue
        if run:
            entries.append((words[run], 1.0))
            run = []
        if position is not None:
            entries.append((ids[position], 1.0))
    return entries


def _exemplar_latent(source: Any) -> torch.Tensor:
    """(1, 4, 1, h, w) clean latent at core scale of one planned exemplar source: its LATENT, or (VAE, image prompt)
    through the VAE (the posterior mean, as ComfyUI's VAE Encode; the official code samples the posterior)."""
    if isinstance(source, torch.Tensor):
        return source.float().cpu()
    vae, prepared = source
    with torch.no_grad():
        latent = vae_encode(vae, prepared.vae_pixels, sample=False)
    return latent.float().cpu()[:, :, None]


class FramesAsBatchContextHandler:
    """ComfyUI's ``model_options["context_handler"]`` for frames-as-batch latents: VideoBooth's windows, each starting
    with the global frame 0 (which holds the subject across the whole video), fused by the core's weights.

    ComfyUI's own handler cannot take this layout in 0.3.64 (it matches one timestep per call against the schedule,
    and a frames-as-batch call has one per frame), and it has no anchor frame."""

    def __init__(self, options: ContextOptions) -> None:
        self.options = options

    def should_use_context(self, model: Any, conds: list, x_in: torch.Tensor, timestep: torch.Tensor,
                           model_options: dict) -> bool:
        return x_in.shape[0] > self.options.window

    def execute(self, calc_cond_batch: Any, model: Any, conds: list, x_in: torch.Tensor, timestep: torch.Tensor,
                model_options: dict) -> list:
        frames = x_in.shape[0]
        per_frame_t = torch.as_tensor(timestep).reshape(-1).shape[0] == frames

        def predict(window: list[int]) -> list:
            index = torch.tensor(window, device=x_in.device)
            window_conds = [None if c is None else [_window_cond(item, index, frames) for item in c] for c in conds]
            return calc_cond_batch(model, window_conds, x_in[index], timestep[index] if per_frame_t else timestep,
                                   model_options)

        return fuse_window_predictions(frames, self.options, predict, dim=0)


def _window_cond(cond: dict, index: torch.Tensor, frames: int) -> dict:
    """A conditioning entry for one window: per-frame model conds (first axis = the frames) are sliced; VideoBooth's
    own (text, image prompt: one row) pass unchanged."""
    model_conds = {}
    for key, value in cond.get("model_conds", {}).items():
        tensor = getattr(value, "cond", None)
        sliced = isinstance(tensor, torch.Tensor) and tensor.ndim > 0 and tensor.shape[0] == frames
        model_conds[key] = value._copy_with(tensor[index.to(tensor.device)]) if sliced else value
    return {**cond, "model_conds": model_conds}


class VideoBoothNativeContextWindows:
    DESCRIPTION = ("Long videos on the native road: the frames are denoised in windows of the trained length, each "
                   "starting with the video's first frame (which carries the subject), and fused. Put it between "
                   "the VideoBooth Native Loader (or a LoRA) and KSampler; the latent's batch is the frame count.")
    CATEGORY = "VideoBooth/native"
    FUNCTION = "apply"
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The model, sampling long videos window by window.",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "model": ("MODEL", {"tooltip": "The VideoBooth native model."}),
            "context_window": ("INT", {**widget("context_window"), "tooltip": (
                "Frames per model call, the first frame included (16: the trained length).")}),
            "context_overlap": ("INT", {**widget("context_overlap"), "tooltip": (
                "Frames shared by neighbouring windows besides the first frame (at most context_window - 2).")}),
            "fuse": (list(FUSE_MODES), {"default": SETTINGS["context_fuse"].default, "tooltip": (
                "pyramid: a window's frames count more towards its middle, so seams fade; flat: equal weights.")}),
        }}

    def apply(self, model: Any, context_window: int, context_overlap: int, fuse: str) -> tuple[Any]:
        mapper_of(model)  # a VideoBooth native model, or a clear error
        # the pack's Context Options rules and messages (in these widgets' words), one home for both roads
        (options,) = VideoBoothContextOptions().options(int(context_window), int(context_overlap), fuse, False)
        patched = model.clone()
        patched.model_options["context_handler"] = FramesAsBatchContextHandler(options)
        return (patched,)


NODE_CLASS_MAPPINGS = {
    "VideoBoothNativeLoader": VideoBoothNativeLoader,
    "VideoBoothNativeConditioning": VideoBoothNativeConditioning,
    "VideoBoothNativeContextWindows": VideoBoothNativeContextWindows,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "VideoBoothNativeLoader": "VideoBooth Native Loader (MODEL)",
    "VideoBoothNativeConditioning": "VideoBooth Native Conditioning",
    "VideoBoothNativeContextWindows": "VideoBooth Native Context Windows",
}
