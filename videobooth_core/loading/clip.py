"""Loading the CLIP text and vision towers (``transformers.CLIPTextModel`` / ``CLIPVisionModel``), offline, from
the layouts users have on disk, and writing them as single files (running the vision tower for the mapper:
:mod:`videobooth_core.conditioning.clip`).

Accepted layouts:

* a transformers *folder* (``config.json`` + weights), a full ``CLIPModel`` folder such as
  ``openai/clip-vit-large-patch14``, or a pipeline root with a ``text_encoder/`` / ``image_encoder/`` sub-folder;
* a *single file* as ComfyUI users keep them (``models/text_encoders/clip_l.safetensors``,
  ``models/clip_vision/*.safetensors``), also nested in a full Stable Diffusion checkpoint
  (``cond_stage_model.transformer.`` prefix). Its config comes from the ``videobooth_config`` metadata, else
  from the weight shapes (:func:`infer_clip_text_config`, :func:`infer_clip_vision_config`).

Keys deliberately ignored: everything outside the selected tower (the other tower of a full ``CLIPModel``, other
parts of a full checkpoint); ``text_projection.weight``, ``visual_projection.weight`` and ``logit_scale`` (CLIP
heads the towers do not have); ``*.position_ids`` (a non-persistent buffer in current transformers: it is
recreated, never read, which also protects against the known checkpoints whose stored position ids are corrupt).

transformers is imported inside the functions, so importing this module is cheap.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..errors import CheckpointError, VideoBoothError, explain
from ..files import PathLike
from .component import count_indices, read_component, require_tensor
from .strict import Device, assign_weights, build_on_meta
from .weight_files import CONFIG_METADATA_KEY, read_config_metadata, read_json, save_safetensors

if TYPE_CHECKING:
    import transformers

logger = logging.getLogger(__name__)

ATTN_IMPLEMENTATIONS = ("eager", "sdpa")

# Attention heads by width for shape inference (head width 64 except the OpenCLIP ViT-H/bigG vision towers).
_TEXT_HEADS_BY_WIDTH = {512: 8, 768: 12, 1024: 16, 1280: 20}
_VISION_HEADS_BY_WIDTH = {768: 12, 1024: 16, 1280: 16, 1664: 16}
# OpenCLIP towers (ViT-H/14 and ViT-bigG/14, after conversion to the transformers layout) use exact GELU.
_TEXT_ACT_BY_WIDTH = {1024: "gelu", 1280: "gelu"}
_VISION_ACT_BY_WIDTH = {1280: "gelu", 1664: "gelu"}

_TEXT_CONFIG_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "projection_dim", "num_hidden_layers", "num_attention_heads",
    "max_position_embeddings", "hidden_act", "layer_norm_eps", "bos_token_id", "eos_token_id", "pad_token_id",
)
_VISION_CONFIG_FIELDS = (
    "hidden_size", "intermediate_size", "projection_dim", "num_hidden_layers", "num_attention_heads", "num_channels",
    "image_size", "patch_size", "hidden_act", "layer_norm_eps",
)

_TEXT_MARKER = "embeddings.token_embedding.weight"
_VISION_MARKER = "embeddings.patch_embedding.weight"
_CLIP_HEAD_EXTRAS = ("text_projection.weight", "visual_projection.weight", "logit_scale")


def infer_clip_text_config(
    component: Mapping[str, torch.Tensor], projection: torch.Tensor | None = None, *, source: str = "the file",
    prefix: str = "",
) -> dict[str, Any]:
    """Infer ``CLIPTextConfig`` kwargs from the shapes of a CLIP text state dict (keys without prefix).

    hidden/vocab from ``embeddings.token_embedding.weight`` (vocab, hidden); max positions from the position
    embedding; intermediate from ``fc1``; layers by counting ``encoder.layers.N``; heads from the width (64 per
    head, 8/12/16/20 for 512/768/1024/1280); ``quick_gelu`` (OpenAI CLIP) except the OpenCLIP widths 1024/1280
    (``gelu``); projection_dim from ``text_projection.weight`` when present. Tiny or unusual models need the
    ``videobooth_config`` metadata instead.
    """
    what = "CLIP text encoder"
    tok = require_tensor(component, _TEXT_MARKER, source=source, prefix=prefix, what=what)
    pos = require_tensor(component, "embeddings.position_embedding.weight", source=source, prefix=prefix, what=what)
    fc1 = require_tensor(component, "encoder.layers.0.mlp.fc1.weight", source=source, prefix=prefix, what=what)
    vocab_size, hidden = (int(s) for s in tok.shape)
    config: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": int(fc1.shape[0]),
        "num_hidden_layers": count_indices(list(component), r"encoder\.layers\.(\d+)\."),
        "num_attention_heads": _TEXT_HEADS_BY_WIDTH.get(hidden, max(1, hidden // 64)),
        "max_position_embeddings": int(pos.shape[0]),
        "hidden_act": _TEXT_ACT_BY_WIDTH.get(hidden, "quick_gelu"),
        "layer_norm_eps": 1e-5,
        "projection_dim": int(projection.shape[0]) if projection is not None else hidden,
    }
    logger.info("%s: inferred CLIP text config from shapes: %s", source, config)
    return config


def infer_clip_vision_config(
    component: Mapping[str, torch.Tensor], projection: torch.Tensor | None = None, *, source: str = "the file",
    prefix: str = "",
) -> dict[str, Any]:
    """Infer ``CLIPVisionConfig`` kwargs from the shapes of a CLIP vision state dict (keys without prefix).

    hidden from ``embeddings.class_embedding`` (hidden,); patch size and channels from
    ``embeddings.patch_embedding.weight`` (hidden, channels, patch, patch); image size = patch * sqrt(positions - 1)
    from ``embeddings.position_embedding.weight`` (positions, hidden); intermediate from ``fc1``; layers counted;
    heads from the width (64 per head; 16 for the OpenCLIP widths 1280/1664, which also use ``gelu``);
    projection_dim from ``visual_projection.weight`` when present.
    """
    what = "CLIP vision encoder"
    cls_emb = require_tensor(component, "embeddings.class_embedding", source=source, prefix=prefix, what=what)
    patch = require_tensor(component, _VISION_MARKER, source=source, prefix=prefix, what=what)
    pos = require_tensor(component, "embeddings.position_embedding.weight", source=source, prefix=prefix, what=what)
    fc1 = require_tensor(component, "encoder.layers.0.mlp.fc1.weight", source=source, prefix=prefix, what=what)
    hidden = int(cls_emb.shape[0])
    patch_size = int(patch.shape[-1])
    grid = math.isqrt(int(pos.shape[0]) - 1)
    if grid * grid != int(pos.shape[0]) - 1:
        raise CheckpointError(explain(
            f"'{prefix}embeddings.position_embedding.weight' has {pos.shape[0]} positions, not 1 + a square number "
            "of patches (a square-image CLIP vision tower is expected), in", source,
            f"use a file with the config in its '{CONFIG_METADATA_KEY}' metadata, or the model's original folder"))
    config: dict[str, Any] = {
        "hidden_size": hidden,
        "intermediate_size": int(fc1.shape[0]),
        "num_hidden_layers": count_indices(list(component), r"encoder\.layers\.(\d+)\."),
        "num_attention_heads": _VISION_HEADS_BY_WIDTH.get(hidden, max(1, hidden // 64)),
        "num_channels": int(patch.shape[1]),
        "image_size": grid * patch_size,
        "patch_size": patch_size,
        "hidden_act": _VISION_ACT_BY_WIDTH.get(hidden, "quick_gelu"),
        "layer_norm_eps": 1e-5,
        "projection_dim": int(projection.shape[0]) if projection is not None else hidden,
    }
    logger.info("%s: inferred CLIP vision config from shapes: %s", source, config)
    return config


_CLIP_TOWERS: dict[str, dict[str, Any]] = {
    "text": dict(subfolder="text_encoder", marker=_TEXT_MARKER, example_key="text_model.embeddings.token_embedding.weight",
                 wrapper="text_model", projection="text_projection.weight", infer=infer_clip_text_config,
                 config_class="CLIPTextConfig", model_class="CLIPTextModel", model_type="clip_text_model"),
    "vision": dict(subfolder="image_encoder", marker=_VISION_MARKER,
                   example_key="vision_model.embeddings.patch_embedding.weight", wrapper="vision_model",
                   projection="visual_projection.weight", infer=infer_clip_vision_config,
                   config_class="CLIPVisionConfig", model_class="CLIPVisionModel", model_type="clip_vision_model"),
}


def load_clip_text_encoder(
    path: PathLike,
    dtype: torch.dtype = torch.float32,
    device: Device = "cpu",
    attn_implementation: str = "eager",
) -> transformers.CLIPTextModel:
    """Load a CLIP text encoder (``transformers.CLIPTextModel``) in eval mode with ``requires_grad=False``.

    Args:
        path: a transformers folder (``config.json`` + ``model.safetensors`` / ``pytorch_model.bin``; a full
            ``CLIPModel`` folder; or a pipeline root with ``text_encoder/``), or a single ``.safetensors`` / ``.pt``
            file such as ComfyUI's ``models/text_encoders/clip_l.safetensors`` (keys ``text_model.*``, optionally
            prefixed ``cond_stage_model.transformer.`` or ``transformer.``).
        dtype: dtype of the floating-point weights.
        device: device of the returned model.
        attn_implementation: ``"eager"`` (default, same math as the official transformers 4.28 code) or
            ``"sdpa"``.

    Returns:
        The model; ``model(input_ids)`` maps ids ``(B, 77)`` to ``last_hidden_state`` ``(B, 77, hidden)``.

    Raises:
        CheckpointError: unreadable/unsafe file, not a CLIP text encoder, missing/unexpected/mis-shaped weights.
    """
    return _load_clip_tower(path, "text", dtype, device, attn_implementation)


def load_clip_vision_encoder(
    path: PathLike,
    dtype: torch.dtype = torch.float32,
    device: Device = "cpu",
    attn_implementation: str = "eager",
) -> transformers.CLIPVisionModel:
    """Load a CLIP vision encoder (``transformers.CLIPVisionModel``) in eval mode with ``requires_grad=False``.

    Args:
        path: a transformers folder (``CLIPVisionModel``/``CLIPVisionModelWithProjection``, a full ``CLIPModel``
            folder, or a pipeline root with ``image_encoder/``), or a single file such as ComfyUI's
            ``models/clip_vision/clip_vision_l.safetensors`` (keys ``vision_model.*``).
        dtype: dtype of the floating-point weights.
        device: device of the returned model.
        attn_implementation: ``"eager"`` (default) or ``"sdpa"``.

    Returns:
        The model; ``model(pixel_values, output_hidden_states=True)`` maps ``(B, 3, 224, 224)`` to
        ``last_hidden_state`` ``(B, 1 + patches, hidden)`` and ``hidden_states`` (layers + 1 tensors of that shape).

    Raises:
        CheckpointError: unreadable/unsafe file, not a CLIP vision encoder, missing/unexpected/mis-shaped weights.
    """
    return _load_clip_tower(path, "vision", dtype, device, attn_implementation)


def _folder_config(folder: Path, kind: str) -> transformers.CLIPTextConfig | transformers.CLIPVisionConfig:
    """The tower's config from a folder's ``config.json`` (a tower's own, or a full ``CLIPModel``'s)."""
    import transformers

    spec = _CLIP_TOWERS[kind]
    raw = read_json(folder / "config.json")
    model_type = raw.get("model_type")
    try:
        if f"{kind}_config" in raw or model_type == "clip":
            full = transformers.CLIPConfig.from_dict(raw)
            return full.text_config if kind == "text" else full.vision_config
        if model_type == spec["model_type"]:
            return getattr(transformers, spec["config_class"]).from_dict(raw)
    except (ValueError, TypeError) as e:
        raise CheckpointError(explain(f"the folder's transformers CLIP config is invalid ({e})", folder,
                                      "download the folder again")) from e
    other = _CLIP_TOWERS["vision" if kind == "text" else "text"]["model_type"]
    what = f"a CLIP {'vision' if kind == 'text' else 'text'} encoder" if model_type == other else \
        f"a model of type {model_type!r}"
    raise CheckpointError(explain(
        f"the folder holds {what} (config.json model_type={model_type!r}), but a CLIP {kind} encoder was expected "
        f"(model_type '{spec['model_type']}' or a full 'clip' model)", folder, f"pass the CLIP {kind} encoder folder"))


def _model_key_prefix(model: torch.nn.Module, wrapper: str) -> str:
    """``wrapper + '.'`` when the installed transformers nests the tower (4.x: ``text_model.*``), else ``''``."""
    return f"{wrapper}." if any(k.startswith(f"{wrapper}.") for k in model.state_dict()) else ""


def _load_clip_tower(
    path: PathLike, kind: str, dtype: torch.dtype, device: Device, attn_implementation: str
) -> torch.nn.Module:
    """Shared body of :func:`load_clip_text_encoder` (``kind="text"``) and :func:`load_clip_vision_encoder`."""
    import transformers

    spec = _CLIP_TOWERS[kind]
    if attn_implementation not in ATTN_IMPLEMENTATIONS:
        raise VideoBoothError(explain(
            "unsupported attn_implementation", attn_implementation,
            f"pass one of {', '.join(ATTN_IMPLEMENTATIONS)} ('eager' matches the official transformers 4.28 math)"))
    expected = f"a CLIP {kind} encoder"
    found = read_component(path, subfolder=spec["subfolder"], flavour="transformers", marker=spec["marker"],
                           example_key=spec["example_key"], expected=expected,
                           folder_config=lambda folder: _folder_config(folder, kind))
    config, source, prefix, component = found.config, found.source, found.prefix, found.weights
    ignored = [k for k in component if k.endswith("position_ids") or k in _CLIP_HEAD_EXTRAS]
    for key in ignored:
        del component[key]
    if ignored:
        logger.debug("%s: ignoring %s", source, ", ".join(ignored))
    if config is None:
        parent = prefix[: -len(spec["wrapper"]) - 1] if prefix.endswith(spec["wrapper"] + ".") else prefix
        kwargs = read_config_metadata(path) or spec["infer"](
            component, found.state_dict.get(parent + spec["projection"]), source=source, prefix=prefix,
        )
        try:
            config = getattr(transformers, spec["config_class"]).from_dict(dict(kwargs))
        except (ValueError, TypeError) as e:
            raise CheckpointError(explain(
                f"invalid CLIP {kind} config ({e}; {spec['config_class']} values are expected)", source,
                f"correct the '{CONFIG_METADATA_KEY}' metadata or remove it so the config is inferred")) from e
    return build_clip_tower(kind, config, component, source=source, expected=expected, file_prefix=prefix,
                            dtype=dtype, device=device, attn_implementation=attn_implementation)


def build_clip_tower(
    kind: str,
    config: transformers.CLIPTextConfig | transformers.CLIPVisionConfig,
    weights: Mapping[str, torch.Tensor],
    *,
    source: PathLike,
    expected: str,
    file_prefix: str,
    dtype: torch.dtype,
    device: Device,
    attn_implementation: str,
) -> torch.nn.Module:
    """A ``CLIPTextModel`` (``kind="text"``) or ``CLIPVisionModel`` (``"vision"``) built on the meta device from
    ``config``, with ``weights`` (transformers names without the ``text_model.`` / ``vision_model.`` wrapper)
    strictly assigned; errors name a key as the file has it, ``file_prefix`` + the key. Also builds the OpenCLIP
    towers of :mod:`..conditioning.openclip_text` once their weights are renamed.

    Raises:
        CheckpointError: missing, unexpected or mis-shaped weights.
    """
    import transformers

    spec = _CLIP_TOWERS[kind]
    model_class = getattr(transformers, spec["model_class"])
    model = build_on_meta(lambda: model_class._from_config(config, attn_implementation=attn_implementation),
                          source=source, expected=expected)
    model_prefix = _model_key_prefix(model, spec["wrapper"])
    assign_weights(model, {model_prefix + k: v for k, v in weights.items()}, source=source, expected=expected,
                   dtype=dtype, device=device, file_name=lambda k: file_prefix + k[len(model_prefix):])
    return model


def _single_file_tensors(model: torch.nn.Module, wrapper: str) -> dict[str, torch.Tensor]:
    """The tower's weights under ``wrapper.`` (ComfyUI's single-file names), without ``position_ids``."""
    prefix = _model_key_prefix(model, wrapper)
    return {f"{wrapper}.{k[len(prefix):]}": v for k, v in model.state_dict().items() if not k.endswith("position_ids")}


def save_clip_text_single_file(model: transformers.CLIPTextModel, path: PathLike) -> None:
    """Write ``model`` atomically as one safetensors file in ComfyUI's ``clip_l`` layout (``text_model.*`` keys),
    its architecture config in the ``videobooth_config`` metadata."""
    config = {k: getattr(model.config, k) for k in _TEXT_CONFIG_FIELDS}
    save_safetensors(_single_file_tensors(model, "text_model"), path,
                     {"format": "pt", CONFIG_METADATA_KEY: json.dumps(config)})


def save_clip_vision_single_file(model: transformers.CLIPVisionModel, path: PathLike) -> None:
    """Write ``model`` atomically as one safetensors file in the ``clip_vision`` layout (``vision_model.*`` keys),
    its architecture config in the ``videobooth_config`` metadata."""
    config = {k: getattr(model.config, k) for k in _VISION_CONFIG_FIELDS}
    save_safetensors(_single_file_tensors(model, "vision_model"), path,
                     {"format": "pt", CONFIG_METADATA_KEY: json.dumps(config)})
