"""What a weight file holds, told from its keys (never from its name): the one kind detector, and the selection of
one component (a CLIP tower, a VAE) inside a file that holds several (a full Stable Diffusion checkpoint).

Kinds this pack loads: ``videobooth_unet``, ``videobooth_mapper`` (and ``wrapped_*``: the released pickles before
unwrapping), ``elite_mapper`` (ELITE's global mapper, the official stage-1 start: the mapper MLPs with, per attention
site, the attn2 ``to_k``/``to_v``, or the MLPs only; also the layout of the official stage-1 checkpoints; training
only, see :func:`.checkpoint.read_starting_mapper`), ``vae``, ``clip_text``, ``clip_vision``, ``clip_full`` (a
whole ``CLIPModel``: both towers and their projections, such as ``openai/clip-vit-large-patch14``; it fills the text
and the vision role, see :data:`ROLE_KINDS`). Kinds it recognises only to explain a wrong file:
``openclip_text``, ``openclip_vision`` (the OpenAI/OpenCLIP layouts, not the transformers one), ``image_unet``
(an image diffusion UNet such as Stable Diffusion's) and ``unknown``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Mapping

import torch

from ..errors import CheckpointError, explain

logger = logging.getLogger(__name__)

UNET_WRAPPER_KEY = "ema_unet"
"""The key of the UNet inside the released ``watermark_remove_module.pt``."""
MAPPER_WRAPPER_KEY = "ema"
"""The key of the mapper inside the released ``mapper.pt``."""

KIND_NAMES: dict[str, str] = {
    "videobooth_unet": "a VideoBooth UNet",
    "videobooth_mapper": "a VideoBooth mapper",
    "elite_mapper": "an ELITE global mapper (the official stage-1 start; a training start, not a VideoBooth mapper)",
    "wrapped_videobooth_unet": "a VideoBooth UNet (the released pickle, under 'ema_unet')",
    "wrapped_videobooth_mapper": "a VideoBooth mapper (the released pickle, under 'ema')",
    "vae": "a VAE",
    "clip_text": "a CLIP text encoder",
    "clip_vision": "a CLIP vision encoder",
    "clip_full": "a full CLIP model (text and vision towers with their projections)",
    "openclip_text": "a CLIP text encoder in the OpenAI/OpenCLIP layout (not the transformers layout)",
    "openclip_vision": "a CLIP vision tower in the OpenAI/OpenCLIP layout (not the transformers layout)",
    "image_unet": "an image diffusion UNet (e.g. Stable Diffusion's), not the VideoBooth video UNet",
    "unknown": "nothing this pack recognises",
}
"""What each kind is, in words (for messages: ``f"{path} holds {KIND_NAMES[kind]}"``)."""

ROLE_KINDS: dict[str, tuple[str, ...]] = {
    "clip_text": ("clip_text", "clip_full"),
    "clip_vision": ("clip_vision", "clip_full"),
    "clip_eval": ("clip_full",),
}
"""The kinds of file that can fill a role (a role not listed is filled by its own kind only): a full CLIP holds
both towers, so it serves as the text encoder, the vision encoder and the evaluation's CLIP."""


def fills_role(kind: str, role: str) -> bool:
    """Whether a file of ``kind`` can be loaded for ``role`` (see :data:`ROLE_KINDS`)."""
    return kind in ROLE_KINDS.get(role, (role,))


FULL_CLIP_KEYS = ("text_model.embeddings.token_embedding.weight", "vision_model.embeddings.patch_embedding.weight",
                  "text_projection.weight", "visual_projection.weight")
"""Keys every full ``transformers.CLIPModel`` state dict has (as saved: no prefix)."""


def _has(keys: Collection[str], fragment: str) -> bool:
    return any(fragment in k for k in keys)


def _ends(keys: Collection[str], marker: str) -> bool:
    return any(k == marker or k.endswith("." + marker) for k in keys)


