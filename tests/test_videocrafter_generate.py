"""VideoCrafter1/2 end to end (issue 26): ``make-tiny --family``, the Python API and ``generate --models DIR`` picking
the family from the files it finds, on tiny random sets of the released layout; bad input refused before any model
loads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from videobooth_core.app.cli import main
from videobooth_core.app.tiny_videocrafter import make_tiny_videocrafter
from videobooth_core.conditioning.openclip_text import encode_penultimate, tokenize_openclip
from videobooth_core.errors import CheckpointError, ImagePromptError, SamplingError, VideoBoothError
from videobooth_core.sampling.noise import GeneratorNoise
from videobooth_core.sampling.videocrafter import VideoCrafterDDIM, guided_unet, sample_videocrafter_ddim
from videobooth_core.video_io import read_last_frames
from videobooth_core.videocrafter_pipeline import (
    VideoCrafterPipeline,
    VideoCrafterRequest,
    check_request,
    find_videocrafter_models,
    pick_videocrafter_model,
)

SMALL = dict(frames=4, height=64, width=64, steps=4)


@pytest.fixture(scope="module")
def sets(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("videocrafter_sets")
    make_tiny_videocrafter(root / "vc2", "videocrafter2")
    make_tiny_videocrafter(root / "i2v", "videocrafter1-i2v-512")
    return root


def test_the_tiny_sets_are_found_by_their_keys_with_their_kind(sets: Path) -> None:
    assert find_videocrafter_models(sets / "vc2") == [(sets / "vc2/videocrafter/videocrafter2.ckpt", "videocrafter2")]
    assert pick_videocrafter_model(sets / "i2v")[1] == "videocrafter1-i2v-512"
    with pytest.raises(CheckpointError, match="--model matches 0"):
        pick_videocrafter_model(sets / "vc2", "videocrafter1-t2v-512")


def test_the_api_is_the_sum_of_the_tested_stages(sets: Path) -> None:
    """The pipeline's latent equals the stages run by hand with the kind's official settings (fps 28, use_scale
    with scale_b 0.7, the empty prompt unconditional), so its wiring adds nothing of its own."""
    pipe = VideoCrafterPipeline.from_models_dir(sets / "vc2")
    result = pipe.generate(VideoCrafterRequest(prompt="a cat", seed=5, **SMALL))
    assert result.frames.shape == (4, 64, 64, 3) and result.frames.dtype == torch.uint8
    assert (result.request.fps, result.request.guidance, result.request.eta) == (28, 12.0, 1.0)
    context, uncond = (encode_penultimate(pipe.text_encoder, tokenize_openclip(pipe.tokenizer, [p])) for p in ("a cat", ""))
    schedule = VideoCrafterDDIM(4, 1.0, use_scale=True, scale_b=0.7)
    with torch.no_grad():
        by_hand = sample_videocrafter_ddim(guided_unet(pipe.unet, context, uncond, torch.tensor([28])), schedule,
                                           (1, 4, 4, 8, 8), GeneratorNoise(torch.Generator().manual_seed(5)),
                                           guidance=12.0)
    assert torch.equal(result.latents, by_hand)
    again = pipe.generate(VideoCrafterRequest(prompt="a cat", seed=5, **SMALL))
    other = pipe.generate(VideoCrafterRequest(prompt="a cat", seed=6, **SMALL))
    assert torch.equal(again.frames, result.frames) and not torch.equal(other.latents, result.latents)


def test_image_to_video_conditions_on_the_start_image(sets: Path) -> None:
    pipe = VideoCrafterPipeline.from_models_dir(sets / "i2v")
    assert pipe.defaults.fps == 8
    image = torch.rand(48, 80, 3, generator=torch.Generator().manual_seed(0))
    first = pipe.generate(VideoCrafterRequest(prompt="a cat", start_image=image, **SMALL))
    second = pipe.generate(VideoCrafterRequest(prompt="a cat", start_image=1 - image, **SMALL))
    assert first.frames.shape == (4, 64, 64, 3)
    assert not torch.equal(first.latents, second.latents)  # the image tokens reach the UNet
    tokens = pipe.image_tokens(torch.zeros(1, 3, 224, 224))
    assert tokens.shape == (1, 16, 32) and tokens.abs().sum() > 0  # a zero image has non-zero tokens


def test_bad_requests_are_refused_naming_the_value() -> None:
    with pytest.raises(SamplingError, match=r"breaks at this step count.*: 3; use 2 or 4 steps"):
        check_request(VideoCrafterRequest(prompt="x", steps=3), "videocrafter2")
    with pytest.raises(SamplingError, match=r"breaks at this step count.*: 105; use 100 or 112 steps"):
        check_request(VideoCrafterRequest(prompt="x", steps=105), "videocrafter2")
    assert VideoCrafterDDIM(30).timesteps.tolist() == list(range(1, 1000, 33))  # 31 steps: the official count
    assert VideoCrafterDDIM(50).timesteps.tolist() == list(range(1, 1000, 20))
    with pytest.raises(SamplingError, match=r"width must be a multiple of 64: 500; use e\.g\. 512"):
        check_request(VideoCrafterRequest(prompt="x", width=500), "videocrafter2")
    with pytest.raises(ImagePromptError, match="needs a start image"):
        check_request(VideoCrafterRequest(prompt="x"), "videocrafter1-i2v-512")
    with pytest.raises(ImagePromptError, match="a start image needs the image-to-video model"):
        check_request(VideoCrafterRequest(prompt="x", start_image=torch.zeros(8, 8, 3)), "videocrafter1-t2v-512")
    request = check_request(VideoCrafterRequest(prompt="x"), "videocrafter1-t2v-1024")
    assert (request.height, request.width, request.fps, request.steps) == (576, 1024, 28, 50)


def test_the_command_line_runs_the_family_it_finds(sets: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "cat"
    flags = ["--frames", "4", "--width", "64", "--height", "64", "--steps", "4"]
    assert main(["generate", "--models", str(sets / "vc2"), "--prompt", "a cat", *flags, "--save-latents",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "videocrafter2; 4 frames 64x64, 4 DDIM steps, eta 1.0, guidance 12.0, fps 28, seed 123" in printed
    assert read_last_frames(out, 10).shape == (4, 64, 64, 3)
    from safetensors.torch import load_file  # --save-latents: the sampler's latents beside the frames folder

    assert f"latents {tmp_path / 'cat.latents.safetensors'}" in printed
    latents = load_file(tmp_path / "cat.latents.safetensors")["latents"]
    assert latents.dtype == torch.float32 and latents.shape == (1, 4, 4, 8, 8) and bool(latents.isfinite().all())
    # refused before any model loads, one line, exit 2; nothing written
    for extra, message in ((["--lora", "x.safetensors"], "'--lora'"), (["--steps", "3"], "breaks at this step count")):
        assert main(["generate", "--models", str(sets / "vc2"), "--prompt", "a cat", *flags, *extra,
                     "--out", str(tmp_path / "no.gif")]) == 2
        assert message in capsys.readouterr().err
    assert main(["generate", "--models", str(sets / "i2v"), "--prompt", "a cat", *flags,
                 "--out", str(tmp_path / "no.gif")]) == 2
    assert "needs a start image" in capsys.readouterr().err
    assert not (tmp_path / "no.gif").exists()


def _command_line_request(*flags: str) -> VideoCrafterRequest:
    from videobooth_core.app.cli import build_parser
    from videobooth_core.app.videocrafter import request_from

    return request_from(build_parser().parse_args(["generate", "--models", "m", "--prompt", "a cat", *flags]))


def test_a_given_flag_is_used_as_given_and_only_a_missing_one_takes_the_familys_default() -> None:
    """Issue 26 follow-up: a flag equal to VideoBooth's default (--steps 250, --width 256, --seed 10, --negative
    None...) was silently replaced by VideoCrafter's official value; the flags now default to 'not given'."""
    plain = _command_line_request()
    assert (plain.frames, plain.steps, plain.eta, plain.guidance, plain.seed, plain.negative_prompt) == \
        (16, 50, 1.0, 12.0, 123, "")
    assert (plain.width, plain.height, plain.fps) == (None, None, None)  # the checkpoint kind's
    resolved = check_request(plain, "videocrafter1-t2v-1024")
    assert (resolved.width, resolved.height, resolved.fps) == (1024, 576, 28)
    given = _command_line_request("--steps", "250", "--width", "256", "--height", "256", "--eta", "0", "--cfg", "4",
                                  "--seed", "10", "--fps", "8", "--negative", "None", "--frames", "16")
    assert (given.steps, given.width, given.height, given.eta, given.guidance, given.seed, given.fps,
            given.negative_prompt) == (250, 256, 256, 0.0, 4.0, 10, 8, "None")
    assert (check_request(given, "videocrafter2").steps, len(VideoCrafterDDIM(250))) == (250, 250)
    for flags, words in ((["--sampler", "ddpm"], "--sampler"), (["--guidance", "all"], "--guidance"),
                         (["--noise-reuse", "--padding", "0"], "'--padding --noise-reuse'"),
                         (["--fps", "7.5"], "--fps must be a whole number, got 7.5"),
                         (["--frames", "257"], "--frames must be between 1 and 256, got 257"),
                         (["--context-window", "1"], "--context-window must be at least 2 and at most 64, got 1"),
                         (["--cfg", "0.5"], "--cfg must be at least 1 and at most 30, got 0.5; the default is 12")):
        with pytest.raises(VideoBoothError) as caught:
            _command_line_request(*flags)
        assert words in str(caught.value), str(caught.value)


