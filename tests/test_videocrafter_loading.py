"""VideoCrafter checkpoints on disk (issue 26): pickles read only with ``weights_only=True`` (a malicious one is refused
and nothing in it runs), kinds told from keys, strict loading with teaching errors, and the safetensors converter
(fp16 by default; an fp32 conversion loads bit-identically to its pickle)."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch

from conftest import FIXTURES
from videobooth_core.errors import CheckpointError, OutputError
from videobooth_core.loading.videocrafter import (
    PROJECTOR_PREFIX,
    UNET_PREFIX,
    convert_videocrafter_checkpoint,
    detect_videocrafter_kind,
    load_image_projector,
    load_videocrafter_unet,
    missing_encoders,
    read_videocrafter_checkpoint,
)
from videobooth_core.loading.weight_files import read_safetensors_metadata
from videobooth_core.models.videocrafter.config import ImageProjectorConfig

ROOT = FIXTURES / "videocrafter_tiny"
TINY_PROJECTOR = ImageProjectorConfig(dim=32, depth=4, dim_head=8, heads=4, num_queries=16, embedding_dim=48,
                                      output_dim=32)


class _RunsCode:
    """A pickle payload that would create a file when unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (str(self.marker),))


def test_a_malicious_pickle_is_refused_and_nothing_in_it_runs(tmp_path: Path) -> None:
    marker = tmp_path / "the_payload_ran"
    path = tmp_path / "model.ckpt"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": {"model.diffusion_model.init_attn.0.proj_in.weight": _RunsCode(marker)}}, f)
    with pytest.raises(CheckpointError, match="refused.*safetensors"):
        read_videocrafter_checkpoint(path)
    assert not marker.exists()


def test_a_file_of_another_model_is_named_as_such(tmp_path: Path) -> None:
    path = tmp_path / "sd.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)}}, path)
    with pytest.raises(CheckpointError, match=r"not a VideoCrafter1/2 checkpoint.*Text2Video-512 model\.ckpt"):
        read_videocrafter_checkpoint(path)


def test_kinds_are_told_apart_by_their_keys() -> None:
    base = {UNET_PREFIX + "init_attn.0.proj_in.weight"}
    assert detect_videocrafter_kind(base) == "videocrafter1-t2v-512"
    assert detect_videocrafter_kind(base | {UNET_PREFIX + "fps_embedding.0.weight"}) == "videocrafter1-t2v-1024"
    conv = UNET_PREFIX + "input_blocks.1.0.temopral_conv.conv1.0.weight"
    assert detect_videocrafter_kind(base | {conv}) == "videocrafter2"
    ip = UNET_PREFIX + "input_blocks.1.1.transformer_blocks.0.attn2.to_k_ip.weight"
    assert detect_videocrafter_kind(base | {conv, ip}) == "videocrafter1-i2v-512"
    assert detect_videocrafter_kind({UNET_PREFIX + "input_blocks.0.0.weight"}) is None


def test_a_truncated_unet_is_refused_naming_the_missing_key(tmp_path: Path) -> None:
    _, state = read_videocrafter_checkpoint(ROOT / "t2v_512_v1" / "model.ckpt")
    state = dict(state)
    del state[UNET_PREFIX + "middle_block.1.transformer_blocks.0.attn1.to_q.weight"]
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": state}, path)
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): 'model\.diffusion_model\.middle_block\.1\."):
        load_videocrafter_unet(path)


def test_the_missing_encoders_are_named_with_where_they_go() -> None:
    kind, state = read_videocrafter_checkpoint(ROOT / "i2v_512_v1" / "model.ckpt")
    missing = missing_encoders(kind, state)
    assert len(missing) == 2
    assert "cond_stage_model.model.*" in missing[0] and "clip_h" in missing[0]
    assert "embedder.model.*" in missing[1] and "clip_vision_h" in missing[1]


def test_an_fp32_conversion_loads_bit_identically_to_the_pickle(tmp_path: Path) -> None:
    source = ROOT / "t2v_512_v2" / "model.ckpt"
    target = convert_videocrafter_checkpoint(source, tmp_path / "vc2.safetensors", dtype=torch.float32)
    _, from_pickle = load_videocrafter_unet(source)
    kind, from_safetensors = load_videocrafter_unet(target)
    assert kind == "videocrafter2"
    pickled, converted = from_pickle.state_dict(), from_safetensors.state_dict()
    assert pickled.keys() == converted.keys()
    assert all(torch.equal(pickled[k], converted[k]) and converted[k].dtype == torch.float32 for k in pickled)
    # the whole checkpoint travels, under its released names
    _, every = read_videocrafter_checkpoint(source)
    _, every_converted = read_videocrafter_checkpoint(target)
    assert every.keys() == every_converted.keys()


def test_the_default_conversion_is_fp16_with_the_kind_and_configs_stored(tmp_path: Path) -> None:
    source = ROOT / "i2v_512_v1" / "model.ckpt"
    target = convert_videocrafter_checkpoint(source, tmp_path / "i2v.safetensors", projector_config=TINY_PROJECTOR)
    metadata = read_safetensors_metadata(target)
    assert metadata["videobooth_kind"] == "videocrafter1-i2v-512" and metadata["videobooth_dtype"] == "float16"
    _, state = read_videocrafter_checkpoint(source)
    _, converted = read_videocrafter_checkpoint(target)
    assert all(torch.equal(converted[k], v.half()) for k, v in state.items())
    # the stored projector config (4 heads, which no shape records) is the one the loader uses
    projector = load_image_projector(target, converted)
    assert projector.config == TINY_PROJECTOR
    assert projector.latents.dtype == torch.float16
    assert {PROJECTOR_PREFIX + k for k in projector.state_dict()} <= converted.keys()
    tokens = torch.randn(1, 5, 48)
    reference = load_image_projector(source, state, config=TINY_PROJECTOR)
    with torch.no_grad():
        assert torch.equal(projector.float()(tokens), reference.half().float()(tokens))


def test_the_converter_never_overwrites(tmp_path: Path) -> None:
    target = tmp_path / "vc1.safetensors"
    target.write_bytes(b"the user's file")
    with pytest.raises(OutputError, match="already exists"):
        convert_videocrafter_checkpoint(ROOT / "t2v_512_v1" / "model.ckpt", target)
    assert target.read_bytes() == b"the user's file"
