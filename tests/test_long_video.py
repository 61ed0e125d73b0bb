"""Long videos (issue 15): sliding context windows, start frames (image-to-video) and extension.

Tiny real UNet, 8x8 latents, a few steps: the windows' schedule and fuse weights, exact frame counts below, at
and above the window, the windowed path's identity with the plain one at the window's length, the start image
exact in the final latents, extension keeping the given frames, and the errors before any model loads.
"""

from __future__ import annotations

import pytest
import torch

from videobooth_core.app.tiny import tiny_unet_and_mapper
from videobooth_core.errors import SamplingError
from videobooth_core.pipeline import GenerationRequest, sample_seeded
from videobooth_core.sampling.known_frames import KnownFrames, check_known_frames, fit_frames
from videobooth_core.sampling.run import prepare_denoiser, run_sampler
from videobooth_core.sampling.schedulers import SAMPLERS
from videobooth_core.sampling.windows import (
    ContextOptions,
    WindowedDenoiser,
    context_windows,
    fuse_weights,
    reuse_noise,
)

WIDTH = 32
LATENT = 8


@pytest.fixture(scope="module")
def model():
    unet, mapper = tiny_unet_and_mapper(vision_width=32, text_width=WIDTH)
    unet.attach_projections(mapper.site_projections())
    text = torch.randn((2, 77, WIDTH), generator=torch.Generator().manual_seed(0))
    exemplar = torch.randn((1, 4, 1, LATENT, LATENT), generator=torch.Generator().manual_seed(1))
    return unet, text[:1], text[1:], exemplar


def _denoiser(model, frames: int, context: ContextOptions | None, image_prompt: bool = True):
    unet, cond, null, _ = model
    shape = (1, 4, frames, LATENT, LATENT)
    denoiser, estimate = prepare_denoiser(unet, cond, null, shape, "cpu", image_prompt=image_prompt, context=context)
    return denoiser, estimate, shape


def _sample(model, frames: int, context: ContextOptions | None, sampler: str = "ddpm", steps: int = 2,
            start_latents: torch.Tensor | None = None, seed: int = 3) -> torch.Tensor:
    denoiser, _, shape = _denoiser(model, frames, context)
    with torch.no_grad():
        return sample_seeded(denoiser, seed, shape, "cpu", sampler=sampler, steps=steps, exemplar_latent=model[3],
                             context=context, start_latents=start_latents)


# -- the window schedule ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("frames, window, overlap", [(17, 16, 4), (40, 16, 4), (64, 16, 0), (64, 16, 14), (33, 8, 3),
                                                     (9, 3, 1), (5, 2, 0), (100, 16, 7)])
@pytest.mark.parametrize("fuse", ["pyramid", "flat"])
def test_every_frame_is_covered_and_the_weights_sum_to_one(frames: int, window: int, overlap: int, fuse: str) -> None:
    windows = context_windows(frames, window, overlap)
    weights = fuse_weights(windows, frames, fuse)
    assert windows[0] == list(range(window))
    total = torch.zeros(frames, dtype=torch.float64)
    for frame_list, weight in zip(windows, weights):
        assert len(frame_list) == window and frame_list[0] == 0  # every window attends to the global frame 0
        assert frame_list[1:] == list(range(frame_list[1], frame_list[1] + window - 1))  # then consecutive frames
        assert weight.shape == (window,) and bool((weight >= 0).all())
        total[frame_list] += weight.double()
    torch.testing.assert_close(total, torch.ones(frames, dtype=torch.float64), rtol=0, atol=1e-6)
    assert windows[-1][-1] == frames - 1
    for before, after in zip(windows, windows[1:]):  # neighbours share at least `overlap` frames besides frame 0
        assert len(set(before[1:]) & set(after[1:])) >= overlap
    assert all(float(w[0]) == 0.0 for w in weights[1:])  # frame 0 is predicted by the first window alone


def test_pyramid_weighs_a_window_middle_above_its_edges() -> None:
    windows = context_windows(40, 16, 4)
    weights = fuse_weights(windows, 40, "pyramid")
    second = weights[1]
    assert float(second[8]) > float(second[1]) and float(second[8]) > float(second[-1])
    flat = fuse_weights(windows, 40, "flat")
    assert torch.equal(flat[0][1:4], torch.ones(3))  # frames only the first window covers


