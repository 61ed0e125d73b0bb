"""Weight files on disk: the one safe reader, the one safetensors header reader, the one unwrapper of nested
checkpoints and the one (atomic) safetensors writer; also the folders of transformers/diffusers models.

* ``.safetensors`` / ``.sft`` files are read with safetensors (memory-mapped).
* ``.pt`` / ``.pth`` / ``.ckpt`` / ``.bin`` files are read only with ``torch.load(weights_only=True, mmap=True)``:
  a pickle that would import anything but tensors is refused and nothing in it runs.
* A truncated, corrupt or foreign file is a :class:`~videobooth_core.errors.CheckpointError` that names the file
  and says how to fix it.

Everything here is cheap to import (no transformers, no diffusers).
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import struct
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch

from ..errors import CheckpointError, explain
from ..files import PathLike, atomic_path

logger = logging.getLogger(__name__)


SAFETENSORS_SUFFIXES: tuple[str, ...] = (".safetensors", ".sft")
PICKLE_SUFFIXES: tuple[str, ...] = (".pt", ".pth", ".ckpt", ".bin")
#: safetensors metadata key under which our files store the model config (JSON).
CONFIG_METADATA_KEY = "videobooth_config"
#: safetensors metadata key naming what a converted VideoBooth file holds (``videobooth_unet``, ...).
KIND_METADATA_KEY = "videobooth_kind"

#: safetensors dtype names -> torch dtypes (the 8-bit float types only where this torch has them).
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
    **{name: getattr(torch, attr) for name, attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"),
                                                     ("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64"))
       if hasattr(torch, attr)},
}


def unreadable_file_error(path: PathLike, error: OSError) -> CheckpointError:
    """The error for a weight file the operating system refuses to read (permissions, a vanished file)."""
    return CheckpointError(explain(f"cannot read {path}", error.strerror or str(error),
                                   "check that the file exists and is readable"))


def incomplete_file_error(path: PathLike, detail: str) -> CheckpointError:
    """The error for a weight file that is cut short or corrupt (``detail`` says what was found)."""
    return CheckpointError(explain(
        f"the weight file is incomplete or corrupt ({detail})", path,
        "download the file again (an interrupted download or a full disk usually causes this) and check its size "
        "against the source"))


# ----------------------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------------------


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
        raise CheckpointError(explain(
            f"weight file not found ({', '.join(SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES)} expected)", p,
            "check the path and file name, or put the model file in the expected models folder"))
    if p.is_dir():
        raise CheckpointError(explain(
            "a single weight file was expected here, but this is a folder", p,
            "pass the weight file inside it (e.g. model.safetensors), or use a loader that accepts model folders"))
    suffix = p.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        return _read_safetensors(p)
    if suffix in PICKLE_SUFFIXES:
        return _read_torch_file(p)
    raise CheckpointError(explain(
        f"Unsupported weight file extension '{p.suffix}' (expected one of "
        f"{', '.join(SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES)})", p,
        "use a .safetensors file (preferred) or a PyTorch .pt/.pth/.ckpt/.bin state dict"))


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {key: f.get_tensor(key) for key in f.keys()}
    except SafetensorError as e:
        raise incomplete_file_error(path, f"safetensors: {e}") from e
    except OSError as e:
        raise unreadable_file_error(path, e) from e


def _read_torch_file(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise unreadable_file_error(path, e) from e
    is_zip = magic == b"PK\x03\x04"  # torch.save's default format since PyTorch 1.6
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except pickle.UnpicklingError as e:
        message = str(e)
        if "Weights only load failed" not in message:
            raise incomplete_file_error(
                path, f"unpickling failed: {message.splitlines()[0] if message else type(e).__name__}"
            ) from e
        found = re.search(r"GLOBAL ([\w.]+)", message)
        global_name = found.group(1) if found else None
        if not is_zip and not _looks_like_foreign_global(global_name):
            # A legacy (non-zip) pickle cut short makes the restricted unpickler stop on a truncated name such as
            # 'torch._uti' or on a stray opcode; it was still refused, nothing ran.
            stopped = f" at {global_name!r}" if global_name else ""
            raise CheckpointError(explain(
                f"refused to load: the safe (weights-only) unpickler stopped{stopped}, so the file is either "
                "incomplete or corrupt, or a pickle that contains objects other than tensors (nothing in it ran)",
                path, "download the file again; if you trust its source, convert it to safetensors")) from e
        detail = f" (it asks to import {global_name!r})" if global_name else ""
        raise CheckpointError(explain(
            f"refused for safety: the file contains Python objects other than tensors{detail}, and unpickling it "
            "could run arbitrary code (a plain state dict of tensors is expected)", path,
            "use a .safetensors version of this model, or convert the file to safetensors with a tool you trust in "
            "an environment you trust")) from e
    except (RuntimeError, EOFError, OSError) as e:  # OSError: mmap of a zip whose records overrun the file
        first_line = str(e).splitlines()[0] if str(e) else "unexpected end of file"
        raise incomplete_file_error(path, f"{type(e).__name__}: {first_line}") from e
    except Exception as e:  # noqa: BLE001 - any other unpickler failure on garbage bytes (IndexError, struct.error)
        raise incomplete_file_error(path, f"{type(e).__name__}: {e}") from e
    if not isinstance(obj, Mapping):
        raise CheckpointError(explain(
            f"the file holds a {type(obj).__name__}, but a state dict (a dict of tensors) was expected", path,
            "save the model's state_dict() rather than the whole object, preferably as .safetensors"))
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


class TensorEntry(NamedTuple):
    """One tensor of a safetensors file: dtype, shape and byte range (relative to the start of the data)."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class SafetensorsHeader:
    """The header of a safetensors file: its ``__metadata__`` strings and every tensor's :class:`TensorEntry`.

    ``data_start`` is the file offset of the first tensor byte (8 + header length).
    """

    path: Path
    metadata: dict[str, str]
    entries: dict[str, TensorEntry]
    data_start: int

    def meta_state_dict(self) -> dict[str, torch.Tensor]:
        """Every tensor as a storage-free ``meta`` tensor of its shape and dtype (for kind and key checks)."""
        return {name: torch.empty(e.shape, dtype=e.dtype, device="meta") for name, e in self.entries.items()}


