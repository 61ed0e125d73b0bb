"""Personalised Stable Diffusion 1.x checkpoints on VideoBooth's spatial layers.

VideoBooth's UNet is SD 1.4 inflated to video: its resnets, spatial attention (``attn1``/``attn2`` query and output
projections, ``norm1..3``, the site's GroupNorm, ``proj_in``/``proj_out``), feed-forwards, resamplers, ``conv_in``,
``conv_norm_out``, ``conv_out`` and time embedding carry SD 1.x's names and shapes (module names are diffusers'
``UNet2DConditionModel`` names). Those are replaced by a checkpoint's; temporal attention (``attn_temp``,
``norm_temp``), the watermark branch and the mapper's projections are kept.

The UNet attends with the mapper's key/value projections, never its own ``attn1``/``attn2`` ``to_k``/``to_v``, so
a checkpoint's K/V weights change nothing unless ``kv="mapper"`` copies them onto the mapper's projections (see
:func:`kv_target_modules`); they are counted either way.

Accepted: a single-file SD 1.x checkpoint in the LDM layout (``model.diffusion_model.*``, as in ComfyUI's
``checkpoints`` folder; converted with diffusers' ``convert_ldm_unet_checkpoint``), a UNet-only LDM file
(``input_blocks.*``), a diffusers UNet file, or a diffusers UNet / pipeline folder. SD 2.x, SDXL, inpainting UNets
and anything else are refused with a message naming what the file is (told from keys and shapes, never names).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from ..errors import CheckpointError, explain
from .kinds import describe_checkpoint
from .strict import key_mismatch_report
from .weight_files import read_folder_weights, read_state_dict, resolve_model_folder, unwrap_state_dict
from .weight_patch import WeightPatch, check_patchable

logger = logging.getLogger(__name__)

KeyValueMode = Literal["ignore", "mapper"]
KV_MODES: tuple[str, ...] = ("ignore", "mapper")

LDM_UNET_PREFIX = "model.diffusion_model."

NOT_FROM_SD: tuple[str, ...] = ("attn_temp.", "norm_temp.", "watermark_")
"""Fragments of the UNet's parameter names that have no Stable Diffusion counterpart (always kept)."""

KV_PROJECTION_RE = re.compile(r"^(?P<site>.+)\.transformer_blocks\.0\.(?P<attn>attn[12])\.(?P<proj>to_[kv])\.weight$")
"""A UNet attn1/attn2 to_k/to_v weight name (the layers VideoBooth replaces with the mapper's projections)."""

_RESNET_TO_LDM = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"),
                  ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection"))
_TOP_LEVEL_TO_LDM = (("time_embedding.linear_1", "time_embed.0"), ("time_embedding.linear_2", "time_embed.2"),
                     ("conv_in", "input_blocks.0.0"), ("conv_norm_out", "out.0"), ("conv_out", "out.2"))


def is_from_sd(name: str) -> bool:
    """Whether a UNet parameter (or module) name is one of the layers VideoBooth inherited from SD 1.x."""
    return not any(fragment in name for fragment in NOT_FROM_SD)


