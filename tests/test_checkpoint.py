"""Loading the VideoBooth UNet and mapper: both released layouts, strictness, safety, conversion."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from videobooth_core.loading.checkpoint import (
    CONFIG_METADATA_KEY,
    convert_released_weights,
    detect_kind,
    load_mapper,
    load_unet,
)
from videobooth_core.models.config import UNetConfig
from videobooth_core.loading.encoders import read_safetensors_metadata
from videobooth_core.errors import CheckpointError
from videobooth_core.app.tiny import MAPPER_FILE, TINY_UNET, UNET_FILE


def _fixture_unet_config(folder: Path) -> UNetConfig:
    config = json.loads((folder / "config.json").read_text())
    return UNetConfig.from_official(config["unet"], tuple(config["unet_watermark_block_out_channels"]))


def test_pt_and_safetensors_layouts_load_identically(parity_fixture: Path) -> None:
    config = _fixture_unet_config(parity_fixture)
    from_pt = load_unet(parity_fixture / "unet.pt", config).state_dict()
    from_st = load_unet(parity_fixture / "unet.safetensors", config).state_dict()
    assert from_pt.keys() == from_st.keys()
    assert all(torch.equal(from_pt[k], from_st[k]) for k in from_pt)
    mapper_pt = load_mapper(parity_fixture / "mapper.pt").state_dict()
    mapper_st = load_mapper(parity_fixture / "mapper.safetensors").state_dict()
    assert all(torch.equal(mapper_pt[k], mapper_st[k]) for k in mapper_pt)


def test_released_pickles_need_no_config(tiny_models: Path) -> None:
    """make-tiny writes the released layout ({'ema_unet': ...}); every width is read from the shapes."""
    unet = load_unet(tiny_models / UNET_FILE)
    assert unet.config == TINY_UNET
    assert not any(p.is_meta for p in unet.parameters())
    mapper = load_mapper(tiny_models / MAPPER_FILE)
    assert {site for site, _ in mapper.config.site_channels} == {s.site for s in unet.attention_sites}
    unet.attach_projections(mapper.site_projections())  # every site finds its projections


def test_requested_dtype_and_device(tiny_models: Path) -> None:
    unet = load_unet(tiny_models / UNET_FILE, dtype=torch.bfloat16)
    assert {p.dtype for p in unet.parameters()} == {torch.bfloat16}


def test_wrong_kind_is_named(tiny_models: Path, parity_fixture: Path) -> None:
    with pytest.raises(CheckpointError, match="holds a VideoBooth mapper, but a VideoBooth UNet was expected"):
        load_unet(tiny_models / MAPPER_FILE)
    with pytest.raises(CheckpointError, match="holds a VAE"):
        load_mapper(next((tiny_models / "vae").glob("*.safetensors")))
    assert detect_kind(load_file(str(parity_fixture / "unet.safetensors"))) == "videobooth_unet"


def test_incomplete_file_names_first_missing_keys(tmp_path: Path, parity_fixture: Path) -> None:
    state = load_file(str(parity_fixture / "unet.safetensors"))
    dropped = "up_blocks.1.attentions.0.transformer_blocks.0.attn_temp.to_q.weight"
    del state[dropped]
    state["extra.weight"] = torch.zeros(1)
    broken = tmp_path / "broken.safetensors"
    save_file(state, str(broken))
    with pytest.raises(CheckpointError) as error:
        load_unet(broken, _fixture_unet_config(parity_fixture))
    assert dropped in str(error.value) and "extra.weight" in str(error.value)


def test_truncated_pickle(tmp_path: Path, tiny_models: Path) -> None:
    data = (tiny_models / UNET_FILE).read_bytes()
    truncated = tmp_path / "watermark_remove_module.pt"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="incomplete or corrupt"):
        load_unet(truncated)


class _Payload:
    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_malicious_pickle_is_refused_and_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "payload_ran"
    payload = _Payload()
    payload.marker = str(marker)
    evil = tmp_path / "mapper.pt"
    with evil.open("wb") as handle:
        pickle.dump({"ema": {"mapping_0.0.weight": payload}}, handle)
    with pytest.raises(CheckpointError, match="refused|Refused"):
        load_mapper(evil)
    assert not marker.exists()


def test_convert_writes_loadable_fp16_safetensors(tmp_path: Path, tiny_models: Path) -> None:
    out = tmp_path / "converted"
    unet_path, mapper_path = convert_released_weights(tiny_models / UNET_FILE, tiny_models / MAPPER_FILE, out, "fp16")
    meta = read_safetensors_metadata(unet_path)
    assert UNetConfig.from_json(meta[CONFIG_METADATA_KEY]) == TINY_UNET
    converted = load_file(str(unet_path))
    original = torch.load(tiny_models / UNET_FILE, weights_only=True)["ema_unet"]
    assert converted.keys() == original.keys()
    assert all(converted[k].dtype == torch.float16 and torch.equal(converted[k], original[k].half()) for k in original)
    assert load_unet(unet_path).config == TINY_UNET
    assert len(load_mapper(mapper_path).state_dict()) == len(torch.load(tiny_models / MAPPER_FILE, weights_only=True)["ema"])
    assert not list(out.glob("*.partial"))


def test_convert_refuses_a_foreign_file_before_writing(tmp_path: Path, tiny_models: Path) -> None:
    out = tmp_path / "converted"
    with pytest.raises(CheckpointError):
        convert_released_weights(tiny_models / UNET_FILE, next((tiny_models / "vae").glob("*")), out, "fp16")
    assert not out.exists() or not any(out.iterdir())
