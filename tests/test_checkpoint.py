"""Loading weights (``videobooth_core.loading``): the safe reader, the safetensors header reader, unwrapping, kind
detection, strict assignment, and the VideoBooth UNet and mapper in both released layouts, conversion included."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from videobooth_core.app.tiny import MAPPER_FILE, TINY_UNET, UNET_FILE
from videobooth_core.errors import CheckpointError
from videobooth_core.loading.checkpoint import convert_released_weights, load_mapper, load_unet
from videobooth_core.loading.kinds import describe_checkpoint, detect_kind
from videobooth_core.loading.weight_files import (
    CONFIG_METADATA_KEY,
    read_safetensors_header,
    read_safetensors_metadata,
    read_state_dict,
    save_safetensors,
    unwrap_state_dict,
)
from videobooth_core.models.config import UNetConfig


def _fixture_unet_config(folder: Path) -> UNetConfig:
    config = json.loads((folder / "config.json").read_text())
    return UNetConfig.from_official(config["unet"], tuple(config["unet_watermark_block_out_channels"]))


# ----------------------------------------------------------------------------------------------------------------
# Reading files
# ----------------------------------------------------------------------------------------------------------------


def test_read_state_dict_formats(tmp_path: Path) -> None:
    sd = {"a.weight": torch.randn(3, 4), "b": torch.arange(5), "c.half": torch.randn(2).half()}
    save_file(sd, str(tmp_path / "x.safetensors"), metadata={"k": "v"})
    save_file(sd, str(tmp_path / "x.sft"))
    torch.save(sd, tmp_path / "x.pt")
    torch.save(sd, tmp_path / "x.bin")
    torch.save({"state_dict": sd}, tmp_path / "x.ckpt")
    torch.save(sd, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    for name in ("x.safetensors", "x.sft", "x.pt", "x.bin", "legacy.pth"):
        got = read_state_dict(tmp_path / name)
        assert got.keys() == sd.keys(), name
        for k in sd:
            assert got[k].dtype == sd[k].dtype and torch.equal(got[k], sd[k]), (name, k)
    ckpt = read_state_dict(tmp_path / "x.ckpt")
    assert list(ckpt) == ["state_dict"]
    assert unwrap_state_dict(ckpt).keys() == sd.keys()
    assert read_safetensors_metadata(tmp_path / "x.safetensors") == {"k": "v"}
    assert read_safetensors_metadata(tmp_path / "x.sft") == {}
    header = read_safetensors_header(tmp_path / "x.safetensors")
    assert {k: (e.dtype, e.shape) for k, e in header.entries.items()} == {k: (v.dtype, tuple(v.shape)) for k, v in sd.items()}
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        read_safetensors_metadata(tmp_path / "x.pt")


def test_read_state_dict_missing_folder_and_extension(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found") as err:
        read_state_dict(tmp_path / "nope.safetensors")
    assert "nope.safetensors" in str(err.value)
    with pytest.raises(CheckpointError, match="is a folder"):
        read_state_dict(tmp_path)
    (tmp_path / "w.npz").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="Unsupported weight file extension"):
        read_state_dict(tmp_path / "w.npz")
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="state dict"):
        read_state_dict(tmp_path / "list.pt")


def test_unwrap_state_dict_never_mutates() -> None:
    sd = {"w": torch.zeros(2), "b": torch.ones(1)}
    flat = unwrap_state_dict(sd)
    assert flat == sd and flat is not sd
    wrapped = {"state_dict": sd, "epoch": 3, "optimizer": {"lr": 0.1}}
    before = {k: v for k, v in wrapped.items()}
    assert unwrap_state_dict(wrapped).keys() == sd.keys()
    assert wrapped == before and wrapped["state_dict"] is sd and sd.keys() == {"w", "b"}
    assert unwrap_state_dict({"ema": sd, "step": 10}).keys() == sd.keys()
    assert unwrap_state_dict({"outer": {"model": sd}}).keys() == sd.keys()
    assert unwrap_state_dict({"ema_unet": sd, "unet": {"x": torch.zeros(1)}}, ("ema_unet",)).keys() == sd.keys()
    with pytest.raises(CheckpointError, match="several nested"):
        unwrap_state_dict({"a": sd, "b": sd}, source="two.pt")
    with pytest.raises(CheckpointError, match="non-tensor entries.*'name'"):
        unwrap_state_dict({"w": torch.zeros(1), "name": "x"})
    with pytest.raises(CheckpointError, match="no tensors"):
        unwrap_state_dict({})


class _Payload:
    """Unpickling this calls os.system: the kind of file that must never be unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path: Path, zip_format: bool) -> None:
    from videobooth_core.loading.vae import load_vae

    marker = tmp_path / "PAYLOAD_RAN"
    evil = tmp_path / "evil.pt"
    torch.save({"ema": {"w": torch.zeros(2), "x": _Payload(marker)}}, evil, _use_new_zipfile_serialization=zip_format)
    with pytest.raises(CheckpointError) as err:
        read_state_dict(evil)
    message = str(err.value)
    assert "evil.pt" in message and "other than tensors" in message and "refused for safety" in message
    assert "safetensors" in message and re.search(r"'(posix|nt)\.system'", message), message
    for loader in (load_mapper, load_vae):  # every loader reads through the one safe reader
        with pytest.raises(CheckpointError, match="refused for safety"):
            loader(evil)
    assert not marker.exists(), "the pickle payload ran"

    # Control: the file really is malicious (an unsafe load runs the payload, here only touching a temp file).
    control_marker = tmp_path / "CONTROL_RAN"
    control = tmp_path / "control.pt"
    torch.save({"x": _Payload(control_marker)}, control, _use_new_zipfile_serialization=zip_format)
    torch.load(control, weights_only=False)
    assert control_marker.exists()


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_pickled_module_is_refused(tmp_path: Path, zip_format: bool) -> None:
    path = tmp_path / "whole_model.pt"
    torch.save(torch.nn.Linear(2, 2), path, _use_new_zipfile_serialization=zip_format)
    with pytest.raises(CheckpointError, match=r"other than tensors \(it asks to import 'torch\.nn\.modules"):
        read_state_dict(path)


