"""Weight streaming: run the UNet with only one block's weights in memory at a time (exact, opt-in).

The released UNet is 4.2 GB in fp32, more than half of what a guided step needs in all. With streaming, the
UNet is built on the ``meta`` device and every block (a resnet, an attention site, a resampler, the input and
output layers) reads its weights from the safetensors file just before it runs and drops them right after.
The arithmetic is unchanged, so results are identical to the resident model; the price is reading the
weights once per UNet call (twice per guided step) - from the OS page cache when the file fits there, else
from disk.

Weights are read with positional reads into fresh tensors rather than through a memory map, so no page of
the file stays mapped into the process: its resident memory holds one block at a time. (The page cache may
keep the file, but that memory is the kernel's, reclaimable at any time.)
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ..allocator import return_freed_memory
from ..models.config import UNetConfig
from ..errors import CheckpointError
from .weight_files import incomplete_file_error, read_safetensors_header, unreadable_file_error


class SafetensorsReader:
    """Reads single tensors of a ``.safetensors`` file with positional reads (no memory map)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if self.path.suffix.lower() not in (".safetensors", ".sft"):
            raise CheckpointError(
                f"weight streaming reads the UNet from a safetensors file, and {self.path.name} is not one. Convert "
                "the released pickle once, keeping fp32 for the official numerics: python -m videobooth_core convert "
                f"--unet {self.path} --out <models>/videobooth --dtype fp32"
            )
        header = read_safetensors_header(self.path)  # checked: a truncated or corrupt file is refused here
        self.metadata: dict[str, str] = header.metadata
        self._data_start = header.data_start
        self.entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = dict(header.entries)
        try:
            self._file = open(self.path, "rb", buffering=0)  # noqa: SIM115 - kept open while streaming
        except OSError as error:
            raise unreadable_file_error(self.path, error) from error

    def meta_state_dict(self) -> dict[str, torch.Tensor]:
        """Every tensor as a storage-free ``meta`` tensor of its shape and dtype (for key and shape checks)."""
        return {name: torch.empty(shape, dtype=dtype, device="meta") for name, (dtype, shape, _, _) in self.entries.items()}

    def read(self, name: str) -> torch.Tensor:
        """Tensor ``name`` on the CPU in the file's dtype, in freshly allocated memory."""
        dtype, shape, begin, end = self.entries[name]
        tensor = torch.empty(shape, dtype=dtype)
        if tensor.numel() == 0:
            return tensor
        buffer = memoryview(tensor.view(-1).view(torch.uint8).numpy())
        offset, done = self._data_start + begin, 0
        while done < end - begin:
            got = os.preadv(self._file.fileno(), [buffer[done:]], offset + done)
            if got <= 0:
                raise incomplete_file_error(self.path, f"truncated: it ended while reading {name!r}")
            done += got
        return tensor

    def close(self) -> None:
        self._file.close()


def streaming_units(unet: nn.Module) -> list[tuple[str, nn.Module]]:
    """The blocks whose weights are loaded together: resnets, attention sites, resamplers and the top-level
    layers (conv_in, time embedding, output head), each with its module path."""
    from ..models.blocks import Downsample3D, ResnetBlock3D, Transformer3DModel, Upsample3D

    block_types = (ResnetBlock3D, Transformer3DModel, Downsample3D, Upsample3D)
    units: list[tuple[str, nn.Module]] = []
    for name, module in unet.named_modules():
        if isinstance(module, block_types):
            units.append((name, module))
    covered = [name for name, _ in units]
    for name, module in unet.named_children():
        if not any(c == name or c.startswith(name + ".") for c in covered):
            units.append((name, module))  # conv_in, time_embedding, conv_norm_out, conv_out, watermark_zero_out
    return units


class WeightStreamer:
    """Loads each unit's weights before its forward and releases them after (see the module docstring)."""

    def __init__(self, unet: nn.Module, reader: SafetensorsReader, dtype: torch.dtype, device: torch.device) -> None:
        self.reader, self.dtype, self.device = reader, dtype, device
        self.units = streaming_units(unet)
        self.bytes_read = 0
        self._handles = []
        for prefix, unit in self.units:
            self._handles.append(unit.register_forward_pre_hook(self._loader(prefix, unit)))
            self._handles.append(unit.register_forward_hook(lambda module, args, output: _release(module)))
            _release(unit)

    @property
    def largest_unit_bytes(self) -> int:
        """Bytes of the largest unit in the compute dtype: the UNet weights resident at any moment."""
        size = torch.empty((), dtype=self.dtype).element_size()
        return max(sum(p.numel() for p in unit.parameters()) * size for _, unit in self.units)

    def _loader(self, prefix: str, unit: nn.Module) -> Callable[[nn.Module, object], None]:
        def load(module: nn.Module, args: object) -> None:
            # listed at every call: attach_projections may have released some parameters since
            for name, _ in list(unit.named_parameters()):
                tensor = self.reader.read(f"{prefix}.{name}")
                self.bytes_read += tensor.numel() * tensor.element_size()
                dtype = self.dtype if tensor.is_floating_point() else tensor.dtype
                _set_parameter(unit, name, tensor.to(device=self.device, dtype=dtype))

        return load

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self.reader.close()


def _release(unit: nn.Module) -> None:
    """Swap every parameter of ``unit`` for a storage-free placeholder of the same shape and dtype."""
    for name, current in list(unit.named_parameters()):
        _set_parameter(unit, name, torch.empty(current.shape, dtype=current.dtype, device="meta"))
    return_freed_memory()


def _set_parameter(unit: nn.Module, name: str, tensor: torch.Tensor) -> None:
    owner_path, _, leaf = name.rpartition(".")
    owner = unit.get_submodule(owner_path) if owner_path else unit
    owner._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)


def load_unet_streamed(
    path: str | Path,
    config: UNetConfig | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> nn.Module:
    """A UNet whose weights stay in ``path`` (a safetensors UNet, e.g. from ``convert``) and are streamed per
    block; keys and shapes are checked strictly up front, as :func:`checkpoint.load_unet` does."""
    from .checkpoint import unet_config_for
    from .strict import check_keys
    from ..models.unet_3d import UNet3DModel

    reader = SafetensorsReader(path)
    try:
        shapes = reader.meta_state_dict()
        if config is None:
            config = unet_config_for(shapes, reader.metadata, path)
        with torch.device("meta"):
            unet = UNet3DModel(config).to(dtype)
        check_keys(shapes, unet.state_dict(), path, "a VideoBooth UNet")
    except Exception:
        reader.close()
        raise
    unet.weight_streamer = WeightStreamer(unet, reader, dtype, torch.device(device))
    return unet.eval().requires_grad_(False)
