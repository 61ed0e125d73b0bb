"""The pack's fast samplers on VideoCrafter (issue 26): diffusers schedulers on the variance-preserving view of the
model's process (``use_scale`` included), proven by the diffusers DDIM reproducing the official DDIM, an oracle that
every fast sampler must land on, the API's wiring, and the refusals before any model loads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import PARITY_RTOL, parity_atol

from videobooth_core.app.cli import main
from videobooth_core.app.tiny_videocrafter import make_tiny_videocrafter, tiny_guided_eps
from videobooth_core.errors import SamplingError
from videobooth_core.models.videocrafter.config import RELEASED_SAMPLING, RELEASED_UNETS
from videobooth_core.sampling.noise import GeneratorNoise
from videobooth_core.sampling.videocrafter import (
    FAST_SAMPLERS,
    VideoCrafterDDIM,
    alphas_cumprod,
    sample_videocrafter_ddim,
    sample_videocrafter_scheduler,
    variance_preserving_schedule,
    x0_scale_array,
)
from videobooth_core.videocrafter_pipeline import VideoCrafterPipeline, VideoCrafterRequest, check_request

SHAPE = (1, 4, 2, 8, 8)


def _scale(kind: str) -> dict:
    return RELEASED_SAMPLING[kind].x0_scale


def test_the_variance_preserving_view_is_a_valid_schedule() -> None:
    """a~ decreases strictly and stays in (0, 1); without use_scale it is the official float32 buffer itself."""
    plain, norms = variance_preserving_schedule()
    assert np.array_equal(plain, alphas_cumprod().double().numpy()) and np.array_equal(norms, np.ones(1000))
    for scale_b, fix in ((0.7, False), (0.3, True)):
        vp, norms = variance_preserving_schedule(True, scale_b, fix)
        assert (np.diff(vp) < 0).all() and 0 < vp[-1] and vp[0] < 1
        a, s = plain, x0_scale_array(scale_b, fix)[:1000].double().numpy()
        np.testing.assert_allclose(vp * norms ** 2, a * s ** 2, rtol=1e-12)  # sqrt(a~) n = sqrt(a) s: the signal
        np.testing.assert_allclose((1 - vp) * norms ** 2, 1 - a, rtol=1e-12)  # sqrt(1 - a~) n = sqrt(1 - a): the eps
        assert norms[0] == 1.0 and norms[999] < 1  # s_0 = 1: the last sample needs no conversion


@pytest.mark.parametrize("kind", sorted(RELEASED_UNETS))
@torch.no_grad()
def test_the_diffusers_ddim_on_the_variance_preserving_view_is_the_official_ddim(kind: str) -> None:
    """The proof of the reformulation: the diffusers DDIM (eta 0, the official timestep grid) run through
    ``sample_videocrafter_scheduler`` on a tiny model of each kind reproduces the official DDIM within the parity
    suite's tolerance (measured: max |diff| at most 7.8e-7 of max |latent| over the four kinds, 10 steps, cfg 12),
    visiting the official timesteps. The same run on SD's plain schedule misses a use_scale kind by far."""
    eps = tiny_guided_eps(kind)
    official_steps, ours_steps = [], []
    official = sample_videocrafter_ddim(eps, VideoCrafterDDIM(10, 0.0, **_scale(kind)), SHAPE,
                                        GeneratorNoise(torch.Generator().manual_seed(3)), guidance=12.0,
                                        on_step=lambda r: official_steps.append((r.timestep, r.pred_x0)))
    ours = sample_videocrafter_scheduler(eps, "ddim", 10, SHAPE, GeneratorNoise(torch.Generator().manual_seed(3)),
                                         guidance=12.0, spacing="leading", **_scale(kind),
                                         on_step=lambda r: ours_steps.append((r.timestep, r.pred_x0)))
    atol = parity_atol(official)
    torch.testing.assert_close(ours, official, rtol=PARITY_RTOL, atol=atol)
    assert [t for t, _ in ours_steps] == [t for t, _ in official_steps] == list(range(901, 0, -100))
    for (_, mine), (_, theirs) in zip(ours_steps, official_steps):  # the official pred_x0 (divided by the scale)
        torch.testing.assert_close(mine, theirs, rtol=PARITY_RTOL, atol=parity_atol(theirs))
    if RELEASED_SAMPLING[kind].use_scale:
        plain = sample_videocrafter_scheduler(eps, "ddim", 10, SHAPE, GeneratorNoise(torch.Generator().manual_seed(3)),
                                              guidance=12.0, spacing="leading")
        assert (plain - official).abs().max() > 100 * atol


