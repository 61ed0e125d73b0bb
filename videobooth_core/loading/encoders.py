"""Loading of the frozen models VideoBooth uses: CLIP text encoder, CLIP vision encoder, VAE and CLIP tokenizer.

Every loader accepts the layouts users actually have on disk:

* a Hugging Face / diffusers *folder* (``config.json`` + weights, or a pipeline root with a ``text_encoder/``,
  ``image_encoder/``, ``vae/`` or ``tokenizer/`` sub-folder, or a full ``CLIPModel`` folder such as
  ``openai/clip-vit-large-patch14``),
* a *single file* as ComfyUI users keep them (``models/text_encoders/clip_l.safetensors``,
  ``models/clip_vision/*.safetensors``, ``models/vae/vae-ft-ema-560000-ema-pruned.safetensors``), including
  weights nested in a full Stable Diffusion checkpoint (``cond_stage_model.transformer.``,
  ``first_stage_model.`` prefixes).

Single files are read safely (safetensors, or ``torch.load(weights_only=True)``), the model is built on the meta
device and the weights are *assigned* (``load_state_dict(strict=True, assign=True)``) so that a large file is
never allocated twice. Loading is strict: a missing, unexpected or mis-shaped weight raises
:class:`~videobooth_core.errors.CheckpointError` naming it. Nothing is downloaded.

Keys that are deliberately ignored (documented here once):

* everything outside the selected component (other parts of a full checkpoint, e.g. ``model.diffusion_model.*``;
  the other tower of a full ``CLIPModel``; ``text_projection.weight``, ``visual_projection.weight`` and
  ``logit_scale`` at the top level of a CLIP file),
* ``*.position_ids`` (a non-persistent buffer in current transformers; it is recreated, never read, which also
  protects against the known checkpoints whose stored position ids are corrupt),
* inside a component: ``text_projection.weight``, ``visual_projection.weight``, ``logit_scale`` (CLIP heads that
  ``CLIPTextModel`` / ``CLIPVisionModel`` do not have), and ``loss.*`` / ``model_ema.*`` in an LDM VAE file
  (the training discriminator and EMA counters of unpruned VAE checkpoints).

Heavy libraries (transformers, diffusers) are imported inside the functions, so importing this module is cheap.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from ..errors import CheckpointError, VideoBoothError

if TYPE_CHECKING:
    import diffusers
    import transformers

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]
Device = str | torch.device

SAFETENSORS_EXTENSIONS: tuple[str, ...] = (".safetensors", ".sft")
PICKLE_EXTENSIONS: tuple[str, ...] = (".pt", ".pth", ".ckpt", ".bin")
#: safetensors metadata key under which our single files store the model config (a JSON dict of kwargs).
CONFIG_METADATA_KEY = "videobooth_config"
#: Latent scaling factor of the Stable Diffusion 1.x VAE used by VideoBooth.
SD_VAE_SCALING_FACTOR = 0.18215

_ATTN_IMPLEMENTATIONS = ("eager", "sdpa")

# Attention heads by width for shape inference (head width 64 except the OpenCLIP ViT-H/bigG vision towers).
_TEXT_HEADS_BY_WIDTH = {512: 8, 768: 12, 1024: 16, 1280: 20}
_VISION_HEADS_BY_WIDTH = {768: 12, 1024: 16, 1280: 16, 1664: 16}
# OpenCLIP towers (ViT-H/14 and ViT-bigG/14, after conversion to the transformers layout) use exact GELU.
_TEXT_ACT_BY_WIDTH = {1024: "gelu", 1280: "gelu"}
_VISION_ACT_BY_WIDTH = {1280: "gelu", 1664: "gelu"}

_TEXT_CONFIG_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "projection_dim",
    "num_hidden_layers",
    "num_attention_heads",
    "max_position_embeddings",
    "hidden_act",
    "layer_norm_eps",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
)
_VISION_CONFIG_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "projection_dim",
    "num_hidden_layers",
    "num_attention_heads",
    "num_channels",
    "image_size",
    "patch_size",
    "hidden_act",
    "layer_norm_eps",
)


# ----------------------------------------------------------------------------------------------------------------
# Reading weight files
# ----------------------------------------------------------------------------------------------------------------


def _incomplete(path: Path, detail: str) -> CheckpointError:
    return CheckpointError(
        f"Cannot read {path}: the file is incomplete or corrupt ({detail}). Expected a complete weight file. "
        "Fix: download the file again (an interrupted download or a full disk usually causes this) and check its "
        "size against the source."
    )


def read_state_dict(path: PathLike) -> dict[str, Any]:
    """Read a weight file safely and return its top-level mapping.

    ``.safetensors`` / ``.sft`` files are read with safetensors (memory-mapped); every value is a tensor.
    ``.pt`` / ``.pth`` / ``.ckpt`` / ``.bin`` files are read with
    ``torch.load(map_location="cpu", weights_only=True, mmap=True)`` (``mmap=False`` only for legacy non-zip
    pickles). A torch file may hold a nested dict (``{"state_dict": {...}}``, ``{"ema": {...}}``): use
    :func:`unwrap_state_dict` to get the flat ``{name: tensor}`` dict.

    Raises:
        CheckpointError: the file is missing, has an unsupported extension, is truncated/corrupt, or is a pickle
            that contains objects other than tensors (refused for safety, the payload never runs).
    """
    p = Path(path)
    if not p.exists():
        raise CheckpointError(
            f"Checkpoint file not found: {p}. Expected an existing weight file "
            f"({', '.join(SAFETENSORS_EXTENSIONS + PICKLE_EXTENSIONS)}). Fix: check the path and file name, or put "
            "the model file in the expected models folder."
        )
    if p.is_dir():
        raise CheckpointError(
            f"{p} is a folder, but a single weight file was expected here. Fix: pass the weight file inside it "
            "(e.g. model.safetensors), or use a loader that accepts model folders."
        )
    suffix = p.suffix.lower()
    if suffix in SAFETENSORS_EXTENSIONS:
        return _read_safetensors(p)
    if suffix in PICKLE_EXTENSIONS:
        return _read_torch_file(p)
    raise CheckpointError(
        f"Unsupported weight file extension '{p.suffix}' for {p}. Expected one of "
        f"{', '.join(SAFETENSORS_EXTENSIONS + PICKLE_EXTENSIONS)}. Fix: use a .safetensors file (preferred) or a "
        "PyTorch .pt/.pth/.ckpt/.bin state dict."
    )


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {key: f.get_tensor(key) for key in f.keys()}
    except SafetensorError as e:
        raise _incomplete(path, f"safetensors: {e}") from e
    except OSError as e:
        raise CheckpointError(f"Cannot read {path}: {e}. Fix: check that the file is readable.") from e


def read_safetensors_metadata(path: PathLike) -> dict[str, str]:
    """Return the ``__metadata__`` string dict of a safetensors file (``{}`` when it has none).

    Raises:
        CheckpointError: the file is missing, not a safetensors file, or its header is corrupt.
    """
    from safetensors import SafetensorError, safe_open

    p = Path(path)
    if p.suffix.lower() not in SAFETENSORS_EXTENSIONS:
        raise CheckpointError(
            f"{p} is not a safetensors file, so it has no metadata. Expected a {'/'.join(SAFETENSORS_EXTENSIONS)} "
            "file. Fix: pass the .safetensors file."
        )
    if not p.is_file():
        raise CheckpointError(f"Checkpoint file not found: {p}. Fix: check the path and file name.")
    try:
        with safe_open(str(p), framework="pt", device="cpu") as f:
            return dict(f.metadata() or {})
    except SafetensorError as e:
        raise _incomplete(p, f"safetensors: {e}") from e


def _read_torch_file(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise CheckpointError(f"Cannot read {path}: {e}. Fix: check that the file is readable.") from e
    is_zip = magic == b"PK\x03\x04"  # torch.save's default format since PyTorch 1.6
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except pickle.UnpicklingError as e:
        message = str(e)
        if "Weights only load failed" not in message:
            raise _incomplete(path, f"unpickling failed: {message.splitlines()[0] if message else type(e).__name__}")
        found = re.search(r"GLOBAL ([\w.]+)", message)
        global_name = found.group(1) if found else None
        if not is_zip and not _looks_like_foreign_global(global_name):
            # A legacy (non-zip) pickle cut short makes the restricted unpickler stop on a truncated name such as
            # 'torch._uti' or on a stray opcode; it was still refused, nothing ran.
            stopped = f" at {global_name!r}" if global_name else ""
            raise CheckpointError(
                f"Refused to load {path}: the safe (weights-only) unpickler stopped{stopped}, so the file is either "
                "incomplete or corrupt, or a pickle that contains objects other than tensors; nothing in it was "
                "executed. Fix: download the file again; if you trust its source, convert it to safetensors."
            ) from e
        detail = f" (it asks to import {global_name!r})" if global_name else ""
        raise CheckpointError(
            f"Refused to load {path}: the file contains Python objects other than tensors{detail}. Unpickling it "
            "could run arbitrary code, so it was refused for safety. Expected a plain state dict of tensors. Fix: "
            "use a .safetensors version of this model, or convert the file to safetensors with a tool you trust "
            "in an environment you trust."
        ) from e
    except (RuntimeError, EOFError, OSError) as e:  # OSError: mmap of a zip whose records overrun the file
        raise _incomplete(path, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'unexpected end of file'}")
    except Exception as e:  # noqa: BLE001 - any other unpickler failure on garbage bytes (IndexError, struct.error)
        raise _incomplete(path, f"{type(e).__name__}: {e}") from e
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"{path} contains a {type(obj).__name__}, but a state dict (a dict of tensors) was expected. Fix: save "
            "the model's state_dict() rather than the whole object, preferably as .safetensors."
        )
    return dict(obj)


def _looks_like_foreign_global(name: str | None) -> bool:
    """Whether a global refused by ``weights_only`` names a real object rather than a cut-off name.

    Genuine state dicts only reference allowed ``torch.*`` / ``collections.*`` globals. Any other complete dotted
    name (``posix.system``, ``builtins.exec``, ``__main__.Model``), or a ``torch.*`` / ``collections.*`` name that
    resolves among the already imported modules (``torch.nn.modules.linear.Linear``: a pickled module), means the
    file carries other objects. A name that does not resolve (``torch._uti``) comes from a truncated file.
    """
    if not name or name.endswith(".") or ".." in name or "." not in name:
        return False
    parts = name.split(".")
    if parts[0] not in ("torch", "collections"):
        return True
    for split in range(len(parts) - 1, 0, -1):  # longest already imported module prefix; nothing is imported here
        obj: Any = sys.modules.get(".".join(parts[:split]))
        if obj is None:
            continue
        for attr in parts[split:]:
            obj = getattr(obj, attr, None)
            if obj is None:
                return False
        return True
    return False


def unwrap_state_dict(
    sd: Mapping[str, Any],
    preferred_keys: Sequence[str] = ("state_dict",),
    *,
    source: PathLike | None = None,
) -> dict[str, torch.Tensor]:
    """Return the flat ``{name: tensor}`` dict inside a possibly nested checkpoint dict.

    Repeatedly descends into the first of ``preferred_keys`` whose value is a dict, or else into the only
    dict-valued entry (e.g. ``{"ema": {...}, "step": 100}``), until every value is a tensor. The caller's dicts are
    never mutated; a new dict is returned.

    Args:
        sd: the mapping returned by :func:`read_state_dict`.
        preferred_keys: wrapper keys to descend into first, in order (``"state_dict"`` for Lightning/LDM files,
            ``"ema"`` / ``"ema_unet"`` for VideoBooth checkpoints).
        source: the file name, for error messages.

    Raises:
        CheckpointError: no tensors, several candidate nested dicts, or non-tensor values next to tensors.
    """
    name = str(source) if source is not None else "the checkpoint"
    current: Mapping[str, Any] = sd
    trail: list[str] = []
    for _ in range(16):
        if current and all(isinstance(v, torch.Tensor) for v in current.values()):
            if trail:
                logger.debug("Unwrapped %s through %s", name, " -> ".join(trail))
            return dict(current)
        nested = [k for k, v in current.items() if isinstance(v, Mapping)]
        chosen = next((k for k in preferred_keys if isinstance(current.get(k), Mapping)), None)
        if chosen is None and len(nested) == 1 and not any(isinstance(v, torch.Tensor) for v in current.values()):
            chosen = nested[0]
        if chosen is None:
            break
        trail.append(chosen)
        current = current[chosen]
    where = f" (inside {' -> '.join(repr(t) for t in trail)})" if trail else ""
    if not current:
        raise CheckpointError(
            f"{name} contains no tensors{where}. Expected a state dict of model weights. Fix: check that this is "
            "the right file and that it was saved completely."
        )
    nested = [k for k, v in current.items() if isinstance(v, Mapping)]
    if len(nested) > 1:
        raise CheckpointError(
            f"{name} holds several nested weight dicts{where}: {', '.join(map(repr, nested[:8]))}. Expected one state "
            "dict. Fix: tell the loader which one to use (preferred_keys), or save only that state dict."
        )
    bad = [k for k, v in current.items() if not isinstance(v, torch.Tensor)]
    raise CheckpointError(
        f"{name} contains non-tensor entries{where}: {', '.join(map(repr, bad[:8]))}. Expected a state dict whose "
        "values are all tensors. Fix: save model.state_dict() only (preferably as .safetensors)."
    )


def _read_config_metadata(path: Path) -> dict[str, Any] | None:
    """The JSON config stored under ``videobooth_config`` in a safetensors file, or ``None``."""
    if path.suffix.lower() not in SAFETENSORS_EXTENSIONS:
        return None
    raw = read_safetensors_metadata(path).get(CONFIG_METADATA_KEY)
    if raw is None:
        return None
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as e:
        raise CheckpointError(
            f"The '{CONFIG_METADATA_KEY}' metadata of {path} is not valid JSON ({e}). Expected a JSON object of "
            "model config values. Fix: re-create the file, or remove that metadata entry so the config is inferred."
        ) from e
    if not isinstance(config, dict):
        raise CheckpointError(
            f"The '{CONFIG_METADATA_KEY}' metadata of {path} is a {type(config).__name__}, expected a JSON object. "
            "Fix: re-create the file, or remove that metadata entry so the config is inferred from the weights."
        )
    return config


_FOLDER_WEIGHT_NAMES = {
    "transformers": ("model.safetensors", "pytorch_model.bin", "model.fp16.safetensors", "pytorch_model.fp16.bin"),
    "diffusers": (
        "diffusion_pytorch_model.safetensors",
        "diffusion_pytorch_model.bin",
        "diffusion_pytorch_model.fp16.safetensors",
        "diffusion_pytorch_model.fp16.bin",
    ),
}


def _read_folder_weights(folder: Path, flavour: str) -> dict[str, torch.Tensor]:
    """Read the weights of a transformers/diffusers model folder (single file or sharded with an index)."""
    for name in _FOLDER_WEIGHT_NAMES[flavour]:
        index = folder / f"{name}.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError) as e:
                raise CheckpointError(
                    f"Cannot read the shard index {index} ({e}). Expected a JSON file with a 'weight_map'. Fix: "
                    "download the model folder again."
                ) from e
            merged: dict[str, torch.Tensor] = {}
            for shard in sorted(set(weight_map.values())):
                merged.update(unwrap_state_dict(read_state_dict(folder / shard), source=folder / shard))
            return merged
        if (folder / name).is_file():
            return unwrap_state_dict(read_state_dict(folder / name), source=folder / name)
    raise CheckpointError(
        f"No weights found in the model folder {folder}. Expected one of {', '.join(_FOLDER_WEIGHT_NAMES[flavour])} "
        "(or a sharded '*.index.json'). Fix: download the complete folder, or pass the weight file itself."
    )


def _resolve_model_folder(folder: Path, subfolders: Sequence[str], expected: str) -> Path:
    if (folder / "config.json").is_file():
        return folder
    for sub in subfolders:
        if (folder / sub / "config.json").is_file():
            return folder / sub
    wanted = " or ".join(f"'{s}/config.json'" for s in subfolders)
    raise CheckpointError(
        f"The folder {folder} is not a model folder: it has no 'config.json'{' (nor ' + wanted + ')' if wanted else ''}"
        f". Expected {expected}. Fix: pass the folder that holds config.json and the weights, or a single weight file."
    )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"Cannot read {path} ({e}). Expected a JSON config. Fix: download it again.") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} is not a JSON object. Expected a model config. Fix: download it again.")
    return data


# ----------------------------------------------------------------------------------------------------------------
# Recognising checkpoints and selecting a component
# ----------------------------------------------------------------------------------------------------------------


def _has_suffix(keys: Sequence[str], marker: str) -> bool:
    return any(k == marker or k.endswith("." + marker) for k in keys)


def describe_checkpoint(keys: Sequence[str]) -> str:
    """A short human description of what a state dict looks like, judged from its key names."""
    keys = list(keys)
    if _has_suffix(keys, "encoder.down.0.block.0.conv1.weight"):
        return "a VAE (AutoencoderKL, original LDM key layout)"
    if _has_suffix(keys, "encoder.down_blocks.0.resnets.0.conv1.weight"):
        return "a VAE (AutoencoderKL, diffusers key layout)"
    if _has_suffix(keys, "embeddings.token_embedding.weight"):
        return "a CLIP text encoder"
    if _has_suffix(keys, "embeddings.patch_embedding.weight"):
        return "a CLIP vision encoder"
    if any(k.startswith("model.diffusion_model.") for k in keys) or _has_suffix(keys, "input_blocks.0.0.weight"):
        return "a diffusion UNet (original Stable Diffusion layout)"
    if _has_suffix(keys, "time_embedding.linear_1.weight"):
        return "a diffusion UNet (diffusers layout)"
    if _has_suffix(keys, "mapping_0.0.weight"):
        return "a VideoBooth Mapper"
    if _has_suffix(keys, "visual.conv1.weight") or _has_suffix(keys, "visual.transformer.resblocks.0.ln_1.weight"):
        return "an OpenAI/OpenCLIP-format CLIP vision tower (not the transformers layout)"
    if _has_suffix(keys, "transformer.resblocks.0.ln_1.weight"):
        return "an OpenAI/OpenCLIP-format CLIP text encoder (not the transformers layout)"
    return f"an unrecognised model (first keys: {', '.join(sorted(keys)[:4]) or 'none'})"


def _select_component(
    sd: Mapping[str, torch.Tensor],
    marker: str,
    *,
    source: str,
    expected: str,
    example_key: str,
) -> tuple[str, dict[str, torch.Tensor]]:
    """Find the component whose keys end in ``marker`` and return ``(prefix, {key without prefix: tensor})``."""
    prefixes = sorted({k[: len(k) - len(marker)] for k in sd if k == marker or k.endswith("." + marker)})
    if not prefixes:
        raise CheckpointError(
            f"{source} does not look like {expected}: it looks like {describe_checkpoint(list(sd))}. Expected keys "
            f"such as '{example_key}'. Fix: choose the right file for this input (check the models folder it came "
            "from)."
        )
    if len(prefixes) > 1:
        raise CheckpointError(
            f"{source} contains several candidates for {expected}, under the prefixes "
            f"{', '.join(repr(p) for p in prefixes[:6])}. Expected exactly one. Fix: extract the one you want into "
            "its own file."
        )
    prefix = prefixes[0]
    component = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
    ignored = [k for k in sd if not k.startswith(prefix)]
    if ignored:
        logger.info(
            "%s: using the %s under prefix %r; ignoring %d other keys (e.g. %s)",
            source, expected, prefix, len(ignored), ", ".join(ignored[:3]),
        )
    return prefix, component


def _drop_keys(component: dict[str, torch.Tensor], predicate: Callable[[str], bool], source: str) -> None:
    dropped = [k for k in component if predicate(k)]
    for k in dropped:
        del component[k]
    if dropped:
        logger.debug("%s: ignoring %s", source, ", ".join(dropped))


def _format_keys(keys: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(repr(k) for k in keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


# ----------------------------------------------------------------------------------------------------------------
# Building on the meta device and assigning weights
# ----------------------------------------------------------------------------------------------------------------


def _build_on_meta(build: Callable[[], torch.nn.Module], *, source: str, expected: str) -> torch.nn.Module:
    try:
        with torch.device("meta"):
            return build()
    except (ValueError, TypeError, AssertionError, AttributeError) as e:
        raise CheckpointError(
            f"Cannot build {expected} from the config of {source}: {e}. Expected a consistent model config. Fix: "
            f"check the config (or the '{CONFIG_METADATA_KEY}' metadata), or use the model's original files."
        ) from e


def _assign_weights(
    model: torch.nn.Module,
    weights: Mapping[str, torch.Tensor],
    *,
    source: str,
    expected: str,
    dtype: torch.dtype,
    device: Device,
    file_name: Callable[[str], str] = lambda k: k,
) -> None:
    """Strictly load ``weights`` (model key names) into a meta-built ``model`` with ``assign=True``.

    Floating-point tensors are cast to ``dtype``; all tensors are moved to ``device``. Non-persistent buffers left
    on the meta device (``position_ids``) are recreated on ``device``. ``file_name`` maps a model key to the name
    it has in the file, for error messages.
    """
    expected_sd = model.state_dict()
    missing = sorted(set(expected_sd) - set(weights))
    unexpected = sorted(set(weights) - set(expected_sd))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} weight(s): {_format_keys([file_name(k) for k in missing])}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} weight(s): {_format_keys([file_name(k) for k in unexpected])}")
        raise CheckpointError(
            f"{source} does not match {expected}: {'; '.join(parts)}. Expected exactly the weights of {expected}. "
            "Fix: use a complete, unmodified file of the right model (a partial download, a pruned/merged file or "
            "a different architecture causes this)."
        )
    mismatched = [
        f"{file_name(k)} {tuple(weights[k].shape)} vs {tuple(expected_sd[k].shape)}"
        for k in expected_sd
        if tuple(weights[k].shape) != tuple(expected_sd[k].shape)
    ]
    if mismatched:
        raise CheckpointError(
            f"{source} has weights of the wrong shape for {expected} (file vs model): {_format_keys(mismatched, 3)}. "
            f"Expected the shapes given by the config. Fix: the config (or the '{CONFIG_METADATA_KEY}' metadata) does "
            "not describe this file; use the model's own config.json or a file with correct metadata."
        )
    prepared = {
        k: (v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device=device))
        for k, v in weights.items()
    }
    model.load_state_dict(prepared, strict=True, assign=True)
    _materialize_meta_buffers(model, device)
    model.eval()
    model.requires_grad_(False)


def _materialize_meta_buffers(model: torch.nn.Module, device: Device) -> None:
    """Recreate the non-persistent buffers that ``assign=True`` left on the meta device."""
    for module_name, module in model.named_modules():
        for name, buf in list(module._buffers.items()):
            if buf is None or not buf.is_meta:
                continue
            if name == "position_ids":
                module._buffers[name] = torch.arange(buf.shape[-1], device=device).expand(buf.shape)
            else:  # pragma: no cover - would be a new buffer in a future library version
                raise RuntimeError(f"Buffer {module_name}.{name} was not loaded and has no known initialisation")
    leftover = [n for n, p in model.named_parameters() if p.is_meta]
    if leftover:  # pragma: no cover - strict loading makes this impossible
        raise RuntimeError(f"Parameters left on the meta device: {leftover[:5]}")


def _check_attn_implementation(attn_implementation: str) -> None:
    if attn_implementation not in _ATTN_IMPLEMENTATIONS:
        raise VideoBoothError(
            f"attn_implementation={attn_implementation!r} is not supported. Expected one of "
            f"{', '.join(_ATTN_IMPLEMENTATIONS)} ('eager' matches the official transformers 4.28 math). Fix: pass "
            "'eager' or 'sdpa'."
        )


def _model_key_prefix(model: torch.nn.Module, wrapper: str) -> str:
    """``wrapper + '.'`` when the installed transformers nests the tower (4.x: ``text_model.*``), else ``''``."""
    return f"{wrapper}." if any(k.startswith(f"{wrapper}.") for k in model.state_dict()) else ""


def _count_indices(keys: Sequence[str], pattern: str) -> int:
    """Number of distinct integers captured by ``pattern`` (one group) among ``keys``."""
    found = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
    return len(found)


def _require(component: Mapping[str, torch.Tensor], key: str, *, source: str, prefix: str, what: str) -> torch.Tensor:
    if key not in component:
        raise CheckpointError(
            f"{source} lacks '{prefix}{key}', which is needed to infer the {what} config. Expected a complete "
            f"{what}. Fix: use a complete file, or one with the config in its '{CONFIG_METADATA_KEY}' metadata."
        )
    return component[key]


# ----------------------------------------------------------------------------------------------------------------
# CLIP text encoder
# ----------------------------------------------------------------------------------------------------------------

_TEXT_MARKER = "embeddings.token_embedding.weight"
_CLIP_HEAD_EXTRAS = ("text_projection.weight", "visual_projection.weight", "logit_scale")


def _is_clip_extra(key: str) -> bool:
    return key.endswith("position_ids") or key in _CLIP_HEAD_EXTRAS


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
    tok = _require(component, _TEXT_MARKER, source=source, prefix=prefix, what="CLIP text encoder")
    pos = _require(component, "embeddings.position_embedding.weight", source=source, prefix=prefix,
                   what="CLIP text encoder")
    fc1 = _require(component, "encoder.layers.0.mlp.fc1.weight", source=source, prefix=prefix,
                   what="CLIP text encoder")
    vocab_size, hidden = (int(s) for s in tok.shape)
    config: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": int(fc1.shape[0]),
        "num_hidden_layers": _count_indices(list(component), r"encoder\.layers\.(\d+)\."),
        "num_attention_heads": _TEXT_HEADS_BY_WIDTH.get(hidden, max(1, hidden // 64)),
        "max_position_embeddings": int(pos.shape[0]),
        "hidden_act": _TEXT_ACT_BY_WIDTH.get(hidden, "quick_gelu"),
        "layer_norm_eps": 1e-5,
        "projection_dim": int(projection.shape[0]) if projection is not None else hidden,
    }
    logger.info("%s: inferred CLIP text config from shapes: %s", source, config)
    return config


def _find_projection(sd: Mapping[str, torch.Tensor], prefix: str, wrapper: str, name: str) -> torch.Tensor | None:
    parent = prefix[: -len(wrapper) - 1] if prefix.endswith(f"{wrapper}.") else prefix
    return sd.get(parent + name)


def _clip_folder_config(
    folder: Path, *, kind: str, source: str
) -> transformers.CLIPTextConfig | transformers.CLIPVisionConfig:
    import transformers

    raw = _read_json(folder / "config.json")
    model_type = raw.get("model_type")
    own_type, other_type = ("clip_text_model", "clip_vision_model") if kind == "text" else (
        "clip_vision_model", "clip_text_model"
    )
    config_cls = transformers.CLIPTextConfig if kind == "text" else transformers.CLIPVisionConfig
    sub_key = f"{kind}_config"
    try:
        if sub_key in raw or model_type == "clip":
            full = transformers.CLIPConfig.from_dict(raw)
            return full.text_config if kind == "text" else full.vision_config
        if model_type == own_type:
            return config_cls.from_dict(raw)
    except (ValueError, TypeError) as e:
        raise CheckpointError(
            f"The config of {source} is invalid ({e}). Expected a transformers CLIP config. Fix: download the "
            "folder again."
        ) from e
    what = "a CLIP vision encoder" if model_type == other_type else f"a model of type {model_type!r}"
    raise CheckpointError(
        f"The folder {source} holds {what} (config.json model_type={model_type!r}), but a CLIP {kind} encoder was "
        f"expected (model_type '{own_type}' or a full 'clip' model). Fix: pass the CLIP {kind} encoder folder."
    )


def load_clip_text_encoder(
    path: PathLike,
    dtype: torch.dtype = torch.float32,
    device: Device = "cpu",
    attn_implementation: str = "eager",
) -> transformers.CLIPTextModel:
    """Load a CLIP text encoder (``transformers.CLIPTextModel``) in eval mode with ``requires_grad=False``.

    Args:
        path: a transformers folder (``config.json`` + ``model.safetensors`` / ``pytorch_model.bin``; a full
            ``CLIPModel`` folder such as ``openai/clip-vit-large-patch14``; or a pipeline root with
            ``text_encoder/``), or a single ``.safetensors`` / ``.pt`` file such as ComfyUI's
            ``models/text_encoders/clip_l.safetensors`` (keys ``text_model.*``, optionally prefixed
            ``cond_stage_model.transformer.`` or ``transformer.``, optionally with ``text_projection.weight`` and
            ``logit_scale``, which are ignored). Single files take the config from the ``videobooth_config``
            metadata, else infer it from the weight shapes (:func:`infer_clip_text_config`).
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


