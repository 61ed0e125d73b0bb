"""The ComfyUI nodes, called directly (no ComfyUI needed) with the tiny model set of ``make-tiny``.

The pack is imported as a package, the way ComfyUI imports it (its modules use relative imports), so the
core seen here is ``<pack>.videobooth_core``; its error classes are taken from there.
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
import sys
import types
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
FRAMES, SIZE, STEPS, SEED = 4, 64, 3, 7
PROMPT, WORD = "a dog running on the beach", "dog"


from conftest import PACK_NAME, import_pack as _import_pack  # noqa: E402


pack = _import_pack()
nodes = sys.modules[f"{PACK_NAME}.nodes"]
bridge = sys.modules[f"{PACK_NAME}.nodes._bridge"]
errors = importlib.import_module(f"{PACK_NAME}.videobooth_core.errors")
MAPPINGS = pack.NODE_CLASS_MAPPINGS


def node(node_id: str):
    return MAPPINGS[node_id]()


def run(node_id: str, **inputs):
    cls = MAPPINGS[node_id]
    return getattr(cls(), cls.FUNCTION)(**inputs)


@pytest.fixture(scope="module")
def models_dir(tiny_models):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(bridge.MODELS_DIR_ENV, str(tiny_models))
        yield tiny_models


@pytest.fixture(scope="module")
def loaded(models_dir):
    """(model, vae, clip, clip_vision) from the four loader nodes, on the CPU in float32."""
    (model,) = run("VideoBoothModelLoader", unet_name="watermark_remove_module.pt", mapper_name="mapper.pt",
                   precision="auto", device="auto")
    (vae,) = run("VideoBoothVAELoader", vae_name="videobooth_tiny_vae.safetensors", precision="auto", device="auto")
    (clip,) = run("VideoBoothCLIPLoader", clip_name="videobooth_tiny_clip_text.safetensors", tokenizer="auto",
                  precision="auto", device="auto")
    (vision,) = run("VideoBoothCLIPVisionLoader", clip_name="videobooth_tiny_clip_vision.safetensors",
                    precision="auto", device="auto")
    return model, vae, clip, vision


def subject_image() -> tuple[torch.Tensor, torch.Tensor]:
    """A (1, 80, 96, 3) IMAGE in [0, 1] (k/255 levels) and a (1, 80, 96) MASK with the subject = 1."""
    generator = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (1, 80, 96, 3), generator=generator, dtype=torch.uint8).float() / 255
    mask = torch.zeros(1, 80, 96)
    mask[:, 10:60, 20:90] = 1.0  # 70 x 50: the square gets white bands
    return image, mask


def sampler_inputs(**overrides):
    inputs = {"seed": SEED, "steps": STEPS, "cfg": 4.0, "sampler": "ddpm", "guidance": "official", "frames": FRAMES,
                  "width": SIZE, "height": SIZE, "batch": 1}
    inputs.update(overrides)
    return inputs


@pytest.fixture(scope="module")
def image_prompted(loaded):
    """Everything of the image-prompted graph up to the sampler's inputs."""
    model, vae, clip, vision = loaded
    image, mask = subject_image()
    prepared, preview = run("VideoBoothImagePrompt", image=image, padding=0, invert_mask=False, mask=mask)
    (embeds,) = run("VideoBoothImagePromptEncode", model=model, clip_vision=vision, image_prompt=prepared)
    (conditioning,) = run("VideoBoothTextEncode", clip=clip, prompt=PROMPT, subject_word=WORD, negative_prompt="None",
                          image_embeds=embeds)
    (exemplar,) = run("VideoBoothLatentInjection", strength=1.0, start=0.0, end=1.0, image_prompt=prepared, vae=vae)
    return {"prepared": prepared, "preview": preview, "embeds": embeds, "conditioning": conditioning,
            "exemplar": exemplar}


# -- registry and schemas -------------------------------------------------------------------------------
EXPECTED_IDS = {
    "VideoBoothModelLoader", "VideoBoothVAELoader", "VideoBoothCLIPLoader", "VideoBoothCLIPVisionLoader",
    "VideoBoothConvertWeights", "VideoBoothImagePrompt", "VideoBoothImagePromptEncode", "VideoBoothTextEncode",
    "VideoBoothLatentInjection", "VideoBoothSampler", "VideoBoothDecode",
    "VideoBoothMetricModels", "VideoBoothScore", "VideoBoothBestOfN",
    "VideoBoothApplySDCheckpoint", "VideoBoothLoRA",
    "VideoBoothSubjects", "VideoBoothDrift",
    "VideoBoothContextOptions", "VideoBoothStartFrames",
    "VideoBoothNativeLoader", "VideoBoothNativeConditioning", "VideoBoothNativeContextWindows",
    "VideoBoothNativeStartFrames", "VideoBoothNativeImagePromptEncode", "VideoBoothLCMSchedule",
    "VideoBoothVideoCrafterLoader", "VideoBoothVideoCrafterSampler",
}