def read_safetensors_header(path: PathLike) -> SafetensorsHeader:
    """Read and check the header of a safetensors file without reading any tensor.

    The layout is the documented one: an 8-byte little-endian header length, a JSON object mapping each tensor
    name to ``{"dtype", "shape", "data_offsets"}`` (plus an optional ``__metadata__`` of strings), then the data.

    Raises:
        CheckpointError: not a safetensors file name, missing, unreadable, not a valid header, an unsupported
            dtype, or a tensor that ends past the end of the file (a truncated file).
    """
    p = Path(path)
    if p.suffix.lower() not in SAFETENSORS_SUFFIXES:
        raise CheckpointError(explain(
            "not a safetensors file, so it has no safetensors header or metadata", p,
            f"pass the {'/'.join(SAFETENSORS_SUFFIXES)} file"))
    if not p.is_file():
        raise CheckpointError(explain("weight file not found", p, "check the path and file name"))
    try:
        with open(p, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise incomplete_file_error(p, f"not a valid safetensors file: only {size} bytes")
            (header_size,) = struct.unpack("<Q", prefix)
            if not 0 < header_size <= size - 8:
                raise incomplete_file_error(
                    p, f"not a valid safetensors file: its header claims {header_size} bytes in a {size}-byte file"
                )
            raw = handle.read(header_size)
    except OSError as e:
        raise unreadable_file_error(p, e) from e
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise incomplete_file_error(p, f"not a valid safetensors file: the header is not JSON ({e})") from e
    if not isinstance(header, dict):
        raise incomplete_file_error(p, "not a valid safetensors file: the header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise incomplete_file_error(p, "not a valid safetensors file: __metadata__ is not a map of strings")
    data_start = 8 + header_size
    entries: dict[str, TensorEntry] = {}
    for name, entry in header.items():
        try:
            dtype_name, shape, (begin, end) = entry["dtype"], tuple(int(s) for s in entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError) as e:
            raise incomplete_file_error(p, f"not a valid safetensors file: the entry of {name!r} is malformed") from e
        if dtype_name not in SAFETENSORS_DTYPES:
            raise CheckpointError(explain(
                f"tensor {name!r} has the dtype {dtype_name!r}, which this torch cannot hold (it holds "
                f"{', '.join(SAFETENSORS_DTYPES)})", p, "convert the file to fp16/bf16/fp32"))
        if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end):
            raise incomplete_file_error(p, f"not a valid safetensors file: bad byte range of {name!r}")
        if data_start + end > size:
            raise incomplete_file_error(
                p, f"truncated: tensor {name!r} ends at byte {data_start + end} of a {size}-byte file"
            )
        entries[name] = TensorEntry(SAFETENSORS_DTYPES[dtype_name], shape, begin, end)
    return SafetensorsHeader(p, metadata, entries, data_start)


def read_safetensors_metadata(path: PathLike) -> dict[str, str]:
    """The ``__metadata__`` string dict of a safetensors file (``{}`` when it has none); see
    :func:`read_safetensors_header` for the errors."""
    return dict(read_safetensors_header(path).metadata)


def read_config_metadata(path: PathLike) -> dict[str, Any] | None:
    """The JSON object stored under ``videobooth_config`` in a safetensors file; ``None`` for other files or when
    absent.

    Raises:
        CheckpointError: the entry is not valid JSON, or not a JSON object.
    """
    p = Path(path)
    if p.suffix.lower() not in SAFETENSORS_SUFFIXES:
        return None
    raw = read_safetensors_metadata(p).get(CONFIG_METADATA_KEY)
    if raw is None:
        return None
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as e:
        raise CheckpointError(explain(
            f"the '{CONFIG_METADATA_KEY}' metadata of the file is not valid JSON ({e}; a JSON object of model config "
            "values is expected)", p, "re-create the file, or remove that metadata entry so the config is inferred")) from e
    if not isinstance(config, dict):
        raise CheckpointError(explain(
            f"the '{CONFIG_METADATA_KEY}' metadata of the file is a {type(config).__name__}, not a JSON object", p,
            "re-create the file, or remove that metadata entry so the config is inferred from the weights"))
    return config


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
            ``"ema_unet"`` / ``"ema"`` for the released VideoBooth UNet / mapper).
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
        raise CheckpointError(explain(
            f"the file holds no tensors{where} (a state dict of model weights was expected)", name,
            "check that this is the right file and that it was saved completely"))
    nested = [k for k, v in current.items() if isinstance(v, Mapping)]
    if len(nested) > 1:
        raise CheckpointError(explain(
            f"the file holds several nested weight dicts{where} ({', '.join(map(repr, nested[:8]))}; one state dict "
            "was expected)", name, "tell the loader which one to use (preferred_keys), or save only that state dict"))
    bad = [k for k, v in current.items() if not isinstance(v, torch.Tensor)]
    raise CheckpointError(explain(
        f"the file holds non-tensor entries{where} ({', '.join(map(repr, bad[:8]))}; a state dict of tensors was "
        "expected)", name, "save model.state_dict() only (preferably as .safetensors)"))


