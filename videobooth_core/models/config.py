"""Model configurations with the real VideoBooth defaults, validated on construction.

The official config names the number of attention heads ``attention_head_dim`` (an SD-1.x naming quirk);
it is translated once, in :meth:`UNetConfig.from_official`, and called ``num_attention_heads`` here.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

import torch

from ..errors import CheckpointError, ModelConfigError, explain

NUM_MAPPER_LEVELS = 5
"""The mapper turns 5 CLIP feature maps into 5 word vectors."""

CLIP_FEATURE_LAYERS: tuple[int, ...] = (4, 8, 12, 16)
"""CLIP vision hidden states used after the last layer's output (in this order)."""


@dataclass(frozen=True)
class UNetConfig:
    """Shape of the VideoBooth 3D UNet (defaults: the released SD-1.4-sized model)."""

    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    num_attention_heads: int = 8
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int = 768
    watermark_block_out_channels: tuple[int, ...] = (320, 640, 640)
    flip_sin_to_cos: bool = True
    freq_shift: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "block_out_channels", tuple(int(c) for c in self.block_out_channels))
        object.__setattr__(
            self, "watermark_block_out_channels", tuple(int(c) for c in self.watermark_block_out_channels)
        )
        if len(self.block_out_channels) < 2:
            raise ModelConfigError(explain("block_out_channels needs at least 2 levels", self.block_out_channels,
                                           "give one width per UNet level, e.g. (320, 640, 1280, 1280)"))
        if len(self.watermark_block_out_channels) != 3:
            raise ModelConfigError(explain("watermark_block_out_channels must have 3 entries",
                                           self.watermark_block_out_channels,
                                           "give the watermark branch's 3 widths, e.g. (320, 640, 640)"))
        if self.watermark_block_out_channels[0] != self.block_out_channels[0]:
            raise ModelConfigError(explain(
                "watermark_block_out_channels[0] and block_out_channels[0] differ",
                (self.watermark_block_out_channels[0], self.block_out_channels[0]),
                "start the watermark branch at the UNet's first width"))
        for width in self.block_out_channels + self.watermark_block_out_channels:
            if width % self.norm_num_groups:
                raise ModelConfigError(explain(f"a channel width is not divisible by norm_num_groups={self.norm_num_groups}",
                                               width, "use widths that are multiples of the group count"))
        for width in self.block_out_channels:
            if width % self.num_attention_heads:
                raise ModelConfigError(explain(
                    f"a channel width is not divisible by num_attention_heads={self.num_attention_heads}", width,
                    "use widths that are multiples of the head count"))

    @property
    def time_embed_dim(self) -> int:
        return self.block_out_channels[0] * 4

    @property
    def num_downsamples(self) -> int:
        return len(self.block_out_channels) - 1

    @classmethod
    def from_official(
        cls, official: Mapping[str, Any], watermark_block_out_channels: tuple[int, ...] | None = None
    ) -> "UNetConfig":
        """Build from the official diffusers-style UNet config dict (``attention_head_dim`` = head count)."""
        heads = official.get("attention_head_dim", 8)
        if isinstance(heads, (list, tuple)):
            if len(set(heads)) != 1:
                raise ModelConfigError(explain("per-block head counts are not supported", heads,
                                               "use one attention_head_dim (head count) for every block"))
            heads = heads[0]
        block_out = tuple(official.get("block_out_channels", cls.block_out_channels))
        if watermark_block_out_channels is None:
            watermark_block_out_channels = (block_out[0], 2 * block_out[0], 2 * block_out[0])
        return cls(
            in_channels=official.get("in_channels", 4),
            out_channels=official.get("out_channels", 4),
            block_out_channels=block_out,
            layers_per_block=official.get("layers_per_block", 2),
            num_attention_heads=int(heads),
            norm_num_groups=official.get("norm_num_groups", 32),
            norm_eps=official.get("norm_eps", 1e-5),
            cross_attention_dim=official.get("cross_attention_dim", 768),
            watermark_block_out_channels=tuple(watermark_block_out_channels),
            flip_sin_to_cos=official.get("flip_sin_to_cos", True),
            freq_shift=official.get("freq_shift", 0),
        )

    @classmethod
    def infer_from_state_dict(
        cls, state_dict: Mapping[str, torch.Tensor], num_attention_heads: int = 8, norm_num_groups: int = 32
    ) -> "UNetConfig":
        """Read every width from the checkpoint's shapes (head and group counts are not in the shapes)."""
        try:
            conv_in = state_dict["conv_in.weight"]
            levels = 1 + max(int(m.group(1)) for k in state_dict if (m := re.match(r"down_blocks\.(\d+)\.", k)))
            block_out = tuple(
                int(state_dict[f"down_blocks.{i}.resnets.0.conv1.weight"].shape[0]) for i in range(levels)
            )
            layers = 1 + max(
                int(m.group(1)) for k in state_dict if (m := re.match(r"down_blocks\.0\.resnets\.(\d+)\.", k))
            )
            watermark = tuple(
                int(state_dict[f"watermark_down_blocks.{i}.resnets.0.conv1.weight"].shape[0]) for i in range(3)
            )
            cross_dim = int(state_dict["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"].shape[1])
            out_channels = int(state_dict["conv_out.weight"].shape[0])
        except (KeyError, ValueError) as error:
            raise CheckpointError(
                f"cannot read the UNet shape from this state dict (missing {error}); "
                "is it a VideoBooth UNet (watermark_remove_module.pt / its safetensors conversion)?"
            ) from None
        return cls(
            in_channels=int(conv_in.shape[1]),
            out_channels=out_channels,
            block_out_channels=block_out,
            layers_per_block=layers,
            num_attention_heads=num_attention_heads,
            norm_num_groups=norm_num_groups,
            cross_attention_dim=cross_dim,
            watermark_block_out_channels=watermark,
        )

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "UNetConfig":
        return cls(**json.loads(text))


