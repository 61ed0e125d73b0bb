"""SD 1.x checkpoints and LoRAs on VideoBooth's spatial layers (issue 16), with tiny files built from the tiny
UNet's shapes in the real layouts: LDM single files, diffusers folders, kohya / diffusers / PEFT LoRAs."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from safetensors.torch import save_file

from tiny_builders import build_tiny_clip_text_encoder
from videobooth_core.app.tiny import tiny_unet_and_mapper
from videobooth_core.errors import CheckpointError
from videobooth_core.loading.lora import LoraSpec, apply_loras, parse_lora_argument
from videobooth_core.loading.sd_checkpoint import is_from_sd, ldm_name, load_sd_checkpoint
from videobooth_core.loading.weight_patch import share_weights_copy

TEXT_WIDTH = 32
SITE = "down_blocks.0.attentions.0"
BLOCK = f"{SITE}.transformer_blocks.0"


@pytest.fixture()
def models():
    unet, mapper = tiny_unet_and_mapper(vision_width=32, text_width=TEXT_WIDTH, seed=0)
    unet.attach_projections(mapper.site_projections(), release_own=True)
    return unet, mapper


def checksum(module: torch.nn.Module, keep=lambda name: True) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        if keep(name):
            digest.update(name.encode() + tensor.float().numpy().tobytes())
    return digest.hexdigest()


def unet_output(unet: torch.nn.Module) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    sample = torch.randn(1, 4, 2, 8, 8, generator=generator)
    text = torch.randn(1, 77, TEXT_WIDTH, generator=generator)
    with torch.no_grad():
        return unet(sample, 500, text)


def sd_unet_weights(unet, seed: int = 3, kv: bool = True) -> dict[str, torch.Tensor]:
    """A random SD 1.x UNet of the tiny UNet's shapes, in diffusers names (with the K/V the UNet released)."""
    generator = torch.Generator().manual_seed(seed)
    shapes = {k: v.shape for k, v in unet.state_dict().items() if is_from_sd(k)}
    if kv:
        for site in unet.attention_sites:
            width = site.proj_in.out_channels
            for attn, context in (("attn1", width), ("attn2", TEXT_WIDTH)):
                for proj in ("to_k", "to_v"):
                    shapes[f"{site.site}.transformer_blocks.0.{attn}.{proj}.weight"] = torch.Size((width, context))
    return {k: torch.randn(shape, generator=generator) for k, shape in shapes.items()}


def write_ldm_checkpoint(path, weights, unet, extra=None):
    levels, per = len(unet.config.block_out_channels), unet.config.layers_per_block
    ldm = {"model.diffusion_model." + ldm_name(k, per, levels): v for k, v in weights.items()}
    ldm["first_stage_model.decoder.conv_in.weight"] = torch.zeros(1)  # a full checkpoint's other parts
    ldm.update(extra or {})
    save_file(ldm, str(path))
    return path


def test_ldm_checkpoint_replaces_only_the_spatial_layers_and_undoes_exactly(models, tmp_path):
    unet, mapper = models
    weights = sd_unet_weights(unet)
    path = write_ldm_checkpoint(tmp_path / "style.safetensors", weights, unet)
    temporal_and_watermark = checksum(unet, lambda k: not is_from_sd(k))
    mapper_sum, before = checksum(mapper), unet_output(unet)
    originals = {k: v.clone() for k, v in unet.state_dict().items()}

    patch, report = load_sd_checkpoint(unet, path)

    spatial = [k for k in unet.state_dict() if is_from_sd(k)]
    kv_count = 4 * len(unet.attention_sites)
    assert report.replaced == len(spatial) == len(weights) - kv_count
    assert report.key_value == kv_count and report.key_value_applied == 0
    assert report.kept == len(unet.state_dict()) - len(spatial) > 0
    assert all(torch.equal(unet.state_dict()[k], weights[k]) for k in spatial)
    assert checksum(unet, lambda k: not is_from_sd(k)) == temporal_and_watermark
    assert checksum(mapper) == mapper_sum
    assert not torch.equal(unet_output(unet), before)

    patch.undo()
    assert all(torch.equal(v, originals[k]) for k, v in unet.state_dict().items())
    assert torch.equal(unet_output(unet), before)


