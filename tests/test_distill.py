"""Consistency distillation (issue 27): the lcm sampler, the distillation maths, the LoRA it trains, the stage.

Tiny random models on the CPU; every assertion is on numbers.
"""

from __future__ import annotations

import math

import pytest
import torch

from videobooth_core.app.tiny import tiny_unet_and_mapper
from videobooth_core.errors import SamplingError
from videobooth_core.sampling.denoiser import VideoDenoiser
from videobooth_core.sampling.lcm import (alphas_cumprod, consistency_coefficients, consistency_output, ddim_step,
                                          lcm_timesteps, predicted_x0, sample_lcm, solver_pairs, solver_timesteps)
from videobooth_core.sampling.noise import GeneratorNoise
from videobooth_core.sampling.run import run_sampler
from videobooth_core.sampling.schedule import respaced_timesteps

SHAPE = (1, 4, 3, 8, 8)


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    unet, mapper = tiny_unet_and_mapper(vision_width=32, text_width=32)
    unet.attach_projections(mapper.site_projections())
    text = torch.randn((2, 77, 32), generator=torch.Generator().manual_seed(0))
    exemplar = torch.randn((1, 4, 1, 8, 8), generator=torch.Generator().manual_seed(1))
    return unet, mapper, text[:1], text[1:], exemplar


class Recording:
    """A denoiser wrapper that records what it was given and how many UNet passes ran."""

    def __init__(self, inner: VideoDenoiser) -> None:
        self.inner = inner
        self.seen: list[tuple[torch.Tensor, int, torch.Tensor, torch.Tensor | None]] = []

    def __getattr__(self, name):
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def predict(self, x_t, timestep, exemplar_t, exemplar_timestep=None):
        eps, eps_cond, eps_uncond = self.inner.predict(x_t, timestep, exemplar_t)
        self.seen.append((x_t.clone(), timestep, eps, eps_uncond))
        return eps, eps_cond, eps_uncond


# -- the grid -------------------------------------------------------------------------------------------------
def test_the_skipping_grid_comes_from_the_250_step_training_grid() -> None:
    grid = respaced_timesteps(1000, 250)
    points = solver_timesteps(5)
    assert len(points) == 50 and points[-1] == 999 and set(points) <= set(grid)
    assert points[:3] == [grid[4], grid[9], grid[14]] == [16, 36, 56]
    pairs = solver_pairs(5)
    assert pairs[0] == (16, 0) and pairs[-1] == (999, grid[244]) and [t for t, _ in pairs] == points
    assert lcm_timesteps(1) == [999]
    assert lcm_timesteps(4) == [points[49], points[37], points[25], points[13]]
    assert len(lcm_timesteps(8)) == 8 and lcm_timesteps(8)[0] == 999
    with pytest.raises(SamplingError, match="1 to 50 steps.*51"):
        lcm_timesteps(51)


def test_lcm_steps_are_checked_before_any_model_loads() -> None:
    from videobooth_core.pipeline import GenerationRequest

    GenerationRequest(prompt="a dog", sampler="lcm", steps=4).validate()
    with pytest.raises(SamplingError, match="lcm sampler takes 1 to 50 steps; got: 250"):
        GenerationRequest(prompt="a dog", sampler="lcm").validate()
    with pytest.raises(SamplingError, match="lcm_cfg must be at least 1"):
        GenerationRequest(prompt="a dog", sampler="lcm", steps=4, lcm_cfg=0.5).validate()


# -- the consistency function and the sampler --------------------------------------------------------------------
def test_the_boundary_condition() -> None:
    assert consistency_coefficients(0) == (1.0, 0.0)
    x, eps = torch.randn(SHAPE), torch.randn(SHAPE)
    assert consistency_output(x, eps, 0, 0.9999) is x  # f(x, 0) = x
    c_skip, c_out = consistency_coefficients(999)
    assert c_skip < 1e-8 and abs(c_out - 1.0) < 1e-8  # at the noisy end: the x0 prediction
    abar = float(alphas_cumprod()[999])
    expected = (x.double() - math.sqrt(1 - abar) * eps.double()) / math.sqrt(abar)
    torch.testing.assert_close(predicted_x0(x, eps, abar).double(), expected, rtol=1e-6, atol=1e-4)  # 1/sqrt(abar) ~ 157


