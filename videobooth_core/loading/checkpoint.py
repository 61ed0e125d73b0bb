"""Loading VideoBooth weights: the UNet and the mapper, strictly, on the meta device; conversion to safetensors.

The released files are pickles: ``watermark_remove_module.pt`` (UNet under ``ema_unet``) and ``mapper.pt``
(mapper under ``ema``). They are read with ``torch.load(weights_only=True, mmap=True)`` - a pickle that would
run code is refused - and can be converted once to safetensors (:func:`convert_released_weights`), which
store the model config in their metadata. Modules are built on the ``meta`` device and filled with
``load_state_dict(assign=True)``, so a checkpoint is never held twice in memory. Reading, kind detection and
strict assignment are the shared ones of :mod:`.weight_files`, :mod:`.kinds` and :mod:`.strict`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..errors import CheckpointError, explain
from ..files import PathLike
from ..models.config import MapperConfig, UNetConfig
from .kinds import KIND_NAMES, MAPPER_WRAPPER_KEY, UNET_WRAPPER_KEY, describe_checkpoint, detect_kind
from .strict import assign_weights, build_on_meta, check_keys
from .weight_files import (
    CONFIG_METADATA_KEY,
    KIND_METADATA_KEY,
    SAFETENSORS_SUFFIXES,
    read_safetensors_metadata,
    read_state_dict,
    save_safetensors,
    unwrap_state_dict,
)

if TYPE_CHECKING:
    from ..models.mapper import Mapper
    from ..models.unet_3d import UNet3DModel

logger = logging.getLogger(__name__)


_RELEASED_FILES = {"videobooth_unet": "watermark_remove_module.pt", "videobooth_mapper": "mapper.pt"}


def _unwrap(state_dict: Mapping[str, object], wrapper: str, expected: str, path: PathLike) -> dict[str, torch.Tensor]:
    """The flat state dict inside the official wrapper (``ema_unet`` / ``ema``) if any, checked to be ``expected``."""
    flat = unwrap_state_dict(state_dict, (wrapper, UNET_WRAPPER_KEY, MAPPER_WRAPPER_KEY), source=path)
    if detect_kind(flat) != expected:
        raise CheckpointError(explain(
            f"the file holds {describe_checkpoint(flat)}, but {KIND_NAMES[expected]} was expected", path,
            f"use the released file ({_RELEASED_FILES[expected]}) or its conversion by "
            "`python -m videobooth_core convert`"))
    return flat


def unet_config_for(state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, str], path: PathLike) -> UNetConfig:
    """The UNet config stored in a file's ``videobooth_config`` metadata, else read from the weights' shapes (with
    the released model's 8 heads and 32 groups, which shapes do not record).

    Raises:
        CheckpointError: the stored config is not valid JSON or not a valid UNet config, or the shapes do not
            give one.
    """
    stored = metadata.get(CONFIG_METADATA_KEY)
    try:
        return UNetConfig.from_json(stored) if stored else UNetConfig.infer_from_state_dict(state_dict)
    except CheckpointError:
        raise
    except (ValueError, TypeError) as e:  # json.JSONDecodeError and ModelConfigError are ValueErrors
        where = f"the '{CONFIG_METADATA_KEY}' metadata of {path}" if stored else f"the weight shapes of {path}"
        raise CheckpointError(explain(
            f"{where} do not give a valid VideoBooth UNet config", " ".join(str(e).split()) or type(e).__name__,
            "convert the released watermark_remove_module.pt again with `python -m videobooth_core convert` (or "
            "remove that metadata entry so the config is read from the shapes)")) from e


def _metadata(path: PathLike) -> dict[str, str]:
    return read_safetensors_metadata(path) if Path(path).suffix.lower() in SAFETENSORS_SUFFIXES else {}


def _build_unet(config: UNetConfig, path: PathLike) -> "UNet3DModel":
    from ..models.unet_3d import UNet3DModel

    return build_on_meta(lambda: UNet3DModel(config), source=path, expected=KIND_NAMES["videobooth_unet"])


def _build_mapper(state_dict: Mapping[str, torch.Tensor], path: PathLike) -> "Mapper":
    from ..models.mapper import Mapper

    return build_on_meta(lambda: Mapper(MapperConfig.infer_from_state_dict(state_dict)), source=path,
                         expected=KIND_NAMES["videobooth_mapper"])


def load_unet(
    path: PathLike,
    config: UNetConfig | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> "UNet3DModel":
    """Load the VideoBooth UNet from ``watermark_remove_module.pt`` (``ema_unet``) or a safetensors conversion.

    The config comes from ``config``, else the safetensors metadata, else the checkpoint's shapes
    (:func:`unet_config_for`). Returned in eval mode, ``requires_grad=False``.

    Raises:
        CheckpointError: unreadable/unsafe file, not a VideoBooth UNet, a bad stored config, or keys/shapes that
            differ from the config's model.
    """
    state_dict = _unwrap(read_state_dict(path), UNET_WRAPPER_KEY, "videobooth_unet", path)
    unet = _build_unet(config or unet_config_for(state_dict, _metadata(path), path), path)
    assign_weights(unet, state_dict, source=path, expected=KIND_NAMES["videobooth_unet"], dtype=dtype, device=device)
    return unet


def load_mapper(
    path: PathLike, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> "Mapper":
    """Load the mapper (and its per-site projections) from ``mapper.pt`` (``ema``) or a safetensors conversion;
    eval mode, ``requires_grad=False``.

    Raises:
        CheckpointError: unreadable/unsafe file, not a VideoBooth mapper, or inconsistent keys/shapes.
    """
    state_dict = _unwrap(read_state_dict(path), MAPPER_WRAPPER_KEY, "videobooth_mapper", path)
    mapper = _build_mapper(state_dict, path)
    assign_weights(mapper, state_dict, source=path, expected=KIND_NAMES["videobooth_mapper"], dtype=dtype,
                   device=device)
    return mapper


STARTING_MAPPER_KINDS = ("videobooth_mapper", "elite_mapper")
"""What a training stage can start from (``train --mapper``): a VideoBooth mapper, or ELITE's global mapper layout."""
ELITE_PROJECTIONS = ("attn2_to_k", "attn2_to_v")


def read_starting_mapper(path: PathLike) -> tuple[str, dict[str, torch.Tensor]]:
    """The weights a training stage starts from and their kind, told from the keys (unwrapped from ``ema``):
    ``videobooth_mapper`` (the released ``mapper.pt``, a conversion or a training result) or ``elite_mapper``
    (ELITE's ``train_global.py`` state dict: mapper MLPs plus attn2 ``to_k``/``to_v`` per site, or the MLPs only;
    the official stage-1 checkpoints have this layout under ``ema``). Cheap: no model is built.

    Raises:
        CheckpointError: unreadable/unsafe file, or any other kind (the message names what the file holds).
    """
    flat = unwrap_state_dict(read_state_dict(path), (MAPPER_WRAPPER_KEY,), source=path)
    kind = detect_kind(flat)
    if kind not in STARTING_MAPPER_KINDS:
        raise CheckpointError(explain(
            f"the starting mapper holds {describe_checkpoint(flat)}, not a mapper a training stage can start from",
            path, "pass ELITE's global mapper (stage 1, the official start), a stage-1 result "
                  "(videobooth_mapper.safetensors) or the released mapper.pt"))
    return kind, flat


def has_elite_projections(weights: Mapping[str, torch.Tensor]) -> bool:
    """Whether an ``elite_mapper`` file carries the attn2 ``to_k``/``to_v`` (else it holds the MLPs only)."""
    return any(key.removesuffix(".weight").endswith(ELITE_PROJECTIONS) for key in weights)


def elite_mapper_config(weights: Mapping[str, torch.Tensor],
                        site_channels: tuple[tuple[str, int], ...]) -> MapperConfig:
    """The mapper config of an ``elite_mapper`` file: widths and levels from its MLPs, the attention sites (which
    an MLP-only file does not name) from the UNet it will train with: ((site prefix, channels), ...)."""
    dims = MapperConfig.infer_from_state_dict(weights)
    return MapperConfig(input_dim=dims.input_dim, hidden_dim=dims.hidden_dim, output_dim=dims.output_dim,
                        num_levels=dims.num_levels, site_channels=tuple(site_channels))


def assign_elite_mapper(mapper: "Mapper", weights: Mapping[str, torch.Tensor], path: PathLike) -> bool:
    """Copy an ``elite_mapper`` file into ``mapper`` (built with :func:`elite_mapper_config`), strictly: the file
    must hold exactly the mapper's MLP weights and, if any projection, exactly its attn2 ``to_k``/``to_v`` for every
    site, with the same shapes. The mapper's other projections (attn1 ``_new``/``_exemplar``) are left as they are
    (the trainer copies them from the UNet). Returns whether the file had the attn2 projections.

    Raises:
        CheckpointError: a missing, unexpected or mis-shaped key (named, with what the file holds).
    """
    with_projections = has_elite_projections(weights)
    expected = {key: value for key, value in mapper.state_dict().items()
                if key.startswith("mapping_") or (with_projections and key.removesuffix(".weight").endswith(
                    ELITE_PROJECTIONS))}
    layout = "with attn2 to_k/to_v per site" if with_projections else "MLPs only"
    check_keys(weights, expected, path, f"an ELITE global mapper ({layout}) for this UNet and these CLIP towers")
    with torch.no_grad():
        for key, value in mapper.state_dict().items():
            if key in expected:
                value.copy_(weights[key])
    return with_projections


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """``fp32|fp16|bf16`` (or a torch dtype) → torch dtype."""
    if isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[name]
    except KeyError:
        raise CheckpointError(f"unknown precision {name!r}; choose one of {', '.join(DTYPES)}") from None


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
        config = unet_config or unet_config_for(sd, {}, unet_path)
        check_keys(sd, _build_unet(config, unet_path).state_dict(), unet_path, KIND_NAMES["videobooth_unet"])
        jobs.append(("unet", sd, Path(out_dir) / "videobooth_unet.safetensors",
                     {CONFIG_METADATA_KEY: config.to_json(), KIND_METADATA_KEY: "videobooth_unet"}))
    if mapper_path is not None:
        sd = _unwrap(read_state_dict(mapper_path), MAPPER_WRAPPER_KEY, "videobooth_mapper", mapper_path)
        check_keys(sd, _build_mapper(sd, mapper_path).state_dict(), mapper_path, KIND_NAMES["videobooth_mapper"])
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
