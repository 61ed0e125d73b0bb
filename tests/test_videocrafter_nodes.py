"""The VideoCrafter nodes (issue 26), called directly (no ComfyUI needed) on tiny sets of ``make-tiny --family``: the
loader reads models/videocrafter, the sampler gives the Python API's frames as an IMAGE, and the image-to-video model
takes its start image from an IMAGE."""

from __future__ import annotations

import importlib
import sys
import types
from pathlib import Path

import pytest
import torch

from conftest import PACK_NAME, import_pack

pack = import_pack()
bridge = sys.modules[f"{PACK_NAME}.nodes._bridge"]
vc_nodes = sys.modules[f"{PACK_NAME}.nodes.videocrafter"]
errors = importlib.import_module(f"{PACK_NAME}.videobooth_core.errors")
tiny = importlib.import_module(f"{PACK_NAME}.videobooth_core.app.tiny_videocrafter")
api = importlib.import_module(f"{PACK_NAME}.videobooth_core.videocrafter_pipeline")
MAPPINGS = pack.NODE_CLASS_MAPPINGS
SAMPLER = dict(prompt="a cat", negative_prompt="", frames=4, width=64, height=64, sampler="ddim", steps=4, eta=1.0,
               cfg=12.0, fps=0, seed=3)


def run(node_id: str, **inputs):
    cls = MAPPINGS[node_id]
    return getattr(cls(), cls.FUNCTION)(**inputs)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("videocrafter_models")
    tiny.make_tiny_videocrafter(root, "videocrafter2")
    tiny.make_tiny_videocrafter(root, "videocrafter1-i2v-512")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(bridge.MODELS_DIR_ENV, str(root))
        yield root


def test_the_loader_lists_models_videocrafter(models: Path) -> None:
    files, options = MAPPINGS["VideoBoothVideoCrafterLoader"].INPUT_TYPES()["required"]["ckpt_name"]
    assert files == ["videocrafter1-i2v-512.ckpt", "videocrafter2.ckpt"]
    assert "videocrafter" in options["tooltip"]


def test_the_sampler_gives_the_apis_frames_as_an_image(models: Path) -> None:
    (model,) = run("VideoBoothVideoCrafterLoader", ckpt_name="videocrafter2.ckpt", precision="fp32", device="cpu")
    assert model.pipeline.kind == "videocrafter2"
    (frames,) = run("VideoBoothVideoCrafterSampler", model=model, **SAMPLER)
    assert frames.shape == (4, 64, 64, 3) and frames.dtype == torch.float32
    expected = model.pipeline.generate(
        api.VideoCrafterRequest(prompt="a cat", frames=4, width=64, height=64, steps=4, seed=3))
    assert torch.equal(frames, expected.frames.float() / 255)
    (again,) = run("VideoBoothVideoCrafterLoader", ckpt_name="videocrafter2.ckpt", precision="fp32", device="cpu")
    assert again is model  # loaded once while the file and settings stay the same
    with pytest.raises(errors.SamplingError, match="breaks at this step count"):
        run("VideoBoothVideoCrafterSampler", model=model, **{**SAMPLER, "steps": 3})
    with pytest.raises(errors.ImagePromptError, match="needs the image-to-video model"):
        run("VideoBoothVideoCrafterSampler", model=model, **SAMPLER, start_image=torch.rand(1, 32, 32, 3))
    # the settings table's ranges, named by the widget, before any step runs
    for change, words in (({"frames": 257}, "frames must be between 1 and 256, got 257; the default is 16"),
                          ({"frames": 65}, r"more than 64 frames need context windows: 65; give context_window "
                                           r"\(VideoBooth Context Options\) 16 \(the trained length\), or at most 64 "
                                           "frames"),
                          ({"cfg": 0.5}, "cfg must be at least 1 and at most 30, got 0.5; the default is 12"),
                          ({"negative_prompt": 5}, "negative_prompt must be a string, got 5")):
        with pytest.raises(errors.SamplingError, match=words):
            run("VideoBoothVideoCrafterSampler", model=model, **{**SAMPLER, **change})


def test_the_sampler_widget_runs_the_fast_samplers_as_the_api_does(models: Path, monkeypatch) -> None:
    """``sampler`` dpmpp_2m: the API's frames, the progress bar sized to its steps (the official DDIM's count
    differs: 30 steps are 31 timesteps there); lcm refused by name, naming the widget, before any step."""
    (model,) = run("VideoBoothVideoCrafterLoader", ckpt_name="videocrafter2.ckpt", precision="fp32", device="cpu")
    totals = []
    monkeypatch.setattr(bridge.Progress, "__init__", lambda self, total, node=None: totals.append(total))
    monkeypatch.setattr(bridge.Progress, "update", lambda self, value, preview=None: None)
    (frames,) = run("VideoBoothVideoCrafterSampler", model=model, **{**SAMPLER, "sampler": "dpmpp_2m", "steps": 3})
    expected = model.pipeline.generate(
        api.VideoCrafterRequest(prompt="a cat", frames=4, width=64, height=64, sampler="dpmpp_2m",
                                steps=3, seed=3))
    assert torch.equal(frames, expected.frames.float() / 255)
    assert totals == [3]
    assert api.step_count(api.VideoCrafterRequest(prompt="x", steps=30)) == 31
    with pytest.raises(errors.SamplingError, match=r"^sampler 'lcm' is not available: .*distilled"):
        run("VideoBoothVideoCrafterSampler", model=model, **{**SAMPLER, "sampler": "lcm"})


