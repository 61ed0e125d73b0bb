"""VideoCrafter's text encoder (and, at the end, its I2V image encoder): OpenCLIP ViT-H/14's text tower read at its penultimate layer, as
``FrozenOpenCLIPEmbedder(layer="penultimate")`` does (``lvdm/modules/encoders/condition.py:174-232`` of
AILab-CVC/VideoCrafter): token + position embedding, every residual block but the last (causal mask, no padding
mask), then ``ln_final``; 77 tokens, padded with id 0 (OpenCLIP's ``tokenize``), the end token kept last when a
prompt is cut.

The tower runs as a ``transformers.CLIPTextModel`` (GELU, 16 heads of 64 at width 1024): its weights come from the
checkpoint's ``cond_stage_model.model.*`` (OpenCLIP layout, converted here by our own table: the fused ``in_proj``
split into q/k/v), from a separate OpenCLIP-layout file, or from a transformers-layout file such as SD 2.x's
``text_encoder`` / ComfyUI's ``clip_h`` text encoder (loaded by :func:`..loading.clip.load_clip_text_encoder`).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from ..errors import CheckpointError, explain
from ..files import PathLike
from ..loading.clip import build_clip_tower, infer_clip_text_config, infer_clip_vision_config

if TYPE_CHECKING:
    import transformers

OPENCLIP_TEXT_PREFIX = "cond_stage_model.model."
PAD_ID = 0
"""OpenCLIP's ``tokenize`` pads with zeros (not with the end token, as SD 1.x's tokenizer does)."""
logger = logging.getLogger(__name__)

CONTEXT_LENGTH = 77

_BLOCK = re.compile(r"^transformer\.resblocks\.(\d+)\.(.+)$")
_BLOCK_NAMES = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
                "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
_TOP_NAMES = {"token_embedding.weight": "embeddings.token_embedding.weight",
              "positional_embedding": "embeddings.position_embedding.weight",
              "ln_final.weight": "final_layer_norm.weight", "ln_final.bias": "final_layer_norm.bias"}
_UNUSED = ("text_projection", "logit_scale", "attn_mask")
"""The pooled projection and the contrastive temperature play no part in the penultimate-layer context."""


def _convert_block(key: str, value: torch.Tensor, out: dict[str, torch.Tensor]) -> None:
    """One ``transformer.resblocks.N.*`` tensor under the transformers encoder-layer names (q/k/v split)."""
    match = _BLOCK.match(key)
    if not match:
        raise CheckpointError(explain("an OpenCLIP tower key this converter does not know", key,
                                      "use an unmodified OpenCLIP ViT-H/14 file"))
    layer, rest = f"encoder.layers.{match.group(1)}.", match.group(2)
    if rest.startswith("attn.in_proj_"):
        suffix = rest.removeprefix("attn.in_proj_")
        for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
            out[f"{layer}self_attn.{name}.{suffix}"] = part
        return
    module, _, leaf = rest.rpartition(".")
    if module not in _BLOCK_NAMES:
        raise CheckpointError(explain("an OpenCLIP tower key this converter does not know", key,
                                      "use an unmodified OpenCLIP ViT-H/14 file"))
    out[f"{layer}{_BLOCK_NAMES[module]}.{leaf}"] = value


def _convert_tower(
    tower: Mapping[str, torch.Tensor], names: Mapping[str, str], *, skip: Callable[[str], bool]
) -> dict[str, torch.Tensor]:
    """An OpenCLIP tower's tensors under transformers' names: ``names`` for the tensors outside the blocks, the
    block table for ``transformer.resblocks.N.*``; the keys ``skip`` accepts are dropped.

    Raises:
        CheckpointError: a key neither table knows (named), so nothing is silently dropped.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in tower.items():
        if skip(key):
            continue
        if key in names:
            out[names[key]] = value
        else:
            _convert_block(key, value, out)
    return out


_TOWERS = {"text": ("CLIPTextConfig", "the OpenCLIP ViT-H/14 text encoder", OPENCLIP_TEXT_PREFIX),
           "vision": ("CLIPVisionConfig", "the OpenCLIP ViT-H/14 image encoder", "embedder.model.visual.")}
