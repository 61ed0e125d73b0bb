"""Loading VideoBooth weights: safe reading, kind detection by keys, strict loading on the meta device.

The released files are pickles: ``watermark_remove_module.pt`` (UNet under ``ema_unet``) and ``mapper.pt``
(mapper under ``ema``). They are read with ``torch.load(weights_only=True, mmap=True)`` - a pickle that would
run code is refused - and can be converted once to safetensors (:func:`convert_released_weights`), which
store the model config in their metadata. Modules are built on the ``meta`` device and filled with
``load_state_dict(assign=True)``, so a checkpoint is never held twice in memory.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..models.config import MapperConfig, UNetConfig
from .encoders import read_safetensors_metadata, read_state_dict
from ..errors import CheckpointError

if TYPE_CHECKING:
    from ..models.mapper import Mapper
    from ..models.unet_3d import UNet3DModel

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike
CONFIG_METADATA_KEY = "videobooth_config"
KIND_METADATA_KEY = "videobooth_kind"
SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")
UNET_WRAPPER_KEY = "ema_unet"
MAPPER_WRAPPER_KEY = "ema"


def _config_metadata(path: PathLike) -> str | None:
    """The model config stored in a safetensors file's metadata (None for pickles or when absent)."""
    if Path(path).suffix.lower() not in SAFETENSORS_SUFFIXES:
        return None
    return read_safetensors_metadata(path).get(CONFIG_METADATA_KEY)


def detect_kind(state_dict: Mapping[str, object]) -> str:
    """Tell what a state dict holds from its keys: ``videobooth_unet``, ``videobooth_mapper``, ``vae``,
    ``clip_text``, ``clip_vision``, ``wrapped_videobooth_unet``/``wrapped_videobooth_mapper`` (official
    pickles before unwrapping) or ``unknown``."""
    keys = state_dict.keys()
    if UNET_WRAPPER_KEY in keys:
        return "wrapped_videobooth_unet"
    if MAPPER_WRAPPER_KEY in keys and isinstance(state_dict[MAPPER_WRAPPER_KEY], Mapping):
        return "wrapped_videobooth_mapper"
    has = lambda fragment: any(fragment in k for k in keys)  # noqa: E731
    if "conv_in.weight" in keys and has("watermark_down_blocks."):
        return "videobooth_unet"
    if "mapping_0.0.weight" in keys and has("_attn1_to_k_new"):
        return "videobooth_mapper"
    if has("encoder.down.") or has("encoder.down_blocks.") or has("first_stage_model."):
        return "vae"
    if has("vision_model.") or has("visual_projection"):
        return "clip_vision"
    if has("text_model.") or has("token_embedding"):
        return "clip_text"
    if "conv_in.weight" in keys and has("down_blocks.") and has("attn2.to_k"):
        return "image_unet"
    return "unknown"


KIND_NAMES = {
    "videobooth_unet": "a VideoBooth UNet",
    "videobooth_mapper": "a VideoBooth mapper",
    "vae": "a VAE",
    "clip_text": "a CLIP text encoder",
    "clip_vision": "a CLIP vision encoder",
    "image_unet": "an image UNet (e.g. Stable Diffusion), not the VideoBooth video UNet",
    "unknown": "nothing this pack recognises",
}


def _unwrap(state_dict: Mapping[str, object], wrapper: str, expected: str, path: PathLike) -> dict[str, torch.Tensor]:
    """Take the official wrapper key (``ema_unet`` / ``ema``) if present, then check the kind by keys."""
    for key in (wrapper, UNET_WRAPPER_KEY, MAPPER_WRAPPER_KEY):
        if key in state_dict and isinstance(state_dict[key], Mapping):
            state_dict = state_dict[key]
            break
    kind = detect_kind(state_dict)
    if kind != expected:
        released = "watermark_remove_module.pt" if expected == "videobooth_unet" else "mapper.pt"
        raise CheckpointError(
            f"{path} holds {KIND_NAMES.get(kind, kind)}, but {KIND_NAMES[expected]} was expected "
            f"(the released file is {released}, or its conversion by `python -m videobooth_core convert`)"
        )
    return dict(state_dict)


def key_mismatch_report(state_dict: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> str | None:
    """None when the keys and shapes match exactly, else a summary of the first differences."""
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        f"{k} {tuple(state_dict[k].shape)} != {tuple(expected[k].shape)}"
        for k in expected
        if k in state_dict and tuple(state_dict[k].shape) != tuple(expected[k].shape)
    ]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys (first: {', '.join(missing[:5])})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys (first: {', '.join(unexpected[:5])})")
    if mismatched:
        parts.append(f"{len(mismatched)} shape mismatches (first: {'; '.join(mismatched[:3])})")
    return "; ".join(parts) or None


def check_keys(state_dict: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], path: PathLike, what: str) -> None:
    """Raise CheckpointError naming the first missing/unexpected keys and shape mismatches."""
    report = key_mismatch_report(state_dict, expected)
    if report:
        raise CheckpointError(
            f"{path} does not match the {what} it should hold: {report}. "
            "The file is incomplete or of another model; use the released file or its conversion."
        )