# ----------------------------------------------------------------------------------------------------------------
# CLIP vision encoder
# ----------------------------------------------------------------------------------------------------------------

_VISION_MARKER = "embeddings.patch_embedding.weight"


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
    cls_emb = _require(component, "embeddings.class_embedding", source=source, prefix=prefix,
                       what="CLIP vision encoder")
    patch = _require(component, _VISION_MARKER, source=source, prefix=prefix, what="CLIP vision encoder")
    pos = _require(component, "embeddings.position_embedding.weight", source=source, prefix=prefix,
                   what="CLIP vision encoder")
    fc1 = _require(component, "encoder.layers.0.mlp.fc1.weight", source=source, prefix=prefix,
                   what="CLIP vision encoder")
    hidden = int(cls_emb.shape[0])
    patch_size = int(patch.shape[-1])
    grid = math.isqrt(int(pos.shape[0]) - 1)
    if grid * grid != int(pos.shape[0]) - 1:
        raise CheckpointError(
            f"{source}: '{prefix}embeddings.position_embedding.weight' has {pos.shape[0]} positions, which is not "
            "1 + a square number of patches. Expected a square-image CLIP vision tower. Fix: use a file with the "
            f"config in its '{CONFIG_METADATA_KEY}' metadata, or the model's original folder."
        )
    config: dict[str, Any] = {
        "hidden_size": hidden,
        "intermediate_size": int(fc1.shape[0]),
        "num_hidden_layers": _count_indices(list(component), r"encoder\.layers\.(\d+)\."),
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


def load_clip_vision_encoder(
    path: PathLike,
    dtype: torch.dtype = torch.float32,
    device: Device = "cpu",
    attn_implementation: str = "eager",
) -> transformers.CLIPVisionModel:
    """Load a CLIP vision encoder (``transformers.CLIPVisionModel``) in eval mode with ``requires_grad=False``.

    Args:
        path: a transformers folder (``CLIPVisionModel``/``CLIPVisionModelWithProjection``, a full ``CLIPModel``
            folder with ``vision_config``, or a pipeline root with ``image_encoder/``), or a single file such as
            ComfyUI's ``models/clip_vision/clip_vision_l.safetensors`` (keys ``vision_model.*``, optional
            ``visual_projection.weight``, which is ignored). Single files take the config from the
            ``videobooth_config`` metadata, else infer it (:func:`infer_clip_vision_config`).
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


_CLIP_TOWERS: dict[str, dict[str, Any]] = {
    "text": dict(subfolder="text_encoder", marker=_TEXT_MARKER, example_key="text_model.embeddings.token_embedding.weight",
                 wrapper="text_model", projection="text_projection.weight", infer=infer_clip_text_config,
                 config_class="CLIPTextConfig", model_class="CLIPTextModel"),
    "vision": dict(subfolder="image_encoder", marker=_VISION_MARKER,
                   example_key="vision_model.embeddings.patch_embedding.weight", wrapper="vision_model",
                   projection="visual_projection.weight", infer=infer_clip_vision_config,
                   config_class="CLIPVisionConfig", model_class="CLIPVisionModel"),
}


def _load_clip_tower(
    path: PathLike, kind: str, dtype: torch.dtype, device: Device, attn_implementation: str
) -> torch.nn.Module:
    """Shared body of :func:`load_clip_text_encoder` (``kind="text"``) and :func:`load_clip_vision_encoder`."""
    import transformers

    spec = _CLIP_TOWERS[kind]
    _check_attn_implementation(attn_implementation)
    p = Path(path)
    expected = f"a CLIP {kind} encoder"
    if p.is_dir():
        folder = _resolve_model_folder(p, (spec["subfolder"],), expected)
        config = _clip_folder_config(folder, kind=kind, source=str(folder))
        sd = _read_folder_weights(folder, "transformers")
        source = str(folder)
        metadata_config = None
    else:
        sd = unwrap_state_dict(read_state_dict(p), source=p)
        source = str(p)
        metadata_config = _read_config_metadata(p)
        config = None
    prefix, component = _select_component(
        sd, spec["marker"], source=source, expected=expected, example_key=spec["example_key"]
    )
    _drop_keys(component, _is_clip_extra, source)
    config_class = getattr(transformers, spec["config_class"])
    if config is None:
        kwargs = metadata_config or spec["infer"](
            component, _find_projection(sd, prefix, spec["wrapper"], spec["projection"]), source=source, prefix=prefix,
        )
        try:
            config = config_class.from_dict(dict(kwargs))
        except (ValueError, TypeError) as e:
            raise CheckpointError(
                f"Invalid CLIP {kind} config for {source}: {e}. Expected {spec['config_class']} values. Fix: correct "
                f"the '{CONFIG_METADATA_KEY}' metadata or remove it so the config is inferred."
            ) from e
    model_class = getattr(transformers, spec["model_class"])
    model = _build_on_meta(
        lambda: model_class._from_config(config, attn_implementation=attn_implementation),
        source=source, expected=expected,
    )
    model_prefix = _model_key_prefix(model, spec["wrapper"])
    weights = {model_prefix + k: v for k, v in component.items()}
    _assign_weights(
        model, weights, source=source, expected=expected, dtype=dtype, device=device,
        file_name=lambda k: prefix + k[len(model_prefix) :],
    )
    return model


# ----------------------------------------------------------------------------------------------------------------
# VAE: LDM <-> diffusers key conversion
# ----------------------------------------------------------------------------------------------------------------

#: Ordered (LDM prefix, diffusers prefix) rename rules; the first rule whose LDM (resp. diffusers) prefix matches a
#: key renames it, the rest of the key (``weight``, ``norm1.bias``, ...) is kept. ``{part}`` is ``encoder`` or
#: ``decoder``; ``{i}``/``{j}`` are kept; ``{u}`` is an up level, numbered from the lowest resolution in LDM
#: (``decoder.up.0`` is the last block run) and in run order in diffusers: diffusers index = levels - 1 - LDM index.
#: Specific rules (``nin_shortcut``) come before the generic block rules. The table is used in both directions.
VAE_LDM_TO_DIFFUSERS_RULES: tuple[tuple[str, str], ...] = (
    ("{part}.conv_in.", "{part}.conv_in."),
    ("{part}.conv_out.", "{part}.conv_out."),
    ("{part}.norm_out.", "{part}.conv_norm_out."),
    ("encoder.down.{i}.block.{j}.nin_shortcut.", "encoder.down_blocks.{i}.resnets.{j}.conv_shortcut."),
    ("encoder.down.{i}.block.{j}.", "encoder.down_blocks.{i}.resnets.{j}."),
    ("encoder.down.{i}.downsample.conv.", "encoder.down_blocks.{i}.downsamplers.0.conv."),
    ("decoder.up.{u}.block.{j}.nin_shortcut.", "decoder.up_blocks.{u}.resnets.{j}.conv_shortcut."),
    ("decoder.up.{u}.block.{j}.", "decoder.up_blocks.{u}.resnets.{j}."),
    ("decoder.up.{u}.upsample.conv.", "decoder.up_blocks.{u}.upsamplers.0.conv."),
    ("{part}.mid.block_1.", "{part}.mid_block.resnets.0."),
    ("{part}.mid.block_2.", "{part}.mid_block.resnets.1."),
    ("{part}.mid.attn_1.norm.", "{part}.mid_block.attentions.0.group_norm."),
    ("{part}.mid.attn_1.q.", "{part}.mid_block.attentions.0.to_q."),
    ("{part}.mid.attn_1.k.", "{part}.mid_block.attentions.0.to_k."),
    ("{part}.mid.attn_1.v.", "{part}.mid_block.attentions.0.to_v."),
    ("{part}.mid.attn_1.proj_out.", "{part}.mid_block.attentions.0.to_out.0."),
    ("quant_conv.", "quant_conv."),
    ("post_quant_conv.", "post_quant_conv."),
)

#: Attention projection names of diffusers < 0.14 files (e.g. stabilityai/sd-vae-ft-ema) -> current names.
_VAE_DEPRECATED_ATTENTION = (("query.", "to_q."), ("key.", "to_k."), ("value.", "to_v."), ("proj_attn.", "to_out.0."))
# diffusers attention weights that are 1x1 convolutions (out, in, 1, 1) in LDM files and Linear (out, in) here.
_VAE_ATTN_LINEAR = re.compile(r"^(encoder|decoder)\.mid_block\.attentions\.0\.(to_q|to_k|to_v|to_out\.0)\.weight$")
_VAE_LDM_IGNORED_PREFIXES = ("loss.", "model_ema.")


def _conv1x1_to_linear(weight: torch.Tensor) -> torch.Tensor:
    """``(out, in, 1, 1)`` or ``(out, in, 1)`` 1x1-convolution weight -> ``(out, in)`` Linear weight (a view)."""
    if weight.ndim > 2 and all(s == 1 for s in weight.shape[2:]):
        return weight.reshape(weight.shape[0], weight.shape[1])
    return weight


def _compile_template(template: str) -> re.Pattern[str]:
    pattern = re.escape(template)
    for name, group in (("part", "encoder|decoder"), ("i", r"\d+"), ("j", r"\d+"), ("u", r"\d+")):
        pattern = pattern.replace(re.escape("{" + name + "}"), f"(?P<{name}>{group})")
    return re.compile("^" + pattern + "(?P<rest>.+)$")


_VAE_RULES_COMPILED = tuple(
    (_compile_template(ldm), ldm, _compile_template(dif), dif) for ldm, dif in VAE_LDM_TO_DIFFUSERS_RULES
)


def _rename_vae_key(key: str, num_levels: int, to_diffusers: bool) -> str | None:
    for ldm_re, ldm_t, dif_re, dif_t in _VAE_RULES_COMPILED:
        src_re, dst_t = (ldm_re, dif_t) if to_diffusers else (dif_re, ldm_t)
        m = src_re.match(key)
        if m is None:
            continue
        groups = {k: v for k, v in m.groupdict().items() if v is not None and k != "rest"}
        if "u" in groups:
            u = int(groups["u"])
            if not 0 <= u < num_levels:
                return None
            groups["u"] = str(num_levels - 1 - u)
        return dst_t.format(**groups) + m.group("rest")
    return None


def _vae_num_levels(keys: Sequence[str], ldm: bool) -> int:
    pattern = r"encoder\.down\.(\d+)\." if ldm else r"encoder\.down_blocks\.(\d+)\."
    return _count_indices(keys, pattern)


def convert_ldm_vae_to_diffusers(
    sd: Mapping[str, torch.Tensor], *, source: str = "the VAE checkpoint"
) -> dict[str, torch.Tensor]:
    """Rename an LDM-layout VAE state dict (no prefix) to diffusers ``AutoencoderKL`` names.

    Uses :data:`VAE_LDM_TO_DIFFUSERS_RULES`; the mid-block attention ``q``/``k``/``v``/``proj_out`` weights, 1x1
    convolutions ``(C, C, 1, 1)`` in LDM files, become Linear weights ``(C, C)`` (views, no copy). ``loss.*`` and
    ``model_ema.*`` entries are dropped. Returns a new dict; ``sd`` is not modified.

    Raises:
        CheckpointError: a key that no rule knows (naming it).
    """
    num_levels = _vae_num_levels(list(sd), ldm=True)
    out: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, value in sd.items():
        if key.startswith(_VAE_LDM_IGNORED_PREFIXES):
            continue
        new = _rename_vae_key(key, num_levels, to_diffusers=True)
        if new is None:
            unknown.append(key)
            continue
        if _VAE_ATTN_LINEAR.match(new):
            value = _conv1x1_to_linear(value)
        out[new] = value
    if unknown:
        raise CheckpointError(
            f"{source} has {len(unknown)} VAE weight(s) with unknown LDM names: {_format_keys(sorted(unknown))}. "
            "Expected the keys of a Stable Diffusion (LDM) AutoencoderKL. Fix: use an SD 1.x/2.x/XL VAE file."
        )
    return out


def convert_diffusers_vae_to_ldm(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`convert_ldm_vae_to_diffusers`: diffusers ``AutoencoderKL`` names -> LDM names.

    The mid-block attention Linear weights ``(C, C)`` become 1x1 convolution weights ``(C, C, 1, 1)``.

    Raises:
        VideoBoothError: a key that no rule knows.
    """
    num_levels = _vae_num_levels(list(sd), ldm=False)
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        new = _rename_vae_key(key, num_levels, to_diffusers=False)
        if new is None:
            raise VideoBoothError(f"No LDM name for the diffusers VAE weight '{key}'. Expected an AutoencoderKL.")
        if _VAE_ATTN_LINEAR.match(key) and value.ndim == 2:
            value = value[:, :, None, None]
        out[new] = value
    return out


def _normalize_diffusers_vae_keys(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename deprecated attention names and flatten 1x1-conv attention weights in a diffusers-layout dict."""
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        m = re.match(r"^((?:encoder|decoder)\.mid_block\.attentions\.0\.)(.+)$", key)
        if m:
            for old, new in _VAE_DEPRECATED_ATTENTION:
                if m.group(2).startswith(old):
                    key = m.group(1) + new + m.group(2)[len(old) :]
                    break
        if _VAE_ATTN_LINEAR.match(key):
            value = _conv1x1_to_linear(value)
        out[key] = value
    return out


def infer_vae_config(sd: Mapping[str, torch.Tensor], *, source: str = "the file") -> dict[str, Any]:
    """Infer ``AutoencoderKL`` kwargs from a diffusers-named VAE state dict.

    block_out_channels from ``encoder.down_blocks.i.resnets.0.conv1.weight`` (out channels), layers_per_block by
    counting resnets in down block 0, latent_channels from ``post_quant_conv`` (or ``decoder.conv_in``), in/out
    channels from ``encoder.conv_in`` / ``decoder.conv_out``. Not inferable, set to the SD 1.x values:
    norm_num_groups 32, sample_size 256, scaling_factor 0.18215 (an SDXL VAE, 0.13025, needs the metadata).
    """
    keys = list(sd)
    levels = _vae_num_levels(keys, ldm=False)
    what = "VAE"
    block_out = []
    for i in range(levels):
        w = _require(sd, f"encoder.down_blocks.{i}.resnets.0.conv1.weight", source=source, prefix="", what=what)
        block_out.append(int(w.shape[0]))
    conv_in = _require(sd, "encoder.conv_in.weight", source=source, prefix="", what=what)
    conv_out = _require(sd, "decoder.conv_out.weight", source=source, prefix="", what=what)
    if "post_quant_conv.weight" in sd:
        latent = int(sd["post_quant_conv.weight"].shape[0])
    else:
        latent = int(_require(sd, "decoder.conv_in.weight", source=source, prefix="", what=what).shape[1])
    config: dict[str, Any] = {
        "in_channels": int(conv_in.shape[1]),
        "out_channels": int(conv_out.shape[0]),
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": block_out,
        "layers_per_block": _count_indices(keys, r"encoder\.down_blocks\.0\.resnets\.(\d+)\."),
        "act_fn": "silu",
        "latent_channels": latent,
        "norm_num_groups": 32,
        "sample_size": 256,
        "scaling_factor": SD_VAE_SCALING_FACTOR,
        "use_quant_conv": "quant_conv.weight" in sd,
        "use_post_quant_conv": "post_quant_conv.weight" in sd,
        "mid_block_add_attention": "encoder.mid_block.attentions.0.to_q.weight" in sd,
    }
    logger.info("%s: inferred VAE config from shapes: %s", source, config)
    return config


def _vae_ldm_name(key: str, num_levels: int) -> str:
    return _rename_vae_key(key, num_levels, to_diffusers=False) or key


def load_vae(
    path: PathLike,
    dtype: torch.dtype = torch.float32,
    device: Device = "cpu",
) -> diffusers.AutoencoderKL:
    """Load a VAE (``diffusers.AutoencoderKL``) in eval mode with ``requires_grad=False``.

    Args:
        path: (a) a diffusers folder (``config.json`` + ``diffusion_pytorch_model.safetensors``/``.bin``) such as
            ``stabilityai/sd-vae-ft-ema``, or a pipeline root with a ``vae/`` sub-folder; (b) a single LDM-format
            file as kept in ComfyUI's ``models/vae`` (``encoder.down.0.block.0.norm1.weight``, ...; optionally
            prefixed ``first_stage_model.``, e.g. a full SD checkpoint, whose other parts are ignored); (c) a
            single diffusers-format safetensors file. Single files take the config from the ``videobooth_config``
            metadata, else infer it (:func:`infer_vae_config`).
        dtype: dtype of the weights.
        device: device of the returned model.

    Raises:
        CheckpointError: unreadable/unsafe file, not a VAE, missing/unexpected/mis-shaped weights.
    """
    import diffusers

    p = Path(path)
    expected = "a VAE (AutoencoderKL)"
    config: dict[str, Any] | None
    if p.is_dir():
        folder = _resolve_model_folder(p, ("vae",), expected)
        config = _read_json(folder / "config.json")
        class_name = config.get("_class_name", "AutoencoderKL")
        if class_name != "AutoencoderKL":
            raise CheckpointError(
                f"The folder {folder} holds a {class_name} (config.json _class_name), but {expected} was expected. "
                "Fix: pass the VAE folder (the 'vae' sub-folder of a pipeline) or a VAE file."
            )
        sd = _read_folder_weights(folder, "diffusers")
        source = str(folder)
    else:
        sd = unwrap_state_dict(read_state_dict(p), source=p)
        source = str(p)
        config = _read_config_metadata(p)
    prefix, component = _select_component(
        sd, "encoder.conv_in.weight", source=source, expected=expected, example_key="encoder.conv_in.weight"
    )
    is_ldm = any(k.startswith("encoder.down.") for k in component)
    num_levels = _vae_num_levels(list(component), ldm=is_ldm)
    if is_ldm:
        weights = convert_ldm_vae_to_diffusers(component, source=source)
    else:
        weights = _normalize_diffusers_vae_keys(component)
    if config is None:
        config = infer_vae_config(weights, source=source)
    model_config = {k: v for k, v in config.items() if not k.startswith("_")}
    model = _build_on_meta(lambda: diffusers.AutoencoderKL.from_config(model_config), source=source, expected=expected)
    if is_ldm:
        file_name: Callable[[str], str] = lambda k: prefix + _vae_ldm_name(k, num_levels)  # noqa: E731
    else:
        file_name = lambda k: prefix + k  # noqa: E731
    _assign_weights(model, weights, source=source, expected=expected, dtype=dtype, device=device, file_name=file_name)
    return model


def _vae_scaling_factor(vae: diffusers.AutoencoderKL, scaling_factor: float | None) -> float:
    if scaling_factor is not None:
        return float(scaling_factor)
    return float(getattr(vae.config, "scaling_factor", None) or SD_VAE_SCALING_FACTOR)


def vae_encode(
    vae: diffusers.AutoencoderKL,
    pixels: torch.Tensor,
    generator: torch.Generator | None = None,
    sample: bool = True,
    scaling_factor: float | None = None,
) -> torch.Tensor:
    """Encode images to scaled latents, as the official code does (``latent_dist.sample() * 0.18215``).

    Args:
        vae: the VAE.
        pixels: ``(N, 3, H, W)`` in ``[-1, 1]``; H and W divisible by the VAE downscale (8).
        generator: draws the posterior noise (on the generator's device, CPU for ``None``), then moved to the
            VAE's device, so results do not depend on the accelerator.
        sample: draw ``mean + std * randn`` (True) or return the posterior mean (False).
        scaling_factor: defaults to ``vae.config.scaling_factor`` (0.18215 for SD 1.x).

    Returns:
        Latents ``(N, latent_channels, H/8, W/8)`` in the VAE's dtype, times the scaling factor.
    """
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    if pixels.ndim != 4 or pixels.shape[1] != vae.config.in_channels:
        raise VideoBoothError(
            f"vae_encode expects pixels of shape (N, {vae.config.in_channels}, H, W), got {tuple(pixels.shape)}. "
            "Fix: convert images to channels-first batches."
        )
    if pixels.shape[-1] % factor or pixels.shape[-2] % factor:
        raise VideoBoothError(
            f"vae_encode expects H and W divisible by {factor}, got {tuple(pixels.shape[-2:])}. Fix: resize or crop "
            f"the images to a multiple of {factor}."
        )
    param = next(vae.parameters())
    with torch.no_grad():
        dist = vae.encode(pixels.to(device=param.device, dtype=param.dtype)).latent_dist
        latents = dist.mean
        if sample:
            noise_device = generator.device if generator is not None else torch.device("cpu")
            noise = torch.randn(dist.mean.shape, generator=generator, device=noise_device, dtype=dist.mean.dtype)
            latents = dist.mean + dist.std * noise.to(dist.mean.device)
    return latents * _vae_scaling_factor(vae, scaling_factor)


def vae_decode(
    vae: diffusers.AutoencoderKL,
    latents: torch.Tensor,
    chunk_size: int = 8,
    scaling_factor: float | None = None,
) -> torch.Tensor:
    """Decode scaled latents to images, ``chunk_size`` frames at a time to bound memory.

    Args:
        vae: the VAE.
        latents: ``(N, latent_channels, h, w)`` scaled latents (e.g. video frames flattened into N).
        chunk_size: frames decoded per VAE call (>= 1).
        scaling_factor: defaults to ``vae.config.scaling_factor``; latents are divided by it.

    Returns:
        Pixels ``(N, 3, 8h, 8w)``, nominally in ``[-1, 1]`` (not clamped), in the VAE's dtype.
    """
    if latents.ndim != 4 or latents.shape[1] != vae.config.latent_channels:
        raise VideoBoothError(
            f"vae_decode expects latents of shape (N, {vae.config.latent_channels}, h, w), got "
            f"{tuple(latents.shape)}. Fix: flatten frames into the batch axis ('b c f h w -> (b f) c h w')."
        )
    if chunk_size < 1:
        raise VideoBoothError(f"vae_decode chunk_size must be >= 1, got {chunk_size}.")
    param = next(vae.parameters())
    scaled = latents.to(device=param.device, dtype=param.dtype) / _vae_scaling_factor(vae, scaling_factor)
    out = None
    with torch.no_grad():
        for start in range(0, scaled.shape[0], chunk_size):
            part = vae.decode(scaled[start:start + chunk_size]).sample
            if out is None:  # written in place: the frames are held once, never as parts plus their concatenation
                out = part.new_empty((scaled.shape[0], *part.shape[1:]))
            out[start:start + part.shape[0]] = part
            del part
    return out


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------------------------

_TOKENIZER_FILES = ("vocab.json", "merges.txt")


def load_clip_tokenizer(path: PathLike, model_max_length: int | None = 77) -> transformers.CLIPTokenizer:
    """Load a CLIP BPE tokenizer from a folder holding ``vocab.json`` and ``merges.txt``, offline.

    Args:
        path: the folder (or a pipeline root with a ``tokenizer/`` sub-folder); optional ``tokenizer_config.json``
            and ``special_tokens_map.json`` are used when present.
        model_max_length: overrides the stored maximum length (some copies of the CLIP files say 8192, but the
            text encoder has 77 positions). ``None`` keeps the stored value.

    Raises:
        CheckpointError: the folder or its files are missing or unreadable.
    """
    import transformers

    p = Path(path)
    if not p.is_dir():
        raise CheckpointError(
            f"Tokenizer folder not found: {p}. Expected a folder with {' and '.join(_TOKENIZER_FILES)}. Fix: pass "
            "the CLIP tokenizer folder (e.g. the 'tokenizer' folder of a Stable Diffusion 1.x model)."
        )
    folder = p
    if not all((p / f).is_file() for f in _TOKENIZER_FILES) and all((p / "tokenizer" / f).is_file()
                                                                   for f in _TOKENIZER_FILES):
        folder = p / "tokenizer"
    missing = [f for f in _TOKENIZER_FILES if not (folder / f).is_file()]
    if missing:
        raise CheckpointError(
            f"The tokenizer folder {folder} lacks {' and '.join(missing)}. Expected a CLIP BPE tokenizer "
            f"({' + '.join(_TOKENIZER_FILES)}, optionally tokenizer_config.json and special_tokens_map.json). Fix: "
            "copy the complete CLIP tokenizer folder."
        )
    kwargs: dict[str, Any] = {"local_files_only": True}
    if model_max_length is not None:
        kwargs["model_max_length"] = model_max_length
    try:
        tokenizer = transformers.CLIPTokenizer.from_pretrained(str(folder), **kwargs)
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise CheckpointError(
            f"Cannot load the CLIP tokenizer in {folder}: {e}. Expected valid vocab.json/merges.txt files. Fix: "
            "copy the tokenizer folder again."
        ) from e
    return tokenizer


def bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2 byte -> printable unicode character mapping (256 entries, in CLIP's vocabulary order)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


class TinyTokenizerInfo(NamedTuple):
    """What :func:`write_tiny_tokenizer` wrote: vocabulary size and the special token ids."""

    vocab_size: int
    bos_token_id: int
    eos_token_id: int


_TINY_TOKENIZER_WORDS = (
    "a panda dog cat in the on pond beach park running playing sdksd none video tiny photo of and with is "
    "swimming walking sitting grass water man woman car road snow"
).split()


def _train_tiny_merges(words: Sequence[str], num_merges: int) -> list[tuple[str, str]]:
    """Greedy BPE merges over ``words`` in CLIP's word convention (last symbol carries ``</w>``).

    Most frequent adjacent pair first, ties broken alphabetically, so the result is deterministic.
    """
    corpus = [list(w[:-1]) + [w[-1] + "</w>"] for w in words]
    merges: list[tuple[str, str]] = []
    for _ in range(num_merges):
        counts: dict[tuple[str, str], int] = {}
        for symbols in corpus:
            for pair in zip(symbols, symbols[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            break
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        merges.append(best)
        for idx, symbols in enumerate(corpus):
            merged: list[str] = []
            k = 0
            while k < len(symbols):
                if k + 1 < len(symbols) and (symbols[k], symbols[k + 1]) == best:
                    merged.append(symbols[k] + symbols[k + 1])
                    k += 2
                else:
                    merged.append(symbols[k])
                    k += 1
            corpus[idx] = merged
    return merges


def write_tiny_tokenizer(folder: PathLike, num_merges: int = 48) -> TinyTokenizerInfo:
    """Write a small CLIP-style BPE tokenizer of our own (not a copy of the CLIP vocabulary) into ``folder``.

    ``vocab.json``: the 256 byte-level characters of :func:`bytes_to_unicode`, the same with ``</w>``, the merged
    symbols of ``num_merges`` merges trained on a fixed list of common words, then ``<|startoftext|>`` and
    ``<|endoftext|>`` as the last two ids (the layout of CLIP's vocabulary). Also ``merges.txt`` (with the
    ``#version: 0.2`` header), ``tokenizer_config.json`` (model_max_length 77, pad ``<|endoftext|>``,
    lower-casing) and ``special_tokens_map.json``. Any text tokenises into ids below the vocabulary size.

    Returns:
        ``TinyTokenizerInfo(vocab_size, bos_token_id, eos_token_id)``.
    """
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    byte_chars = list(bytes_to_unicode().values())
    merges = _train_tiny_merges(_TINY_TOKENIZER_WORDS, num_merges)
    tokens = byte_chars + [c + "</w>" for c in byte_chars]
    for a, b in merges:
        if a + b not in tokens:
            tokens.append(a + b)
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: idx for idx, tok in enumerate(tokens)}
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8"
    )
    specials = {
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
    }
    tokenizer_config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": 77,
        "do_lower_case": True,
        "errors": "replace",
        "add_prefix_space": False,
        **specials,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2), encoding="utf-8")
    (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=2), encoding="utf-8")
    return TinyTokenizerInfo(len(vocab), vocab["<|startoftext|>"], vocab["<|endoftext|>"])


# ----------------------------------------------------------------------------------------------------------------
# Tiny models (tests, ``make-tiny``) and single-file writers
# ----------------------------------------------------------------------------------------------------------------


def tiny_clip_text_config() -> transformers.CLIPTextConfig:
    """A tiny CLIP text config: width 32, 2 layers, 4 heads, MLP 64, 77 positions, CLIP's vocabulary size."""
    import transformers

    return transformers.CLIPTextConfig(
        vocab_size=49408,
        hidden_size=32,
        intermediate_size=64,
        projection_dim=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
    )


def tiny_clip_vision_config() -> transformers.CLIPVisionConfig:
    """A tiny CLIP vision config: width 32, 18 layers (``hidden_states[16]`` exists), 4 heads, 224 px, patch 14."""
    import transformers

    return transformers.CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        projection_dim=32,
        num_hidden_layers=18,
        num_attention_heads=4,
        image_size=224,
        patch_size=14,
        hidden_act="quick_gelu",
    )


def tiny_vae_config() -> dict[str, Any]:
    """``AutoencoderKL`` kwargs of a tiny VAE with the SD layout: 4 levels (downscale 8), 4 latent channels."""
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "block_out_channels": [8, 16, 16, 16],
        "layers_per_block": 1,
        "act_fn": "silu",
        "latent_channels": 4,
        "norm_num_groups": 4,
        "sample_size": 64,
        "scaling_factor": SD_VAE_SCALING_FACTOR,
    }


