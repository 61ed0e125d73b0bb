"""VideoCrafter1/2 checkpoints: telling the four released kinds apart by their keys, reading the UNet's shape from
its tensors, strict loading of the UNet and the I2V image projector, and conversion of the released pickles to
safetensors.

A released ``model.ckpt`` is a whole LVDM ``LatentDiffusion`` pickle under ``state_dict`` (a deepspeed one under
``module`` with a ``_forward_module.`` prefix): ``model.diffusion_model.*`` (the UNet), ``first_stage_model.*``
(the SD VAE, LDM layout), ``cond_stage_model.model.*`` (the OpenCLIP ViT-H/14 text tower), for I2V
``embedder.model.*`` (the OpenCLIP visual tower) and ``image_proj_model.*`` (the projector), and the schedule
buffers (``betas``, ``alphas_cumprod``, ..., ``scale_arr``). It is read with ``torch.load(weights_only=True)``
(:func:`.weight_files.read_state_dict`): a pickle that asks for anything but tensors is refused, nothing in it runs.
:func:`convert_videocrafter_checkpoint` writes the same tensors, same names, to one safetensors file (fp16 by
default) with the kind and the UNet config in its metadata; both load the same way.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..errors import CheckpointError, explain
from ..files import PathLike, check_target
from ..models.videocrafter.config import (
    INIT_ATTN_HEADS,
    KIND_I2V_512_V1,
    KIND_T2V_512_V1,
    KIND_T2V_512_V2,
    KIND_T2V_1024_V1,
    ImageProjectorConfig,
    VideoCrafterUNetConfig,
)
from .strict import assign_weights, build_on_meta, check_keys
from .weight_files import (
    KIND_METADATA_KEY,
    SAFETENSORS_SUFFIXES,
    read_safetensors_metadata,
    read_state_dict,
    save_safetensors,
    unwrap_state_dict,
)

if TYPE_CHECKING:
    from ..models.videocrafter.resampler import ImageProjector
    from ..models.videocrafter.unet import VideoCrafterUNet

logger = logging.getLogger(__name__)

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_ENCODER_PREFIX = "cond_stage_model.model."
IMAGE_ENCODER_PREFIX = "embedder.model."
PROJECTOR_PREFIX = "image_proj_model."
DEEPSPEED_PREFIX = "_forward_module."
"""A deepspeed checkpoint's ``module`` dict prefixes every key with these 16 characters (funcs.py:95-101)."""
MARKER = UNET_PREFIX + "init_attn.0.proj_in.weight"
"""Every released kind has the extra temporal attention ``init_attn``; no other LDM UNet has it."""
UNET_CONFIG_METADATA_KEY = "videobooth_videocrafter_unet_config"
"""Not ``videobooth_config``: the VAE and CLIP loaders read that key as their own config from the same file."""
PROJECTOR_CONFIG_METADATA_KEY = "videobooth_videocrafter_projector_config"

KIND_NAMES: dict[str, str] = {
    KIND_T2V_512_V1: "VideoCrafter1 text-to-video 512",
    KIND_T2V_1024_V1: "VideoCrafter1 text-to-video 1024",
    KIND_I2V_512_V1: "VideoCrafter1 image-to-video 512",
    KIND_T2V_512_V2: "VideoCrafter2 text-to-video 512",
}
RELEASED_FILES = {
    KIND_T2V_512_V1: "VideoCrafter/Text2Video-512 model.ckpt",
    KIND_T2V_1024_V1: "VideoCrafter/Text2Video-1024 model.ckpt",
    KIND_I2V_512_V1: "VideoCrafter/Image2Video-512 model.ckpt",
    KIND_T2V_512_V2: "VideoCrafter/VideoCrafter2 model.ckpt",
}


def is_videocrafter(keys: Collection[str]) -> bool:
    """Whether a checkpoint's keys are a VideoCrafter1/2 model's (the UNet with its ``init_attn``)."""
    return MARKER in keys


def detect_videocrafter_kind(keys: Collection[str]) -> str | None:
    """The released kind of a whole checkpoint, told from its UNet keys, or ``None`` when it is no VideoCrafter model.

    I2V has the image cross-attention (``to_k_ip``); VideoCrafter2 the temporal convolutions (``temopral_conv``)
    without it; T2V 1024 the fps embedding without either; T2V 512 none of them.
    """
    if not is_videocrafter(keys):
        return None
    unet = [k for k in keys if k.startswith(UNET_PREFIX)]
    if any(".to_k_ip." in k for k in unet):
        return KIND_I2V_512_V1
    if any(".temopral_conv." in k for k in unet):
        return KIND_T2V_512_V2
    if UNET_PREFIX + "fps_embedding.0.weight" in keys:
        return KIND_T2V_1024_V1
    return KIND_T2V_512_V1