def test_every_node_is_registered_and_documented(models_dir) -> None:
    assert set(MAPPINGS) == EXPECTED_IDS
    assert set(pack.NODE_DISPLAY_NAME_MAPPINGS) == EXPECTED_IDS
    for node_id, cls in MAPPINGS.items():
        assert node_id.startswith("VideoBooth")
        assert isinstance(cls.DESCRIPTION, str) and len(cls.DESCRIPTION) > 40, node_id
        assert cls.CATEGORY.split("/")[0] == "VideoBooth", node_id
        assert callable(getattr(cls, cls.FUNCTION)), node_id
        assert isinstance(cls.RETURN_TYPES, tuple) and cls.RETURN_TYPES, node_id
        assert len(cls.RETURN_NAMES) == len(cls.OUTPUT_TOOLTIPS) == len(cls.RETURN_TYPES), node_id
        schema = cls.INPUT_TYPES()
        assert set(schema) <= {"required", "optional", "hidden"}, node_id
        for section in ("required", "optional"):
            for name, spec in schema.get(section, {}).items():
                kind, options = spec
                assert isinstance(kind, (str, list)), (node_id, name)
                assert options.get("tooltip"), f"{node_id}.{name} has no tooltip"
                if isinstance(kind, list) and "default" in options:
                    assert options["default"] in kind, (node_id, name)
                if kind in ("INT", "FLOAT"):
                    assert options["min"] <= options["default"] <= options["max"], (node_id, name)


def test_file_lists_come_from_the_model_folders(models_dir) -> None:
    model_inputs = MAPPINGS["VideoBoothModelLoader"].INPUT_TYPES()["required"]
    assert model_inputs["unet_name"][0] == ["mapper.pt", "watermark_remove_module.pt"]
    assert model_inputs["unet_name"][1]["default"] == "watermark_remove_module.pt"
    assert model_inputs["mapper_name"][1]["default"] == "mapper.pt"
    assert "videobooth" in model_inputs["unet_name"][1]["tooltip"]
    vae_names = MAPPINGS["VideoBoothVAELoader"].INPUT_TYPES()["required"]["vae_name"][0]
    assert vae_names == ["videobooth_tiny_vae.safetensors"]
    clip_inputs = MAPPINGS["VideoBoothCLIPLoader"].INPUT_TYPES()["required"]
    assert clip_inputs["clip_name"][0] == ["videobooth_tiny_clip_text.safetensors"]
    assert clip_inputs["tokenizer"][0] == ["auto", "videobooth_tiny_tokenizer"]  # no ComfyUI: no bundled tokenizer
    vision = MAPPINGS["VideoBoothCLIPVisionLoader"].INPUT_TYPES()["required"]["clip_name"][0]
    assert vision == ["videobooth_tiny_clip_vision.safetensors"]
    convert = MAPPINGS["VideoBoothConvertWeights"].INPUT_TYPES()["required"]
    assert convert["unet_name"][0][-1] == "none" and MAPPINGS["VideoBoothConvertWeights"].OUTPUT_NODE


def test_sampler_schema_defaults() -> None:
    required = MAPPINGS["VideoBoothSampler"].INPUT_TYPES()["required"]
    assert required["seed"][1]["control_after_generate"] is True
    assert required["steps"][1]["default"] == 250 and "250" in required["steps"][1]["tooltip"]
    assert required["cfg"][1]["default"] == 4.0
    assert required["sampler"][0] == ["ddpm", "ddim", "dpmpp_2m", "euler", "euler_ancestral", "unipc", "lcm"]
    assert required["sampler"][1]["default"] == "ddpm" and required["guidance"][0] == ["official", "all"]
    optional = MAPPINGS["VideoBoothSampler"].INPUT_TYPES()["optional"]
    assert optional["spacing"][0] == ["trailing", "leading"] and optional["eta"][1]["default"] == 0.0
    assert [required[name][1]["default"] for name in ("frames", "width", "height")] == [16, 256, 256]
    assert required["width"][1]["step"] == 8
    assert "exemplar" in MAPPINGS["VideoBoothSampler"].INPUT_TYPES()["optional"]


# -- the graph --------------------------------------------------------------------------------------------
def test_loaders_give_the_custom_types(loaded) -> None:
    model, vae, clip, vision = loaded
    assert model.dtype == torch.float32 and model.managed.load_device.type == "cpu"
    assert model.unet.config.cross_attention_dim == clip.text_encoder.config.hidden_size == 32
    assert vae.vae.config.latent_channels == 4
    assert clip.tokenizer_path.name == "videobooth_tiny_tokenizer"
    assert vision.vision_encoder.config.num_hidden_layers == 18
    assert model.managed.patcher is None  # no ComfyUI: plain modules


def test_image_prompt_preparation_and_encoding(image_prompted) -> None:
    preview = image_prompted["preview"]
    assert preview.shape == (1, 256, 256, 3) and preview.dtype == torch.float32
    assert 0.0 <= float(preview.min()) and float(preview.max()) <= 1.0
    assert image_prompted["prepared"].bbox == (20, 10, 90, 60)
    assert torch.all(preview[0, 0, 0] == 1.0)  # the white background of the padded square
    words = image_prompted["embeds"].words
    assert words.shape == (1, 5, 32) and torch.isfinite(words).all()
    conditioning = image_prompted["conditioning"]
    assert conditioning.cond.shape == conditioning.null.shape == (1, 77, 32)
    assert conditioning.image_prompted and "sdksd" in conditioning.prompt_used