# ----------------------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------------------


def save_safetensors(
    state_dict: Mapping[str, torch.Tensor], path: PathLike, metadata: Mapping[str, str] | None = None
) -> None:
    """Write ``state_dict`` (moved to the CPU, made contiguous) as a safetensors file, atomically: a temporary
    sibling renamed into place, so an interrupted write never leaves a partial file under ``path``.

    Raises:
        CheckpointError: ``path`` does not end in ``.safetensors`` / ``.sft``.
    """
    from safetensors.torch import save_file

    p = Path(path)
    if p.suffix.lower() not in SAFETENSORS_SUFFIXES:
        raise CheckpointError(explain(
            f"cannot write as safetensors a name that does not end in {' or '.join(SAFETENSORS_SUFFIXES)}", p,
            "use the .safetensors extension"))
    data = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    with atomic_path(p) as tmp:
        save_file(data, str(tmp), metadata=dict(metadata or {}))


def save_torch_file(obj: Any, path: PathLike) -> None:
    """``torch.save`` ``obj`` to ``path`` atomically (the released pickle layouts of ``make-tiny``)."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


# ----------------------------------------------------------------------------------------------------------------
# Model folders (transformers / diffusers layouts)
# ----------------------------------------------------------------------------------------------------------------

_FOLDER_WEIGHT_NAMES = {
    "transformers": ("model.safetensors", "pytorch_model.bin", "model.fp16.safetensors", "pytorch_model.fp16.bin"),
    "diffusers": (
        "diffusion_pytorch_model.safetensors",
        "diffusion_pytorch_model.bin",
        "diffusion_pytorch_model.fp16.safetensors",
        "diffusion_pytorch_model.fp16.bin",
    ),
}


def read_folder_weights(folder: Path, flavour: str) -> dict[str, torch.Tensor]:
    """Read the weights of a ``transformers`` / ``diffusers`` model folder (one file, or shards with an index)."""
    for name in _FOLDER_WEIGHT_NAMES[flavour]:
        index = folder / f"{name}.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise CheckpointError(explain(
                    f"cannot read the shard index ({e}; a JSON file with a 'weight_map' is expected)", index,
                    "download the model folder again")) from e
            merged: dict[str, torch.Tensor] = {}
            for shard in sorted(set(weight_map.values())):
                merged.update(unwrap_state_dict(read_state_dict(folder / shard), source=folder / shard))
            return merged
        if (folder / name).is_file():
            return unwrap_state_dict(read_state_dict(folder / name), source=folder / name)
    raise CheckpointError(explain(
        f"No weights found in the model folder (expected one of {', '.join(_FOLDER_WEIGHT_NAMES[flavour])}, or a "
        "sharded '*.index.json')", folder, "download the complete folder, or pass the weight file itself"))


def resolve_model_folder(folder: Path, subfolders: Sequence[str], expected: str) -> Path:
    """``folder`` if it holds ``config.json``, else its first sub-folder (of ``subfolders``) that does."""
    if (folder / "config.json").is_file():
        return folder
    for sub in subfolders:
        if (folder / sub / "config.json").is_file():
            return folder / sub
    wanted = " or ".join(f"'{s}/config.json'" for s in subfolders)
    raise CheckpointError(explain(
        f"not a model folder ({expected} expected): it has no 'config.json'{' (nor ' + wanted + ')' if wanted else ''}",
        folder, "pass the folder that holds config.json and the weights, or a single weight file"))


def read_json(path: Path) -> dict[str, Any]:
    """A model folder's JSON config as a dict."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(explain(f"cannot read the JSON config ({e})", path, "download it again")) from e
    if not isinstance(data, dict):
        raise CheckpointError(explain("the model config is not a JSON object", path, "download it again"))
    return data