def test_the_videocrafter_table_is_its_requests_defaults_with_videobooths_flags() -> None:
    from videobooth_core.settings import SETTINGS, VIDEOCRAFTER_SETTINGS

    request = VideoCrafterRequest(prompt="x")
    assert {key: getattr(request, spec.name) for key, spec in VIDEOCRAFTER_SETTINGS.items()} == {
        "negative": "", "frames": 16, "width": None, "height": None, "sampler": "ddim", "steps": 50, "eta": 1.0,
        "cfg": 12.0, "fps": None, "seed": 123, "context_window": None, "context_overlap": 4, "context_fuse": "pyramid",
        "save_latents": False}
    assert all(spec.flag == SETTINGS[key].flag for key, spec in VIDEOCRAFTER_SETTINGS.items())


def test_batch_jobs_run_a_videocrafter_folder_as_the_api_does(sets: Path, tmp_path: Path, capsys) -> None:
    """A jobs file for a VideoCrafter models folder: every line through the one request builder, the command
    line's flags as every line's default, the outputs the API's frames; a rerun redoes nothing; VideoBooth-only
    keys and flags refused before anything is written."""
    import json

    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(json.dumps({"id": "a", "prompt": "a cat", "out": "a"}) + "\n"
                    + json.dumps({"id": "b", "prompt": "a dog", "seed": 5, "cfg": 7.5, "out": "b",
                                  "save_latents": True}) + "\n")
    out = tmp_path / "out"
    command = ["generate", "--models", str(sets / "vc2"), "--jobs", str(jobs), "--out-dir", str(out),
               "--frames", "4", "--width", "64", "--height", "64", "--steps", "4"]
    assert main(command) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert [item["id"] for item in manifest["items"]] == ["a", "b"]
    assert manifest["items"][1]["settings"]["cfg"] == 7.5 and manifest["items"][1]["settings"]["family"] == \
        "videocrafter2"
    pipe = VideoCrafterPipeline.from_models_dir(sets / "vc2")
    for job, request in (("a", VideoCrafterRequest(prompt="a cat", **SMALL)),
                         ("b", VideoCrafterRequest(prompt="a dog", seed=5, guidance=7.5, **SMALL))):
        result = pipe.generate(request)
        assert torch.equal(read_last_frames(out / job, 4), result.frames), job
    from safetensors.torch import load_file  # b's save_latents: the sampler's latents, named in the manifest

    assert "latents" not in manifest["items"][0] and manifest["items"][1]["latents"] == "b.latents.safetensors"
    assert torch.equal(load_file(out / "b.latents.safetensors")["latents"], result.latents)
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == \
        ["a", "b", "b.latents.safetensors", "manifest.json"]
    capsys.readouterr()
    assert main(command) == 0
    assert "2 already done, 0 to generate" in capsys.readouterr().err
    jobs.write_text(json.dumps({"prompt": "a cat", "word": "cat"}) + "\n")
    for extra, message in (([], "line 1: 'word' does not apply to a VideoCrafter model (videocrafter2)"),
                           (["--sampler", "lcm"], "--sampler 'lcm' is not available")):
        assert main([*command[:6], str(tmp_path / "none"), *extra]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "none").exists()


