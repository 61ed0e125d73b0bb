"""VideoCrafter long videos (issue 26, item 4 "context windows where they apply"): windows of consecutive frames
(the contiguous schedule of ``sampling/windows.py``) whose guided eps is fused at every DDIM step, on tiny sets of
``make-tiny --family``: a window covering every frame is the plain path bit for bit, two windows give the hand-fused
per-window eps, the command line and batch jobs run more frames than one window end to end, bad settings are
refused by name before any model loads, and the memory estimate is one window's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from videobooth_core.app.cli import main
from videobooth_core.app.tiny_videocrafter import make_tiny_videocrafter
from videobooth_core.errors import SamplingError
from videobooth_core.sampling.videocrafter import (
    estimate_videocrafter_step_memory,
    guided_unet,
    windowed_eps,
)
from videobooth_core.sampling.windows import (
    CONTIGUOUS,
    ContextOptions,
    check_context,
    context_windows,
    fuse_weights,
)
from videobooth_core.video_io import read_last_frames
from videobooth_core.videocrafter_pipeline import VideoCrafterPipeline, VideoCrafterRequest, check_request

SMALL = dict(height=64, width=64, steps=2)


@pytest.fixture(scope="module")
def sets(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("videocrafter_window_sets")
    make_tiny_videocrafter(root / "vc2", "videocrafter2")  # temporal convolutions, no relative positions
    make_tiny_videocrafter(root / "i2v", "videocrafter1-i2v-512")  # + image tokens
    make_tiny_videocrafter(root / "t2v", "videocrafter1-t2v-512")  # relative positions, no fps
    return root


def test_the_contiguous_schedule_is_consecutive_frames_the_last_window_at_the_end() -> None:
    assert context_windows(40, 16, 4, CONTIGUOUS) == [list(range(0, 16)), list(range(12, 28)), list(range(24, 40))]
    assert context_windows(10, 4, 1, CONTIGUOUS) == [[0, 1, 2, 3], [3, 4, 5, 6], [6, 7, 8, 9]]
    assert context_windows(9, 4, 1, CONTIGUOUS) == [[0, 1, 2, 3], [3, 4, 5, 6], [5, 6, 7, 8]]  # aligned to the end
    assert context_windows(4, 16, 4, CONTIGUOUS) == [[0, 1, 2, 3]]
    assert context_windows(5, 4, 3, CONTIGUOUS) == [[0, 1, 2, 3], [1, 2, 3, 4]]  # overlap window - 1: stride 1
    # the house's weights without the frame-0 rule: pyramid over each whole window, normalised per frame
    pyramid = fuse_weights(context_windows(6, 4, 2, CONTIGUOUS), 6, "pyramid", CONTIGUOUS)
    assert [w.tolist() for w in pyramid] == [[1.0, 1.0, pytest.approx(2 / 3), pytest.approx(1 / 3)],
                                             [pytest.approx(1 / 3), pytest.approx(2 / 3), 1.0, 1.0]]
    flat = fuse_weights(context_windows(6, 4, 2, CONTIGUOUS), 6, "flat", CONTIGUOUS)
    assert [w.tolist() for w in flat] == [[1.0, 1.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0]]
    with pytest.raises(SamplingError, match=r"--context-overlap must be at most --context-window - 1 = 3 \(each "
                                            r"window needs at least one new frame\): 4; lower --context-overlap to 3"):
        check_context(4, 4, schedule=CONTIGUOUS)
    with pytest.raises(SamplingError, match="unknown context window schedule: 'loop'"):
        ContextOptions(4, 1, schedule="loop")
    with pytest.raises(SamplingError, match="frame-0 windows only; the schedule is: 'contiguous'; leave noise reuse"):
        ContextOptions(4, 1, noise_reuse=True, schedule=CONTIGUOUS)
    with pytest.raises(SamplingError, match="consecutive frames; got the schedule: 'frame0'"):
        windowed_eps(lambda x, t: (x, x), ContextOptions(4, 1))


@pytest.mark.parametrize("window", [4, 8])
def test_a_window_covering_every_frame_is_the_plain_path_bit_for_bit(sets: Path, window: int) -> None:
    pipe = VideoCrafterPipeline.from_models_dir(sets / "vc2")
    plain = pipe.generate(VideoCrafterRequest(prompt="a cat", frames=4, seed=4, **SMALL))
    covered = pipe.generate(VideoCrafterRequest(prompt="a cat", frames=4, seed=4, context_window=window,
                                                context_overlap=1, **SMALL))
    assert torch.equal(covered.latents, plain.latents) and torch.equal(covered.frames, plain.frames)


@pytest.mark.parametrize("kind", ["i2v", "t2v"])
def test_two_windows_fuse_each_windows_guided_eps_by_hand(sets: Path, kind: str) -> None:
    """Step 0 of a 6-frame video in windows of 4 overlapping by 2: each branch's eps is window 0's on frames 0-1,
    window 1's on frames 4-5, and the pyramid mix 2/3 : 1/3 (frame 2) and 1/3 : 2/3 (frame 3) between; each window
    is the guided UNet on its frames with the whole video's context (for I2V the start image's tokens too)."""
    pipe = VideoCrafterPipeline.from_models_dir(sets / kind)
    image = torch.rand(48, 80, 3, generator=torch.Generator().manual_seed(0)) if kind == "i2v" else None
    request = VideoCrafterRequest(prompt="a cat", frames=6, seed=1, context_window=4, context_overlap=2,
                                  start_image=image, **SMALL)
    records = []
    result = pipe.generate(request, callback=lambda step, total, record: records.append(record))
    assert result.frames.shape == (6, 64, 64, 3) and len(records) == 2
    first = records[0]
    request = pipe.check(request)
    context, uncond = pipe.encode_prompts(["a cat"]), pipe.encode_prompts([""])
    if kind == "i2v":
        from videobooth_core.videocrafter_pipeline import _start_image_tensor

        context = torch.cat([context, pipe.image_tokens(_start_image_tensor(image, 64, 64))], dim=1)
        uncond = torch.cat([uncond, pipe.image_tokens(torch.zeros(1, 3, 224, 224))], dim=1)
    eps = guided_unet(pipe.unet, context, uncond, torch.tensor([request.fps]))
    timesteps = torch.full((1,), first.timestep)
    with torch.no_grad():
        cond_0, uncond_0 = eps(first.x_in[:, :, 0:4], timesteps)
        cond_1, uncond_1 = eps(first.x_in[:, :, 2:6], timesteps)
        whole = eps(first.x_in, timesteps)[0]
    weight_0 = torch.tensor([1.0, 1.0, 2 / 3, 1 / 3], dtype=torch.float64).float().view(1, 1, 4, 1, 1)
    weight_1 = torch.tensor([1 / 3, 2 / 3, 1.0, 1.0], dtype=torch.float64).float().view(1, 1, 4, 1, 1)
    for fused, window_0, window_1 in ((first.eps_cond, cond_0, cond_1), (first.eps_uncond, uncond_0, uncond_1)):
        by_hand = torch.zeros_like(first.x_in)
        by_hand[:, :, 0:4] += window_0 * weight_0
        by_hand[:, :, 2:6] += window_1 * weight_1
        assert torch.equal(fused, by_hand)
        assert torch.equal(fused[:, :, :2], window_0[:, :, :2]) and torch.equal(fused[:, :, 4:], window_1[:, :, 2:])
    assert (first.eps_cond - whole).abs().max() > 1e-4  # the windows see fewer frames than the whole video


def test_the_command_line_and_jobs_run_more_frames_than_a_window(sets: Path, tmp_path: Path, capsys) -> None:
    """More frames than one window, end to end: the command line writes the API's frames, and a jobs line takes
    the same keys; the summary names the windows."""
    flags = ["--frames", "7", "--width", "64", "--height", "64", "--steps", "2", "--context-window", "4",
             "--context-overlap", "1", "--context-fuse", "flat"]
    out = tmp_path / "cat"
    assert main(["generate", "--models", str(sets / "t2v"), "--prompt", "a cat", *flags, "--out", str(out)]) == 0
    assert "7 frames 64x64 in 2 windows of 4 (overlap 1, flat), 2 DDIM steps" in capsys.readouterr().out
    pipe = VideoCrafterPipeline.from_models_dir(sets / "t2v")
    request = VideoCrafterRequest(prompt="a cat", frames=7, context_window=4, context_overlap=1, context_fuse="flat",
                                  **SMALL)
    expected = pipe.generate(request).frames
    assert torch.equal(read_last_frames(out, 10), expected)
    assert not torch.equal(expected, pipe.generate(VideoCrafterRequest(prompt="a cat", frames=7, **SMALL)).frames)
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(json.dumps({"id": "a", "prompt": "a cat", "out": "a", "context_window": 4, "context_overlap": 1,
                                "context_fuse": "flat"}) + "\n")
    assert main(["generate", "--models", str(sets / "t2v"), "--jobs", str(jobs), "--out-dir", str(tmp_path / "jobs"),
                 "--frames", "7", "--width", "64", "--height", "64", "--steps", "2"]) == 0
    assert torch.equal(read_last_frames(tmp_path / "jobs/a", 10), expected)


@pytest.mark.parametrize("flags, words", [
    (["--frames", "65"], "more than 64 frames need context windows: 65; give --context-window 16 (the trained "
                         "length), or at most 64 --frames"),
    (["--context-window", "4", "--context-overlap", "4"], "--context-overlap must be at most --context-window - 1 = 3"),
    (["--context-window", "4", "--noise-reuse"], "'--noise-reuse'"),
])
def test_bad_window_settings_are_refused_by_name_before_loading(sets: Path, tmp_path: Path, capsys, flags,
                                                                words) -> None:
    assert main(["generate", "--models", str(sets / "vc2"), "--prompt", "a cat", *flags,
                 "--out", str(tmp_path / "no.gif")]) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err and "estimated peak memory" not in err  # nothing loaded
    assert not (tmp_path / "no.gif").exists()


def test_the_api_and_jobs_name_the_window_settings_their_way(sets: Path, tmp_path: Path, capsys) -> None:
    assert check_request(VideoCrafterRequest(prompt="x", frames=256, context_window=16), "videocrafter2").frames == 256
    with pytest.raises(SamplingError, match="more than 64 frames need context windows: 100; give --context-window"):
        check_request(VideoCrafterRequest(prompt="x", frames=100), "videocrafter2")
    with pytest.raises(SamplingError, match="'context_overlap' must be at most 'context_window' - 1 = 7"):
        check_request(VideoCrafterRequest(prompt="x", context_window=8, context_overlap=9), "videocrafter2",
                      names=repr)
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(json.dumps({"prompt": "a cat", "context_window": 4, "context_overlap": 6}) + "\n")
    assert main(["generate", "--models", str(sets / "vc2"), "--jobs", str(jobs), "--out-dir",
                 str(tmp_path / "none")]) == 2
    assert "'context_overlap' must be at most 'context_window' - 1 = 3" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()


def test_with_windows_the_memory_estimate_is_one_windows_step(sets: Path) -> None:
    """Windows run one after another: the dry run is one window's guided step, plus the whole video's float32
    latents the step holds (sample, fused cond and uncond, guided eps, noise, next sample)."""
    pipe = VideoCrafterPipeline.from_models_dir(sets / "vc2")
    window = estimate_videocrafter_step_memory(pipe.unet, (1, 4, 4, 8, 8), 77, "cuda").activations_bytes
    whole = estimate_videocrafter_step_memory(pipe.unet, (1, 4, 32, 8, 8), 77, "cuda").activations_bytes
    windowed = estimate_videocrafter_step_memory(pipe.unet, (1, 4, 32, 8, 8), 77, "cuda",
                                                 context_window=4).activations_bytes
    assert windowed == window + 6 * (4 * 32 * 8 * 8) * 4
    assert windowed < whole / 4
    covered = estimate_videocrafter_step_memory(pipe.unet, (1, 4, 4, 8, 8), 77, "cuda", context_window=16)
    assert covered.activations_bytes == window  # no windows: the plain estimate
    request = VideoCrafterRequest(prompt="x", frames=32, context_window=4, context_overlap=1, **SMALL)
    assert pipe.estimate_memory(request).activations_bytes == windowed  # the pipeline passes its window


def test_default_window_settings_leave_a_videocrafter_jobs_fingerprint_as_it_was() -> None:
    """Done-records of VideoCrafter jobs written before the window settings existed stay valid (a resume redoes
    nothing); a window given is part of the fingerprint."""
    from videobooth_core.app.jobs.schema import Job

    first = {"negative": "", "frames": 16, "width": None, "height": None, "steps": 50, "eta": 1.0, "cfg": 12.0,
             "fps": None, "seed": 123}  # the first format's settings
    now = {**first, "context_window": None, "context_overlap": 4, "context_fuse": "pyramid"}

    def job(settings: dict) -> Job:
        return Job(index=0, line=1, id="a", out="a.gif", prompt="a cat", word=None, image=None, mask=None, bbox=None,
                   settings=settings, family="videocrafter2", model="videocrafter2.ckpt")

    assert job(now).fingerprint("fp32") == job(first).fingerprint("fp32")
    assert job({**now, "context_window": 16}).fingerprint("fp32") != job(first).fingerprint("fp32")
    assert job({**now, "context_fuse": "flat"}).fingerprint("fp32") != job(first).fingerprint("fp32")