@pytest.mark.parametrize("kind", ["videocrafter1-t2v-512", "videocrafter2", "videocrafter1-t2v-1024"])
@pytest.mark.parametrize("name", FAST_SAMPLERS)
def test_every_fast_sampler_lands_on_the_oracles_clean_latent(name: str, kind: str) -> None:
    """An oracle that knows x0 predicts the exact eps of the kind's training process (``use_scale``'s
    ``x_t = sqrt(a) s x0 + sqrt(1 - a) eps``): a sampler on the right schedule ends on x0 (measured: at most
    9.6e-7 off, 12 steps); on SD's plain schedule the use_scale kinds end 0.2 to 0.5 away."""
    clean = torch.randn((1, 4, 3, 4, 4), generator=torch.Generator().manual_seed(0))
    scale = _scale(kind)
    a = alphas_cumprod().double()
    s = x0_scale_array(scale["scale_b"], scale["fix_scale_bug"])[:1000].double() if scale["use_scale"] \
        else torch.ones(1000, dtype=torch.float64)

    def oracle(x, timesteps):
        t = int(timesteps[0])
        eps = ((x.double() - a[t].sqrt() * s[t] * clean.double()) / (1 - a[t]).sqrt()).float()
        return eps, eps

    out = sample_videocrafter_scheduler(oracle, name, 12, clean.shape, GeneratorNoise(torch.Generator().manual_seed(1)),
                                        guidance=1.0, **scale)
    torch.testing.assert_close(out, clean, rtol=0, atol=1e-5)
    if scale["use_scale"]:
        plain = sample_videocrafter_scheduler(oracle, name, 12, clean.shape,
                                              GeneratorNoise(torch.Generator().manual_seed(1)), guidance=1.0)
        assert (plain - clean).abs().max() > 0.1