def test_a_converted_checkpoint_generates_what_its_pickle_generates(sets: Path, tmp_path: Path, capsys) -> None:
    """``convert --videocrafter`` (fp32 here) into a models folder of its own: the same frames, bit for bit."""
    models = tmp_path / "models"
    (models / "text_encoders").mkdir(parents=True)
    import shutil

    shutil.copytree(sets / "vc2/text_encoders", models / "text_encoders", dirs_exist_ok=True)
    assert main(["convert", "--videocrafter", str(sets / "vc2/videocrafter/videocrafter2.ckpt"), "--dtype", "fp32",
                 "--out", str(models / "videocrafter")]) == 0
    assert "videocrafter2.safetensors (videocrafter2, fp32" in capsys.readouterr().out
    request = VideoCrafterRequest(prompt="a cat", seed=2, **SMALL)
    from_pickle = VideoCrafterPipeline.from_models_dir(sets / "vc2").generate(request)
    from_safetensors = VideoCrafterPipeline.from_models_dir(models).generate(request)
    assert torch.equal(from_pickle.latents, from_safetensors.latents)
    assert torch.equal(from_pickle.frames, from_safetensors.frames)


def test_the_memory_estimate_counts_the_models_and_scales_with_the_video(sets: Path) -> None:
    """A dry run of the guided step on the meta device: every loaded model's bytes, and activations that grow with
    the frames and halve in bf16."""
    from videobooth_core.sampling.videocrafter import estimate_videocrafter_step_memory

    pipe = VideoCrafterPipeline.from_models_dir(sets / "vc2")
    estimate = pipe.estimate_memory(VideoCrafterRequest(prompt="x", **SMALL))
    models = [pipe.unet, pipe.vae, pipe.text_encoder]
    assert estimate.weights_bytes == sum(p.numel() * p.element_size() for m in models for p in m.parameters()) \
        + sum(b.numel() * b.element_size() for m in models for b in m.buffers())
    small = estimate_videocrafter_step_memory(pipe.unet, (1, 4, 4, 8, 8), 77, "cuda").activations_bytes
    longer = estimate_videocrafter_step_memory(pipe.unet, (1, 4, 16, 8, 8), 77, "cuda").activations_bytes
    assert 3.5 * small < longer < 4.5 * small
    half = estimate_videocrafter_step_memory(pipe.unet.to(torch.bfloat16), (1, 4, 16, 8, 8), 77, "cuda")
    assert 0.4 * longer < half.activations_bytes < 0.6 * longer


