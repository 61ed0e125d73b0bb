"""The command line, run as a user runs it (``python -m videobooth_core ...`` in a subprocess), on the tiny
model set: a generation (its frames then written in-process to every output format), text-to-video, every kind
of bad input (non-zero exit, one ``error:`` line, no output), the demo with and without weights, convert and
make-tiny; and the Python API (one pipeline, many generations, seeds). Existing outputs, out of memory and
unexpected errors: tests/test_outputs.py."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import SMALL, ok, read_frames, run_cli

PROMPT = "a ball rolling on the grass"


def _summary(result: subprocess.CompletedProcess) -> dict:
    lines = [line for line in result.stdout.splitlines() if line.startswith("done: ")]
    assert len(lines) == 1, result.stdout
    return json.loads(lines[0][len("done: "):])


# -- fixtures ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def subject(tmp_path_factory) -> dict[str, Path]:
    """A subject photo with its mask, an all-black mask, a text file named .png."""
    from PIL import Image

    from videobooth_core.app.demo import synthetic_subject

    folder = tmp_path_factory.mktemp("subject")
    image, mask = synthetic_subject(width=96, height=80)
    Image.fromarray(image.numpy()).save(folder / "ball.png")
    Image.fromarray(mask.numpy().astype(np.uint8) * 255).save(folder / "ball_mask.png")
    Image.new("L", (96, 80), 0).save(folder / "black_mask.png")
    (folder / "notes.png").write_text("this is not an image\n")
    return {"image": folder / "ball.png", "mask": folder / "ball_mask.png", "black": folder / "black_mask.png",
            "text": folder / "notes.png", "missing": folder / "no_such_photo.png"}


@pytest.fixture(scope="module")
def generated(tiny_models, subject, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """One image-prompt generation from the command line (seed 7) into a folder of PNG frames (lossless)."""
    out = tmp_path_factory.mktemp("generated")
    result = run_cli(["generate", "--models", tiny_models, "--image", subject["image"], "--mask", subject["mask"],
                      "--prompt", PROMPT, "--word", "ball", *SMALL, "--seed", "7", "--out", out / "frames"],
                     out / "home")
    return out / "frames", result


# -- generate -----------------------------------------------------------------------------------------------
def test_generate_from_the_command_line(generated) -> None:
    path, result = generated
    ok(result)
    assert sorted(p.name for p in path.iterdir()) == [f"frame_{i:05d}.png" for i in range(4)]
    frames = read_frames(path)
    assert len(frames) == 4 and all(frame.shape == (64, 64, 3) for frame in frames)
    assert len({frame.tobytes() for frame in frames}) > 1  # a video, not one frame repeated
    summary = _summary(result)
    assert summary["seed"] == 7 and summary["frames"] == 4 and summary["size"] == [64, 64] and summary["steps"] == 2
    assert summary["seconds"] > 0 and summary["peak_rss_mb"] > 0
    assert summary["prompt_used"] == "a sdksd rolling on the grass"
    assert summary["output"] == str(path)
    assert "sampling" in result.stderr  # the progress bar (tqdm, on stderr)
    assert not list(path.parent.glob(".videobooth-*"))  # no temporary folder left behind


@pytest.mark.parametrize("name", ["clip.gif", "clip.webp", "clip.mp4", "frames"])
def test_write_frames_writes_each_format(generated, name, tmp_path) -> None:
    from videobooth_core.video_io import write_frames

    frames = np.stack(read_frames(ok(generated[1]) and generated[0]))  # the command line's frames, in-process
    path = write_frames(torch.from_numpy(frames), tmp_path / name, fps=8.0)
    decoded = read_frames(path)
    assert len(decoded) == 4 and all(frame.shape == (64, 64, 3) for frame in decoded)
    if name in ("clip.webp", "frames"):  # lossless: the very frames
        assert all(np.array_equal(a, b) for a, b in zip(decoded, frames, strict=True))
    else:  # gif (256-colour palette) and mp4 (lossy): close, not equal
        error = np.abs(np.stack(decoded).astype(np.int16) - frames.astype(np.int16)).mean()
        assert error < 40, error
    if name == "clip.mp4":
        import av

        with av.open(str(path)) as container:  # H.264 in MP4 at 8 fps, as players expect
            stream = container.streams.video[0]
            assert (container.format.name.split(",")[0], stream.codec_context.name, stream.average_rate) == \
                ("mov", "h264", 8)
            assert stream.codec_context.pix_fmt == "yuv420p"
    if name == "clip.gif":
        from PIL import Image

        with Image.open(path) as image:
            # 8 fps = 125 ms a frame, which GIF stores in hundredths of a second; looping
            assert image.info["duration"] in (120, 130) and image.info["loop"] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]  # no temporary file left behind


def test_text_to_video_without_image_or_word(tiny_models, tmp_path) -> None:
    out = tmp_path / "t2v.gif"
    result = ok(run_cli(["generate", "--models", tiny_models, "--prompt", "a dog running on the beach", *SMALL,
                          "--seed", "3", "--out", out], tmp_path / "home"))
    frames = read_frames(out)
    assert len(frames) == 4 and frames[0].shape == (64, 64, 3)
    summary = _summary(result)
    assert summary["prompt_used"] == "a dog running on the beach" and summary["seed"] == 3


def test_speed_modes_and_the_memory_estimate_reach_the_summary(generated, tiny_models, subject, tmp_path) -> None:
    out = tmp_path / "fast"
    result = ok(run_cli(["generate", "--models", tiny_models, "--image", subject["image"], "--mask", subject["mask"],
                          "--prompt", PROMPT, "--word", "ball", *SMALL, "--seed", "7", "--out", out,
                          "--single-frame-image-prompt", "--image-prompt-steps", "0", "0.5", "--no-watermark-branch"],
                         tmp_path / "home"))
    summary = _summary(result)
    assert summary["speed_modes"] == ["single-frame-image-prompt", "image-prompt-steps 0-0.5", "no-watermark-branch"]
    assert summary["estimated_peak_mb"] > summary["estimated_weights_mb"] > 0
    assert "estimated peak memory on cpu" in result.stderr  # said before sampling starts
    assert result.stderr.index("estimated peak memory") < result.stderr.index("sampling")
    exact = read_frames(ok(generated[1]) and generated[0])  # same seed, exact path
    assert _summary(generated[1])["attention"] == "sdpa"
    assert _summary(generated[1])["speed_modes"] == []
    assert any(not np.array_equal(a, b) for a, b in zip(read_frames(out), exact))


def test_the_dedup_attention_kernel_is_selected_and_stays_close(generated, tiny_models, subject, tmp_path) -> None:
    out = tmp_path / "dedup"
    result = ok(run_cli(["generate", "--models", tiny_models, "--image", subject["image"], "--mask", subject["mask"],
                          "--prompt", PROMPT, "--word", "ball", *SMALL, "--seed", "7", "--out", out,
                          "--attention", "dedup"], tmp_path / "home"))
    assert _summary(result)["attention"] == "dedup"
    exact = read_frames(generated[0])  # same seed, default kernel: equal up to float rounding (8-bit frames)
    for a, b in zip(read_frames(out), exact):
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 2


# -- bad input ------------------------------------------------------------------------------------------------
def _models_without(tiny_models: Path, dest: Path, relative: str, truncate: bool) -> Path:
    shutil.copytree(tiny_models, dest)
    target = dest / relative
    if truncate:
        data = target.read_bytes()
        target.write_bytes(data[: len(data) // 2])
    else:
        target.unlink()
    return dest


BAD_INPUTS = {
    # name: (extra arguments, words the error line must contain, output kind)
    "word_not_in_prompt": (["--image", "{image}", "--mask", "{mask}", "--prompt", "a dog running", "--word", "ball"],
                           ["'ball'", "not in the prompt"], "clip.gif"),
    "empty_mask": (["--image", "{image}", "--mask", "{black}", "--prompt", PROMPT, "--word", "ball"],
                   ["mask is empty"], "frames"),
    "unreadable_image": (["--image", "{text}", "--prompt", PROMPT, "--word", "ball"],
                         ["cannot read image", "notes.png"], "clip.mp4"),
    "missing_image": (["--image", "{missing}", "--prompt", PROMPT, "--word", "ball"],
                      ["not found", "no_such_photo.png"], "clip.webp"),
    "zero_frames": (["--prompt", PROMPT, "--frames", "0"], ["frames must be at least 1", "0"], "frames"),
    "width_not_multiple_of_8": (["--prompt", PROMPT, "--width", "65"], ["width", "multiple of 8", "65"], "clip.gif"),
    "missing_weight_file": (["--prompt", PROMPT, "--models", "{no_mapper}"], ["mapper", "videobooth"], "clip.gif"),
    "truncated_weight_file": (["--prompt", PROMPT, "--models", "{truncated}"], ["watermark_remove_module.pt"], "frames"),
    "image_prompt_steps_reversed": (["--prompt", PROMPT, "--image-prompt-steps", "0.8", "0.2"],
                                    ["--image-prompt-steps", "0.8"], "clip.gif"),
    "stream_weights_from_a_pickle": (["--prompt", PROMPT, "--stream-weights"], ["safetensors", "convert", "fp32"],
                                     "clip.gif"),
}
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_one_error_line_and_no_output(case, tiny_models, subject, tmp_path) -> None:
    extra, words, out_name = BAD_INPUTS[case]
    paths = {k: str(v) for k, v in subject.items()}
    if case == "missing_weight_file":
        paths["no_mapper"] = str(_models_without(tiny_models, tmp_path / "models", "videobooth/mapper.pt", False))
    if case == "truncated_weight_file":
        paths["truncated"] = str(_models_without(tiny_models, tmp_path / "models",
                                                 "videobooth/watermark_remove_module.pt", True))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    args = [a.format(**paths) for a in extra]
    models = [] if "--models" in args else ["--models", str(tiny_models)]
    small = list(SMALL)
    for flag in ("--frames", "--width"):  # the case's own value wins
        if flag in args:
            i = small.index(flag)
            del small[i : i + 2]
    result = run_cli(["generate", *models, *small, *args, "--out", out_dir / out_name], tmp_path / "home")
    assert result.returncode == 2, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    # warnings are not errors (64x64 warns that the model was trained at 256x256)
    lines = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith("WARNING ")]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    for word in words:
        assert word in lines[0], lines[0]
    if case == "truncated_weight_file":
        # the line must say what is wrong with the file, not only that no weights were found
        assert any(w in lines[0].lower() for w in ("truncated", "incomplete", "corrupt")), lines[0]
    assert list(out_dir.iterdir()) == []  # no output, no temporary file
    assert result.stdout == ""


# -- demo -------------------------------------------------------------------------------------------------------
def test_demo_without_weights_uses_tiny_random_models(tmp_path) -> None:
    home = tmp_path / "home"
    missing = tmp_path / "no_models_here"
    out = tmp_path / "demo.gif"
    result = ok(run_cli(["demo", "--models", missing, "--out", out, "--steps", "2"], home))
    cache = home / ".cache" / "videobooth" / "tiny_models"
    assert "TINY RANDOM" in result.stderr and "noise" in result.stderr
    assert f"put the released weights in {missing}" in result.stderr and "README" in result.stderr
    assert str(cache) in result.stderr
    assert (cache / "VIDEOBOOTH_TINY_RANDOM_WEIGHTS.txt").is_file()
    frames = read_frames(out)
    assert len(frames) == 16 and frames[0].shape == (256, 256, 3)
    summary = _summary(result)
    assert summary["steps"] == 2 and summary["seconds"] > 0 and "seed" in summary
    assert not missing.exists()


def test_demo_uses_the_models_folder_when_it_holds_weights(tiny_models, tmp_path) -> None:
    home = tmp_path / "home"
    out = tmp_path / "demo.webp"
    result = ok(run_cli(["demo", "--models", tiny_models, "--out", out, "--steps", "1"], home))
    assert "No VideoBooth weights" not in result.stderr
    assert "tiny and random" in result.stderr  # this folder is make-tiny's: it says so
    assert not (home / ".cache" / "videobooth").exists()  # no fallback set written
    assert len(read_frames(out)) == 16


# -- convert and make-tiny ------------------------------------------------------------------------------------
def test_convert_to_fp16_safetensors(tiny_models, tmp_path) -> None:
    from safetensors.torch import load_file

    from videobooth_core.loading.checkpoint import load_mapper, load_unet
    from videobooth_core.loading.weight_files import read_state_dict

    out = tmp_path / "converted"
    unet_pt = tiny_models / "videobooth" / "watermark_remove_module.pt"
    mapper_pt = tiny_models / "videobooth" / "mapper.pt"
    result = ok(run_cli(["convert", "--unet", unet_pt, "--mapper", mapper_pt, "--out", out, "--dtype", "fp16"],
                         tmp_path / "home"))
    written = {out / "videobooth_unet.safetensors", out / "videobooth_mapper.safetensors"}
    assert set(out.iterdir()) == written
    for path in written:
        assert f"wrote {path}" in result.stdout
    for pt, wrapper, st in ((unet_pt, "ema_unet", "videobooth_unet"), (mapper_pt, "ema", "videobooth_mapper")):
        original = read_state_dict(pt)[wrapper]
        converted = load_file(str(out / f"{st}.safetensors"))
        assert converted.keys() == original.keys()
        for key, value in original.items():
            expected = value.to(torch.float16) if value.is_floating_point() else value
            assert converted[key].dtype == expected.dtype, key
            assert torch.equal(converted[key], expected), key
    unet = load_unet(out / "videobooth_unet.safetensors", dtype=torch.float16)
    mapper = load_mapper(out / "videobooth_mapper.safetensors", dtype=torch.float16)
    assert next(unet.parameters()).dtype == torch.float16 and next(mapper.parameters()).dtype == torch.float16


def test_convert_refuses_a_file_that_is_not_videobooth(tiny_models, tmp_path) -> None:
    out = tmp_path / "converted"
    vae = next((tiny_models / "vae").iterdir())
    result = run_cli(["convert", "--unet", vae, "--out", out], tmp_path / "home")
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "UNet" in lines[0] and vae.name in lines[0]
    assert not out.exists()


def test_make_tiny_writes_a_usable_models_folder(tmp_path) -> None:
    from videobooth_core.loading.models_dir import ModelFiles

    out = tmp_path / "tiny"
    result = ok(run_cli(["make-tiny", "--out", out], tmp_path / "home"))
    assert "RANDOM" in result.stdout and str(out) in result.stdout
    files = ModelFiles.from_models_dir(out)
    assert files.unet.name == "watermark_remove_module.pt" and files.mapper.name == "mapper.pt"
    assert (out / "VIDEOBOOTH_TINY_RANDOM_WEIGHTS.txt").is_file()
    assert not list(out.rglob("*.partial"))


# -- Python API ---------------------------------------------------------------------------------------------
@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # see _env
    yield
    torch.set_num_threads(threads)


def test_api_load_once_generate_many(tiny_models, subject, one_thread) -> None:
    from videobooth_core.conditioning.image_prompt import load_image, load_mask
    from videobooth_core.pipeline import GenerationRequest, VideoBoothPipeline

    pipe = VideoBoothPipeline.from_models_dir(str(tiny_models), dtype="fp32", device="cpu")
    small = {"frames": 4, "width": 64, "height": 64, "steps": 2, "seed": 5}
    with_image = GenerationRequest(prompt=PROMPT, subject_word="ball", image=load_image(subject["image"]),
                                   mask=load_mask(subject["mask"]), **small)
    text_only = GenerationRequest(prompt="a red car driving through a city at night", **small)
    steps = []
    first = pipe.generate(with_image, callback=lambda step, total, _out: steps.append((step, total)))
    second = pipe.generate(text_only)
    again = pipe.generate(with_image)
    assert steps == [(0, 2), (1, 2)]
    for result in (first, second, again):
        assert result.frames.shape == (4, 64, 64, 3) and result.frames.dtype == torch.uint8
    assert first.prompt_used == "a sdksd rolling on the grass"
    assert second.prompt_used == "a red car driving through a city at night" and second.image_prompt is None
    assert not torch.equal(first.frames, second.frames)
    assert torch.equal(first.frames, again.frames)  # nothing of one generation leaks into the next
    assert not torch.equal(first.frames, pipe.generate(dataclasses.replace(with_image, seed=6)).frames)


def test_save_latents_writes_the_final_latents_beside_the_video_and_off_changes_no_byte(tiny_models, subject, tmp_path,
                                                                                     one_thread, capsys) -> None:
    """``generate --save-latents`` (in-process ``main``): ``OUT.latents.safetensors`` holds the latents the video was
    decoded from, the Python API's ``result.latents`` of the same request, written by the same function; the done
    summary names it. Without the flag: the same video, byte for byte, and no latents file."""
    from safetensors.torch import load_file

    from videobooth_core.app.cli import main
    from videobooth_core.app.request import build_request
    from videobooth_core.latents_file import latents_path, write_result
    from videobooth_core.pipeline import VideoBoothPipeline

    argv = ["generate", "--models", str(tiny_models), "--image", str(subject["image"]), "--mask", str(subject["mask"]),
            "--prompt", PROMPT, "--word", "ball", *SMALL, "--seed", "7"]
    summaries = {}
    for name, extra in (("plain.gif", []), ("saved.gif", ["--save-latents"])):
        assert main([*argv, *extra, "--out", str(tmp_path / name)]) == 0
        done = [line for line in capsys.readouterr().out.splitlines() if line.startswith("done: ")]
        summaries[name] = json.loads(done[0][len("done: "):])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain.gif", "saved.gif", "saved.gif.latents.safetensors"]
    assert "latents" not in summaries["plain.gif"]
    assert summaries["saved.gif"]["latents"] == str(tmp_path / "saved.gif.latents.safetensors")
    assert (tmp_path / "plain.gif").read_bytes() == (tmp_path / "saved.gif").read_bytes()
    saved = load_file(tmp_path / "saved.gif.latents.safetensors")["latents"]
    assert saved.dtype == torch.float32 and saved.shape == (1, 4, 4, 8, 8)

    pipe = VideoBoothPipeline.from_models_dir(str(tiny_models), dtype="fp32", device="cpu")
    request = build_request({"prompt": PROMPT, "word": "ball", "image": str(subject["image"]),
                             "mask": str(subject["mask"]), "frames": 4, "width": 64, "height": 64, "steps": 2,
                             "seed": 7, "save_latents": True})
    result = pipe.generate(request)
    assert torch.equal(result.latents, saved)
    written = write_result(result, tmp_path / "api.gif", request.fps, save=request.save_latents)
    assert written == latents_path(tmp_path / "api.gif") == tmp_path / "api.gif.latents.safetensors"
    assert torch.equal(load_file(written)["latents"], saved)
    assert (tmp_path / "api.gif").read_bytes() == (tmp_path / "saved.gif").read_bytes()


@pytest.mark.parametrize(("argv", "allocator"), [
    (["generate", "--models", "m", "--prompt", "p", "--out", "o.gif"], "fast"),  # fast by default: measured faster
    (["generate", "--models", "m", "--prompt", "p", "--out", "o.gif", "--stream-weights"], "lean"),
    (["generate", "--models", "m", "--prompt", "p", "--out", "o.gif", "--stream-weights", "--allocator", "fast"],
     "fast"),
    (["generate", "--models", "m", "--prompt", "p", "--out", "o.gif", "--allocator", "lean"], "lean"),
    (["generate", "--models", "m", "--prompt", "p", "--out", "o.gif", "--allocator", "glibc"], "glibc"),
    (["demo"], "fast"),
    (["make-tiny", "--out", "x"], "lean"),
])
def test_the_allocator_follows_the_run(argv, allocator, monkeypatch) -> None:
    from videobooth_core.app import cli

    calls = []
    monkeypatch.setattr(cli, "apply_allocator", lambda name: calls.append(name) or True)
    monkeypatch.setitem(cli.COMMANDS, argv[0], lambda args: 0)
    assert cli.main(argv) == 0
    assert calls == [allocator]
