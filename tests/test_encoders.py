"""The frozen encoders (``videobooth_core.conditioning``): CLIP text and vision towers, the VAE, the CLIP tokenizer,
from every layout they come in, and the tiny ones of ``videobooth_core.app.tiny`` (CPU, offline)."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import tiny_builders
from videobooth_core.app import tiny
from videobooth_core.conditioning.vae import vae_decode, vae_encode
from videobooth_core.conditioning.tokenizer import load_clip_tokenizer
from videobooth_core.errors import CheckpointError, VideoBoothError
from videobooth_core.loading import clip
from videobooth_core.loading import vae as V
from videobooth_core.loading.weight_files import CONFIG_METADATA_KEY, read_safetensors_metadata


@pytest.fixture(autouse=True)
def _no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail loudly if anything tries to open a network connection (conftest sets the offline variables)."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype, k
        assert torch.equal(sa[k], sb[k]), k


def _ids(n: int = 2, vocab: int = 49408, length: int = 77, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab - 2, (n, length), generator=g)
    ids[:, 0] = vocab - 2
    ids[:, -1] = vocab - 1
    return ids


def _pixels(n: int = 1, size: int = 224, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _text_out(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).last_hidden_state


def _vision_out(model: torch.nn.Module, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        out = model(pixels, output_hidden_states=True)
    return (out.last_hidden_state, *out.hidden_states)


# Small configs whose heads follow the 64-wide rule, so that shape inference (no metadata) recovers them exactly.
def _inferable_text_config():
    import transformers

    return transformers.CLIPTextConfig(
        vocab_size=1000, hidden_size=128, intermediate_size=256, projection_dim=48, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=77, hidden_act="quick_gelu",
    )


def _inferable_vision_config():
    import transformers

    return transformers.CLIPVisionConfig(
        hidden_size=128, intermediate_size=256, projection_dim=48, num_hidden_layers=3, num_attention_heads=2,
        image_size=28, patch_size=14, hidden_act="quick_gelu",
    )


def _inferable_vae_config() -> dict:
    cfg = tiny.tiny_vae_config()
    cfg.update(block_out_channels=[32, 32, 64, 64], norm_num_groups=32, sample_size=256)
    return cfg


@pytest.fixture(scope="module")
def tiny_text():
    return tiny_builders.build_tiny_clip_text_encoder(seed=0)


@pytest.fixture(scope="module")
def tiny_vision():
    return tiny_builders.build_tiny_clip_vision_encoder(seed=0)


@pytest.fixture(scope="module")
def tiny_vae():
    return tiny_builders.build_tiny_vae(seed=0)


# ----------------------------------------------------------------------------------------------------------------
# CLIP text encoder
# ----------------------------------------------------------------------------------------------------------------


def test_fixture_text_encoder_matches_transformers_and_official_outputs(parity_fixture: Path) -> None:
    import transformers

    folder = parity_fixture / "text_encoder"
    ours = clip.load_clip_text_encoder(folder)
    ref = transformers.CLIPTextModel.from_pretrained(folder, attn_implementation="eager").eval()
    assert isinstance(ours, transformers.CLIPTextModel)
    assert not ours.training and not any(p.requires_grad for p in ours.parameters())
    assert ours.config._attn_implementation == "eager"
    _assert_same_state(ours, ref)
    assert torch.equal(ours.embeddings.position_ids, torch.arange(77)[None])
    inputs = load_file(str(parity_fixture / "inputs.safetensors"))
    outputs = load_file(str(parity_fixture / "outputs.safetensors"))
    null_ids = inputs["null_input_ids"]
    got = _text_out(ours, torch.cat([null_ids, inputs["cond_input_ids"]]))
    assert torch.equal(got, _text_out(ref, torch.cat([null_ids, inputs["cond_input_ids"]])))
    expected = outputs["text.null_last_hidden_state"]
    scale = max(1.0, expected.abs().max().item())
    torch.testing.assert_close(got[:1], expected, rtol=1e-5, atol=1e-5 * scale)
    sdpa = clip.load_clip_text_encoder(folder, attn_implementation="sdpa")
    assert sdpa.config._attn_implementation == "sdpa"
    torch.testing.assert_close(_text_out(sdpa, null_ids), expected, rtol=1e-5, atol=1e-5 * scale)
    with pytest.raises(VideoBoothError, match="attn_implementation"):
        clip.load_clip_text_encoder(folder, attn_implementation="flash")


def test_tiny_text_config_and_builder(tiny_text) -> None:
    cfg = tiny_text.config
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads) == (49408, 32, 2, 4)
    assert (cfg.intermediate_size, cfg.max_position_embeddings, cfg.hidden_act, cfg.projection_dim) == (
        64, 77, "quick_gelu", 32
    )
    again = tiny_builders.build_tiny_clip_text_encoder(seed=0)
    _assert_same_state(tiny_text, again)
    other = tiny_builders.build_tiny_clip_text_encoder(seed=1)
    assert not torch.equal(other.final_layer_norm.weight, tiny_text.final_layer_norm.weight)
    assert not torch.equal(tiny_text.final_layer_norm.bias, torch.zeros(32))  # norms are randomised too


def test_tiny_text_single_file_and_folder_round_trip(tiny_text, tmp_path: Path) -> None:
    path = tmp_path / "clip_l.safetensors"
    clip.save_clip_text_single_file(tiny_text, path)
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
        meta = json.loads(f.metadata()[CONFIG_METADATA_KEY])
    assert "text_model.embeddings.token_embedding.weight" in keys
    assert not any(k.endswith("position_ids") for k in keys)
    assert meta["num_attention_heads"] == 4 and meta["hidden_size"] == 32
    ids = _ids()
    loaded = clip.load_clip_text_encoder(path)
    _assert_same_state(loaded, tiny_text)
    assert torch.equal(_text_out(loaded, ids), _text_out(tiny_text, ids))

    tiny_text.save_pretrained(tmp_path / "folder")
    from_folder = clip.load_clip_text_encoder(tmp_path / "folder")
    _assert_same_state(from_folder, tiny_text)
    assert torch.equal(_text_out(from_folder, ids), _text_out(tiny_text, ids))

    half = clip.load_clip_text_encoder(path, dtype=torch.bfloat16, device="cpu")
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())
    assert half.embeddings.position_ids.dtype == torch.int64


@pytest.mark.parametrize(
    "prefix", ["text_model.", "cond_stage_model.transformer.text_model.", "transformer.text_model.", ""]
)
def test_text_single_file_prefixes_extras_and_inference(prefix: str, tmp_path: Path) -> None:
    model = tiny_builders.build_tiny_clip_text_encoder(seed=3, config=_inferable_text_config())
    canonical = {k[len("text_model."):]: v for k, v in clip._single_file_tensors(model, "text_model").items()}
    sd = {prefix + k: v for k, v in canonical.items()}
    parent = prefix[: -len("text_model.")] if prefix.endswith("text_model.") else prefix
    sd[parent + "text_projection.weight"] = torch.randn(48, 128)
    sd[parent + "logit_scale"] = torch.tensor(4.6)
    sd[prefix + "embeddings.position_ids"] = torch.arange(77, dtype=torch.float32)[None] * 0.5  # corrupt, ignored
    if prefix.startswith("cond_stage_model."):
        sd["model.diffusion_model.input_blocks.0.0.weight"] = torch.randn(4, 4, 3, 3)
        sd["first_stage_model.encoder.conv_in.weight"] = torch.randn(8, 3, 3, 3)
    torch.save({"state_dict": sd, "global_step": 7}, tmp_path / "text.ckpt")
    save_file(sd, str(tmp_path / "text.safetensors"))  # no metadata: config inferred from shapes
    ids = _ids(vocab=1000)
    for name in ("text.ckpt", "text.safetensors"):
        loaded = clip.load_clip_text_encoder(tmp_path / name)
        cfg = loaded.config
        assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.intermediate_size) == (
            128, 2, 2, 256
        )
        assert (cfg.vocab_size, cfg.max_position_embeddings, cfg.hidden_act, cfg.projection_dim) == (
            1000, 77, "quick_gelu", 48
        )
        _assert_same_state(loaded, model)
        assert torch.equal(loaded.embeddings.position_ids, torch.arange(77)[None])
        assert torch.equal(_text_out(loaded, ids), _text_out(model, ids))


def test_full_clip_model_folder_and_pipeline_root(tmp_path: Path) -> None:
    import transformers

    config = transformers.CLIPConfig(
        text_config=tiny.tiny_clip_text_config().to_dict(),
        vision_config=tiny.tiny_clip_vision_config().to_dict(),
        projection_dim=32,
    )
    torch.manual_seed(0)
    full = transformers.CLIPModel._from_config(config, attn_implementation="eager").eval()
    full.save_pretrained(tmp_path / "clip")
    text = clip.load_clip_text_encoder(tmp_path / "clip")
    vision = clip.load_clip_vision_encoder(tmp_path / "clip")
    ids, pixels = _ids(), _pixels()
    assert torch.equal(_text_out(text, ids), _text_out(full.text_model, ids))
    for a, b in zip(_vision_out(vision, pixels), _vision_out(full.vision_model, pixels)):
        assert torch.equal(a, b)

    root = tmp_path / "pipeline"
    full.text_model.save_pretrained(root / "text_encoder")
    full.vision_model.save_pretrained(root / "image_encoder")
    assert torch.equal(_text_out(clip.load_clip_text_encoder(root), ids), _text_out(full.text_model, ids))
    from_root = clip.load_clip_vision_encoder(root)
    assert torch.equal(_vision_out(from_root, pixels)[0], _vision_out(full.vision_model, pixels)[0])


# ----------------------------------------------------------------------------------------------------------------
# CLIP vision encoder
# ----------------------------------------------------------------------------------------------------------------


def test_fixture_image_encoder_matches_transformers_and_official_outputs(parity_fixture: Path) -> None:
    import transformers

    folder = parity_fixture / "image_encoder"
    ours = clip.load_clip_vision_encoder(folder)
    ref = transformers.CLIPVisionModel.from_pretrained(folder, attn_implementation="eager").eval()
    assert isinstance(ours, transformers.CLIPVisionModel)
    assert not ours.training and not any(p.requires_grad for p in ours.parameters())
    _assert_same_state(ours, ref)
    pixels = load_file(str(parity_fixture / "inputs.safetensors"))["clip_pixel_values"]
    outputs = load_file(str(parity_fixture / "outputs.safetensors"))
    got, want = _vision_out(ours, pixels), _vision_out(ref, pixels)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    last, hidden = got[0], got[1:]
    assert len(hidden) == 19
    expected = {"clip.last_hidden_state": last}
    expected.update({f"clip.hidden_states_{k}": hidden[k] for k in (4, 8, 12, 16)})
    for name, actual in expected.items():
        scale = max(1.0, outputs[name].abs().max().item())
        torch.testing.assert_close(actual, outputs[name], rtol=1e-5, atol=1e-5 * scale, msg=name)


def test_tiny_vision_round_trip(tiny_vision, tmp_path: Path) -> None:
    cfg = tiny_vision.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.intermediate_size) == (32, 18, 4, 64)
    assert (cfg.image_size, cfg.patch_size, cfg.projection_dim) == (224, 14, 32)
    pixels = _pixels()
    want = _vision_out(tiny_vision, pixels)
    assert len(want) == 20  # last + 19 hidden states: hidden_states[16] exists

    path = tmp_path / "clip_vision_l.safetensors"
    clip.save_clip_vision_single_file(tiny_vision, path)
    with safe_open(str(path), "pt") as f:
        assert "vision_model.embeddings.class_embedding" in set(f.keys())
    loaded = clip.load_clip_vision_encoder(path)
    _assert_same_state(loaded, tiny_vision)
    for a, b in zip(_vision_out(loaded, pixels), want):
        assert torch.equal(a, b)

    tiny_vision.save_pretrained(tmp_path / "folder")
    from_folder = clip.load_clip_vision_encoder(tmp_path / "folder")
    for a, b in zip(_vision_out(from_folder, pixels), want):
        assert torch.equal(a, b)


def test_vision_single_file_inference_with_projection(tmp_path: Path) -> None:
    model = tiny_builders.build_tiny_clip_vision_encoder(seed=5, config=_inferable_vision_config())
    sd = clip._single_file_tensors(model, "vision_model")
    sd["visual_projection.weight"] = torch.randn(48, 128)
    sd["vision_model.embeddings.position_ids"] = torch.arange(5)[None]
    torch.save(sd, tmp_path / "vision.pth")
    loaded = clip.load_clip_vision_encoder(tmp_path / "vision.pth")
    cfg = loaded.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.intermediate_size) == (128, 3, 2, 256)
    assert (cfg.image_size, cfg.patch_size, cfg.num_channels, cfg.projection_dim) == (28, 14, 3, 48)
    pixels = _pixels(size=28)
    for a, b in zip(_vision_out(loaded, pixels), _vision_out(model, pixels)):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------------------------------------------
# VAE
# ----------------------------------------------------------------------------------------------------------------


def test_vae_ldm_single_file_round_trip(tiny_vae, tmp_path: Path) -> None:
    path = tmp_path / "vae-ft-ema-tiny.safetensors"
    V.save_vae_ldm_single_file(tiny_vae, path)
    ldm = load_file(str(path))
    for key in (
        "encoder.conv_in.weight", "encoder.down.0.block.0.norm1.weight", "encoder.down.0.downsample.conv.weight",
        "encoder.mid.block_2.conv2.weight", "encoder.norm_out.weight", "decoder.up.3.block.1.conv2.weight",
        "decoder.up.0.block.0.nin_shortcut.weight", "decoder.up.1.upsample.conv.weight", "quant_conv.weight",
        "post_quant_conv.bias",
    ):
        assert key in ldm, key
    assert ldm["encoder.mid.attn_1.q.weight"].shape == (16, 16, 1, 1)
    assert ldm["decoder.mid.attn_1.proj_out.weight"].shape == (16, 16, 1, 1)
    # decoder.up.3 (LDM, highest level) is diffusers' up_blocks.0 (run first, widest).
    assert torch.equal(ldm["decoder.up.3.block.0.conv1.weight"], tiny_vae.decoder.up_blocks[0].resnets[0].conv1.weight)
    assert not any("down_blocks" in k or "up_blocks" in k or "mid_block" in k for k in ldm)

    loaded = V.load_vae(path)
    assert dict(loaded.config)["block_out_channels"] == [8, 16, 16, 16]
    _assert_same_state(loaded, tiny_vae)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    pixels = torch.rand(1, 3, 32, 32) * 2 - 1
    assert torch.equal(vae_encode(loaded, pixels, sample=False), vae_encode(tiny_vae, pixels, sample=False))


def test_vae_conversion_table_matches_diffusers(tiny_vae) -> None:
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    ldm = V.convert_diffusers_vae_to_ldm(tiny_vae.state_dict())
    ours = V.convert_ldm_vae_to_diffusers(ldm)
    reference = convert_ldm_vae_checkpoint(dict(ldm), dict(tiny_vae.config))
    assert ours.keys() == reference.keys() == tiny_vae.state_dict().keys()
    for k in ours:
        assert torch.equal(ours[k], reference[k]), k
    with pytest.raises(CheckpointError, match="encoder.mystery.weight"):
        V.convert_ldm_vae_to_diffusers({**ldm, "encoder.mystery.weight": torch.zeros(1)}, source="x.safetensors")


def test_vae_full_checkpoint_inference(tmp_path: Path) -> None:
    vae = tiny_builders.build_tiny_vae(seed=2, config=_inferable_vae_config())
    ldm = V.convert_diffusers_vae_to_ldm(vae.state_dict())
    full = {f"first_stage_model.{k}": v for k, v in ldm.items()}
    full["model.diffusion_model.input_blocks.0.0.weight"] = torch.randn(4, 4, 3, 3)
    full["cond_stage_model.transformer.text_model.final_layer_norm.weight"] = torch.randn(8)
    full["first_stage_model.loss.discriminator.main.0.weight"] = torch.randn(2, 3, 4, 4)
    torch.save({"state_dict": full, "epoch": 1}, tmp_path / "sd15-tiny.ckpt")
    loaded = V.load_vae(tmp_path / "sd15-tiny.ckpt")
    config = dict(loaded.config)
    assert config["block_out_channels"] == [32, 32, 64, 64] and config["layers_per_block"] == 1
    assert config["latent_channels"] == 4 and config["norm_num_groups"] == 32
    assert config["scaling_factor"] == pytest.approx(0.18215)
    _assert_same_state(loaded, vae)


def test_vae_diffusers_folder_subfolder_and_single_file(tiny_vae, tmp_path: Path) -> None:
    tiny_vae.save_pretrained(tmp_path / "sd-vae-ft-ema")
    tiny_vae.save_pretrained(tmp_path / "pipeline" / "vae")
    _assert_same_state(V.load_vae(tmp_path / "sd-vae-ft-ema"), tiny_vae)
    _assert_same_state(V.load_vae(tmp_path / "pipeline"), tiny_vae)

    # A single diffusers-format file with the deprecated attention names of old diffusers (query/key/value/proj_attn)
    old_names = {
        k.replace(".to_q.", ".query.").replace(".to_k.", ".key.").replace(".to_v.", ".value.")
        .replace(".to_out.0.", ".proj_attn."): v
        for k, v in tiny_vae.state_dict().items()
    }
    assert any(".proj_attn." in k for k in old_names)
    config = {k: v for k, v in dict(tiny_vae.config).items() if not k.startswith("_")}
    save_file(old_names, str(tmp_path / "diffusers_vae.safetensors"),
              metadata={CONFIG_METADATA_KEY: json.dumps(config)})
    _assert_same_state(V.load_vae(tmp_path / "diffusers_vae.safetensors"), tiny_vae)

    bf16 = V.load_vae(tmp_path / "sd-vae-ft-ema", dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in bf16.parameters())


def test_vae_encode_decode(tiny_vae) -> None:
    pixels = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    mean = vae_encode(tiny_vae, pixels, sample=False)
    assert mean.shape == (2, 4, 8, 8)
    with torch.no_grad():
        dist = tiny_vae.encode(pixels).latent_dist
        reference = dist.sample(generator=torch.Generator().manual_seed(7)) * 0.18215
    assert torch.equal(mean, dist.mean * 0.18215)
    sampled = vae_encode(tiny_vae, pixels, generator=torch.Generator().manual_seed(7))
    assert torch.equal(sampled, reference)  # same draw as diffusers' posterior sample with that generator
    assert torch.equal(sampled, vae_encode(tiny_vae, pixels, generator=torch.Generator().manual_seed(7)))
    assert not torch.equal(sampled, mean)

    latents = torch.randn(5, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    whole = vae_decode(tiny_vae, latents, chunk_size=8)
    assert whole.shape == (5, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(whole, tiny_vae.decode(latents / 0.18215).sample)
    # Chunks of 1-4 frames: CPU conv2d picks batch-size dependent kernels (~1e-6 differences; 0 for the same
    # batch size), so chunked decoding agrees to float32 rounding rather than bit for bit.
    for chunk in (1, 2, 3, 4):
        torch.testing.assert_close(vae_decode(tiny_vae, latents, chunk_size=chunk), whole, rtol=1e-5, atol=1e-5)
    assert torch.equal(vae_decode(tiny_vae, latents, chunk_size=5), whole)

    with pytest.raises(VideoBoothError, match="divisible by 8"):
        vae_encode(tiny_vae, torch.zeros(1, 3, 60, 64))
    with pytest.raises(VideoBoothError, match=r"\(N, 3, H, W\)"):
        vae_encode(tiny_vae, torch.zeros(3, 64, 64))
    with pytest.raises(VideoBoothError, match="latents of shape"):
        vae_decode(tiny_vae, torch.zeros(1, 4, 4, 8, 8))
    with pytest.raises(VideoBoothError, match="chunk_size"):
        vae_decode(tiny_vae, latents, chunk_size=0)


# ----------------------------------------------------------------------------------------------------------------
# Strictness and wrong files
# ----------------------------------------------------------------------------------------------------------------


def test_strict_errors_name_keys_as_the_file_does(tiny_text, tiny_vae, tmp_path: Path) -> None:
    """The message itself is tested with the UNet (test_checkpoint); here: keys named with the file's prefix and
    layout (LDM names for a VAE), shapes from a config that does not describe the file, a bad stored config."""
    path = tmp_path / "clip_l.safetensors"
    clip.save_clip_text_single_file(tiny_text, path)
    metadata = read_safetensors_metadata(path)
    sd = load_file(str(path))

    removed = {f"cond_stage_model.transformer.{k}": v for k, v in sd.items()}
    del removed["cond_stage_model.transformer.text_model.encoder.layers.1.mlp.fc2.bias"]
    save_file(removed, str(tmp_path / "removed.safetensors"), metadata=metadata)
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): "
                                              r"'cond_stage_model\.transformer\.text_model\.encoder\.layers\.1\.mlp\.fc2\.bias'"):
        clip.load_clip_text_encoder(tmp_path / "removed.safetensors")

    wrong_config = dict(metadata)
    stored = json.loads(metadata[CONFIG_METADATA_KEY])
    wrong_config[CONFIG_METADATA_KEY] = json.dumps({**stored, "intermediate_size": 96})
    save_file(sd, str(tmp_path / "wrong_shape.safetensors"), metadata=wrong_config)
    with pytest.raises(CheckpointError, match=r"wrong shapes \(6, file vs model\): "
                                              r"'text_model\.encoder\.layers\.0\.mlp\.fc1\.weight' \(64, 32\) vs \(96, 32\)"):
        clip.load_clip_text_encoder(tmp_path / "wrong_shape.safetensors")

    save_file(sd, str(tmp_path / "bad_json.safetensors"), metadata={CONFIG_METADATA_KEY: "{not json"})
    with pytest.raises(CheckpointError, match="not valid JSON"):
        clip.load_clip_text_encoder(tmp_path / "bad_json.safetensors")

    vae_path = tmp_path / "vae.safetensors"
    V.save_vae_ldm_single_file(tiny_vae, vae_path)
    vae_sd = load_file(str(vae_path))
    del vae_sd["decoder.up.2.block.1.norm2.weight"]
    save_file(vae_sd, str(tmp_path / "vae_removed.safetensors"), metadata=read_safetensors_metadata(vae_path))
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): 'decoder\.up\.2\.block\.1\.norm2\.weight'"):
        V.load_vae(tmp_path / "vae_removed.safetensors")


def test_wrong_kind_of_file_is_explained(tiny_text, tiny_vision, tiny_vae, tmp_path: Path) -> None:
    vae_path, text_path, vision_path = tmp_path / "vae.safetensors", tmp_path / "t.safetensors", tmp_path / "v.sft"
    V.save_vae_ldm_single_file(tiny_vae, vae_path)
    clip.save_clip_text_single_file(tiny_text, text_path)
    clip.save_clip_vision_single_file(tiny_vision, vision_path)
    with pytest.raises(CheckpointError) as err:
        clip.load_clip_text_encoder(vae_path)
    assert "looks like a VAE" in str(err.value) and "CLIP text encoder" in str(err.value)
    assert str(vae_path) in str(err.value)
    with pytest.raises(CheckpointError, match="looks like a CLIP vision encoder"):
        clip.load_clip_text_encoder(vision_path)
    with pytest.raises(CheckpointError, match="looks like a CLIP text encoder"):
        clip.load_clip_vision_encoder(text_path)
    with pytest.raises(CheckpointError, match="does not look like a VAE.*looks like a CLIP text encoder"):
        V.load_vae(text_path)
    unet_like = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)}
    save_file(unet_like, str(tmp_path / "unet.safetensors"))
    with pytest.raises(CheckpointError, match="diffusion UNet"):
        clip.load_clip_vision_encoder(tmp_path / "unet.safetensors")

    tiny_vision.save_pretrained(tmp_path / "vision_folder")
    with pytest.raises(CheckpointError, match="holds a CLIP vision encoder"):
        clip.load_clip_text_encoder(tmp_path / "vision_folder")
    (tmp_path / "empty_folder").mkdir()
    with pytest.raises(CheckpointError, match="no 'config.json'"):
        V.load_vae(tmp_path / "empty_folder")
    (tmp_path / "no_weights").mkdir()
    (tmp_path / "no_weights" / "config.json").write_text(json.dumps(tiny.tiny_vae_config()))
    with pytest.raises(CheckpointError, match="No weights found.*diffusion_pytorch_model.safetensors"):
        V.load_vae(tmp_path / "no_weights")
    with pytest.raises(CheckpointError, match="not found"):
        clip.load_clip_vision_encoder(tmp_path / "missing.safetensors")


# ----------------------------------------------------------------------------------------------------------------
# Tokenizers
# ----------------------------------------------------------------------------------------------------------------


def test_clip_tokenizer_ids(clip_tokenizer_dir: Path, parity_fixture: Path) -> None:
    tok = load_clip_tokenizer(clip_tokenizer_dir)
    assert tok.model_max_length == 77
    cond = tok("sdksd in the tiny pond", padding="max_length", max_length=77).input_ids
    assert len(cond) == 77
    assert cond[:9] == [49406, 3080, 74, 4159, 530, 518, 5591, 10750, 49407]
    assert set(cond[9:]) == {49407}
    null = tok("None", padding="max_length", max_length=77).input_ids
    assert null[:3] == [49406, 8906, 49407] and set(null[3:]) == {49407}
    assert tok("sdksd", add_special_tokens=False).input_ids == [3080, 74, 4159]
    inputs = load_file(str(parity_fixture / "inputs.safetensors"))
    assert cond == inputs["cond_input_ids"][0].tolist()
    assert null == inputs["null_input_ids"][0].tolist()
    assert inputs["placeholder_ids"][0].tolist() == [3080, 74, 4159]


def test_clip_tokenizer_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        load_clip_tokenizer(tmp_path / "nope")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "vocab.json").write_text("{}")
    with pytest.raises(CheckpointError, match="lacks merges.txt"):
        load_clip_tokenizer(tmp_path / "half")


def test_tiny_tokenizer(tmp_path: Path) -> None:
    info = tiny.write_tiny_tokenizer(tmp_path / "tok")
    vocab = json.loads((tmp_path / "tok" / "vocab.json").read_text(encoding="utf-8"))
    merges = (tmp_path / "tok" / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert merges[0] == "#version: 0.2" and 24 <= len(merges) - 1 <= 64
    assert info.vocab_size == len(vocab) < 1000  # our own small vocabulary, not CLIP's 49408
    assert (info.bos_token_id, info.eos_token_id) == (info.vocab_size - 2, info.vocab_size - 1)
    assert vocab["<|startoftext|>"] == info.bos_token_id and vocab["<|endoftext|>"] == info.eos_token_id
    byte_chars = list(tiny.bytes_to_unicode().values())
    assert all(vocab[c] == i and vocab[c + "</w>"] == 256 + i for i, c in enumerate(byte_chars))
    config = json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())
    assert config["model_max_length"] == 77 and config["pad_token"] == "<|endoftext|>" and config["do_lower_case"]
    assert (tmp_path / "tok" / "special_tokens_map.json").is_file()

    tok = load_clip_tokenizer(tmp_path / "tok")
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (
        info.bos_token_id, info.eos_token_id, info.eos_token_id
    )
    for prompt in ("a panda is playing in the pond", "sdksd in the tiny pond", "none", "xyzzy quux jumps, 42!"):
        ids = tok(prompt, padding="max_length", max_length=77).input_ids
        assert len(ids) == 77 and max(ids) < info.vocab_size
        assert ids[0] == info.bos_token_id and info.eos_token_id in ids
        # CLIP decoding puts a space before punctuation and between digits (each digit is its own word).
        expected = prompt.replace(",", " ,").replace("!", " !").replace("42", "4 2")
        assert tok.decode(ids, skip_special_tokens=True) == expected
    assert tok.convert_ids_to_tokens(tok("the dog", add_special_tokens=False).input_ids) != ["t", "h", "e</w>", "d",
                                                                                                "o", "g</w>"]
    assert tok("Panda").input_ids == tok("panda").input_ids  # lower-cased
    # the merges of the recorded pinned result (test_pinned_result): tokenizers' trainer with alphabetical ties
    assert tok.tokenize("a ball rolling on the grass") == [
        "a</w>", "b", "a", "l", "l</w>", "r", "o", "l", "l", "ing</w>", "o", "n</w>", "t", "he</w>", "grass</w>"]
    assert tiny.write_tiny_tokenizer(tmp_path / "again") == info
    assert (tmp_path / "again" / "vocab.json").read_bytes() == (tmp_path / "tok" / "vocab.json").read_bytes()