def test_a_checkpoint_without_its_text_encoder_names_it_before_loading(sets: Path, tmp_path: Path) -> None:
    state = torch.load(sets / "vc2/videocrafter/videocrafter2.ckpt", weights_only=True)["state_dict"]
    stripped = {k: v for k, v in state.items() if not k.startswith("cond_stage_model.")}
    torch.save({"state_dict": stripped}, tmp_path / "model.ckpt")
    with pytest.raises(CheckpointError, match=r"lacks the OpenCLIP ViT-H/14 text encoder.*clip_h.*--text-encoder"):
        VideoCrafterPipeline.from_files(tmp_path / "model.ckpt", sets / "vc2/text_encoders/videobooth_tiny_tokenizer")


def test_the_image_encoder_resize_is_kornias_antialiased_bicubic() -> None:
    """The official I2V preprocessing (kornia's Gaussian-then-bicubic resize), recorded from kornia."""
    from safetensors.torch import load_file

    from videobooth_core.videocrafter_pipeline import antialiased_resize

    recorded = load_file(Path(__file__).parent / "fixtures/videocrafter_tiny/kornia_resize.safetensors")
    ours = antialiased_resize(recorded["input"], (20, 24))
    torch.testing.assert_close(ours, recorded["output_20x24"], rtol=0, atol=1e-6)
    plain = torch.nn.functional.interpolate(recorded["input"], (20, 24), mode="bicubic", align_corners=True)
    assert (plain - recorded["output_20x24"]).abs().max() > 0.1  # the blur matters: without it the test fails
