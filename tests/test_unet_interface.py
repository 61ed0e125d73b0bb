"""The UNet's image-prompt interface: the mapper's projections are resolved (and checked) once, when attached."""

from __future__ import annotations

import pytest
import torch

from videobooth_core.app.tiny import TINY_MAPPER_HIDDEN, TINY_UNET
from videobooth_core.errors import ModelMismatchError, SamplingError
from videobooth_core.models.config import MapperConfig
from videobooth_core.models.mapper import Mapper
from videobooth_core.models.unet_3d import UNet3DModel


def _meta_unet() -> UNet3DModel:
    with torch.device("meta"):  # shapes only: the checks never read weights
        return UNet3DModel(TINY_UNET)


def _meta_mapper(unet: UNet3DModel, text_width: int = TINY_UNET.cross_attention_dim, drop_sites: int = 0,
                 dtype: torch.dtype = torch.float32) -> Mapper:
    sites = tuple((site.site, site.proj_in.out_channels) for site in unet.attention_sites)
    config = MapperConfig(input_dim=16, hidden_dim=TINY_MAPPER_HIDDEN, output_dim=text_width,
                          site_channels=sites[: len(sites) - drop_sites])
    with torch.device("meta"):
        return Mapper(config).to(dtype)


@pytest.mark.parametrize(("mapper_options", "detail"), [
    ({"drop_sites": 1},
     r"10 attention sites, mapper\.pt projections for 9; first missing site: 'up_blocks\.3\.attentions\.1'"),
    ({"text_width": 16}, r"needs text_key weights of shape \(32, 32\), mapper\.pt's are: \(32, 16\)"),
    ({"dtype": torch.bfloat16}, r"unet\.safetensors is torch\.float32, mapper\.pt's projections are: torch\.bfloat16"),
], ids=["sites", "widths", "precision"])
def test_a_mapper_of_another_model_is_refused_naming_both_files(mapper_options: dict, detail: str) -> None:
    unet = _meta_unet()
    mapper = _meta_mapper(unet, **mapper_options)
    with pytest.raises(ModelMismatchError, match=rf"mapper\.pt does not belong to unet\.safetensors: .*{detail}"):
        unet.attach_projections(mapper.site_projections(), release_own=True,
                                unet_name="unet.safetensors", mapper_name="mapper.pt")
    # refused before anything changed: the UNet still attends with its own projections
    block = unet.attention_sites[0].transformer_blocks[0]
    assert unet.attached_projections is None and not unet.released_own_projections
    assert block.attn1.key_value.key is block.attn1.to_k and block.attn1.image_prompt_key_value is None


def test_attaching_resolves_every_sites_projections_once() -> None:
    unet = _meta_unet()
    mapper = _meta_mapper(unet)
    projections = mapper.site_projections()
    unet.attach_projections(projections, release_own=True)
    for site in unet.attention_sites:
        block, p = site.transformer_blocks[0], projections[site.site]
        assert (block.attn1.key_value.key, block.attn1.key_value.value) == (p.attn1_key, p.attn1_value)
        assert block.attn1.image_prompt_key_value.key is p.image_prompt_key
        assert (block.attn2.key_value.key, block.attn2.key_value.value) == (p.text_key, p.text_value)
        assert block.attn_temp.key_value.key is block.attn_temp.to_k  # temporal attention keeps its own
        assert block.attn1.to_k is None and block.attn2.to_v is None  # released
    assert not any(name.startswith("mapping") for name in unet.state_dict())  # referenced, not registered


def test_image_prompt_features_need_the_mappers_projections() -> None:
    unet = _meta_unet()
    sample, text = torch.empty((1, 4, 2, 8, 8), device="meta"), torch.empty((1, 77, 32), device="meta")
    features = unet.capture_image_prompt_features(sample, 500, text)
    assert sorted(features) == sorted(site.site for site in unet.attention_sites)
    assert features["mid_block.attentions.0"].shape == (1, 1, 64)  # frame 0's tokens at the 1x1 middle
    with pytest.raises(SamplingError, match="attach_projections"):
        unet(sample, 500, text, image_prompt_features=features)