@pytest.mark.parametrize("steps", [1, 4])
@torch.no_grad()
def test_the_sampler_returns_the_last_steps_consistency_output_exactly(model, steps: int) -> None:
    unet, _, cond, null, exemplar = model
    recording = Recording(VideoDenoiser(unet, cond, null, 4.0))
    outputs = []
    out = sample_lcm(recording, steps, SHAPE, GeneratorNoise(torch.Generator().manual_seed(2)), exemplar,
                     callback=lambda s, n, o: outputs.append(o))
    x_last, t_last, eps_last, eps_uncond = recording.seen[-1]
    table = alphas_cumprod()
    assert [t for _, t, _, _ in recording.seen] == lcm_timesteps(steps)
    assert all(u is None for *_, u in recording.seen)  # guidance-free: no unconditional pass (cfg 4 not used)
    assert torch.equal(out, consistency_output(x_last, eps_last, t_last, float(table[t_last])))
    assert torch.equal(out, outputs[-1].pred_x0) and torch.equal(out, outputs[-1].x_prev)
    # ... which is the model's x0 prediction up to c_skip ~ 1e-9 at these timesteps
    torch.testing.assert_close(out, predicted_x0(x_last, eps_last, float(table[t_last])), rtol=1e-5, atol=1e-5)
    for step in range(steps - 1):  # between steps: the consistency output re-noised to the next timestep
        following = float(table[recording.seen[step + 1][1]])
        assert outputs[step].x_prev.shape == SHAPE
        assert torch.equal(outputs[step].x_prev, recording.seen[step + 1][0])
        assert not torch.allclose(outputs[step].x_prev, math.sqrt(following) * outputs[step].pred_x0)


def test_with_an_oracle_the_sampler_lands_on_the_clean_latent() -> None:
    from test_samplers import OracleDenoiser

    clean = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    for steps in (1, 4):  # the oracle's x0 prediction is exact, so any step count lands there (to c_skip)
        out = sample_lcm(OracleDenoiser(clean), steps, SHAPE, GeneratorNoise(torch.Generator().manual_seed(1)))
        torch.testing.assert_close(out, clean, rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_an_optional_cfg_runs_the_official_guidance(model) -> None:
    unet, _, cond, null, exemplar = model
    free = run_sampler(VideoDenoiser(unet, cond, null, 4.0), "lcm", 2, SHAPE, torch.Generator().manual_seed(3), "cpu",
                       exemplar_clean=exemplar)
    recording = Recording(VideoDenoiser(unet, cond, null, 4.0))
    guided = sample_lcm(recording, 2, SHAPE, GeneratorNoise(torch.Generator().manual_seed(3)), exemplar, cfg=1.5)
    assert all(u is not None for *_, u in recording.seen)
    assert recording.inner.cfg_scale == 4.0  # the caller's denoiser is left as it was
    assert free.shape == guided.shape and not torch.allclose(free, guided)
    with pytest.raises(SamplingError, match="at least 1"):
        sample_lcm(recording, 2, SHAPE, GeneratorNoise(torch.Generator().manual_seed(3)), exemplar, cfg=0.5)


# -- the distillation maths ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("pair", [(999, 979), (519, 499), (36, 16)])
def test_the_teachers_ode_step_is_the_packs_ddim_step(pair) -> None:
    from videobooth_core.sampling.schedulers import make_scheduler

    t, s = pair
    scheduler = make_scheduler("ddim")
    scheduler.set_timesteps(1000 // (t - s))  # its own previous timestep is then t - (t - s) = s
    x, eps = torch.randn(SHAPE), torch.randn(SHAPE)
    expected = scheduler.step(eps, t, x, eta=0.0).prev_sample
    ours = ddim_step(x, eps, scheduler.alphas_cumprod[t], scheduler.alphas_cumprod[s])
    assert torch.equal(ours, expected)
    # on the training schedule's float64 coefficients (what the stage uses) the same step to float rounding
    table = alphas_cumprod()
    ours64 = ddim_step(x, eps, torch.tensor(table[t]), torch.tensor(table[s]))
    torch.testing.assert_close(ours64, expected, rtol=1e-5, atol=1e-5)