def test_the_same_schedule_holds_at_every_step(model) -> None:
    """Every step covers every frame: the windows the denoiser runs are recorded over a whole sampling run."""
    exemplar = model[3]
    context = ContextOptions(window=4, overlap=1)
    denoiser, _, shape = _denoiser(model, 7, context)
    seen: list[int] = []
    inner_predict = denoiser.inner.predict

    def recording(x_t, *args, **kwargs):
        seen.append(x_t.shape[2])
        return inner_predict(x_t, *args, **kwargs)

    denoiser.inner.predict = recording
    steps = []
    with torch.no_grad():
        out = run_sampler(denoiser, "ddpm", 2, shape, torch.Generator().manual_seed(0), "cpu", exemplar_clean=exemplar,
                          callback=lambda step, total, output: steps.append(step))
    windows = context_windows(7, 4, 1)
    assert steps == [0, 1] and seen == [4] * (2 * len(windows))
    assert out.shape == shape and torch.isfinite(out).all()


# -- frame counts and the plain path -------------------------------------------------------------------------------
@pytest.mark.parametrize("frames", [3, 7])  # at the window: the next test
def test_frames_below_at_and_above_the_window(model, frames: int) -> None:
    out = _sample(model, frames, ContextOptions(window=4, overlap=1))
    assert out.shape == (1, 4, frames, LATENT, LATENT) and torch.isfinite(out).all()