def test_full_graph_shapes_and_ranges(loaded, image_prompted) -> None:
    model, vae, _, _ = loaded
    (latent,) = run("VideoBoothSampler", model=model, conditioning=image_prompted["conditioning"],
                    exemplar=image_prompted["exemplar"], **sampler_inputs())
    samples = latent["samples"]
    assert set(latent) == {"samples"}
    assert samples.shape == (FRAMES, 4, SIZE // 8, SIZE // 8) and samples.dtype == torch.float32
    assert samples.device.type == "cpu" and torch.isfinite(samples).all()
    (frames,) = run("VideoBoothDecode", vae=vae, samples=latent, chunk_size=3)
    assert frames.shape == (FRAMES, SIZE, SIZE, 3) and frames.dtype == torch.float32 and frames.device.type == "cpu"
    assert 0.0 <= float(frames.min()) and float(frames.max()) <= 1.0 and float(frames.std()) > 0


def test_the_graph_matches_the_pipeline_for_the_same_seed(models_dir, loaded, image_prompted, capsys) -> None:
    """Nodes and the pipeline make the same video from one seed (z, VAE sample, steps order), bit for bit; the
    pipeline's progress bar counts the steps."""
    pipeline = importlib.import_module(f"{PACK_NAME}.videobooth_core.pipeline")
    model, _, _, _ = loaded
    (latent,) = run("VideoBoothSampler", model=model, conditioning=image_prompted["conditioning"],
                    exemplar=image_prompted["exemplar"], **sampler_inputs())
    image, mask = subject_image()
    pipe = pipeline.VideoBoothPipeline.from_models_dir(models_dir)
    request = pipeline.GenerationRequest(prompt=PROMPT, subject_word=WORD,
                                         image=torch.round(image[0] * 255).to(torch.uint8), mask=mask[0] > 0,
                                         frames=FRAMES, width=SIZE, height=SIZE, steps=STEPS, seed=SEED)
    steps = []
    reference = pipe.generate(request, decode=False, progress=True, callback=lambda s, t, o: steps.append(s)).latents
    assert torch.equal(latent["samples"], bridge.video_latents_to_comfy(reference)["samples"])
    assert steps == list(range(STEPS)) and f"{STEPS}/{STEPS}" in capsys.readouterr().err


def test_same_seed_same_latent_and_batches_use_consecutive_seeds(loaded, image_prompted) -> None:
    model = loaded[0]
    kwargs = {"model": model, "conditioning": image_prompted["conditioning"], "exemplar": image_prompted["exemplar"]}
    first = run("VideoBoothSampler", **kwargs, **sampler_inputs())[0]["samples"]
    again = run("VideoBoothSampler", **kwargs, **sampler_inputs())[0]["samples"]
    other = run("VideoBoothSampler", **kwargs, **sampler_inputs(seed=SEED + 1))[0]["samples"]
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)
    batch = run("VideoBoothSampler", **kwargs, **sampler_inputs(batch=2))[0]["samples"]
    assert batch.shape == (2 * FRAMES, 4, SIZE // 8, SIZE // 8)
    torch.testing.assert_close(batch[:FRAMES], first)
    torch.testing.assert_close(batch[FRAMES:], other)


def test_text_only_path(loaded, image_prompted) -> None:
    model, vae, clip, _ = loaded
    (conditioning,) = run("VideoBoothTextEncode", clip=clip, prompt="a red car on a road", subject_word="dog",
                          negative_prompt="None")
    assert not conditioning.image_prompted and conditioning.prompt_used == "a red car on a road"
    (latent,) = run("VideoBoothSampler", model=model, conditioning=conditioning, **sampler_inputs())
    assert latent["samples"].shape == (FRAMES, 4, SIZE // 8, SIZE // 8)
    prompted = run("VideoBoothSampler", model=model, conditioning=image_prompted["conditioning"],
                   exemplar=image_prompted["exemplar"], **sampler_inputs())[0]["samples"]
    assert not torch.allclose(latent["samples"], prompted)
    (frames,) = run("VideoBoothDecode", vae=vae, samples=latent, chunk_size=8)
    assert frames.shape == (FRAMES, SIZE, SIZE, 3)


def test_injection_from_a_comfyui_latent(loaded, image_prompted) -> None:
    model = loaded[0]
    raw = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(3))  # as VAE Encode makes it: unscaled
    (exemplar,) = run("VideoBoothLatentInjection", strength=0.5, start=0.0, end=0.5, latent={"samples": raw})
    assert exemplar.latent.shape == (1, 4, 1, 32, 32) and exemplar.vae is None
    torch.testing.assert_close(exemplar.latent[:, :, 0], raw[:1] * 0.18215)
    assert (exemplar.strength, exemplar.start, exemplar.end) == (0.5, 0.0, 0.5)
    (latent,) = run("VideoBoothSampler", model=model, conditioning=image_prompted["conditioning"], exemplar=exemplar,
                    **sampler_inputs())
    assert latent["samples"].shape == (FRAMES, 4, SIZE // 8, SIZE // 8) and torch.isfinite(latent["samples"]).all()


def test_decode_matches_raw_latents_and_chunking_does_not_matter(loaded) -> None:
    vae = loaded[1]
    raw = torch.randn(5, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    whole = run("VideoBoothDecode", vae=vae, samples={"samples": raw}, chunk_size=8)[0]
    chunked = run("VideoBoothDecode", vae=vae, samples={"samples": raw}, chunk_size=2)[0]
    torch.testing.assert_close(whole, chunked, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # ComfyUI's convention: LATENT samples go into the VAE decoder unscaled
        direct = vae.vae.decode(raw).sample
    torch.testing.assert_close(whole, ((direct + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1), rtol=1e-5, atol=1e-5)


# -- masks ---------------------------------------------------------------------------------------------
def test_invert_mask_for_loadimage_alpha_masks() -> None:
    image, mask = subject_image()
    direct, _ = run("VideoBoothImagePrompt", image=image, padding=0, invert_mask=False, mask=mask)
    inverted, _ = run("VideoBoothImagePrompt", image=image, padding=0, invert_mask=True, mask=1.0 - mask)
    assert direct.bbox == inverted.bbox == (20, 10, 90, 60)
    torch.testing.assert_close(direct.vae_pixels, inverted.vae_pixels)
    padded, _ = run("VideoBoothImagePrompt", image=image, padding=5, invert_mask=False, mask=mask)
    assert padded.bbox == (15, 5, 95, 65)
    whole, _ = run("VideoBoothImagePrompt", image=image, padding=0, invert_mask=False)
    assert whole.bbox == (0, 0, 96, 80)


def test_a_mask_that_looks_inverted_is_a_warning_naming_invert_mask(caplog) -> None:
    image, subject = subject_image()
    cutout = image * subject[..., None]  # a cut-out PNG as LoadImage gives it: transparent pixels black,
    loadimage_mask = 1.0 - subject  # and its mask 1 - alpha

    def warnings(**inputs) -> list[str]:
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            run("VideoBoothImagePrompt", padding=0, **inputs)
        return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]

    (message,) = warnings(image=cutout, invert_mask=False, mask=loadimage_mask)
    assert "turn invert_mask on" in message and "every border" in message and "flat colour" in message
    assert warnings(image=cutout, invert_mask=True, mask=loadimage_mask) == []
    assert warnings(image=image, invert_mask=False, mask=subject) == []  # a segmentation mask, subject = 1
    (message,) = warnings(image=image, invert_mask=True, mask=subject)
    assert "turn invert_mask off" in message and "every border" in message and "flat colour" not in message


# -- errors ----------------------------------------------------------------------------------------------
def test_missing_subject_word_lists_the_prompts_words(loaded, image_prompted) -> None:
    clip = loaded[2]
    with pytest.raises(errors.PromptError) as caught:
        run("VideoBoothTextEncode", clip=clip, prompt="A cat on a sofa", subject_word="dog", negative_prompt="None",
            image_embeds=image_prompted["embeds"])
    message = str(caught.value)
    assert "'dog'" in message and "'cat'" in message and "'sofa'" in message


def test_several_token_subject_anywhere_in_the_prompt(loaded, image_prompted) -> None:
    clip = loaded[2]
    (conditioning,) = run("VideoBoothTextEncode", clip=clip, prompt="On the moon, a teddy bear dances",
                          subject_word="Teddy Bear", negative_prompt="None", image_embeds=image_prompted["embeds"])
    assert conditioning.prompt_used == "on the moon, a sdksd dances"


def test_empty_mask_is_an_error_with_a_hint() -> None:
    image, mask = subject_image()
    with pytest.raises(errors.ImagePromptError, match="empty.*invert_mask"):
        run("VideoBoothImagePrompt", image=image, padding=0, invert_mask=False, mask=torch.zeros_like(mask))
    with pytest.raises(errors.ImagePromptError, match="empty.*invert_mask off"):
        run("VideoBoothImagePrompt", image=image, padding=0, invert_mask=True, mask=torch.ones_like(mask))


def test_mask_of_another_size_is_an_error() -> None:
    image, _ = subject_image()
    with pytest.raises(errors.ImagePromptError, match="LoadImage outputs an empty 64x64 mask"):
        run("VideoBoothImagePrompt", image=image, padding=0, invert_mask=False, mask=torch.zeros(1, 64, 64))
    with pytest.raises(errors.ImagePromptError, match=r"the mask is \(50, 40\)"):
        run("VideoBoothImagePrompt", image=image, padding=0, invert_mask=False, mask=torch.ones(1, 40, 50))


def test_wrong_file_kind_names_the_folder_and_the_expected_files(tiny_models, tmp_path, monkeypatch) -> None:
    root = tmp_path / "ComfyUI"  # capitals: the message names the folder as it is spelt
    root.mkdir()
    (root / "videobooth").mkdir()
    shutil.copy(tiny_models / "vae" / "videobooth_tiny_vae.safetensors",
                root / "videobooth" / "some_model.safetensors")
    shutil.copy(tiny_models / "videobooth" / "mapper.pt", root / "videobooth" / "mapper.pt")
    monkeypatch.setenv(bridge.MODELS_DIR_ENV, str(root))
    with pytest.raises(errors.CheckpointError) as caught:
        run("VideoBoothModelLoader", unet_name="some_model.safetensors", mapper_name="mapper.pt", precision="fp32",
            device="cpu")
    message = str(caught.value)
    assert "holds a VAE" in message and "watermark_remove_module.pt" in message
    assert f"The 'videobooth' model folder ({root / 'videobooth'}) should hold" in message
    with pytest.raises(errors.CheckpointError, match="mapper.pt"):  # the mapper chosen as the UNet
        run("VideoBoothModelLoader", unet_name="mapper.pt", mapper_name="mapper.pt", precision="fp32", device="cpu")
    with pytest.raises(errors.CheckpointError, match="not found in the 'videobooth' model folder"):
        run("VideoBoothModelLoader", unet_name="gone.pt", mapper_name="mapper.pt", precision="fp32", device="cpu")
    with pytest.raises(errors.CheckpointError, match=r"'vae' model folder .*sd-vae-ft-ema"):
        shutil.copy(tiny_models / "videobooth" / "mapper.pt", root / "vae.pt")
        (root / "vae").mkdir()
        shutil.move(root / "vae.pt", root / "vae" / "vae.pt")
        run("VideoBoothVAELoader", vae_name="vae.pt", precision="fp32", device="cpu")


@pytest.mark.parametrize("change, pattern", [
    ({"width": 65}, "width must be a positive multiple of 8, got 65; try 64"),
    ({"height": 60}, "height must be a positive multiple of 8"),
    ({"frames": 0}, "frames must be at least 1"),
    ({"batch": 0}, "batch must be at least 1"),
    ({"sampler": "heun"}, "unknown sampler"),
    ({"sampler": "ddim", "spacing": "linspace"}, "unknown timestep spacing"),
    ({"sampler": "ddim", "eta": 1.5}, "eta must be between 0 and 1"),
])
def test_bad_sampler_settings_fail_before_sampling(loaded, image_prompted, change, pattern) -> None:
    with pytest.raises(errors.SamplingError, match=pattern):
        run("VideoBoothSampler", model=loaded[0], conditioning=image_prompted["conditioning"],
            **sampler_inputs(**change))


def test_bad_injection_settings(image_prompted) -> None:
    with pytest.raises(errors.SamplingError, match="start < end"):
        run("VideoBoothLatentInjection", strength=1.0, start=0.5, end=0.5, image_prompt=image_prompted["prepared"])
    with pytest.raises(errors.SamplingError, match="connect both"):
        run("VideoBoothLatentInjection", strength=1.0, start=0.0, end=1.0, image_prompt=image_prompted["prepared"])
    with pytest.raises(errors.SamplingError, match=r"shape \(frames, 4"):
        run("VideoBoothLatentInjection", strength=1.0, start=0.0, end=1.0, latent={"samples": torch.zeros(1, 16, 8, 8)})


def test_widgets_are_checked_by_their_settings_rule_naming_the_widget() -> None:
    """The nodes' one widget check (nodes/_widgets.py): the settings' rules, before any file or model is touched."""
    with pytest.raises(errors.SamplingError, match=r"^strength_model must be between -10 and 10, got 1e\+30"):
        run("VideoBoothLoRA", model=None, lora_name="style.safetensors", strength_model=1e30, strength_clip=1.0,
            kv_weights="mapper")
    with pytest.raises(errors.SamplingError, match=r"^strength must be between 0 and 2, got 3"):
        run("VideoBoothLatentInjection", strength=3.0, start=0.0, end=1.0)
    with pytest.raises(errors.SamplingError, match=r"^padding must be at least 0"):
        run("VideoBoothImagePrompt", image=torch.zeros(1, 8, 8, 3), padding=-1, invert_mask=True)


def test_decode_rejects_other_latents(loaded) -> None:
    with pytest.raises(errors.SamplingError, match="4 channels"):
        run("VideoBoothDecode", vae=loaded[1], samples={"samples": torch.zeros(2, 16, 8, 8)}, chunk_size=4)


def test_tokenizer_choice(loaded, models_dir) -> None:
    with pytest.raises(errors.CheckpointError, match="is gone"):
        run("VideoBoothCLIPLoader", clip_name="videobooth_tiny_clip_text.safetensors", tokenizer="nope",
            precision="fp32", device="cpu")
    (clip,) = run("VideoBoothCLIPLoader", clip_name="videobooth_tiny_clip_text.safetensors",
                  tokenizer="videobooth_tiny_tokenizer", precision="fp32", device="cpu")
    assert clip.tokenizer_path == models_dir / "text_encoders" / "videobooth_tiny_tokenizer"


# -- host integration (progress, cancel, memory, folders) with stand-ins for ComfyUI ------------------------
def test_progress_previews_and_cancel(loaded, image_prompted, monkeypatch) -> None:
    updates = []

    class FakeBar:
        def __init__(self, total, node_id=None):
            self.node_id = node_id

        def update_absolute(self, value, total=None, preview=None):
            updates.append((self.node_id, value, total, preview))

    monkeypatch.setattr(bridge, "comfy_utils", types.SimpleNamespace(ProgressBar=FakeBar))
    monkeypatch.setattr(bridge, "previews_enabled", lambda: True)
    kwargs = {"model": loaded[0], "conditioning": image_prompted["conditioning"],
              "exemplar": image_prompted["exemplar"]}
    run("VideoBoothSampler", **kwargs, **sampler_inputs(batch=2), unique_id="12")
    assert [u[1] for u in updates] == list(range(1, 2 * STEPS + 1))
    assert all(u[0] == "12" and u[2] == 2 * STEPS for u in updates)
    fmt, picture, size = updates[0][3]
    assert fmt == "JPEG" and size == 512 and picture.size == (4 * SIZE // 8, SIZE // 8)

    class Interrupted(Exception):
        pass

    calls = []

    def interrupt_on_second_step():
        calls.append(1)
        if len(calls) == 3:  # once before the video, then after each step
            raise Interrupted

    monkeypatch.setattr(bridge, "check_interrupt", interrupt_on_second_step)
    with pytest.raises(Interrupted):
        run("VideoBoothSampler", **kwargs, **sampler_inputs())
    assert len(calls) == 3


def test_models_are_handed_to_comfyui_memory_management(loaded, image_prompted, monkeypatch) -> None:
    loads = []

    class FakePatcher:
        def __init__(self, model, load_device, offload_device):
            self.model, self.load_device, self.offload_device = model, load_device, offload_device

    fake_mm = types.SimpleNamespace(
        load_models_gpu=lambda patchers, memory_required=0, force_full_load=False: loads.append(
            (patchers, memory_required, force_full_load)),
        throw_exception_if_processing_interrupted=lambda: None,
        intermediate_device=lambda: "cpu",
    )
    monkeypatch.setattr(bridge, "model_patcher", types.SimpleNamespace(ModelPatcher=FakePatcher))
    monkeypatch.setattr(bridge, "model_management", fake_mm)
    model, vae, _, _ = loaded
    unet = bridge.ManagedModel({"unet": model.unet, "mapper": model.mapper}, torch.device("cpu"), torch.device("cpu"))
    assert isinstance(unet.patcher, FakePatcher) and unet.patcher.model is unet.holder
    assert unet.module("unet") is model.unet
    managed_model = type(model)(unet, model.dtype, model.unet_path, model.mapper_path)
    vae_managed = bridge.ManagedModel({"vae": vae.vae}, torch.device("cpu"), torch.device("cpu"))
    managed_vae = type(vae)(vae_managed, vae.path)
    (exemplar,) = run("VideoBoothLatentInjection", strength=1.0, start=0.0, end=1.0,
                      image_prompt=image_prompted["prepared"], vae=managed_vae)
    run("VideoBoothSampler", model=managed_model, conditioning=image_prompted["conditioning"], exemplar=exemplar,
        **sampler_inputs())
    patchers, memory, full = loads[-1]
    assert patchers == [unet.patcher, vae_managed.patcher] and full is True
    # ComfyUI is asked for the dry-run estimate of one step's working memory, beyond the weights
    core_memory = importlib.import_module(f"{PACK_NAME}.videobooth_core.sampling.memory")
    core_sampling = importlib.import_module(f"{PACK_NAME}.videobooth_core.sampling.denoiser")
    cond = image_prompted["conditioning"]
    denoiser = core_sampling.VideoDenoiser(model.unet, cond.cond, cond.null, 4.0, "official")
    expected = core_memory.estimate_step_memory(denoiser, (1, 4, FRAMES, SIZE // 8, SIZE // 8), True, "cpu")
    assert memory == expected.activations_bytes > 0


class FakeFolderPaths:
    """ComfyUI's folder_paths as far as the pack uses it: add_model_folder_path appends a path to a folder or
    creates the folder with no extensions (= any file), as ComfyUI's does."""

    supported_pt_extensions = {".pt", ".safetensors"}

    def __init__(self, models_dir: str, folders: dict) -> None:
        self.models_dir, self.folder_names_and_paths = models_dir, folders

    def add_model_folder_path(self, name: str, path: str, is_default: bool = False) -> None:
        paths = self.folder_names_and_paths.setdefault(name, ([], set()))[0]
        if path not in paths:
            paths.insert(0, path) if is_default else paths.append(path)


def test_folder_registration_keeps_existing_entries(tmp_path) -> None:
    yaml_path = str(tmp_path / "from_yaml")
    fake = FakeFolderPaths(str(tmp_path / "models"), {"videobooth": ([yaml_path], set()),
                                                      "vae": (["/somewhere/vae"], {".pt"})})
    bridge.register_videobooth_folder(fake)
    bridge.register_videobooth_folder(fake)  # twice: nothing duplicated
    paths, extensions = fake.folder_names_and_paths["videobooth"]
    assert paths == [yaml_path, str(tmp_path / "models" / "videobooth")]
    assert extensions == {".pt", ".safetensors"}
    assert fake.folder_names_and_paths["vae"] == (["/somewhere/vae"], {".pt"})

    fresh = FakeFolderPaths(str(tmp_path / "m"), {})
    bridge.register_videobooth_folder(fresh)
    assert fresh.folder_names_and_paths == {"videobooth": ([str(tmp_path / "m" / "videobooth")],
                                                          {".pt", ".safetensors"})}


def test_previews_use_comfyui_latent_rgb_factors(monkeypatch) -> None:
    latents = torch.zeros(1, 4, 1, 3, 5)
    latents[:, 0] = 1.0  # channel 0 only: the preview's colour is the first row of the factors
    assert bridge.latent_preview(latents).getpixel((0, 0)) == (172, 156, 168)  # the stand-in, without ComfyUI
    latent_formats = types.ModuleType("comfy.latent_formats")
    latent_formats.SD15 = lambda: types.SimpleNamespace(latent_rgb_factors=[[0.5, -0.5, 0.0]] + [[0.0] * 3] * 3)
    monkeypatch.setitem(sys.modules, "comfy", types.ModuleType("comfy"))
    monkeypatch.setitem(sys.modules, "comfy.latent_formats", latent_formats)
    picture = bridge.latent_preview(latents)
    assert picture.size == (5, 3) and picture.getpixel((0, 0)) == (191, 63, 127)


def test_convert_weights_node(tiny_models, tmp_path, monkeypatch) -> None:
    (tmp_path / "videobooth").mkdir()
    for name in ("watermark_remove_module.pt", "mapper.pt"):
        shutil.copy(tiny_models / "videobooth" / name, tmp_path / "videobooth" / name)
    monkeypatch.setenv(bridge.MODELS_DIR_ENV, str(tmp_path))
    result = run("VideoBoothConvertWeights", unet_name="watermark_remove_module.pt", mapper_name="mapper.pt",
                 precision="fp32", overwrite=False)
    summary = result["result"][0]
    assert result["ui"]["text"] == [summary] and summary.count("wrote") == 2
    assert {p.name for p in (tmp_path / "videobooth").iterdir()} >= {"videobooth_unet.safetensors",
                                                                   "videobooth_mapper.safetensors"}
    again = run("VideoBoothConvertWeights", unet_name="watermark_remove_module.pt", mapper_name="none",
                precision="fp32", overwrite=False)["result"][0]
    assert "skipped" in again and "mapper" not in again
    (converted,) = run("VideoBoothModelLoader", unet_name="videobooth_unet.safetensors",
                       mapper_name="videobooth_mapper.safetensors", precision="fp32", device="cpu")
    (original,) = run("VideoBoothModelLoader", unet_name="watermark_remove_module.pt", mapper_name="mapper.pt",
                      precision="fp32", device="cpu")
    for (name, a), (_, b) in zip(converted.unet.state_dict().items(), original.unet.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    with pytest.raises(errors.CheckpointError, match="nothing to convert"):
        run("VideoBoothConvertWeights", unet_name="none", mapper_name="none", precision="fp16", overwrite=False)


def test_loader_cache_reuses_the_loaded_model(models_dir) -> None:
    loader = node("VideoBoothVAELoader")
    first = loader.load("videobooth_tiny_vae.safetensors", "fp32", "cpu")[0]
    assert loader.load("videobooth_tiny_vae.safetensors", "fp32", "cpu")[0] is first
    assert loader.load("videobooth_tiny_vae.safetensors", "fp16", "cpu")[0] is not first


# -- messages in the widgets' words, as the frontend shows them -----------------------------------------
def test_node_errors_reach_the_frontend_as_videobooth_class(loaded, image_prompted) -> None:
    """ComfyUI reports an exception's type as module.qualname (execution.full_type_name): the pack's errors read
    VideoBooth.<Class>, are still the core's classes, and keep their message."""
    with pytest.raises(errors.SamplingError) as caught:
        run("VideoBoothSampler", model=loaded[0], conditioning=image_prompted["conditioning"],
            **sampler_inputs(width=65))
    error = caught.value
    assert f"{type(error).__module__}.{type(error).__qualname__}" == "VideoBooth.SamplingError"
    assert isinstance(error, errors.VideoBoothError) and str(error).startswith("width must be a positive multiple")
    assert error.__cause__ is None and error.__suppress_context__
    assert all(getattr(cls, cls.FUNCTION)._reports_errors for cls in MAPPINGS.values())


@pytest.mark.parametrize("start_frames, start_size, pattern", [
    (1, 32, r"not the video's size, 64x64 pixels \(the width and height widgets\): 32x32 pixels; set width 32 "
            r"and height 32, or encode the start frames at 64x64"),
    (FRAMES, SIZE, rf"start_latent holds {FRAMES} frames .* \(the frames widget\): {FRAMES}; raise frames above "
                   rf"{FRAMES}, or start from fewer frames \(VideoBooth Start Frames' last_frames\)"),
])
def test_start_frame_errors_speak_of_widgets_and_pixels(loaded, image_prompted, start_frames, start_size,
                                                        pattern) -> None:
    start = {"samples": torch.zeros(start_frames, 4, start_size // 8, start_size // 8)}
    with pytest.raises(errors.SamplingError, match=pattern) as caught:
        run("VideoBoothSampler", model=loaded[0], conditioning=image_prompted["conditioning"], start_latent=start,
            **sampler_inputs())
    assert "--" not in str(caught.value)


def test_context_options_errors_speak_of_widgets() -> None:
    pattern = r"context_overlap must be at most context_window - 2 = 6 .*: 7; lower context_overlap to 4 or raise " \
              r"context_window to 9"
    with pytest.raises(errors.SamplingError, match=pattern) as caught:
        run("VideoBoothContextOptions", context_window=8, context_overlap=7, context_fuse="pyramid", noise_reuse=False)
    assert "--" not in str(caught.value)
    (options,) = run("VideoBoothContextOptions", context_window=8, context_overlap=6, context_fuse="flat",
                     noise_reuse=True)
    assert (options.window, options.overlap, options.fuse, options.noise_reuse) == (8, 6, "flat", True)


def test_start_frames_names_its_own_widget(loaded) -> None:
    with pytest.raises(errors.SamplingError, match=r"^last_frames must be at least 1") as caught:
        run("VideoBoothStartFrames", vae=loaded[1], image=torch.zeros(2, 64, 64, 3), last_frames=0, width=64,
            height=64)
    assert "extend" not in str(caught.value)


def test_the_sampler_refuses_several_subjects_with_context_windows_before_sampling(loaded, image_prompted,
                                                                                   monkeypatch) -> None:
    """The node road runs the core's one validation: two subjects' exemplars and a video longer than the context
    window are refused in the widgets' words before the denoiser is built (the pipeline road refuses the same)."""
    sampling = sys.modules[f"{PACK_NAME}.nodes.sampling"]
    subjects_module = sys.modules[f"{PACK_NAME}.nodes.subjects"]
    exemplar = image_prompted["exemplar"]
    second = subjects_module.NodeSubject("cat", image_prompted["embeds"].words, exemplar, None)
    (context,) = run("VideoBoothContextOptions", context_window=8, context_overlap=2, context_fuse="pyramid",
                     noise_reuse=False)
    class Started(Exception):
        pass

    def started(*args, **kwargs):
        raise Started

    monkeypatch.setattr(sampling, "prepare_denoiser", started)
    inputs = {"model": loaded[0], "conditioning": image_prompted["conditioning"], "exemplar": exemplar,
              "subjects": (second,), "context": context}
    with pytest.raises(errors.SamplingError) as caught:
        run("VideoBoothSampler", **inputs, **sampler_inputs(frames=12))
    message = str(caught.value)
    assert message.startswith("several subjects' image prompts and a long video (context windows) do not go "
                              "together yet; frames: 12; use at most 8 frames (or a context_window (VideoBooth "
                              "Context Options) of 12 or more)"), message
    assert "strength of each subject's VideoBooth Latent Injection" in message and "--" not in message
    with pytest.raises(Started):  # one window: it goes on to sampling
        run("VideoBoothSampler", **inputs, **sampler_inputs(frames=8))


def test_image_prompt_and_evaluation_read_a_loadimage_mask_alike(monkeypatch) -> None:
    """One LoadImage mask of a cut-out (1 on the transparent background) gives the Image Prompt and the evaluation
    nodes the same subject with their defaults, and with invert_mask off both read a subject = 1 mask."""
    evaluation = importlib.import_module(f"{PACK_NAME}.nodes.evaluation")
    image, subject = subject_image()
    loadimage_mask = 1.0 - subject
    defaults = {name: MAPPINGS[name].INPUT_TYPES() for name in
                ("VideoBoothImagePrompt", "VideoBoothScore", "VideoBoothBestOfN", "VideoBoothDrift")}
    assert {name: (spec["required"] | spec.get("optional", {}))["invert_mask"][1]["default"]
            for name, spec in defaults.items()} == dict.fromkeys(defaults, True)
    for name in ("VideoBoothScore", "VideoBoothBestOfN", "VideoBoothDrift"):  # appended last: old files keep meaning
        assert list(defaults[name]["optional"]) == ["mask", "invert_mask"], name
    prepared, _ = run("VideoBoothImagePrompt", image=image, padding=0, invert_mask=True, mask=loadimage_mask)
    assert prepared.bbox == (20, 10, 90, 60)
    reference = evaluation._reference(image, loadimage_mask, True)
    torch.testing.assert_close(reference, prepared.square.permute(1, 2, 0))
    torch.testing.assert_close(evaluation._reference(image, subject, False), reference)
    seen = []
    monkeypatch.setattr(evaluation, "_reference", lambda image, mask, invert: seen.append(invert) or reference)
    scorer = type("Scorer", (), {"score": lambda self, frames, reference, prompt: dict.fromkeys(evaluation.METRICS)})()
    run("VideoBoothScore", frames=image, metric_models=scorer, image_prompt=image, prompt="", mask=loadimage_mask)
    run("VideoBoothScore", frames=image, metric_models=scorer, image_prompt=image, prompt="", mask=subject,
        invert_mask=False)
    assert seen == [True, False]


def test_a_mask_that_looks_inverted_is_shown_on_the_node(monkeypatch) -> None:
    image, subject = subject_image()
    sent = []
    server = type("Server", (), {"send_progress_text": lambda self, text, node_id: sent.append((node_id, text))})()
    monkeypatch.setattr(bridge, "PromptServer", type("PromptServer", (), {"instance": server}))
    run("VideoBoothImagePrompt", image=image * subject[..., None], padding=0, invert_mask=False, mask=1.0 - subject,
        unique_id="5")
    ((node_id, text),) = sent
    assert node_id == "5" and "turn invert_mask on" in text
    run("VideoBoothImagePrompt", image=image * subject[..., None], padding=0, invert_mask=True, mask=1.0 - subject,
        unique_id="5")
    assert len(sent) == 1


def test_native_context_windows_follow_the_context_options_rules() -> None:
    """The native road's context node takes its ranges and its refusal (in widget words) from the pack's Context
    Options, and installs the frame-0-anchored handler on a clone of the model."""
    import types

    node = MAPPINGS["VideoBoothNativeContextWindows"]()

    class Patcher:
        def __init__(self) -> None:
            self.model = types.SimpleNamespace(videobooth_mapper=object())
            self.model_options = {"transformer_options": {}}

        def clone(self) -> "Patcher":
            return Patcher()

    from videobooth_core.settings import SETTINGS

    assert node.INPUT_TYPES()["required"]["context_window"][1]["default"] == SETTINGS["context_window"].default
    with pytest.raises(errors.SamplingError, match="context_overlap must be at most context_window - 2"):
        node.apply(Patcher(), 16, 15, "pyramid")
    original = Patcher()
    (patched,) = node.apply(original, 16, 4, "flat")
    handler = patched.model_options["context_handler"]
    assert patched is not original and "context_handler" not in original.model_options
    assert (handler.options.window, handler.options.overlap, handler.options.fuse) == (16, 4, "flat")


def test_native_start_frames_make_an_inpainting_latent_that_keeps_the_start_frames() -> None:
    """The start frames first, zeros after, and ComfyUI's noise_mask 0 on them (kept) and 1 on the frames to make;
    refused in the widgets' words when no frame is left to generate."""
    node = MAPPINGS["VideoBoothNativeStartFrames"]()
    start = torch.randn(2, 4, 3, 5, generator=torch.Generator().manual_seed(1))
    (latent,) = node.make({"samples": start}, 6)
    assert torch.equal(latent["samples"][:2], start) and not latent["samples"][2:].any()
    assert latent["noise_mask"].shape == (6, 1, 3, 5)
    assert latent["noise_mask"][:, 0].flatten(1).amax(1).tolist() == [0, 0, 1, 1, 1, 1]
    assert latent["noise_mask"][:, 0].flatten(1).amin(1).tolist() == [0, 0, 1, 1, 1, 1]
    with pytest.raises(errors.SamplingError, match="raise frames above 2"):
        node.make({"samples": start}, 2)
