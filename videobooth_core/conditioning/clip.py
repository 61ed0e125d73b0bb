"""The CLIP vision tower's features the mapper reads (the coarse embedding's first stage). Loading the towers:
:mod:`videobooth_core.loading.clip`."""

from __future__ import annotations

import torch

from ..errors import CheckpointError, explain
from ..models.config import CLIP_FEATURE_LAYERS


def clip_vision_features(vision_model: torch.nn.Module, pixel_values: torch.Tensor) -> list[torch.Tensor]:
    """Run a transformers ``CLIPVisionModel`` and collect the mapper's 5 inputs.

    Args:
        vision_model: a ``transformers.CLIPVisionModel`` with at least 16 layers.
        pixel_values: (b, 3, 224, 224) CLIP-normalised image prompt.

    Returns:
        [last_hidden_state (no post-layernorm), hidden_states[4], [8], [12], [16]], each (b, 257, width),
        where hidden_states[k] is the output of encoder layer k (index 0 = embeddings after pre-LN).
    """
    param = next(vision_model.parameters())
    out = vision_model(pixel_values=pixel_values.to(param.device, param.dtype), output_hidden_states=True)
    hidden = out.hidden_states
    if len(hidden) <= max(CLIP_FEATURE_LAYERS):
        raise CheckpointError(explain("the CLIP vision tower has too few layers for VideoBooth", len(hidden) - 1,
                                      f"use CLIP ViT-L/14 (24 layers; layer {max(CLIP_FEATURE_LAYERS)} is read)"))
    return [out.last_hidden_state, *(hidden[layer] for layer in CLIP_FEATURE_LAYERS)]