def test_image_to_video_takes_its_start_image_from_an_image(models: Path) -> None:
    (model,) = run("VideoBoothVideoCrafterLoader", ckpt_name="videocrafter1-i2v-512.ckpt", precision="fp32",
                   device="cpu")
    image = torch.rand(1, 48, 80, 3, generator=torch.Generator().manual_seed(0))
    (frames,) = run("VideoBoothVideoCrafterSampler", model=model, **SAMPLER, start_image=image)
    expected = model.pipeline.generate(
        api.VideoCrafterRequest(prompt="a cat", frames=4, width=64, height=64, steps=4, seed=3,
                                start_image=image[0]))
    assert torch.equal(frames, expected.frames.float() / 255)
    with pytest.raises(errors.ImagePromptError, match="needs a start image"):
        run("VideoBoothVideoCrafterSampler", model=model, **SAMPLER)


def test_the_sampler_takes_the_context_options_as_windows_of_consecutive_frames(models: Path) -> None:
    """VideoBooth Context Options into the VideoCrafter Sampler: the API's windowed video (contiguous windows);
    FreeNoise's noise_reuse is VideoBooth's and refused by name."""
    (model,) = run("VideoBoothVideoCrafterLoader", ckpt_name="videocrafter2.ckpt", precision="fp32", device="cpu")
    (context,) = run("VideoBoothContextOptions", context_window=4, context_overlap=2, context_fuse="flat",
                     noise_reuse=False)
    (frames,) = run("VideoBoothVideoCrafterSampler", model=model, **{**SAMPLER, "frames": 7}, context=context)
    expected = model.pipeline.generate(
        api.VideoCrafterRequest(prompt="a cat", frames=7, width=64, height=64, steps=4, seed=3,
                                context_window=4, context_overlap=2, context_fuse="flat"))
    plain = model.pipeline.generate(
        api.VideoCrafterRequest(prompt="a cat", frames=7, width=64, height=64, steps=4, seed=3))
    assert frames.shape == (7, 64, 64, 3) and torch.equal(frames, expected.frames.float() / 255)
    assert not torch.equal(expected.frames, plain.frames)
    (reuse,) = run("VideoBoothContextOptions", context_window=4, context_overlap=2, context_fuse="flat",
                   noise_reuse=True)
    with pytest.raises(errors.SamplingError,
                       match="noise_reuse .* does not apply to VideoCrafter.*turn noise_reuse off"):
        run("VideoBoothVideoCrafterSampler", model=model, **{**SAMPLER, "frames": 7}, context=reuse)


def test_the_model_is_handed_to_comfyui_memory_management(models: Path, monkeypatch) -> None:
    """Issue 26: the loader hands the pipeline's modules to one ComfyUI ModelPatcher, leaving them on the offload
    device; the sampler asks ComfyUI to load it, with one step's working memory (the pipeline's own estimate), before
    the first step, and gives the API's frames."""
    events = []

    class FakePatcher:
        def __init__(self, model, load_device, offload_device):
            self.model, self.load_device, self.offload_device = model, load_device, offload_device

    fake_mm = types.SimpleNamespace(
        load_models_gpu=lambda patchers, memory_required=0, force_full_load=False: events.append(
            ("load", patchers, memory_required, force_full_load)),
        throw_exception_if_processing_interrupted=lambda: None, intermediate_device=lambda: "cpu")
    monkeypatch.setattr(bridge, "model_patcher", types.SimpleNamespace(ModelPatcher=FakePatcher))
    monkeypatch.setattr(vc_nodes, "_CACHE", {})
    # a compute device other than the offload one: the modules must stay on the offload device (the CPU)
    monkeypatch.setattr(bridge, "devices_for", lambda role, choice: (torch.device("meta"), torch.device("cpu")))
    (model,) = run("VideoBoothVideoCrafterLoader", ckpt_name="videocrafter1-i2v-512.ckpt", precision="fp32",
                   device="auto")
    pipe, managed = model.pipeline, model.managed
    assert pipe.device == torch.device("meta") and managed.load_device == torch.device("meta")
    assert managed.offload_device == torch.device("cpu") and managed.patcher.model is managed.holder
    assert {name for name, _ in managed.holder.named_children()} == {"unet", "vae", "text_encoder", "image_encoder",
                                                                     "projector"}
    assert managed.module("unet") is pipe.unet and managed.module("projector") is pipe.projector
    assert {t.device.type for t in (*managed.holder.parameters(), *managed.holder.buffers())} == {"cpu"}

    monkeypatch.undo()  # the CPU for sampling, with the fakes again
    monkeypatch.setattr(bridge, "model_patcher", types.SimpleNamespace(ModelPatcher=FakePatcher))
    monkeypatch.setattr(bridge, "model_management", fake_mm)
    monkeypatch.setattr(vc_nodes, "_CACHE", {})
    monkeypatch.setattr(bridge.Progress, "update", lambda self, value, preview=None: events.append(("step", value)))
    (model,) = run("VideoBoothVideoCrafterLoader", ckpt_name="videocrafter2.ckpt", precision="fp32", device="cpu")
    (frames,) = run("VideoBoothVideoCrafterSampler", model=model, **SAMPLER)
    request = api.VideoCrafterRequest(prompt="a cat", frames=4, width=64, height=64, steps=4, seed=3)
    expected = model.pipeline.estimate_memory(request).activations_bytes
    assert events[0] == ("load", [model.managed.patcher], expected, True) and expected > 0
    assert [e[0] for e in events[1:]] == ["step"] * 4
    assert torch.equal(frames, model.pipeline.generate(request).frames.float() / 255)