def test_diffusers_folder_gives_the_same_weights_and_kv_option_sets_the_mapper(models, tmp_path):
    unet, mapper = models
    weights = sd_unet_weights(unet)
    folder = tmp_path / "my_sd15" / "unet"
    folder.mkdir(parents=True)
    save_file(weights, str(folder / "diffusion_pytorch_model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))

    _, report = load_sd_checkpoint(unet, tmp_path / "my_sd15", kv="mapper")

    assert report.key_value_applied == 6 * len(unet.attention_sites)  # attn1 K/V also on the image-prompt K/V
    site = unet.attached_projections[SITE]
    assert torch.equal(site.attn1_key.weight, weights[f"{BLOCK}.attn1.to_k.weight"])
    assert torch.equal(site.image_prompt_value.weight, weights[f"{BLOCK}.attn1.to_v.weight"])
    assert torch.equal(site.text_value.weight, weights[f"{BLOCK}.attn2.to_v.weight"])
    assert torch.equal(unet.state_dict()["conv_in.weight"], weights["conv_in.weight"])


@pytest.mark.parametrize("variant, named", [
    ("sdxl", "an SDXL UNet"), ("sd2", "an SD 2.x UNet"), ("inpainting", "9 input channels"),
    ("size", "does not fit this VideoBooth UNet"), ("vae", "not a Stable Diffusion UNet"),
])
def test_other_models_are_refused_naming_what_they_are(models, tmp_path, variant, named):
    unet, _ = models
    weights = sd_unet_weights(unet)
    extra = {}
    if variant == "sdxl":
        extra = {"model.diffusion_model.label_emb.0.0.weight": torch.zeros(4, 4)}
    elif variant == "sd2":
        weights = {k: v.flatten(1) if k.endswith(("proj_in.weight", "proj_out.weight")) else v
                   for k, v in weights.items()}
    elif variant == "inpainting":
        weights["conv_in.weight"] = torch.zeros(32, 9, 3, 3)
    elif variant == "size":
        weights["conv_in.weight"] = torch.zeros(320, 4, 3, 3)
    path = tmp_path / "model.safetensors"
    if variant == "vae":
        save_file({"encoder.down.0.block.0.conv1.weight": torch.zeros(1)}, str(path))
    else:
        write_ldm_checkpoint(path, weights, unet, extra)
    before = checksum(unet)
    with pytest.raises(CheckpointError, match=named):
        load_sd_checkpoint(unet, path)
    assert checksum(unet) == before


# -- LoRAs --------------------------------------------------------------------------------------------------------
LORA_LAYERS = {  # our module name: (out, in[, kh, kw]) are read from the UNet
    f"{BLOCK}.attn1.to_q": None, f"{BLOCK}.attn2.to_out.0": None, f"{BLOCK}.ff.net.2": None,
    f"{SITE}.proj_in": None,  # a 1x1 conv
    "down_blocks.1.resnets.0.conv1": None,  # LoCon: a 3x3 conv
    f"{BLOCK}.attn1.to_k": None, f"{BLOCK}.attn2.to_v": None,  # K/V: the mapper's projections
}


def lora_halves(unet, seed=5, rank=4):
    generator = torch.Generator().manual_seed(seed)
    halves = {}
    for name in LORA_LAYERS:
        if name.endswith(("to_k", "to_v")):
            width = unet.get_submodule(name.split(".transformer_blocks")[0]).proj_in.out_channels
            shape = (width, TEXT_WIDTH if ".attn2." in name else width)
        else:
            shape = tuple(unet.get_submodule(name).weight.shape)
        down_shape = (rank, *shape[1:]) if len(shape) == 4 and shape[2] > 1 else (rank, shape[1])
        halves[name] = (0.1 * torch.randn(down_shape, generator=generator),
                        0.1 * torch.randn(shape[0], rank, generator=generator))
    return halves


def write_lora(path, halves, fmt, alpha=2.0):
    tensors = {}
    for name, (down, up) in halves.items():
        conv = down.ndim == 4 or name.endswith("proj_in")
        if fmt == "kohya":
            stem = "lora_unet_" + name.replace(".", "_")
            tensors[f"{stem}.lora_down.weight"] = down if down.ndim == 4 or not conv else down[:, :, None, None]
            tensors[f"{stem}.lora_up.weight"] = up[:, :, None, None] if conv else up
            tensors[f"{stem}.alpha"] = torch.tensor(alpha)
        else:
            prefix = "unet." if fmt == "diffusers" else "base_model.model."
            tensors[f"{prefix}{name}.lora_A.weight"] = down
            tensors[f"{prefix}{name}.lora_B.weight"] = up
    if fmt == "diffusers":  # diffusers' own format keeps kohya-style alphas beside the weights
        tensors.update({f"unet.{name}.alpha": torch.tensor(alpha) for name in halves})
    save_file(tensors, str(path))
    if fmt == "peft":
        (path.parent / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": alpha}))
    return path


def expected_weight(weight, halves, name, strengths_scales):
    down, up = halves[name]
    delta = sum(s * scale * (up.double() @ down.double().flatten(1)) for s, scale in strengths_scales)
    return (weight.double() + delta.reshape(weight.shape)).to(weight.dtype)


@pytest.mark.parametrize("fmt", ["kohya", "diffusers", "peft"])
def test_each_lora_format_merges_w_plus_scaled_up_down_on_every_layer(models, tmp_path, fmt):
    unet, mapper = models
    halves = lora_halves(unet)
    (tmp_path / fmt).mkdir()
    path = write_lora(tmp_path / fmt / "style.safetensors", halves, fmt)
    temporal_and_watermark = checksum(unet, lambda k: not is_from_sd(k))
    before = {name: unet.get_submodule(name).weight.clone() for name in LORA_LAYERS if "to_k" not in name
              and "to_v" not in name}
    site = unet.attached_projections[SITE]
    mapper_before = {f: getattr(site, f).weight.clone() for f in ("attn1_key", "image_prompt_key", "text_value")}

    patch, report = apply_loras(unet, [LoraSpec(path, strength=0.7)])

    assert report.unet_layers == 5 and report.kv_layers == 2 and report.kv_applied == 3
    for name, weight in before.items():
        torch.testing.assert_close(unet.get_submodule(name).weight,
                                   expected_weight(weight, halves, name, [(0.7, 0.5)]), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(site.attn1_key.weight, expected_weight(
        mapper_before["attn1_key"], halves, f"{BLOCK}.attn1.to_k", [(0.7, 0.5)]), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(site.image_prompt_key.weight, expected_weight(
        mapper_before["image_prompt_key"], halves, f"{BLOCK}.attn1.to_k", [(0.7, 0.5)]), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(site.text_value.weight, expected_weight(
        mapper_before["text_value"], halves, f"{BLOCK}.attn2.to_v", [(0.7, 0.5)]), rtol=1e-6, atol=1e-7)
    assert checksum(unet, lambda k: not is_from_sd(k)) == temporal_and_watermark
    patch.undo()


def test_formats_agree_stacking_adds_and_undo_is_exact_in_half_precision(models, tmp_path):
    unet, mapper = models
    unet.half(), mapper.half()
    halves, other = lora_halves(unet), lora_halves(unet, seed=9)
    paths = {}
    for fmt in ("kohya", "diffusers", "peft"):
        (tmp_path / fmt).mkdir()
        paths[fmt] = write_lora(tmp_path / fmt / "a.safetensors", halves, fmt)
    second = write_lora(tmp_path / "kohya" / "b.safetensors", other, "kohya", alpha=4.0)
    originals = {k: v.clone() for k, v in (*unet.state_dict().items(), *mapper.state_dict().items())}
    name = f"{BLOCK}.ff.net.2"

    merged = {}
    for fmt, path in paths.items():
        patch, _ = apply_loras(unet, [LoraSpec(path, 1.0), LoraSpec(second, -0.5)])
        merged[fmt] = {k: v.clone() for k, v in (*unet.state_dict().items(), *mapper.state_dict().items())}
        torch.testing.assert_close(unet.get_submodule(name).weight, expected_weight(
            originals[name + ".weight"], {name: halves[name]}, name, [(1.0, 0.5)])
            + (expected_weight(originals[name + ".weight"], {name: other[name]}, name, [(-0.5, 1.0)])
               - originals[name + ".weight"]), rtol=2e-3, atol=2e-3)
        patch.undo()
        restored = dict((*unet.state_dict().items(), *mapper.state_dict().items()))
        assert all(torch.equal(restored[k], v) for k, v in originals.items())
    assert all(torch.equal(merged["kohya"][k], merged[fmt][k]) for fmt in merged for k in originals)
    assert any(not torch.equal(merged["kohya"][k], originals[k]) for k in originals)


def test_strength_zero_is_bit_identical_and_kv_ignore_leaves_the_mapper(models, tmp_path):
    unet, mapper = models
    path = write_lora(tmp_path / "a.safetensors", lora_halves(unet), "kohya")
    before, mapper_sum = unet_output(unet), checksum(mapper)

    patch, report = apply_loras(unet, [LoraSpec(path, 0.0)])
    assert len(patch) == 0 and report.layers == 0
    assert torch.equal(unet_output(unet), before)

    patch, report = apply_loras(unet, [LoraSpec(path, 1.0)], kv="ignore")
    assert report.kv_layers == 2 and report.kv_applied == 0 and report.unet_layers == 5
    assert checksum(mapper) == mapper_sum
    ignored = unet_output(unet)
    patch.undo()
    patch, _ = apply_loras(unet, [LoraSpec(path, 1.0)], kv="mapper")
    assert checksum(mapper) != mapper_sum
    assert not torch.equal(unet_output(unet), ignored)  # the K/V option changes the output
    patch.undo()
    assert checksum(mapper) == mapper_sum and torch.equal(unet_output(unet), before)


def test_unmatched_layers_are_an_error_listing_them(models, tmp_path):
    unet, _ = models
    sdxl = {
        "lora_unet_input_blocks_7_1_transformer_blocks_1_attn1_to_q.lora_down.weight": torch.zeros(4, 64),
        "lora_unet_input_blocks_7_1_transformer_blocks_1_attn1_to_q.lora_up.weight": torch.zeros(64, 4),
        "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 32),
        "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(64, 4),
    }
    save_file(sdxl, str(tmp_path / "xl.safetensors"))
    before = checksum(unet)
    with pytest.raises(CheckpointError, match=r"2 of 2 layers .* SDXL LoRA.*input_blocks_7_1"):
        apply_loras(unet, [LoraSpec(tmp_path / "xl.safetensors")])
    assert checksum(unet) == before


def test_text_encoder_layers_apply_to_clip(models, tmp_path):
    unet, _ = models
    text_encoder = build_tiny_clip_text_encoder()
    name = "text_model.encoder.layers.1.self_attn.q_proj"  # the name in LoRA files
    module = text_encoder.get_submodule(name if hasattr(text_encoder, "text_model") else name[len("text_model."):])
    weight = module.weight.clone()
    generator = torch.Generator().manual_seed(2)
    down, up = torch.randn(2, 32, generator=generator), torch.randn(32, 2, generator=generator)
    stem = "lora_te_" + name.replace(".", "_")
    save_file({f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up, f"{stem}.alpha": torch.tensor(1.0)},
              str(tmp_path / "te.safetensors"))

    with pytest.raises(CheckpointError, match="no text encoder was given"):
        apply_loras(unet, [LoraSpec(tmp_path / "te.safetensors")])
    patch, report = apply_loras(unet, [LoraSpec(tmp_path / "te.safetensors", 1.0, text_strength=0.5)],
                                text_encoder=text_encoder)
    assert report.text_layers == 1 and report.unet_layers == 0
    torch.testing.assert_close(module.weight, weight + 0.5 * 0.5 * up @ down)
    patch.undo()
    assert torch.equal(module.weight, weight)


def test_a_patched_share_weights_copy_leaves_the_original(models, tmp_path):
    unet, mapper = models
    path = write_lora(tmp_path / "a.safetensors", lora_halves(unet), "kohya")
    sums, before = (checksum(unet), checksum(mapper)), unet_output(unet)
    unet_copy, mapper_copy = share_weights_copy([unet, mapper])
    apply_loras(unet_copy, [LoraSpec(path)])
    assert (checksum(unet), checksum(mapper)) == sums and torch.equal(unet_output(unet), before)
    assert checksum(mapper_copy) != sums[1] and not torch.equal(unet_output(unet_copy), before)


def test_lora_argument_parsing():
    assert parse_lora_argument("style.safetensors") == ("style.safetensors", 1.0)
    assert parse_lora_argument("loras/style.safetensors:0.6") == ("loras/style.safetensors", 0.6)
    assert parse_lora_argument("C:/loras/style.safetensors") == ("C:/loras/style.safetensors", 1.0)


def test_nodes_return_new_models_and_leave_their_inputs(models, tmp_path, monkeypatch):
    from conftest import PACK_NAME, import_pack

    import_pack()
    import sys

    bridge, types_ = sys.modules[f"{PACK_NAME}.nodes._bridge"], sys.modules[f"{PACK_NAME}.nodes._types"]
    sd_nodes = sys.modules[f"{PACK_NAME}.nodes.sd_models"]
    unet, mapper = models
    (tmp_path / "loras").mkdir()
    (tmp_path / "checkpoints").mkdir()
    write_lora(tmp_path / "loras" / "style.safetensors", lora_halves(unet), "kohya")
    write_ldm_checkpoint(tmp_path / "checkpoints" / "sd15.safetensors", sd_unet_weights(unet), unet)
    monkeypatch.setenv(bridge.MODELS_DIR_ENV, str(tmp_path))
    managed = bridge.ManagedModel({"unet": unet, "mapper": mapper}, torch.device("cpu"), torch.device("cpu"))
    model = types_.VideoBoothModel(managed, torch.float32, tmp_path / "u", tmp_path / "m")
    sums, before = (checksum(unet), checksum(mapper)), unet_output(unet)

    (styled,) = sd_nodes.VideoBoothApplySDCheckpoint().apply(model, "sd15.safetensors", "ignore")
    styled, clip = sd_nodes.VideoBoothLoRA().apply(styled, "style.safetensors", 0.8, 1.0, "mapper")

    assert clip is None and (checksum(unet), checksum(mapper)) == sums and torch.equal(unet_output(unet), before)
    assert not torch.equal(unet_output(styled.unet), before) and checksum(styled.mapper) != sums[1]
    assert {"ckpt_name", "kv_weights"} <= set(sd_nodes.VideoBoothApplySDCheckpoint.INPUT_TYPES()["required"])


def test_cli_flags_are_checked_before_models_load(tiny_models, tmp_path, capsys):
    from videobooth_core.app.cli import main

    base = ["generate", "--models", str(tmp_path), "--prompt", "a dog", "--out", str(tmp_path / "o.gif")]
    assert main(base + ["--lora", str(tmp_path / "missing.safetensors:0.5")]) == 2
    assert "--lora" in capsys.readouterr().err
    (tmp_path / "j.jsonl").write_text(json.dumps({"prompt": "a dog", "loras": [["missing.safetensors", 0.5]]}))
    assert main(["generate", "--models", str(tiny_models), "--jobs", str(tmp_path / "j.jsonl"), "--out-dir",
                 str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "line 1" in err and "missing.safetensors" in err and not (tmp_path / "out").exists()


def test_jobs_apply_each_lines_styles_and_restore_the_weights(tiny_models, models, tmp_path, capsys):
    """A styled line, then a plain one: the plain one is bit-identical to a batch without styles (nothing
    leaks), the styled one differs, and the done-record names the LoRA."""
    from videobooth_core.app.cli import main

    unet, _ = models  # the tiny models' UNet shapes
    halves = {name: pair for name, pair in lora_halves(unet, rank=2).items() if not name.endswith(("to_k", "to_v"))}
    write_lora(tmp_path / "style.safetensors", halves, "kohya")
    plain, styled = {"id": "plain", "prompt": "a dog", "out": "plain"}, {
        "id": "styled", "prompt": "a dog", "out": "styled", "loras": ["style.safetensors:0.8"]}
    for name, lines in {"both": [styled, plain], "plain_only": [plain]}.items():
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
        assert main(["generate", "--models", str(tiny_models), "--jobs", str(tmp_path / f"{name}.jsonl"), "--out-dir",
                     str(tmp_path / name), "--frames", "2", "--width", "64", "--height", "64", "--steps", "2"]) == 0
    capsys.readouterr()

    def frames(folder):
        return [f.read_bytes() for f in sorted(folder.glob("*.png"))]

    assert frames(tmp_path / "both/plain") == frames(tmp_path / "plain_only/plain") != []
    assert frames(tmp_path / "both/styled") != frames(tmp_path / "both/plain")
    record = json.loads((tmp_path / "both/.videobooth/done/styled.json").read_text())
    assert record["settings"]["loras"] == [[str((tmp_path / "style.safetensors").resolve()), 0.8]]
    assert "loras" not in json.loads((tmp_path / "both/.videobooth/done/plain.json").read_text())["settings"]
