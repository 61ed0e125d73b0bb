"""The image-feature mapper: CLIP vision features → 5 word vectors, plus the per-site K/V projections.

The released ``mapper.pt`` (key ``ema``) also carries, for every UNet attention site, the key/value
projections the model uses at inference in place of the UNet's own; they are registered here under the
official names (the site path with dots replaced by underscores), so the checkpoint loads strictly.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .attention import SiteProjections
from .config import MapperConfig, mapper_stem_from_site_prefix
from ..errors import CheckpointError, explain

PROJECTION_SUFFIXES = ("attn1_to_k_exemplar", "attn1_to_v_exemplar", "attn1_to_k_new", "attn1_to_v_new",
                       "attn2_to_k", "attn2_to_v")


def _mlp(input_dim: int, hidden_dim: int, output_dim: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(input_dim, hidden_dim),
        nn.LayerNorm(hidden_dim),
        nn.LeakyReLU(0.01),
        nn.Linear(hidden_dim, hidden_dim),
        nn.LayerNorm(hidden_dim),
        nn.LeakyReLU(0.01),
        nn.Linear(hidden_dim, output_dim),
    )


class Mapper(nn.Module):
    """Maps 5 CLIP vision feature maps to 5 text-embedding vectors; holds the per-site projections."""

    def __init__(self, config: MapperConfig) -> None:
        super().__init__()
        self.config = config
        for level in range(config.num_levels):
            setattr(self, f"mapping_{level}", _mlp(config.input_dim, config.hidden_dim, config.output_dim))
            setattr(self, f"mapping_patch_{level}", _mlp(config.input_dim, config.hidden_dim, config.output_dim))
        for site, channels in config.site_channels:
            stem = mapper_stem_from_site_prefix(site) + "_transformer_blocks_0_"
            for suffix in PROJECTION_SUFFIXES:
                in_features = config.output_dim if suffix.startswith("attn2") else channels
                setattr(self, stem + suffix, nn.Linear(in_features, channels, bias=False))

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """Map CLIP vision features to the injected word vectors.

        Args:
            features: ``num_levels`` tensors (b, 1 + patches, input_dim), in the order
                [last hidden state (no post-LN), hidden_states[4], [8], [12], [16]]; token 0 is CLS.

        Returns:
            (b, num_levels, output_dim): per level, the CLS token's MLP output plus the mean over the
            patch tokens of the patch MLP's outputs.
        """
        if len(features) != self.config.num_levels:
            raise CheckpointError(explain(
                f"this mapper has {self.config.num_levels} levels, but the CLIP features hold a different number of "
                "feature maps", len(features),
                "use the released mapper.pt (5 levels) with CLIP ViT-L/14 features from "
                "conditioning.clip.clip_vision_features"))
        words = []
        for level, feature in enumerate(features):
            cls_word = getattr(self, f"mapping_{level}")(feature[:, :1])
            patch_word = getattr(self, f"mapping_patch_{level}")(feature[:, 1:]).mean(dim=1, keepdim=True)
            words.append(cls_word + patch_word)
        return torch.cat(words, dim=1)

    def site_projections(self) -> dict[str, SiteProjections]:
        """The per-site projections keyed by UNet site prefix, ready for ``UNet3DModel.attach_projections``."""
        projections = {}
        for site, _ in self.config.site_channels:
            stem = mapper_stem_from_site_prefix(site) + "_transformer_blocks_0_"
            get = lambda suffix: getattr(self, stem + suffix)  # noqa: E731
            projections[site] = SiteProjections(
                attn1_key=get("attn1_to_k_new"),
                attn1_value=get("attn1_to_v_new"),
                image_prompt_key=get("attn1_to_k_exemplar"),
                image_prompt_value=get("attn1_to_v_exemplar"),
                text_key=get("attn2_to_k"),
                text_value=get("attn2_to_v"),
            )
        return projections
