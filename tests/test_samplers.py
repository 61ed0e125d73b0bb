"""Samplers: every sampler runs VideoBooth's own linear-beta schedule and noises the image prompt per step.

An oracle denoiser that knows the clean latent predicts the exact noise under the training schedule; any
sampler that integrates the same schedule must then land on that clean latent. A scheduler configured with
another schedule (e.g. SD's scaled-linear) would miss it.
"""

from __future__ import annotations

import pytest
import torch

from videobooth_core.sampling.schedulers import SAMPLERS, make_scheduler, sample_with_scheduler
from videobooth_core.sampling.ddpm import sample_ddpm
from videobooth_core.sampling.denoiser import VideoDenoiser
from videobooth_core.sampling.noise import GeneratorNoise
from videobooth_core.sampling.run import run_sampler
from videobooth_core.sampling.schedule import RespacedDDPM, base_betas
from videobooth_core.app.tiny import tiny_unet_and_mapper

ALPHAS_CUMPROD = torch.from_numpy(base_betas()).neg().add(1).cumprod(0)
SHAPE = (1, 4, 3, 4, 4)


class OracleDenoiser:
    """Predicts the exact epsilon of x_t for a known clean latent; records the image prompt it was given."""

    def __init__(self, clean: torch.Tensor) -> None:
        self.clean = clean
        self.seen: list[tuple[int, torch.Tensor | None]] = []

    def predict(self, x_t, timestep, exemplar_t, exemplar_timestep=None):
        abar = ALPHAS_CUMPROD[timestep]
        eps = ((x_t.double() - abar.sqrt() * self.clean.double()) / (1 - abar).sqrt()).float()
        self.seen.append((timestep, exemplar_t))
        return eps, eps, eps


class RecordingNoise(GeneratorNoise):
    def __init__(self, generator):
        super().__init__(generator)
        self.exemplar_draws = []

    def exemplar(self, step, shape):
        draw = super().exemplar(step, shape)
        self.exemplar_draws.append(draw)
        return draw


@pytest.mark.parametrize("spacing", ["trailing", "leading"])
@pytest.mark.parametrize("name", [s for s in SAMPLERS if s not in ("ddpm", "lcm")])  # lcm: tests/test_distill.py
def test_schedulers_follow_the_training_schedule(name: str, spacing: str) -> None:
    generator = torch.Generator().manual_seed(0)
    clean = torch.randn(SHAPE, generator=generator)
    exemplar_clean = torch.randn((1, 4, 1, 4, 4), generator=generator)
    oracle = OracleDenoiser(clean)
    noise = RecordingNoise(torch.Generator().manual_seed(1))
    out = sample_with_scheduler(oracle, name, 12, SHAPE, noise, torch.Generator().manual_seed(2),
                                exemplar_clean=exemplar_clean, spacing=spacing)
    torch.testing.assert_close(out, clean, rtol=1e-3, atol=2e-3)
    # the image prompt was noised to every step's own timestep with that step's fresh noise
    assert len(oracle.seen) == 12 and len(noise.exemplar_draws) == 12
    for (timestep, exemplar_t), draw in zip(oracle.seen, noise.exemplar_draws):
        abar = ALPHAS_CUMPROD[timestep]
        expected = abar.sqrt().float() * exemplar_clean.expand(-1, -1, 3, -1, -1) + (1 - abar).sqrt().float() * draw
        torch.testing.assert_close(exemplar_t, expected)
    assert len({t for t, _ in oracle.seen}) == 12


def test_scheduler_betas_are_linear_not_scaled_linear() -> None:
    scheduler = make_scheduler("ddim")
    torch.testing.assert_close(scheduler.alphas_cumprod.double(), ALPHAS_CUMPROD, rtol=1e-6, atol=1e-9)


def test_official_ddpm_with_oracle_lands_on_the_clean_latent() -> None:
    clean = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    out = sample_ddpm(OracleDenoiser(clean), RespacedDDPM(20), SHAPE, GeneratorNoise(torch.Generator().manual_seed(1)))
    torch.testing.assert_close(out, clean, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", SAMPLERS)
@torch.no_grad()
def test_every_sampler_runs_the_real_model(name: str) -> None:
    unet, mapper = tiny_unet_and_mapper(vision_width=32, text_width=32)
    unet.attach_projections(mapper.site_projections())
    text = torch.randn((2, 77, 32), generator=torch.Generator().manual_seed(0))
    denoiser = VideoDenoiser(unet, text[:1], text[1:], 4.0)
    exemplar = torch.randn((1, 4, 1, 8, 8), generator=torch.Generator().manual_seed(1))
    shape = (1, 4, 3, 8, 8)
    steps = []
    out = run_sampler(denoiser, name, 3, shape, torch.Generator().manual_seed(2), "cpu", exemplar_clean=exemplar,
                      callback=lambda s, t, o: steps.append(s))
    assert out.shape == shape and torch.isfinite(out).all()
    assert steps == [0, 1, 2]


def test_unknown_sampler_is_a_clear_error() -> None:
    from videobooth_core.errors import SamplingError

    with pytest.raises(SamplingError, match="unknown sampler 'heun'"):
        make_scheduler("heun")