"""Per tower: its transformers config class, what it is in messages, its weights' prefix in the checkpoint."""


def _build_tower(
    kind: str,
    weights: Mapping[str, torch.Tensor],
    values: dict[str, Any],
    *,
    source: PathLike,
    dtype: torch.dtype,
    device: str | torch.device,
    num_attention_heads: int | None,
) -> torch.nn.Module:
    """The OpenCLIP ``kind`` tower as a transformers model (sdpa attention) from its renamed weights and its config
    ``values``; ``num_attention_heads`` replaces the count read from the width (tiny test towers)."""
    import transformers

    if num_attention_heads is not None:
        values["num_attention_heads"] = num_attention_heads
    config_class, expected, file_prefix = _TOWERS[kind]
    config = getattr(transformers, config_class)(**values)
    return build_clip_tower(kind, config, weights, source=source, expected=expected, file_prefix=file_prefix,
                            dtype=dtype, device=device, attn_implementation="sdpa")


def openclip_text_to_transformers(tower: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """OpenCLIP text-tower tensors (keys without prefix: ``token_embedding.weight``, ``transformer.resblocks.N.*``,
    ``ln_final.*``) under ``transformers.CLIPTextModel``'s names without the ``text_model.`` prefix.

    Raises:
        CheckpointError: a key the table does not know (named), so nothing is silently dropped.
    """
    return _convert_tower(tower, _TOP_NAMES, skip=lambda key: key in _UNUSED or key.startswith("visual."))


def build_openclip_text_encoder(
    tower: Mapping[str, torch.Tensor],
    *,
    source: PathLike,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    num_attention_heads: int | None = None,
) -> "transformers.CLIPTextModel":
    """A ``CLIPTextModel`` holding an OpenCLIP text tower (keys without prefix), strictly loaded. The head count
    is read from the width (16 for ViT-H's 1024) unless given (tiny test towers)."""
    weights = openclip_text_to_transformers(tower)
    values = {**infer_clip_text_config(weights, source=str(source)), "hidden_act": "gelu"}  # OpenCLIP: exact GELU
    if values["vocab_size"] < 49408:  # a tiny vocabulary: its own last two ids are start and end (make-tiny's)
        values.update(bos_token_id=values["vocab_size"] - 2, eos_token_id=values["vocab_size"] - 1)
    return _build_tower("text", weights, values, source=source, dtype=dtype, device=device,
                        num_attention_heads=num_attention_heads)


def tokenize_openclip(tokenizer: "transformers.CLIPTokenizer", prompts: Sequence[str]) -> torch.Tensor:
    """``(len(prompts), 77)`` int64 ids as OpenCLIP's ``tokenize``: start, BPE tokens, end, zeros; a prompt too
    long is cut to 77 with the end token last. (The BPE vocabulary is CLIP's, the same for ViT-L and ViT-H.)"""
    rows = []
    for prompt in prompts:
        # verbose=False: transformers' own "longer than the maximum" advice would say it a second time, less clearly
        ids = tokenizer(prompt, add_special_tokens=True, truncation=False, verbose=False)["input_ids"]
        if len(ids) > CONTEXT_LENGTH:
            # the official code cuts silently; the user should know which words the model never saw
            dropped = tokenizer.decode(ids[CONTEXT_LENGTH - 1:-1]).strip()
            dropped = dropped if len(dropped) <= 60 else dropped[:57] + "..."  # where the cut starts is what matters
            logger.warning("the prompt is %d tokens, more than the text encoder's %d: the end is cut (%r is not "
                           "seen); shorten the prompt to keep it", len(ids), CONTEXT_LENGTH, dropped)
            ids = ids[:CONTEXT_LENGTH - 1] + [tokenizer.eos_token_id]
        rows.append(ids + [PAD_ID] * (CONTEXT_LENGTH - len(ids)))
    return torch.tensor(rows, dtype=torch.long)


def encode_penultimate(text_encoder: "transformers.CLIPTextModel", input_ids: torch.Tensor) -> torch.Tensor:
    """The context VideoCrafter's UNet reads: the hidden states before the last block, through the final
    LayerNorm. ``input_ids`` ``(b, 77)`` -> ``(b, 77, hidden)`` in the encoder's dtype."""
    final_norm = getattr(text_encoder, "text_model", text_encoder).final_layer_norm  # transformers 4.x nests it
    with torch.no_grad():
        out = text_encoder(input_ids.to(final_norm.weight.device), output_hidden_states=True)
        return final_norm(out.hidden_states[-2])


def load_videocrafter_text_encoder(
    checkpoint: Mapping[str, torch.Tensor],
    *,
    source: PathLike,
    text_encoder_path: PathLike | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> "transformers.CLIPTextModel":
    """The OpenCLIP ViT-H/14 text encoder of a VideoCrafter model: from ``text_encoder_path`` when given (an
    OpenCLIP-layout file such as ``open_clip_pytorch_model.bin``, or a transformers-layout one such as SD 2.x's
    ``text_encoder`` or ComfyUI's ``clip_h``), else from the checkpoint's ``cond_stage_model.model.*``.

    Raises:
        CheckpointError: neither holds it (the message says which file to get and where it goes).
    """
    from ..loading.clip import load_clip_text_encoder
    from ..loading.kinds import select_component
    from ..loading.weight_files import read_state_dict, unwrap_state_dict

    if text_encoder_path is not None:
        weights = unwrap_state_dict(read_state_dict(text_encoder_path), source=text_encoder_path)
        if any(k.endswith("transformer.resblocks.0.ln_1.weight") for k in weights):
            _, tower = select_component(weights, "token_embedding.weight", source=str(text_encoder_path),
                                        expected="an OpenCLIP text tower", example_key="token_embedding.weight")
            return build_openclip_text_encoder(tower, source=text_encoder_path, dtype=dtype, device=device)
        return load_clip_text_encoder(text_encoder_path, dtype=dtype, device=device, attn_implementation="sdpa")
    tower = {k[len(OPENCLIP_TEXT_PREFIX):]: v for k, v in checkpoint.items() if k.startswith(OPENCLIP_TEXT_PREFIX)}
    if not tower:
        raise CheckpointError(explain(
            f"the checkpoint holds no text encoder ('{OPENCLIP_TEXT_PREFIX}*')", source,
            "use the released model.ckpt (it carries its OpenCLIP ViT-H/14 text encoder), or give the text encoder "
            "file: SD 2.x's text_encoder/model.safetensors (ComfyUI's clip_h, in models/text_encoders) or OpenCLIP's "
            "open_clip_pytorch_model.bin (laion/CLIP-ViT-H-14-laion2B-s32B-b79K)"))
    return build_openclip_text_encoder(tower, source=source, dtype=dtype, device=device)


_VISION_NAMES = {"conv1.weight": "embeddings.patch_embedding.weight", "class_embedding": "embeddings.class_embedding",
                 "positional_embedding": "embeddings.position_embedding.weight", "ln_pre.weight": "pre_layrnorm.weight",
                 "ln_pre.bias": "pre_layrnorm.bias", "ln_post.weight": "post_layernorm.weight",
                 "ln_post.bias": "post_layernorm.bias"}


def openclip_vision_to_transformers(tower: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An OpenCLIP visual tower (keys under ``visual.``, prefix removed) under ``CLIPVisionModel``'s names; the
    output projection ``proj`` is dropped (the I2V projector reads the last layer's tokens)."""
    return _convert_tower(tower, _VISION_NAMES, skip=lambda key: key == "proj")


def build_openclip_vision_encoder(
    tower: Mapping[str, torch.Tensor],
    *,
    source: PathLike,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    num_attention_heads: int | None = None,
) -> "transformers.CLIPVisionModel":
    """A ``CLIPVisionModel`` holding an OpenCLIP visual tower (``embedder.model.visual.*`` of the I2V checkpoint,
    prefix removed), strictly loaded; ``last_hidden_state`` is the official image embedder's output (after
    ``ln_pre`` and every block, without ``ln_post``)."""
    weights = openclip_vision_to_transformers(tower)
    values = {**infer_clip_vision_config(weights, source=str(source)), "hidden_act": "gelu"}
    return _build_tower("vision", weights, values, source=source, dtype=dtype, device=device,
                        num_attention_heads=num_attention_heads)