@dataclass(frozen=True)
class MapperConfig:
    """Shape of the image-feature mapper (defaults: CLIP ViT-L/14 → CLIP-L text, hidden width 1024)."""

    input_dim: int = 1024
    hidden_dim: int = 1024
    output_dim: int = 768
    num_levels: int = NUM_MAPPER_LEVELS
    site_channels: tuple[tuple[str, int], ...] = field(default_factory=tuple)
    """(UNet attention-site prefix, channel width) for every site whose K/V projections the mapper carries."""

    @classmethod
    def infer_from_state_dict(cls, state_dict: Mapping[str, torch.Tensor]) -> "MapperConfig":
        """Read the widths and the attention sites from a mapper state dict's shapes."""
        try:
            first = state_dict["mapping_0.0.weight"]
            last = state_dict["mapping_0.6.weight"]
        except KeyError as error:
            raise CheckpointError(
                f"cannot read the mapper shape from this state dict (missing {error}); "
                "is it a VideoBooth mapper (mapper.pt / its safetensors conversion)?"
            ) from None
        levels = 1 + max(int(m.group(1)) for k in state_dict if (m := re.match(r"mapping_(\d+)\.", k)))
        sites = []
        for key, tensor in state_dict.items():
            match = re.fullmatch(r"(.+)_transformer_blocks_0_attn1_to_k_new\.weight", key)
            if match:
                sites.append((site_prefix_from_mapper_stem(match.group(1)), int(tensor.shape[0])))
        return cls(
            input_dim=int(first.shape[1]),
            hidden_dim=int(first.shape[0]),
            output_dim=int(last.shape[0]),
            num_levels=levels,
            site_channels=tuple(sorted(sites)),
        )


def site_prefix_from_mapper_stem(stem: str) -> str:
    """``down_blocks_0_attentions_1`` → ``down_blocks.0.attentions.1`` (``mid_block`` keeps its underscore)."""
    return re.sub(r"_(\d+)", r".\1", stem).replace("_attentions", ".attentions")


def mapper_stem_from_site_prefix(prefix: str) -> str:
    """``down_blocks.0.attentions.1`` → ``down_blocks_0_attentions_1``."""
    return prefix.replace(".", "_")