def ldm_name(name: str, layers_per_block: int, levels: int) -> str | None:
    """The LDM (original SD / ComfyUI checkpoint) name of a spatial UNet parameter or module name in diffusers
    naming (ours), e.g. ``down_blocks.1.attentions.0.proj_in`` → ``input_blocks.4.1.proj_in``; ``None`` for names
    with no SD counterpart. Used to accept LDM-named ("SGM") LoRA keys, and to write LDM checkpoints in tests.

    ``levels`` is the number of down blocks; the last down block and the first up block have no attention, as in
    SD 1.x."""
    if not is_from_sd(name):
        return None
    for ours, ldm in _TOP_LEVEL_TO_LDM:
        if name == ours or name.startswith(ours + "."):
            return ldm + name[len(ours):]
    per = layers_per_block + 1

    def resnet_rest(rest: str) -> str:
        for ours, ldm in _RESNET_TO_LDM:
            if rest == ours or rest.startswith(ours + "."):
                return ldm + rest[len(ours):]
        return rest

    if m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)(\.|$)(.*)", name):
        block, part, index, dot, rest = int(m[1]), m[2], int(m[3]), m[4], m[5]
        slot = 0 if part == "resnets" else 1
        rest = resnet_rest(rest) if part == "resnets" else rest
        return f"input_blocks.{1 + block * per + index}.{slot}{dot}{rest}"
    if m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv(\.|$)(.*)", name):
        return f"input_blocks.{(int(m[1]) + 1) * per}.0.op{m[2]}{m[3]}"
    if m := re.match(r"mid_block\.(resnets|attentions)\.(\d+)(\.|$)(.*)", name):
        index = 1 if m[1] == "attentions" else 2 * int(m[2])
        rest = resnet_rest(m[4]) if m[1] == "resnets" else m[4]
        return f"middle_block.{index}{m[3]}{rest}"
    if m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)(\.|$)(.*)", name):
        block, part, index, dot, rest = int(m[1]), m[2], int(m[3]), m[4], m[5]
        slot = 0 if part == "resnets" else 1
        rest = resnet_rest(rest) if part == "resnets" else rest
        return f"output_blocks.{block * per + index}.{slot}{dot}{rest}"
    if m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv(\.|$)(.*)", name):
        block = int(m[1])
        slot = 1 if block == 0 else 2  # SD 1.x's first up block has no attention: its upsampler sits in slot 1
        return f"output_blocks.{block * per + layers_per_block}.{slot}.conv{m[2]}{m[3]}"
    return None


# -- what a file is --------------------------------------------------------------------------------------------
def identify_sd_unet(state_dict: Mapping[str, torch.Tensor]) -> tuple[str, str]:
    """``(family, description)`` of an image-UNet state dict in LDM or diffusers naming, told from keys and shapes:
    family ``sd1`` (accepted), ``sdxl``, ``sd2``, ``sd1_inpainting`` (other input channels), ``videobooth``,
    ``motion_module`` or ``other``."""
    keys = list(state_dict)
    if any("watermark_down_blocks." in k for k in keys):
        return "videobooth", "a VideoBooth UNet (load it with the model loader / --models, not as a base checkpoint)"
    if any("motion_modules." in k for k in keys) and not any(k.endswith("attn2.to_q.weight") for k in keys):
        return "motion_module", "an AnimateDiff motion module (temporal layers only, no spatial SD layers)"
    is_unet = any(k.endswith(("input_blocks.0.0.weight", "conv_in.weight")) for k in keys) and any(
        ".input_blocks." in f".{k}" or k.startswith("down_blocks.") for k in keys)
    if not is_unet:
        return "other", f"not a Stable Diffusion UNet: {describe_checkpoint(state_dict)}"
    context = {int(v.shape[1]) for k, v in state_dict.items() if k.endswith("attn2.to_k.weight")}
    if any(k.startswith(("label_emb.", "add_embedding.")) or ".label_emb." in k for k in keys) or 2048 in context:
        return "sdxl", "an SDXL UNet (it has SDXL's added size/pooled-text embedding and 2048-wide text states)"
    linear_projection = any(v.ndim == 2 for k, v in state_dict.items() if k.endswith("proj_in.weight"))
    if 1024 in context or linear_projection:
        return "sd2", ("an SD 2.x UNet (OpenCLIP ViT-H text states of width 1024 and linear proj_in/proj_out; "
                       "VideoBooth is SD 1.x: CLIP ViT-L/14 text states, 1x1-conv projections)")
    conv_in = next(v for k, v in state_dict.items() if k.endswith(("input_blocks.0.0.weight", "conv_in.weight")))
    if conv_in.ndim == 4 and conv_in.shape[1] != 4:
        return "sd1_inpainting", (f"an SD 1.x UNet with {conv_in.shape[1]} input channels (an inpainting or "
                                  "instruct-pix2pix model); VideoBooth's UNet takes the 4-channel latent only")
    return "sd1", "an SD 1.x UNet"


