"""Loading the Stable Diffusion VAE (``diffusers.AutoencoderKL``) from the layouts users have on disk, the LDM <->
diffusers key conversion, and writing it as one LDM file (encoding and decoding:
:mod:`videobooth_core.conditioning.vae`).

Accepted layouts: a diffusers folder (``config.json`` + ``diffusion_pytorch_model.*``) such as
``stabilityai/sd-vae-ft-ema`` or a pipeline root with ``vae/``; a single LDM-format file as kept in ComfyUI's
``models/vae`` (also nested in a full SD checkpoint under ``first_stage_model.``); a single diffusers-format
file (also with the attention names of diffusers < 0.14). ``loss.*`` and ``model_ema.*`` entries of unpruned LDM
files (the training discriminator, EMA counters) are ignored.

The LDM -> diffusers conversion is our own table, not diffusers' ``convert_ldm_vae_checkpoint``
(``diffusers.loaders.single_file_utils``): a test checks that both give the same tensors bit for bit, but
diffusers' drops the keys it does not know (strict loading must name them), has no inverse (``make-tiny`` writes
LDM files, and errors name keys as they are in the file), and lives in a module whose functions have moved
between the diffusers versions this pack supports.

diffusers is imported inside the functions, so importing this module is cheap.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..errors import CheckpointError, VideoBoothError, explain
from ..files import PathLike
from .component import count_indices, read_component, require_tensor
from .strict import Device, assign_weights, build_on_meta, format_keys
from .weight_files import CONFIG_METADATA_KEY, read_config_metadata, read_json, save_safetensors

if TYPE_CHECKING:
    import diffusers

logger = logging.getLogger(__name__)

#: Latent scaling factor of the Stable Diffusion 1.x VAE used by VideoBooth.
SD_VAE_SCALING_FACTOR = 0.18215


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
    return count_indices(keys, pattern)


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
        raise CheckpointError(explain(
            f"{len(unknown)} VAE weight(s) with unknown LDM names ({format_keys(sorted(unknown))}; the keys of a "
            "Stable Diffusion (LDM) AutoencoderKL are expected) in", source, "use an SD 1.x/2.x/XL VAE file"))
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
    block_out = []
    for i in range(levels):
        w = require_tensor(sd, f"encoder.down_blocks.{i}.resnets.0.conv1.weight", source=source, what="VAE")
        block_out.append(int(w.shape[0]))
    conv_in = require_tensor(sd, "encoder.conv_in.weight", source=source, what="VAE")
    conv_out = require_tensor(sd, "decoder.conv_out.weight", source=source, what="VAE")
    if "post_quant_conv.weight" in sd:
        latent = int(sd["post_quant_conv.weight"].shape[0])
    else:
        latent = int(require_tensor(sd, "decoder.conv_in.weight", source=source, what="VAE").shape[1])
    config: dict[str, Any] = {
        "in_channels": int(conv_in.shape[1]),
        "out_channels": int(conv_out.shape[0]),
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": block_out,
        "layers_per_block": count_indices(keys, r"encoder\.down_blocks\.0\.resnets\.(\d+)\."),
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


def _folder_config(folder: Path) -> dict[str, Any]:
    """A diffusers VAE folder's ``config.json``, refused when it is another model's (a pipeline's UNet folder)."""
    config = read_json(folder / "config.json")
    class_name = config.get("_class_name", "AutoencoderKL")
    if class_name != "AutoencoderKL":
        raise CheckpointError(explain(
            f"the folder holds a {class_name} (config.json _class_name), but a VAE (AutoencoderKL) was expected",
            folder, "pass the VAE folder (the 'vae' sub-folder of a pipeline) or a VAE file"))
    return config


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

    expected = "a VAE (AutoencoderKL)"
    found = read_component(path, subfolder="vae", flavour="diffusers", marker="encoder.conv_in.weight",
                           example_key="encoder.conv_in.weight", expected=expected, folder_config=_folder_config)
    source, prefix, component = found.source, found.prefix, found.weights
    config = found.config if found.config is not None else read_config_metadata(path)
    is_ldm = any(k.startswith("encoder.down.") for k in component)
    num_levels = _vae_num_levels(list(component), ldm=is_ldm)
    if is_ldm:
        weights = convert_ldm_vae_to_diffusers(component, source=source)
    else:
        weights = _normalize_diffusers_vae_keys(component)
    if config is None:
        config = infer_vae_config(weights, source=source)
    model_config = {k: v for k, v in config.items() if not k.startswith("_")}
    model = build_on_meta(lambda: diffusers.AutoencoderKL.from_config(model_config), source=source, expected=expected)
    if is_ldm:
        file_name: Callable[[str], str] = lambda k: prefix + _vae_ldm_name(k, num_levels)  # noqa: E731
    else:
        file_name = lambda k: prefix + k  # noqa: E731
    assign_weights(model, weights, source=source, expected=expected, dtype=dtype, device=device, file_name=file_name)
    return model


def save_vae_ldm_single_file(vae: diffusers.AutoencoderKL, path: PathLike) -> None:
    """Write ``vae`` atomically as one safetensors file in the original LDM key layout (ComfyUI ``models/vae``).

    Keys are renamed with the inverse of :data:`VAE_LDM_TO_DIFFUSERS_RULES` (attention weights as 1x1 convs);
    the ``AutoencoderKL`` config is stored in the metadata under ``videobooth_config``.
    """
    config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(vae.config).items() if not k.startswith("_")}
    save_safetensors(convert_diffusers_vae_to_ldm(vae.state_dict()), path,
                     {"format": "pt", CONFIG_METADATA_KEY: json.dumps(config)})