def component(state_dict: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The tensors under ``prefix``, with the prefix removed (a new dict; the caller's is not changed)."""
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def read_videocrafter_checkpoint(path: PathLike) -> tuple[str, dict[str, torch.Tensor]]:
    """Read a VideoCrafter ``model.ckpt`` (weights-only unpickling) or its safetensors conversion.

    Returns:
        ``(kind, flat state dict with the released key names)``.

    Raises:
        CheckpointError: unreadable, unsafe (a pickle asking for anything but tensors), or not a VideoCrafter model.
    """
    flat = unwrap_state_dict(read_state_dict(path), ("state_dict", "module"), source=path)
    if any(k.startswith(DEEPSPEED_PREFIX) for k in flat):
        flat = {k[len(DEEPSPEED_PREFIX):] if k.startswith(DEEPSPEED_PREFIX) else k: v for k, v in flat.items()}
    kind = detect_videocrafter_kind(flat.keys())
    if kind is None:
        raise CheckpointError(explain(
            f"not a VideoCrafter1/2 checkpoint (no '{MARKER}'; first keys: {', '.join(sorted(flat)[:3])})", path,
            "use a released model.ckpt (" + "; ".join(RELEASED_FILES.values()) + ") or its conversion by "
            "`python -m videobooth_core convert --videocrafter`"))
    return kind, flat


_INPUT_BLOCK = re.compile(r"input_blocks\.(\d+)\.")


def infer_unet_config(unet: Mapping[str, torch.Tensor], *, source: PathLike = "the checkpoint") -> VideoCrafterUNetConfig:
    """The UNet config of a ``model.diffusion_model.*`` state dict (prefix removed), read from its shapes.

    The head width is read from ``init_attn`` (8 heads hard-coded) or, without it, a relative-position table; the
    temporal length from a relative-position table (16, the released value, when there is none: it then only
    sizes nothing).

    Raises:
        CheckpointError: a tensor the reading needs is missing (the file is not a whole VideoCrafter UNet).
    """
    def need(key: str) -> torch.Tensor:
        if key not in unet:
            raise CheckpointError(explain(f"the VideoCrafter UNet has no '{UNET_PREFIX}{key}'", source,
                                          "use a complete, unmodified model.ckpt (or its conversion)"))
        return unet[key]

    conv_in = need("input_blocks.0.0.weight")
    model_channels, in_channels = int(conv_in.shape[0]), int(conv_in.shape[1])
    out_channels = int(need("out.2.weight").shape[0])
    blocks = sorted({int(m.group(1)) for k in unet for m in [_INPUT_BLOCK.match(k)] if m})
    # levels end at a Downsample (input_blocks.N.0.op); the last level has none
    downsamples = [n for n in blocks if f"input_blocks.{n}.0.op.weight" in unet]
    num_res_blocks = (downsamples[0] - 1) if downsamples else len(blocks) - 1
    levels = len(downsamples) + 1
    channel_mult, attention_resolutions = [], []
    for level in range(levels):
        first = 1 + level * (num_res_blocks + 1)
        width = int(need(f"input_blocks.{first}.0.out_layers.3.weight").shape[0])
        channel_mult.append(width // model_channels)
        if f"input_blocks.{first}.1.proj_in.weight" in unet:
            attention_resolutions.append(2 ** level)
    relative = [v for k, v in unet.items() if k.endswith("relative_position_k.embeddings_table")]
    if "init_attn.0.proj_in.weight" in unet:
        head_channels = int(unet["init_attn.0.proj_in.weight"].shape[0]) // INIT_ATTN_HEADS
    elif relative:
        head_channels = int(relative[0].shape[1])
    else:
        head_channels = VideoCrafterUNetConfig.num_head_channels
    spatial = "middle_block.1."
    temporal = "middle_block.2."

    def depth(prefix: str) -> int:
        return len({k.split(".")[3] for k in unet if k.startswith(prefix + "transformer_blocks.")})

    try:
        return VideoCrafterUNetConfig(
            in_channels=in_channels, out_channels=out_channels, model_channels=model_channels,
            channel_mult=tuple(channel_mult), num_res_blocks=num_res_blocks,
            attention_resolutions=tuple(attention_resolutions), num_head_channels=head_channels,
            transformer_depth=depth(spatial), temporal_transformer_depth=depth(temporal),
            context_dim=int(need(spatial + "transformer_blocks.0.attn2.to_k.weight").shape[1]),
            temporal_length=(int(relative[0].shape[0]) - 1) // 2 if relative else 16,
            use_linear=need(spatial + "proj_in.weight").dim() == 2,
            fps_cond="fps_embedding.0.weight" in unet,
            temporal_conv=any(".temopral_conv." in k for k in unet),
            use_relative_position=bool(relative),
            use_image_attention=any(".to_k_ip." in k for k in unet),
            addition_attention="init_attn.0.proj_in.weight" in unet,
        )
    except CheckpointError:
        raise
    except ValueError as e:
        raise CheckpointError(explain(f"the VideoCrafter UNet's shapes describe no buildable model ({e})", source,
                                      "use a complete, unmodified model.ckpt (or its conversion)")) from e


def infer_projector_config(projector: Mapping[str, torch.Tensor], heads: int | None = None) -> ImageProjectorConfig:
    """The I2V projector's config from its shapes (prefix removed). The head count is not in the shapes: the
    released 64-wide heads unless ``heads`` is given (the stored metadata of a converted file gives it)."""
    latents = projector["latents"]
    inner = int(projector["layers.0.0.to_q.weight"].shape[0])
    heads = heads or max(inner // 64, 1)
    return ImageProjectorConfig(
        dim=int(latents.shape[2]), num_queries=int(latents.shape[1]),
        depth=len({k.split(".")[1] for k in projector if k.startswith("layers.")}),
        heads=heads, dim_head=inner // heads, embedding_dim=int(projector["proj_in.weight"].shape[1]),
        output_dim=int(projector["proj_out.weight"].shape[0]),
        ff_mult=int(projector["layers.0.1.1.weight"].shape[0]) // int(latents.shape[2]))


def _stored_configs(path: PathLike) -> tuple[dict | None, dict | None]:
    if Path(path).suffix.lower() not in SAFETENSORS_SUFFIXES:
        return None, None
    metadata = read_safetensors_metadata(path)
    unet = metadata.get(UNET_CONFIG_METADATA_KEY)
    projector = metadata.get(PROJECTOR_CONFIG_METADATA_KEY)
    try:
        return (json.loads(unet) if unet else None), (json.loads(projector) if projector else None)
    except json.JSONDecodeError as e:
        raise CheckpointError(explain(f"the stored VideoCrafter config is not valid JSON ({e})", path,
                                      "convert the model.ckpt again")) from e


def load_videocrafter_unet(
    path: PathLike,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    state_dict: Mapping[str, torch.Tensor] | None = None,
) -> "tuple[str, VideoCrafterUNet]":
    """Build the UNet of a VideoCrafter checkpoint on the meta device and assign its tensors strictly.

    Args:
        path: ``model.ckpt`` or its safetensors conversion (read here unless ``state_dict`` is given).
        dtype: the weights' dtype (``None``: as stored).
        state_dict: the already read flat state dict of ``path`` (avoids a second read).

    Returns:
        ``(kind, unet)`` in eval mode, ``requires_grad`` off.
    """
    from ..models.videocrafter.unet import VideoCrafterUNet

    kind, flat = (detect_videocrafter_kind(state_dict.keys()), state_dict) if state_dict is not None \
        else read_videocrafter_checkpoint(path)
    if kind is None:
        raise CheckpointError(explain("not a VideoCrafter1/2 checkpoint", path, "use a released model.ckpt"))
    weights = component(flat, UNET_PREFIX)
    stored, _ = _stored_configs(path)
    config = VideoCrafterUNetConfig.from_dict(stored) if stored else infer_unet_config(weights, source=path)
    unet = build_on_meta(lambda: VideoCrafterUNet(config), source=path, expected=f"the {KIND_NAMES[kind]} UNet")
    assign_weights(unet, weights, source=path, expected=f"the {KIND_NAMES[kind]} UNet", dtype=dtype, device=device,
                   file_name=lambda key: UNET_PREFIX + key)
    return kind, unet


def load_image_projector(
    path: PathLike,
    state_dict: Mapping[str, torch.Tensor],
    *,
    config: ImageProjectorConfig | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
) -> "ImageProjector":
    """The I2V ``image_proj_model`` of a read checkpoint, strictly loaded (config: given, stored, or read from the
    shapes with the released 12 heads of 64)."""
    from ..models.videocrafter.resampler import ImageProjector

    weights = component(state_dict, PROJECTOR_PREFIX)
    if "latents" not in weights:
        raise CheckpointError(explain(f"the checkpoint has no image projector ('{PROJECTOR_PREFIX}*')", path,
                                      f"use the {RELEASED_FILES[KIND_I2V_512_V1]} (image-to-video) checkpoint"))
    if config is None:
        _, stored = _stored_configs(path)
        config = ImageProjectorConfig(**stored) if stored else infer_projector_config(weights)
    projector = build_on_meta(lambda: ImageProjector(config), source=path, expected="the I2V image projector")
    assign_weights(projector, weights, source=path, expected="the I2V image projector", dtype=dtype, device=device,
                   file_name=lambda key: PROJECTOR_PREFIX + key)
    return projector


def convert_videocrafter_checkpoint(
    source: PathLike,
    target: PathLike,
    *,
    dtype: torch.dtype = torch.float16,
    overwrite: bool = False,
    projector_config: ImageProjectorConfig | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Write a VideoCrafter ``model.ckpt`` as one safetensors file: every tensor under its released name, floating
    tensors cast to ``dtype`` (fp16 by default; the schedule buffers too, which the sampler recomputes anyway),
    the kind and the UNet (and projector) config in the metadata. The UNet is checked strictly before anything is
    written; the target appears atomically and an existing one is refused unless ``overwrite``.

    Returns:
        The written file.
    """
    from ..models.videocrafter.unet import VideoCrafterUNet

    out = check_target(target, overwrite=overwrite)
    if out.suffix.lower() not in SAFETENSORS_SUFFIXES:
        raise CheckpointError(explain("the converted file must be a safetensors file", target,
                                      "name it e.g. videocrafter2.safetensors"))
    kind, flat = read_videocrafter_checkpoint(source)
    unet_weights = component(flat, UNET_PREFIX)
    config = infer_unet_config(unet_weights, source=source)
    expected = build_on_meta(lambda: VideoCrafterUNet(config), source=source, expected=f"the {KIND_NAMES[kind]} UNet")
    check_keys(unet_weights, expected.state_dict(), source, f"the {KIND_NAMES[kind]} UNet",
               lambda key: UNET_PREFIX + key)
    metadata = {KIND_METADATA_KEY: kind, UNET_CONFIG_METADATA_KEY: json.dumps(config.to_dict()),
                "videobooth_dtype": str(dtype).removeprefix("torch.")}
    if kind == KIND_I2V_512_V1:
        projector = projector_config or infer_projector_config(component(flat, PROJECTOR_PREFIX))
        metadata[PROJECTOR_CONFIG_METADATA_KEY] = json.dumps(projector.to_dict())
    converted = {}
    for i, (key, value) in enumerate(flat.items()):
        converted[key] = value.to(dtype) if value.is_floating_point() else value
        if progress is not None:
            progress(i + 1, len(flat))
    save_safetensors(converted, out, metadata)
    logger.info("wrote %s (%s, %d tensors)", out, kind, len(converted))
    return out


def missing_encoders(kind: str, state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    """What the checkpoint lacks to run on its own, in words with where it goes: the OpenCLIP ViT-H/14 text tower
    (``cond_stage_model.model.*``), for I2V the OpenCLIP ViT-H/14 visual tower (``embedder.model.*``)."""
    keys = state_dict.keys()
    missing = []
    if not any(k.startswith(TEXT_ENCODER_PREFIX) for k in keys):
        missing.append("the OpenCLIP ViT-H/14 text encoder (keys 'cond_stage_model.model.*'; or ComfyUI's SD 2.x "
                       "'clip_h' text encoder file in models/text_encoders)")
    if kind == KIND_I2V_512_V1 and not any(k.startswith(IMAGE_ENCODER_PREFIX) for k in keys):
        missing.append("the OpenCLIP ViT-H/14 image encoder (keys 'embedder.model.*'; or ComfyUI's "
                       "'clip_vision_h' file in models/clip_vision)")
    return missing