def test_truncated_and_corrupt_files(tmp_path: Path) -> None:
    sd = {"w": torch.randn(64, 64), "b": torch.randn(64)}
    save_file(sd, str(tmp_path / "full.safetensors"))
    torch.save(sd, tmp_path / "full.pt")
    torch.save(sd, tmp_path / "full_legacy.pt", _use_new_zipfile_serialization=False)
    cases = []
    for name in ("full.safetensors", "full.pt", "full_legacy.pt"):
        data = (tmp_path / name).read_bytes()
        for cut in (0, 3, 40, len(data) // 2, len(data) - 7):
            target = tmp_path / f"cut{cut}_{name}"
            target.write_bytes(data[:cut])
            cases.append(target)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a checkpoint at all")
    cases.append(garbage)
    for target in cases:
        readers = [read_state_dict] + ([read_safetensors_header] if target.suffix == ".safetensors" else [])
        for reader in readers:
            with pytest.raises(CheckpointError) as err:
                reader(target)
            message = str(err.value)
            assert str(target) in message, message
            assert "incomplete or corrupt" in message and "download" in message, message


# ----------------------------------------------------------------------------------------------------------------
# The VideoBooth UNet and mapper
# ----------------------------------------------------------------------------------------------------------------


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
    assert not unet.training and not any(p.requires_grad for p in unet.parameters())
    mapper = load_mapper(tiny_models / MAPPER_FILE)
    assert {site for site, _ in mapper.config.site_channels} == {s.site for s in unet.attention_sites}
    unet.attach_projections(mapper.site_projections())  # every site finds its projections
    assert {p.dtype for p in load_unet(tiny_models / UNET_FILE, dtype=torch.bfloat16).parameters()} == {torch.bfloat16}


def test_kind_is_told_by_keys(tiny_models: Path, parity_fixture: Path) -> None:
    with pytest.raises(CheckpointError, match="holds a VideoBooth mapper, but a VideoBooth UNet was expected"):
        load_unet(tiny_models / MAPPER_FILE)
    with pytest.raises(CheckpointError, match=r"holds a VAE \(AutoencoderKL, original LDM key layout\)"):
        load_mapper(next((tiny_models / "vae").glob("*.safetensors")))
    assert detect_kind(load_file(str(parity_fixture / "unet.safetensors"))) == "videobooth_unet"
    assert detect_kind(torch.load(tiny_models / MAPPER_FILE, weights_only=True)) == "wrapped_videobooth_mapper"
    assert detect_kind({"model.diffusion_model.input_blocks.0.0.weight": 0}) == "image_unet"
    openclip_text = {"token_embedding.weight": 0, "transformer.resblocks.0.ln_1.weight": 0}
    assert detect_kind(openclip_text) == "openclip_text"  # recognised, never taken for a loadable CLIP text encoder
    assert describe_checkpoint({"foo.weight": 0}) == "an unrecognised model (first keys: foo.weight)"


def test_incomplete_file_names_first_missing_keys(tmp_path: Path, parity_fixture: Path) -> None:
    state = load_file(str(parity_fixture / "unet.safetensors"))
    dropped = "up_blocks.1.attentions.0.transformer_blocks.0.attn_temp.to_q.weight"
    del state[dropped]
    state["extra.weight"] = torch.zeros(1)
    broken = tmp_path / "broken.safetensors"
    save_file(state, str(broken))
    with pytest.raises(CheckpointError, match=rf"missing keys \(1\): '{re.escape(dropped)}'.*"
                                              r"unexpected keys \(1\): 'extra\.weight'"):
        load_unet(broken, _fixture_unet_config(parity_fixture))


@pytest.mark.parametrize("stored", ["{not json", '["a list"]', '{"block_out_channels": [32, 48], "norm_num_groups": 32}',
                                    '{"no_such_field": 1}'])
def test_a_bad_embedded_unet_config_is_a_checkpoint_error(tmp_path: Path, tiny_models: Path, stored: str) -> None:
    from videobooth_core.loading.streaming import load_unet_streamed

    state = torch.load(tiny_models / UNET_FILE, weights_only=True)["ema_unet"]
    path = tmp_path / "videobooth_unet.safetensors"
    save_safetensors(state, path, {CONFIG_METADATA_KEY: stored})
    for loader in (load_unet, load_unet_streamed):
        with pytest.raises(CheckpointError, match=f"'{CONFIG_METADATA_KEY}' metadata of .*videobooth_unet.safetensors"):
            loader(path)


def test_a_bad_embedded_unet_config_is_one_error_line_from_the_command_line(tmp_path: Path, tiny_models: Path,
                                                                           capsys) -> None:
    from videobooth_core.app.cli import main

    models = tmp_path / "models"
    (models / "videobooth").mkdir(parents=True)
    for sub in ("vae", "clip_vision", "text_encoders"):
        (models / sub).symlink_to(tiny_models / sub, target_is_directory=True)
    (models / MAPPER_FILE).symlink_to(tiny_models / MAPPER_FILE)
    state = torch.load(tiny_models / UNET_FILE, weights_only=True)["ema_unet"]
    bad = '{"block_out_channels": [32, 48], "norm_num_groups": 32}'  # watermark widths that cannot fit
    save_safetensors(state, models / "videobooth" / "videobooth_unet.safetensors", {CONFIG_METADATA_KEY: bad})
    out = tmp_path / "clip.gif"
    code = main(["generate", "--models", str(models), "--prompt", "a cat", "--frames", "2", "--width", "64",
                 "--height", "64", "--steps", "1", "--out", str(out)])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip() and not line.startswith("WARNING")]
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("error: ") and "videobooth_unet.safetensors" in lines[0], lines[0]
    assert "watermark_block_out_channels" in lines[0] and "convert" in lines[0], lines[0]
    assert not out.exists()