def _randomize_(module: torch.nn.Module, seed: int) -> None:
    """Perturb every parameter (norm scales and biases too) with seeded noise so that all of them matter."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in sorted(module.named_parameters()):
            param.add_(torch.randn(param.shape, generator=gen, dtype=torch.float32).to(param.dtype) * 0.02)


def _build_seeded(build: Callable[[], torch.nn.Module], seed: int) -> torch.nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build()
    _randomize_(model, seed + 1)
    model.eval()
    model.requires_grad_(False)
    return model


def build_tiny_clip_text_encoder(
    seed: int = 0, config: transformers.CLIPTextConfig | None = None, attn_implementation: str = "eager"
) -> transformers.CLIPTextModel:
    """A seeded, randomly initialised ``CLIPTextModel`` (default :func:`tiny_clip_text_config`), eval mode."""
    import transformers

    cfg = config if config is not None else tiny_clip_text_config()
    return _build_seeded(  # type: ignore[return-value]
        lambda: transformers.CLIPTextModel._from_config(cfg, attn_implementation=attn_implementation), seed
    )


def build_tiny_clip_vision_encoder(
    seed: int = 0, config: transformers.CLIPVisionConfig | None = None, attn_implementation: str = "eager"
) -> transformers.CLIPVisionModel:
    """A seeded, randomly initialised ``CLIPVisionModel`` (default :func:`tiny_clip_vision_config`), eval mode."""
    import transformers

    cfg = config if config is not None else tiny_clip_vision_config()
    return _build_seeded(  # type: ignore[return-value]
        lambda: transformers.CLIPVisionModel._from_config(cfg, attn_implementation=attn_implementation), seed
    )


def build_tiny_vae(seed: int = 0, config: Mapping[str, Any] | None = None) -> diffusers.AutoencoderKL:
    """A seeded, randomly initialised ``AutoencoderKL`` (default :func:`tiny_vae_config`), eval mode."""
    import diffusers

    cfg = dict(config if config is not None else tiny_vae_config())
    return _build_seeded(lambda: diffusers.AutoencoderKL.from_config(cfg), seed)  # type: ignore[return-value]


def _check_safetensors_path(path: PathLike) -> Path:
    p = Path(path)
    if p.suffix.lower() not in SAFETENSORS_EXTENSIONS:
        raise VideoBoothError(f"Expected a .safetensors path to write, got {p}. Fix: use the .safetensors extension.")
    p.parent.mkdir(parents=True, exist_ok=True)
    return p


def _save(tensors: Mapping[str, torch.Tensor], path: Path, config: Mapping[str, Any]) -> None:
    from safetensors.torch import save_file

    data = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    save_file(data, str(path), metadata={"format": "pt", CONFIG_METADATA_KEY: json.dumps(dict(config))})


def _clip_single_file_tensors(model: torch.nn.Module, wrapper: str) -> dict[str, torch.Tensor]:
    prefix = _model_key_prefix(model, wrapper)
    return {
        f"{wrapper}.{k[len(prefix):]}": v for k, v in model.state_dict().items() if not k.endswith("position_ids")
    }


def save_clip_text_single_file(model: transformers.CLIPTextModel, path: PathLike) -> None:
    """Write ``model`` as one safetensors file in ComfyUI's ``clip_l`` layout (``text_model.*`` keys).

    The architecture config is stored in the metadata under ``videobooth_config``.
    """
    p = _check_safetensors_path(path)
    config = {k: getattr(model.config, k) for k in _TEXT_CONFIG_FIELDS}
    _save(_clip_single_file_tensors(model, "text_model"), p, config)


def save_clip_vision_single_file(model: transformers.CLIPVisionModel, path: PathLike) -> None:
    """Write ``model`` as one safetensors file in the ``clip_vision`` layout (``vision_model.*`` keys).

    The architecture config is stored in the metadata under ``videobooth_config``.
    """
    p = _check_safetensors_path(path)
    config = {k: getattr(model.config, k) for k in _VISION_CONFIG_FIELDS}
    _save(_clip_single_file_tensors(model, "vision_model"), p, config)


def save_vae_ldm_single_file(vae: diffusers.AutoencoderKL, path: PathLike) -> None:
    """Write ``vae`` as one safetensors file in the original LDM key layout (ComfyUI ``models/vae`` format).

    Keys are renamed with the inverse of :data:`VAE_LDM_TO_DIFFUSERS_RULES` (attention weights as 1x1 convs);
    the ``AutoencoderKL`` config is stored in the metadata under ``videobooth_config``.
    """
    p = _check_safetensors_path(path)
    config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(vae.config).items() if not k.startswith("_")}
    _save(convert_diffusers_vae_to_ldm(vae.state_dict()), p, config)