def _sd1_or_refuse(state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    family, description = identify_sd_unet(state_dict)
    if family != "sd1":
        raise CheckpointError(explain(
            f"{source} is {description}, not an SD 1.x checkpoint", source,
            "choose an SD 1.x / 1.5-based checkpoint (from the checkpoints folder); VideoBooth's spatial layers are "
            "SD 1.x's"))


def read_sd_unet(path: str | Path, layers_per_block: int = 2) -> dict[str, torch.Tensor]:
    """The UNet weights of an SD 1.x checkpoint, in diffusers (= our) names.

    Args:
        path: a single file (LDM full checkpoint, LDM UNet-only, or diffusers UNet; .safetensors preferred, pickles
            read weights-only) or a diffusers UNet folder (or a pipeline folder with ``unet/``).
        layers_per_block: the VideoBooth UNet's (2 at the released size); the LDM layout's block numbering uses it.

    Raises:
        CheckpointError: unreadable/unsafe, or not an SD 1.x UNet (the message names what it is).
    """
    p = Path(path)
    if p.is_dir():
        folder = resolve_model_folder(p, ("unet",), "a diffusers UNet folder (config.json + diffusion_pytorch_model)")
        state_dict = read_folder_weights(folder, "diffusers")
        _sd1_or_refuse(state_dict, str(p))
        return state_dict
    raw = unwrap_state_dict(read_state_dict(p), ("state_dict",), source=p)
    _sd1_or_refuse(raw, str(p))
    if not any(k.startswith(LDM_UNET_PREFIX) for k in raw) and "input_blocks.0.0.weight" in raw:
        raw = {LDM_UNET_PREFIX + k: v for k, v in raw.items()}  # a UNet-only LDM file (ComfyUI diffusion_models)
    if any(k.startswith(LDM_UNET_PREFIX) for k in raw):
        from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

        return convert_ldm_unet_checkpoint(raw, {"layers_per_block": layers_per_block})
    return {k: v for k, v in raw.items() if not k.startswith(("first_stage_model.", "cond_stage_model."))}


# -- applying --------------------------------------------------------------------------------------------------
def kv_target_modules(unet: nn.Module, name: str) -> list[nn.Linear] | None:
    """The modules that really project keys/values for the UNet key/value projection ``name`` (e.g.
    ``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k``), or ``None`` if ``name`` is not one.

    With the mapper's projections attached (the released model): ``attn1.to_k`` → the mapper's ``to_k_new`` (video
    tokens) and ``to_k_exemplar`` (image-prompt tokens, which are attended to together with frame 0's, so they stay
    in one key space); ``attn1.to_v`` likewise; ``attn2.to_k``/``to_v`` → the mapper's text projections. Without
    them: the UNet's own layer."""
    m = KV_PROJECTION_RE.match(name + ".weight")
    if m is None:
        return None
    projections = getattr(unet, "attached_projections", None)
    if projections is None:
        return [unet.get_submodule(name)]
    site = projections.get(m["site"])
    if site is None:
        return None
    if m["attn"] == "attn2":
        return [site.text_key if m["proj"] == "to_k" else site.text_value]
    if m["proj"] == "to_k":
        return [site.attn1_key, site.image_prompt_key]
    return [site.attn1_value, site.image_prompt_value]


@dataclass(frozen=True)
class SDCheckpointReport:
    replaced: int
    """UNet tensors replaced by the checkpoint's."""
    key_value: int
    """The checkpoint's attn1/attn2 to_k/to_v tensors."""
    key_value_applied: int
    """Mapper projection tensors they replaced (0 unless ``kv="mapper"``)."""
    kept: int
    """UNet tensors with no SD counterpart, kept (temporal attention, watermark branch)."""

    def describe(self) -> str:
        kv = (f"{self.key_value} key/value tensors copied onto {self.key_value_applied} mapper projections"
              if self.key_value_applied else
              f"{self.key_value} key/value tensors not used (VideoBooth attends with the mapper's projections)")
        return f"replaced {self.replaced} UNet tensors; {kv}; kept {self.kept} temporal/watermark tensors"


def apply_sd_checkpoint(
    unet: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    *,
    kv: KeyValueMode = "ignore",
    source: str = "the checkpoint",
    patch: WeightPatch | None = None,
) -> tuple[WeightPatch, SDCheckpointReport]:
    """Replace the UNet's SD-inherited layers with ``state_dict``'s (from :func:`read_sd_unet`).

    Strict: every SD-inherited UNet tensor must be in the checkpoint with its shape (a checkpoint of another size
    is refused before anything changes). Returns the :class:`WeightPatch` (``undo()`` restores the UNet exactly;
    drop it to free the old weights) and what was done.

    Raises:
        CheckpointError: not SD 1.x, other keys or shapes than this UNet's, an unknown ``kv``, or a streamed UNet.
    """
    check_patchable(unet, "an SD 1.x checkpoint")
    if kv not in KV_MODES:
        raise CheckpointError(explain("unknown key/value mode", kv, f"choose one of {', '.join(KV_MODES)}"))
    _sd1_or_refuse(state_dict, source)
    own = dict(unet.named_parameters())
    kv_keys = {k for k in state_dict if KV_PROJECTION_RE.match(k)}
    spatial = {k: v for k, v in state_dict.items() if k not in kv_keys}
    expected = {k: v for k, v in own.items() if is_from_sd(k) and not KV_PROJECTION_RE.match(k)}
    report = key_mismatch_report(spatial, expected)
    if report:
        width = tuple(state_dict["conv_in.weight"].shape) if "conv_in.weight" in state_dict else None
        raise CheckpointError(explain(
            f"{source} does not fit this VideoBooth UNet's SD 1.x layers (checkpoint conv_in {width}, UNet "
            f"{tuple(own['conv_in.weight'].shape)})", report,
            "use a full-size SD 1.x checkpoint with the released VideoBooth weights (a tiny test UNet needs a tiny "
            "checkpoint)"))
    attached = getattr(unet, "attached_projections", None) is not None
    patch = patch if patch is not None else WeightPatch()
    applied = 0
    with torch.no_grad():
        for name, value in spatial.items():
            module_name, _, attr = name.rpartition(".")
            patch.replace(unet.get_submodule(module_name), attr, value)
        for name in sorted(kv_keys):
            if attached and kv == "ignore":
                continue  # the UNet's own K/V are not used with the mapper's projections attached
            for target in kv_target_modules(unet, name[: -len(".weight")]) or []:
                if tuple(target.weight.shape) != tuple(state_dict[name].shape):
                    raise CheckpointError(explain(
                        f"{source}'s {name} does not fit the projection it would replace (shape {tuple(target.weight.shape)})",
                        tuple(state_dict[name].shape), "use an SD 1.x checkpoint of this UNet's size"))
                patch.replace(target, "weight", state_dict[name])
                applied += 1
    result = SDCheckpointReport(replaced=len(spatial), key_value=len(kv_keys), key_value_applied=applied,
                                kept=sum(1 for k in own if not is_from_sd(k)))
    logger.info("%s: %s", source, result.describe())
    return patch, result


def load_sd_checkpoint(
    unet: nn.Module, path: str | Path, *, kv: KeyValueMode = "ignore", patch: WeightPatch | None = None
) -> tuple[WeightPatch, SDCheckpointReport]:
    """:func:`read_sd_unet` then :func:`apply_sd_checkpoint` (the file's name labels the messages)."""
    state_dict = read_sd_unet(path, unet.config.layers_per_block)
    return apply_sd_checkpoint(unet, state_dict, kv=kv, source=Path(path).name, patch=patch)