def test_a_full_clip_fills_the_text_and_the_vision_role(tmp_path: Path, tiny_models: Path) -> None:
    """The openai/clip-vit-large-patch14 folder (both towers) serves as text encoder and vision encoder, from
    text_encoders/ alone, and as the evaluation's CLIP; a folder's own single-tower file still wins."""
    import shutil

    import transformers

    from videobooth_core.app.tiny import CLIP_TEXT_FILE, TOKENIZER_DIR, tiny_clip_text_config, tiny_clip_vision_config
    from videobooth_core.loading.clip import load_clip_text_encoder, load_clip_vision_encoder
    from videobooth_core.evaluation.models import find_clip, is_full_clip
    from videobooth_core.loading.models_dir import ModelFiles, kind_of

    models = tmp_path / "models"
    for sub in ("videobooth", "vae"):
        (models / sub).parent.mkdir(parents=True, exist_ok=True)
        (models / sub).symlink_to(tiny_models / sub, target_is_directory=True)
    full = models / "text_encoders" / "clip-vit-large-patch14"
    config = transformers.CLIPConfig(text_config=tiny_clip_text_config().to_dict(),
                                     vision_config=tiny_clip_vision_config().to_dict(), projection_dim=16)
    torch.manual_seed(0)
    transformers.CLIPModel(config).save_pretrained(full)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(tiny_models / TOKENIZER_DIR / name, full / name)
    assert kind_of(full) == "clip_full" and is_full_clip(full)

    files = ModelFiles.from_models_dir(models)
    assert files.clip_text == files.clip_vision == files.tokenizer == full
    assert load_clip_text_encoder(files.clip_text).config.hidden_size == 32
    assert load_clip_vision_encoder(files.clip_vision).config.num_hidden_layers == 18
    assert find_clip(models) == full

    (models / "clip_vision").mkdir()
    moved = full.rename(models / "clip_vision" / full.name)
    files = ModelFiles.from_models_dir(models)  # the vision folder's full CLIP serves the text role too
    assert files.clip_text == files.clip_vision == files.tokenizer == moved
    shutil.copy(tiny_models / CLIP_TEXT_FILE, models / CLIP_TEXT_FILE)  # ... unless text_encoders/ has its own
    files = ModelFiles.from_models_dir(models)
    assert files.clip_vision == moved and files.clip_text == models / CLIP_TEXT_FILE


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
    assert sorted(p.name for p in out.iterdir()) == ["videobooth_mapper.safetensors", "videobooth_unet.safetensors"]


def test_convert_refuses_a_foreign_file_before_writing(tmp_path: Path, tiny_models: Path) -> None:
    out = tmp_path / "converted"
    with pytest.raises(CheckpointError):
        convert_released_weights(tiny_models / UNET_FILE, next((tiny_models / "vae").glob("*")), out, "fp16")
    assert not out.exists() or not any(out.iterdir())