def load_strict(module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], path: PathLike, what: str) -> None:
    """Strict ``load_state_dict(assign=True)`` (works for modules built on the meta device)."""
    check_keys(state_dict, module.state_dict(), path, what)
    module.load_state_dict(state_dict, strict=True, assign=True)


def _cast(state_dict: dict[str, torch.Tensor], dtype: torch.dtype | None, device: torch.device | str) -> dict[str, torch.Tensor]:
    return {
        k: v.to(device=device, dtype=dtype if (dtype is not None and v.is_floating_point()) else v.dtype)
        for k, v in state_dict.items()
    }


def load_unet(
    path: PathLike,
    config: UNetConfig | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> "UNet3DModel":
    """Load the VideoBooth UNet from ``watermark_remove_module.pt`` (``ema_unet``) or a safetensors conversion.

    The config comes from ``config``, else the safetensors metadata, else the checkpoint's shapes (with the
    released model's 8 heads and 32 groups, which shapes do not record).
    """
    from ..models.unet_3d import UNet3DModel

    raw = read_state_dict(path)
    state_dict = _unwrap(raw, UNET_WRAPPER_KEY, "videobooth_unet", path)
    if config is None:
        meta = _config_metadata(path)
        config = UNetConfig.from_json(meta) if meta else UNetConfig.infer_from_state_dict(state_dict)
    with torch.device("meta"):
        unet = UNet3DModel(config)
    load_strict(unet, _cast(state_dict, dtype, device), path, "VideoBooth UNet")
    return unet.eval().requires_grad_(False)


def load_mapper(
    path: PathLike, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> "Mapper":
    """Load the mapper (and its per-site projections) from ``mapper.pt`` (``ema``) or a safetensors conversion."""
    from ..models.mapper import Mapper

    raw = read_state_dict(path)
    state_dict = _unwrap(raw, MAPPER_WRAPPER_KEY, "videobooth_mapper", path)
    config = MapperConfig.infer_from_state_dict(state_dict)
    with torch.device("meta"):
        mapper = Mapper(config)
    load_strict(mapper, _cast(state_dict, dtype, device), path, "VideoBooth mapper")
    return mapper.eval().requires_grad_(False)


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """``fp32|fp16|bf16`` (or a torch dtype) → torch dtype."""
    if isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[name]
    except KeyError:
        raise CheckpointError(f"unknown precision {name!r}; choose one of {', '.join(DTYPES)}") from None


def save_safetensors(
    state_dict: Mapping[str, torch.Tensor], path: PathLike, metadata: Mapping[str, str] | None = None
) -> None:
    """Write a safetensors file atomically (a temporary file renamed into place)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(tmp), metadata=dict(metadata or {}))
    os.replace(tmp, path)


def convert_released_weights(
    unet_path: PathLike | None,
    mapper_path: PathLike | None,
    out_dir: PathLike,
    dtype: str = "fp16",
    progress: Callable[[str, int, int], None] | None = None,
    unet_config: UNetConfig | None = None,
) -> list[Path]:
    """Convert the released pickles to safetensors in ``out_dir``: ``videobooth_unet.safetensors`` and
    ``videobooth_mapper.safetensors`` (with the config and kind in their metadata).

    Every input is validated (kind, strict keys) before anything is written; outputs appear atomically.
    ``progress(label, done, total)`` is called per tensor.
    """
    torch_dtype = parse_dtype(dtype)
    jobs = []
    if unet_path is not None:
        sd = _unwrap(read_state_dict(unet_path), UNET_WRAPPER_KEY, "videobooth_unet", unet_path)
        config = unet_config or UNetConfig.infer_from_state_dict(sd)
        from ..models.unet_3d import UNet3DModel

        with torch.device("meta"):
            expected = UNet3DModel(config).state_dict()
        check_keys(sd, expected, unet_path, "VideoBooth UNet")
        jobs.append(("unet", sd, Path(out_dir) / "videobooth_unet.safetensors",
                     {CONFIG_METADATA_KEY: config.to_json(), KIND_METADATA_KEY: "videobooth_unet"}))
    if mapper_path is not None:
        sd = _unwrap(read_state_dict(mapper_path), MAPPER_WRAPPER_KEY, "videobooth_mapper", mapper_path)
        from ..models.mapper import Mapper

        with torch.device("meta"):
            expected = Mapper(MapperConfig.infer_from_state_dict(sd)).state_dict()
        check_keys(sd, expected, mapper_path, "VideoBooth mapper")
        jobs.append(("mapper", sd, Path(out_dir) / "videobooth_mapper.safetensors", {KIND_METADATA_KEY: "videobooth_mapper"}))
    if not jobs:
        raise CheckpointError("nothing to convert: give --unet and/or --mapper")
    written = []
    for label, sd, target, metadata in jobs:
        converted = {}
        for i, (key, value) in enumerate(sd.items()):
            converted[key] = value.to(torch_dtype) if value.is_floating_point() else value
            if progress is not None:
                progress(label, i + 1, len(sd))
        metadata = dict(metadata, videobooth_dtype=dtype)
        save_safetensors(converted, target, metadata)
        del converted
        written.append(target)
        logger.info("wrote %s", target)
    return written
