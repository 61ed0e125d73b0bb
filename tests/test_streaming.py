"""Weight streaming: the UNet reads each block's weights from its safetensors file just before the block runs."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import pytest
import torch

from videobooth_core.loading.checkpoint import convert_released_weights
from videobooth_core.loading.weight_files import CONFIG_METADATA_KEY, save_safetensors
from videobooth_core.errors import CheckpointError
from videobooth_core.sampling.memory import estimate_step_memory, resident_weight_bytes
from videobooth_core.sampling.denoiser import VideoDenoiser
from videobooth_core.loading.streaming import SafetensorsReader, load_unet_streamed, streaming_units
from videobooth_core.app.tiny import tiny_unet_and_mapper

SHAPE = (1, 4, 3, 8, 8)


@pytest.fixture(scope="module")
def tiny_unet_file(tmp_path_factory) -> tuple[Path, torch.nn.Module, torch.nn.Module]:
    unet, mapper = tiny_unet_and_mapper(vision_width=32, text_width=32)
    path = tmp_path_factory.mktemp("streamed") / "videobooth_unet.safetensors"
    save_safetensors(unet.state_dict(), path, {CONFIG_METADATA_KEY: unet.config.to_json()})
    return path, unet, mapper


def test_every_weight_belongs_to_exactly_one_unit(tiny_unet_file) -> None:
    path, unet, _ = tiny_unet_file
    covered = [f"{prefix}.{name}" for prefix, unit in streaming_units(unet) for name, _ in unit.named_parameters()]
    assert sorted(covered) == sorted(name for name, _ in unet.named_parameters())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_streamed_unet_computes_exactly_what_the_resident_one_does(tiny_unet_file, dtype) -> None:
    path, unet, mapper = tiny_unet_file
    resident_unet = type(unet)(unet.config)
    resident_unet.load_state_dict(unet.state_dict())
    resident_unet = resident_unet.to(dtype).eval()
    streamed = load_unet_streamed(path, dtype=dtype)
    assert all(p.device.type == "meta" for p in streamed.parameters())  # nothing resident before a call
    mapper = copy.deepcopy(mapper).to(dtype)  # Module.to works in place: leave the fixture's alone
    for model in (resident_unet, streamed):
        model.attach_projections(mapper.site_projections(), release_own=True)
    text = torch.randn((2, 77, 32), generator=torch.Generator().manual_seed(0))
    x_t = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    exemplar = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = VideoDenoiser(resident_unet, text[:1], text[1:]).predict(x_t, 300, exemplar)
        got = VideoDenoiser(streamed, text[:1], text[1:]).predict(x_t, 300, exemplar)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert all(p.device.type == "meta" for p in streamed.parameters())  # every block released its weights
    file_bytes = sum(p.numel() * 4 for p in resident_unet.parameters())  # the file holds fp32, released K/V excluded
    assert streamed.weight_streamer.bytes_read == 2 * file_bytes  # two UNet calls per guided step


def test_estimate_counts_one_block_of_a_streamed_unet(tiny_unet_file) -> None:
    path, _, mapper = tiny_unet_file
    streamed = load_unet_streamed(path)
    streamed.attach_projections(mapper.site_projections(), release_own=True)
    text = torch.zeros((1, 77, 32))
    estimate = estimate_step_memory(VideoDenoiser(streamed, text, text), SHAPE, True, "cpu", [mapper])
    largest = max(sum(p.numel() for p in unit.parameters()) * 4 for _, unit in streaming_units(streamed))
    assert estimate.weights_bytes == resident_weight_bytes([mapper]) + largest


def test_bad_files_are_refused_with_the_fix(tmp_path, tiny_unet_file) -> None:
    path, _, _ = tiny_unet_file
    with pytest.raises(CheckpointError, match="convert"):
        load_unet_streamed(tmp_path / "watermark_remove_module.pt")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_unet_streamed(truncated)
    foreign = tmp_path / "foreign.safetensors"
    save_safetensors({"decoder.conv_in.weight": torch.zeros(4, 4)}, foreign, {})
    with pytest.raises(CheckpointError, match="missing keys"):
        load_unet_streamed(foreign, config=tiny_unet_file[1].config)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match="not a valid safetensors"):
        SafetensorsReader(garbage)


def test_pipeline_streams_a_converted_unet_to_the_same_video(tiny_models, tmp_path) -> None:
    from videobooth_core.pipeline import GenerationRequest, VideoBoothPipeline

    with pytest.raises(CheckpointError, match="convert"):  # the released layout is a pickle
        VideoBoothPipeline.from_models_dir(str(tiny_models), stream_weights=True)
    models = tmp_path / "models"
    shutil.copytree(tiny_models, models)
    pickle = models / "videobooth" / "watermark_remove_module.pt"
    convert_released_weights(pickle, None, models / "videobooth", dtype="fp32")
    pickle.unlink()

    request = dict(prompt="a ball rolling on the grass", frames=3, width=64, height=64, steps=2, seed=3)
    resident = VideoBoothPipeline.from_models_dir(str(models)).generate(GenerationRequest(**request), decode=False)
    pipe = VideoBoothPipeline.from_models_dir(str(models), stream_weights=True)
    streamed = pipe.generate(GenerationRequest(**request), decode=False)
    torch.testing.assert_close(streamed.latents, resident.latents, rtol=0, atol=0)
    assert streamed.info["estimated_weights_mb"] < resident.info["estimated_weights_mb"]