# Ordered: the first rule that matches decides. Each rule: (kind, layout detail for messages, test on the keys).
_RULES: tuple[tuple[str, str, Callable[[Collection[str]], bool]], ...] = (
    ("videobooth_unet", "", lambda k: "conv_in.weight" in k and _has(k, "watermark_down_blocks.")),
    ("videobooth_mapper", "", lambda k: "mapping_0.0.weight" in k and _has(k, "_attn1_to_k_new")),
    # ELITE's train_global.py saves its Mapper's state dict: mapping_{i} / mapping_patch_{i} MLPs and, named after
    # the UNet's attn2 modules, <site>_transformer_blocks_0_attn2_to_k / _to_v; without attn1 entries
    ("elite_mapper", " (mapper MLPs with attn2 to_k/to_v per site)",
     lambda k: "mapping_0.0.weight" in k and _has(k, "_attn2_to_k") and not _has(k, "_attn1_to_")),
    ("elite_mapper", " (mapper MLPs only)",
     lambda k: "mapping_0.0.weight" in k and all(key.startswith(("mapping_", "mapping_patch_")) for key in k)),
    ("vae", " (AutoencoderKL, original LDM key layout)",
     lambda k: _has(k, "encoder.down.") or _has(k, "first_stage_model.")),
    ("vae", " (AutoencoderKL, diffusers key layout)", lambda k: _has(k, "encoder.down_blocks.")),
    ("openclip_vision", "", lambda k: _ends(k, "visual.conv1.weight")
     or _ends(k, "visual.transformer.resblocks.0.ln_1.weight")),
    ("clip_full", "", lambda k: all(key in k for key in FULL_CLIP_KEYS)),
    ("clip_vision", "", lambda k: _has(k, "vision_model.") or _has(k, "visual_projection")
     or _ends(k, "embeddings.patch_embedding.weight")),
    ("openclip_text", "", lambda k: _ends(k, "transformer.resblocks.0.ln_1.weight")),
    ("clip_text", "", lambda k: _has(k, "text_model.") or _has(k, "token_embedding")),
    ("image_unet", "", lambda k: ("conv_in.weight" in k and _has(k, "down_blocks.") and _has(k, "attn2.to_k"))
     or _has(k, "model.diffusion_model.") or _ends(k, "input_blocks.0.0.weight")
     or _ends(k, "time_embedding.linear_1.weight")),
)


def _classify(state_dict: Mapping[str, object]) -> tuple[str, str]:
    keys = state_dict.keys()
    if UNET_WRAPPER_KEY in keys:
        return "wrapped_videobooth_unet", ""
    if MAPPER_WRAPPER_KEY in keys and isinstance(state_dict[MAPPER_WRAPPER_KEY], Mapping):
        return "wrapped_videobooth_mapper", ""
    for kind, layout, matches in _RULES:
        if matches(keys):
            return kind, layout
    return "unknown", ""


def detect_kind(state_dict: Mapping[str, object]) -> str:
    """The kind of a state dict (see the module docstring), told from its keys; values may be tensors, meta
    tensors or anything (a dict of keys read from a file's header is enough, except for the released mapper
    pickle, whose ``ema`` entry must be a mapping)."""
    return _classify(state_dict)[0]


def describe_checkpoint(state_dict: Mapping[str, object]) -> str:
    """What a state dict holds in words, with its key layout where that matters (``a VAE (AutoencoderKL,
    original LDM key layout)``); an unrecognised one is described by its first keys."""
    kind, layout = _classify(state_dict)
    if kind == "unknown":
        return f"an unrecognised model (first keys: {', '.join(sorted(state_dict)[:4]) or 'none'})"
    return KIND_NAMES[kind] + layout


def select_component(
    state_dict: Mapping[str, torch.Tensor],
    marker: str,
    *,
    source: str,
    expected: str,
    example_key: str,
) -> tuple[str, dict[str, torch.Tensor]]:
    """Find the one component whose keys end in ``marker`` (e.g. ``embeddings.token_embedding.weight``) and return
    ``(prefix, {key without prefix: tensor})``; keys outside the component are ignored (logged).

    Raises:
        CheckpointError: no such component (the message says what the file looks like instead), or several.
    """
    prefixes = sorted({k[: len(k) - len(marker)] for k in state_dict if k == marker or k.endswith("." + marker)})
    if not prefixes:
        raise CheckpointError(explain(
            f"does not look like {expected}: it looks like {describe_checkpoint(state_dict)} (keys such as "
            f"'{example_key}' were expected)", source,
            "choose the right file for this input (check the models folder it came from)"))
    if len(prefixes) > 1:
        raise CheckpointError(explain(
            f"several candidates for {expected} (one was expected), under the prefixes "
            f"{', '.join(repr(p) for p in prefixes[:6])}, in", source, "extract the one you want into its own file"))
    prefix = prefixes[0]
    component = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    ignored = [k for k in state_dict if not k.startswith(prefix)]
    if ignored:
        logger.info(
            "%s: using the %s under prefix %r; ignoring %d other keys (e.g. %s)",
            source, expected, prefix, len(ignored), ", ".join(ignored[:3]),
        )
    return prefix, component