def test_at_the_window_the_windowed_path_is_the_plain_one(model) -> None:
    frames = 4
    context = ContextOptions(window=4, overlap=1, noise_reuse=True)
    denoiser, _, _ = _denoiser(model, frames, context)
    assert not isinstance(denoiser, WindowedDenoiser)
    plain = _sample(model, frames, None)
    assert torch.equal(_sample(model, frames, context), plain)
    # the wrapper itself, forced on, hands a window-sized video to the inner denoiser untouched
    inner, _, shape = _denoiser(model, frames, None)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    exemplar_t = torch.randn(shape, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        wrapped = WindowedDenoiser(inner, context).predict(x, 500, exemplar_t)
        direct = inner.predict(x, 500, exemplar_t)
    assert all(torch.equal(a, b) for a, b in zip(wrapped, direct))


def test_windows_share_the_image_prompt_features_captured_once(model) -> None:
    """Capturing the image prompt once per step gives the same prediction as rerunning it in every window."""
    unet, cond, null, _ = model
    context = ContextOptions(window=4, overlap=1, fuse="flat")
    shape = (1, 4, 7, LATENT, LATENT)
    # unbatched passes: the reference's separate image-prompt pass then runs the very same kernels
    denoiser, _ = prepare_denoiser(unet, cond, null, shape, "cpu", image_prompt=True, context=context,
                                   batch_passes=False)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    exemplar_t = torch.randn(shape, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        fused, _, _ = denoiser.predict(x, 500, exemplar_t)
        reference = torch.zeros_like(fused)
        for frames, weight in zip(*denoiser.plan(7)):
            eps, _, _ = denoiser.inner.predict(x[:, :, frames], 500, exemplar_t[:, :, :4])
            reference[:, :, frames] += eps * weight.view(1, 1, -1, 1, 1)
    assert torch.equal(fused, reference)
    assert fused.abs().mean() > 0.1


def test_noise_reuse_shuffles_the_first_window_noise() -> None:
    options = ContextOptions(window=4, overlap=1, noise_reuse=True)
    noise = torch.randn((1, 4, 10, 2, 2), generator=torch.Generator().manual_seed(0))
    out = reuse_noise(noise, options, torch.Generator().manual_seed(1))
    assert torch.equal(out[:, :, :4], noise[:, :, :4])
    first = {tuple(noise[0, 0, f].flatten().tolist()) for f in range(1, 4)}
    for frame in range(4, 10):  # every later frame is a copy of one of the first window's frames
        assert tuple(out[0, 0, frame].flatten().tolist()) in first


def test_the_memory_estimate_is_bounded_by_the_window(model) -> None:
    context = ContextOptions(window=4, overlap=1)
    small = _denoiser(model, 4, context)[1].activations_bytes
    large = _denoiser(model, 40, context)[1].activations_bytes
    plain = _denoiser(model, 40, None)[1].activations_bytes
    assert large < 1.25 * small < plain


# -- start image and extension ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_a_start_image_is_frame_0_exactly(model, sampler: str) -> None:
    start = torch.randn((1, 4, 1, LATENT, LATENT), generator=torch.Generator().manual_seed(9))
    out = _sample(model, 4, None, sampler=sampler, start_latents=start)
    assert torch.equal(out[:, :, :1], start)
    assert not torch.equal(out[:, :, 1:2], start)


def test_an_extension_starts_with_the_given_frames_and_windows_attend_to_them(model) -> None:
    first = _sample(model, 4, None, seed=1)
    anchors = first[:, :, -2:]
    context = ContextOptions(window=4, overlap=1)
    continued = _sample(model, 7, context, start_latents=anchors)
    assert continued.shape[2] == 7 and torch.equal(continued[:, :, :2], anchors)
    again = _sample(model, 7, context, start_latents=anchors)
    assert torch.equal(continued, again)  # seeded: the same continuation
    other = _sample(model, 7, context, start_latents=torch.zeros_like(anchors))
    assert not torch.allclose(continued[:, :, -1], other[:, :, -1])  # the last window still sees the anchors


def test_known_frames_follow_the_noise_level() -> None:
    clean = torch.ones((1, 4, 1, 2, 2))
    noise = torch.zeros((1, 4, 3, 2, 2))
    known = KnownFrames(clean, noise)
    x = torch.full((1, 4, 3, 2, 2), 7.0)
    noised = known.at_level(x, 0.25)
    assert torch.allclose(noised[:, :, 0], torch.full((1, 4, 2, 2), 0.5)) and torch.equal(noised[:, :, 1:], x[:, :, 1:])
    assert torch.equal(known.at_level(x, None)[:, :, 0], clean[:, :, 0])


def test_start_frames_are_fitted_to_the_video_size() -> None:
    wide = torch.zeros((1, 10, 40, 3), dtype=torch.uint8)
    wide[:, :, 18:22] = 255  # a white band in the middle survives the centre crop (cover: 16x64, keep 24..40)
    pixels = fit_frames(wide, 16, 16)
    assert pixels.shape == (1, 3, 16, 16) and float(pixels.min()) >= -1 and float(pixels.max()) <= 1
    assert float(pixels[0, :, 8, 8].mean()) > 0.9 and float(pixels[0, :, 8, 0].mean()) < -0.9


# -- errors before any model loads -----------------------------------------------------------------------------------
@pytest.mark.parametrize("settings, words", [
    ({"context_window": 8, "context_overlap": 8}, "--context-overlap must be at most --context-window - 2 = 6"),
    ({"context_window": 8, "context_overlap": 7}, "overlap must be at most --context-window - 2 = 6 .*: 7; lower "
                                                  "--context-overlap to 4 or raise --context-window to 9"),
    ({"context_window": 1}, "at least 2"),
    ({"context_fuse": "gauss"}, "context_fuse"),
    ({"start_frames": torch.zeros((16, 8, 8, 3))}, "leave no frame to generate"),
    ({"start_frames": torch.zeros((8, 8))}, "RGB frames"),
    ({"start_latents": torch.zeros((1, 4, 2, 4, 4))}, "latent size"),
    ({"start_frames": torch.zeros((8, 8, 3)), "start_latents": torch.zeros((1, 4, 1, 32, 32))}, "one of"),
])
def test_bad_long_video_settings_are_clear_errors(settings: dict, words: str) -> None:
    with pytest.raises(SamplingError, match=words):
        GenerationRequest(prompt="a dog", **settings).validate()


def test_good_long_video_settings_validate() -> None:
    GenerationRequest(prompt="a dog", frames=64, context_overlap=14, context_fuse="flat", noise_reuse=True,
                      start_frames=torch.zeros((4, 8, 8, 3), dtype=torch.uint8)).validate()
    with pytest.raises(SamplingError, match="leave no frame"):
        check_known_frames(3, 3)
    with pytest.raises(SamplingError, match="overlap"):
        ContextOptions(window=4, overlap=3)


# -- where users work: the API, the command line, batch jobs ----------------------------------------------------------
def test_the_api_starts_from_an_image_and_extends_a_result(tiny_models) -> None:
    from videobooth_core.pipeline import VideoBoothPipeline

    pipe = VideoBoothPipeline.from_models_dir(str(tiny_models), dtype="fp32", device="cpu")
    small = {"width": 64, "height": 64, "steps": 2, "seed": 5, "sampler": "dpmpp_2m"}
    image = torch.randint(0, 256, (48, 80, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    request = GenerationRequest(prompt="a red car", frames=4, start_frames=image, **small)
    first = pipe.generate(request, decode=False)
    assert torch.equal(first.latents[:, :, :1], pipe.encode_start(request)) and first.info["start_frames"] == 1
    longer = GenerationRequest(prompt="a red car", frames=6, context_window=4, context_overlap=1,
                               start_latents=first.latents[:, :, -2:], **small)
    continued = pipe.generate(longer, decode=False)
    assert continued.latents.shape[2] == 6 and torch.equal(continued.latents[:, :, :2], first.latents[:, :, -2:])
    assert continued.info["context_windows"] == 2 and continued.info["start_frames"] == 2


@pytest.mark.parametrize("extra, words", [
    (["--start-image", "missing.png"], ["--start-image", "missing.png"]),
    (["--extend", "missing.gif"], ["--extend", "missing.gif"]),
    (["--context-window", "8", "--context-overlap", "7"], ["overlap", "7"]),
    (["--frames", "2", "--extend", "{here}"], ["--extend", "no .png or .jpg frames"]),
])
def test_the_command_line_refuses_bad_long_video_flags_before_loading(extra, words, tiny_models, tmp_path,
                                                                      capsys) -> None:
    from videobooth_core.app.cli import main

    extra = [value.format(here=tmp_path) for value in extra]
    code = main(["generate", "--models", str(tiny_models), "--prompt", "a dog", "--out", str(tmp_path / "v.gif"),
                 *extra])
    error = capsys.readouterr().err
    assert code == 2 and all(word in error for word in words), error
    assert not (tmp_path / "v.gif").exists()


def test_extension_reads_the_last_frames_of_a_video(tmp_path) -> None:
    from PIL import Image

    from videobooth_core.app.long_video import read_last_frames, start_frames_from

    frames = [Image.new("RGB", (16, 8), (value, 0, 0)) for value in (10, 60, 110, 160, 210)]
    frames[0].save(tmp_path / "clip.gif", save_all=True, append_images=frames[1:], duration=100)
    last = read_last_frames(tmp_path / "clip.gif", 2)
    assert last.shape == (2, 8, 16, 3) and [int(v) for v in last[:, 0, 0, 0]] == [160, 210]
    (tmp_path / "frames").mkdir()
    for index, frame in enumerate(frames):
        frame.save(tmp_path / "frames" / f"frame_{index:05d}.png")
    assert torch.equal(read_last_frames(tmp_path / "frames", 3)[:, 0, 0, 0], torch.tensor([110, 160, 210],
                                                                                         dtype=torch.uint8))
    with pytest.raises(SamplingError, match="give one"):
        start_frames_from(tmp_path / "frames" / "frame_00000.png", tmp_path / "clip.gif", 2)


def test_jobs_take_the_start_frames_per_line(tmp_path) -> None:
    from PIL import Image

    from videobooth_core.app.jobs import job_request, load_jobs

    Image.new("RGB", (16, 16), (200, 10, 10)).save(tmp_path / "start.png")
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text('{"prompt": "a dog", "start_image": "start.png", "frames": 32, "context_overlap": 2}\n'
                    '{"prompt": "a cat"}\n')
    first, second = load_jobs(jobs, check_files=False)
    request = job_request(first)
    assert request.start_frames.shape == (1, 16, 16, 3) and request.context_overlap == 2
    assert first.describe()["start_image"] == str(tmp_path / "start.png")
    assert "start_image" not in second.describe() and job_request(second).start_frames is None