@pytest.fixture(scope="module")
def vc2(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("videocrafter_fast")
    make_tiny_videocrafter(root, "videocrafter2")
    return root


def test_a_fast_sampler_through_the_api_visits_its_timesteps(vc2: Path) -> None:
    """dpmpp_2m at 25 steps through the pipeline: the kind's use_scale schedule, the trailing timesteps 999 ... 39,
    the same x_T as the official DDIM (seed 123), a finite latent of the right shape; euler_ancestral's per-step
    noise comes from the seed too (the same run twice is the same)."""
    pipe = VideoCrafterPipeline.from_models_dir(vc2)
    seen = []
    small = dict(frames=2, height=64, width=64)
    result = pipe.generate(VideoCrafterRequest(prompt="a cat", sampler="dpmpp_2m", steps=25, **small),
                           callback=lambda step, total, record: seen.append((step, total, record.timestep,
                                                                             record.x_in)))
    assert result.latents.shape == (1, 4, 2, 8, 8) and torch.isfinite(result.latents).all()
    assert [t for _, _, t, _ in seen] == list(range(999, 0, -40)) and {total for _, total, _, _ in seen} == {25}
    official = []
    pipe.generate(VideoCrafterRequest(prompt="a cat", steps=2, **small),
                  callback=lambda step, total, record: official.append(record.x_in))
    torch.testing.assert_close(seen[0][3], official[0], rtol=1e-6, atol=1e-6)  # the UNet's first input: x_T
    runs = [pipe.generate(VideoCrafterRequest(prompt="a cat", sampler="euler_ancestral", steps=4, seed=s, **small))
            for s in (5, 5, 6)]
    assert torch.equal(runs[0].latents, runs[1].latents) and not torch.equal(runs[0].latents, runs[2].latents)


def test_unknown_and_other_family_samplers_are_refused_before_any_model_loads(vc2: Path, tmp_path: Path, capsys,
                                                                            monkeypatch) -> None:
    for name, words in (("lcm", r"sampler 'lcm' is not available: .*LoRA, and none exists for VideoCrafter.*dpmpp_2m"),
                        ("ddpm", r"sampler 'ddpm' is not available: that is VideoBooth's official sampler.*ddim"),
                        ("heun", r"unknown sampler 'heun'; choose one of ddim, dpmpp_2m, euler, euler_ancestral, "
                                 "unipc")):
        with pytest.raises(SamplingError, match=words):
            check_request(VideoCrafterRequest(prompt="x", sampler=name), "videocrafter2")
    # the official schedule's step limits are the official DDIM's only
    assert check_request(VideoCrafterRequest(prompt="x", sampler="unipc", steps=3), "videocrafter2").steps == 3
    with pytest.raises(SamplingError, match="breaks at this step count"):
        check_request(VideoCrafterRequest(prompt="x", steps=3), "videocrafter2")

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(VideoCrafterPipeline, "from_files", no_loading)
    for value, words in (("lcm", "--sampler 'lcm' is not available"), ("ddpm", "--sampler 'ddpm' is not available")):
        assert main(["generate", "--models", str(vc2), "--prompt", "a cat", "--sampler", value,
                     "--out", str(tmp_path / "no.gif")]) == 2
        err = capsys.readouterr().err
        assert words in err and "Traceback" not in err
    assert not (tmp_path / "no.gif").exists()


def test_the_command_line_and_batch_jobs_run_a_fast_sampler_as_the_api_does(vc2: Path, tmp_path: Path,
                                                                           capsys) -> None:
    """``--sampler unipc`` on one video, and a jobs line's ``sampler`` (the flag as every line's default): the API's
    frames; a jobs line's lcm is refused by name before anything is written."""
    import json

    from videobooth_core.video_io import read_last_frames

    flags = ["--frames", "2", "--width", "64", "--height", "64", "--steps", "3"]
    assert main(["generate", "--models", str(vc2), "--prompt", "a cat", *flags, "--sampler", "unipc",
                 "--out", str(tmp_path / "one")]) == 0
    assert "2 frames 64x64, 3 unipc steps, guidance 12.0" in capsys.readouterr().out
    pipe = VideoCrafterPipeline.from_models_dir(vc2)
    small = dict(frames=2, width=64, height=64, steps=3)
    expected = {name: pipe.generate(VideoCrafterRequest(prompt="a cat", sampler=name, **small)).frames
                for name in ("unipc", "euler")}
    assert torch.equal(read_last_frames(tmp_path / "one", 2), expected["unipc"])
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(json.dumps({"id": "a", "prompt": "a cat", "out": "a"}) + "\n"
                    + json.dumps({"id": "b", "prompt": "a cat", "sampler": "euler", "out": "b"}) + "\n")
    batch = ["generate", "--models", str(vc2), "--jobs", str(jobs), *flags, "--sampler", "unipc"]
    assert main([*batch, "--out-dir", str(tmp_path / "out")]) == 0
    for job, name in (("a", "unipc"), ("b", "euler")):
        assert torch.equal(read_last_frames(tmp_path / "out" / job, 2), expected[name]), job
    jobs.write_text(json.dumps({"prompt": "a cat", "sampler": "lcm"}) + "\n")
    assert main([*batch, "--out-dir", str(tmp_path / "none")]) == 2
    assert "line 1" in (err := capsys.readouterr().err) and "'sampler' 'lcm' is not available" in err, err
    assert not (tmp_path / "none").exists()
