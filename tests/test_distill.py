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

from training_helpers import dataset_without_the_word, one_thread, synth  # noqa: F401  (module fixtures)

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


@torch.no_grad()
def test_long_videos_keep_their_windows_with_the_lcm_sampler(model) -> None:
    from videobooth_core.sampling.lcm import with_guidance
    from videobooth_core.sampling.run import prepare_denoiser
    from videobooth_core.sampling.windows import ContextOptions

    unet, _, cond, null, exemplar = model
    shape = (1, 4, 6, 8, 8)
    windowed, _ = prepare_denoiser(unet, cond, null, shape, "cpu", image_prompt=True,
                                   context=ContextOptions(window=4, overlap=1))
    free = with_guidance(windowed, 1.0)
    assert free.options is windowed.options and free.inner is not windowed.inner
    assert (free.cfg_scale, free.guidance, windowed.cfg_scale, windowed.guidance) == (1.0, "all", 4.0, "official")
    out = run_sampler(windowed, "lcm", 2, shape, torch.Generator().manual_seed(4), "cpu", exemplar_clean=exemplar)
    assert out.shape == shape and torch.isfinite(out).all()


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


def test_huber_loss() -> None:
    from videobooth_core.training.distill import huber_loss

    a, b = torch.tensor([0.0, 3.0]), torch.tensor([4.0, 3.0])
    assert huber_loss(a, b, 3.0).item() == pytest.approx((5.0 - 3.0 + 0.0) / 2)
    assert huber_loss(a, b, 0.0).item() == pytest.approx(2.0)  # c = 0: the mean absolute error
    assert huber_loss(a, a, 0.001).item() == 0.0


@torch.no_grad()
def test_the_teacher_is_the_core_denoiser_with_the_official_guidance(model) -> None:
    from videobooth_core.sampling.denoiser import guide
    from videobooth_core.training.distill import teacher_solver_step

    unet, _, cond, null, exemplar = model
    x_t = torch.randn(SHAPE, generator=torch.Generator().manual_seed(4))
    exemplar_t = exemplar.expand(-1, -1, 3, -1, -1)
    teacher = VideoDenoiser(unet, cond, null, 4.0, "official")
    x_s = teacher_solver_step(teacher, x_t, 519, 499, exemplar_t)
    eps_cond = unet(x_t, torch.tensor([519]), cond, image_prompt_features=unet.capture_image_prompt_features(
        exemplar_t, torch.tensor([519]), null))
    eps_uncond = unet(x_t, torch.tensor([519]), null)  # the unconditional pass has no image prompt
    eps = guide(eps_cond, eps_uncond, 4.0, "official")
    assert torch.equal(eps[:, 3], eps_cond[:, 3]) and not torch.equal(eps[:, :3], eps_cond[:, :3])
    table = alphas_cumprod()
    # the denoiser batches the unconditional pass with the capture: the same maths to float rounding
    torch.testing.assert_close(x_s, ddim_step(x_t, eps, torch.tensor(table[519]), torch.tensor(table[499])),
                               rtol=1e-4, atol=1e-4)


# -- the LoRA and the stage -----------------------------------------------------------------------------------------
@torch.no_grad()
def test_lora_strength_0_is_the_teacher_bit_for_bit_and_the_loader_reads_the_file(model, tmp_path) -> None:
    from videobooth_core.loading.lora import LoraSpec, apply_loras
    from videobooth_core.training.config import DEFAULT_LORA_TARGETS
    from videobooth_core.training.lora_train import LoraHooks, LoraLayers, save_kohya

    # float64, a checking precision: in float32 the random tiny model amplifies the rounding difference between a
    # merged weight and an added branch to ~1e-2 (measured), which would hide a real mismatch
    unet, mapper = tiny_unet_and_mapper(vision_width=32, text_width=32)
    unet, mapper = unet.double(), mapper.double()
    unet.attach_projections(mapper.site_projections())
    _, _, cond, null, exemplar = (t.double() if isinstance(t, torch.Tensor) else t for t in model)
    generator = torch.Generator().manual_seed(5)
    layers = LoraLayers(unet, DEFAULT_LORA_TARGETS, rank=4, alpha=2.0).double()
    for layer in layers.layers.values():
        layer.up.copy_(0.05 * torch.randn(layer.up.shape, generator=generator))
    x_t = torch.randn(SHAPE, generator=generator).double()
    exemplar_t = exemplar.expand(-1, -1, 3, -1, -1)

    def predict() -> torch.Tensor:
        return VideoDenoiser(unet, cond, null, 4.0).predict(x_t, 500, exemplar_t)[0]

    teacher = predict()
    hooks = LoraHooks(unet, layers)
    try:
        with hooks.use(layers, strength=0.0):
            assert torch.equal(predict(), teacher)
        with hooks.use(None):
            assert torch.equal(predict(), teacher)
        student = predict()
    finally:
        hooks.remove()
    assert not torch.allclose(student, teacher, atol=1e-3)
    assert torch.equal(predict(), teacher)  # no hook left behind

    path = save_kohya(layers, tmp_path / "videobooth_lcm_lora.safetensors")
    sites = len(unet.attention_sites)
    patch, report = apply_loras(unet, [LoraSpec(path, 0.0)])
    assert report.layers == 0 and torch.equal(predict(), teacher)
    patch.undo()
    patch, report = apply_loras(unet, [LoraSpec(path, 1.0)])  # kv="mapper", the loader's default
    try:
        merged = predict()
    finally:
        patch.undo()
    assert report.kv_layers == 4 * sites and report.kv_applied == 6 * sites  # attn1 K/V: video and image-prompt
    assert report.unet_layers == len(layers.names) - 4 * sites
    # merged weights (the loader) vs an added branch (training): the same update (the file holds float32 halves)
    torch.testing.assert_close(merged, student, rtol=1e-5, atol=1e-5)
    assert torch.equal(predict(), teacher)


def _distill_config(tiny_models, synth, out, **kwargs):
    from videobooth_core.training.config import TrainConfig

    settings = {"size": 64, "frames": 2, "batch_size": 1, "progress": False, "tensorboard": False, "log_every": 1,
                "memory_check": False, "cpu": True, "lora_rank": 4, "lora_alpha": 4.0, "steps": 2,
                "checkpoint_every": 1, **kwargs}
    return TrainConfig(stage="distill", data=str(synth), models=str(tiny_models), out=str(out), **settings)


def test_a_short_distillation_runs_and_resumes_after_sigkill_bit_identically(tiny_models, synth, tmp_path) -> None:
    """``train --stage distill`` SIGKILLed from outside while it writes its second checkpoint (or just after)
    resumes from the last complete one and ends bit-identical to an uninterrupted run (the LoRA, the EMA target,
    the logged losses): the one loop's accelerate state, as stages 1 and 2 (tests/test_training.py)."""
    import json
    import signal
    import sys

    from safetensors import safe_open
    from safetensors.torch import load_file
    from test_training import _start_and_wait

    from videobooth_core.training.distill_loop import RESULT_NAME, train_distill
    from videobooth_core.training.state import MODEL_FILE, list_checkpoints

    uninterrupted = train_distill(_distill_config(tiny_models, synth, tmp_path / "a", steps=3, validate_every=3,
                                                  validation_clips=1))
    assert uninterrupted == tmp_path / "a" / RESULT_NAME
    videos = sorted(p.name for p in (tmp_path / "a" / "validation").iterdir())  # the lcm sampler at 1, 2, 4, 8 steps
    assert len(videos) == 4 and all(name.startswith("step_00000003_") for name in videos)
    assert [name.rsplit("_", 1)[1] for name in videos] == ["lcm1.gif", "lcm2.gif", "lcm4.gif", "lcm8.gif"]
    command = [sys.executable, "-m", "videobooth_core", "train", "--stage", "distill", "--data", str(synth),
               "--models", str(tiny_models), "--out", str(tmp_path / "b"), "--size", "64", "--frames", "2",
               "--batch-size", "1", "--steps", "3", "--checkpoint-every", "1", "--lora-rank", "4", "--lora-alpha", "4",
               "--cpu", "--no-progress", "--no-tensorboard", "--no-memory-check", "--log-every", "1"]
    folder = tmp_path / "b" / "checkpoints"

    def writing_the_second() -> bool:  # step 1 complete, step 2 started (its temporary folder) or complete
        names = [p.name for p in folder.iterdir()] if folder.is_dir() else []
        return "step_00000001" in names and any("step_00000002" in name for name in names)

    process = _start_and_wait(command, writing_the_second)
    process.send_signal(signal.SIGKILL)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == -signal.SIGKILL, stderr[-2000:]
    resumed_config = _distill_config(tiny_models, synth, tmp_path / "b", resume="latest", steps=3)
    left = [int(p.name.removeprefix("step_")) for p in list_checkpoints(resumed_config)]
    assert left and left[0] >= 1 and left[-1] < 3, left  # killed at step 2's checkpoint, not after the run
    assert not (tmp_path / "b" / RESULT_NAME).exists()
    resumed = train_distill(resumed_config)

    a, b = load_file(uninterrupted), load_file(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(k.startswith("lora_unet_") and k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in a)
    assert any(a[k].abs().max() > 0 for k in a if k.endswith(".lora_up.weight"))  # it trained (up starts at 0)
    with safe_open(str(uninterrupted), "pt") as handle:
        assert handle.metadata()["videobooth_sampler"] == "lcm"
    final_a, final_b = list_checkpoints(resumed_config)[-1], sorted((tmp_path / "a" / "checkpoints").iterdir())[-1]
    assert final_a.name == final_b.name == "step_00000003"
    progress = torch.load(final_a / "custom_checkpoint_0.pkl", weights_only=True)
    assert (progress["stage"], progress["step"]) == ("distill", 3)
    for name in (MODEL_FILE, "custom_checkpoint_1.pkl"):  # the student's LoRA, the EMA target
        one = load_file(final_a / name) if name == MODEL_FILE else torch.load(final_a / name, weights_only=True)
        two = load_file(final_b / name) if name == MODEL_FILE else torch.load(final_b / name, weights_only=True)
        tensors = {k: v for k, v in one.items() if isinstance(v, torch.Tensor)}
        assert tensors and all(torch.equal(v, two[k]) for k, v in tensors.items())
    losses = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    reference = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in losses] == [1, 2, 3] and [r["loss"] for r in losses] == [r["loss"] for r in reference]


def test_a_failed_distillation_leaves_the_callers_unet_without_the_lora(tiny_models, synth, tmp_path) -> None:
    """The one loop closes the stage however the run ends: a dataset entry refused after the LoRA's hooks were put
    on the caller's UNet (its caption lacks its word) leaves the UNet with no hook, as it came."""
    from videobooth_core.training.config import TrainingError
    from videobooth_core.training.distill_loop import load_distill_models, train_distill

    broken, broken_id = dataset_without_the_word(synth, tmp_path / "broken")
    config = _distill_config(tiny_models, broken, tmp_path / "run")
    models = load_distill_models(config, torch.device("cpu"))
    hooked = lambda: sum(len(m._forward_hooks) for m in models["unet"].modules())  # noqa: E731
    before = hooked()
    with pytest.raises(TrainingError, match=broken_id):
        train_distill(config, models=models)
    assert hooked() == before


def test_distillation_settings_are_checked_in_one_line(tiny_models, synth, tmp_path) -> None:
    from videobooth_core.training.config import TrainingError, make_config

    for change, words in (({"lora_rank": 0}, "lora_rank"), ({"target_ema": 1.0}, "target_ema"),
                          ({"distill_skip": 251}, "distill_skip"), ({"huber_c": -1.0}, "huber_c"),
                          ({"distill_cfg": math.nan}, "distill_cfg"), ({"lora_targets": ()}, "lora_targets")):
        with pytest.raises(TrainingError, match=words):
            _distill_config(tiny_models, synth, tmp_path, **change).check()
    # the checks come from the table: a bad value is named as the flag or the config file's key that gave it
    from videobooth_core.app.cli import build_parser
    from videobooth_core.training.cli import config_from_args

    base = ["train", "--stage", "distill", "--data", str(synth), "--models", str(tiny_models), "--out",
            str(tmp_path / "o")]
    parsed = config_from_args(build_parser().parse_args([*base, "--lora-targets", "attn1.to_q", "ff.net.2"]))
    assert (parsed.stage, parsed.lora_targets, parsed.lora_rank) == ("distill", ("attn1.to_q", "ff.net.2"), 64)
    assert config_from_args(build_parser().parse_args([*base[:2], "2", *base[3:], "--mapper",
                                                       str(tiny_models / "videobooth" / "mapper.pt")])).stage == 2
    with pytest.raises(TrainingError, match=r"^--target-ema must be less than 1, got 1.0"):
        config_from_args(build_parser().parse_args([*base, "--target-ema", "1"]))
    with pytest.raises(TrainingError, match=r"^--lora-alpha must be greater than 0, got 0.0"):
        config_from_args(build_parser().parse_args([*base, "--lora-alpha", "0"]))
    config_file = tmp_path / "distill.yaml"
    config_file.write_text("stage: distill\nlora_targets: attn1.to_q\n")  # a string, not a list
    with pytest.raises(TrainingError, match=r"^lora_targets in distill.yaml must be a list of one or more"):
        config_from_args(build_parser().parse_args(["train", "--config", str(config_file)]))
    with pytest.raises(TrainingError, match=r"^stage in the config file must be one of 1, 2, distill, got True"):
        make_config({"stage": True}, {})
    with pytest.raises(SystemExit):  # argparse: invalid choice
        build_parser().parse_args([*base[:2], "3"])
    with pytest.raises(TrainingError, match="match no layer"):
        from videobooth_core.training.lora_train import target_names
        from videobooth_core.app.tiny import tiny_unet_and_mapper as tiny

        target_names(tiny(32, 32)[0], ("no_such_layer",))


def test_generate_with_the_lcm_sampler_and_a_distilled_lora(tiny_models, tmp_path) -> None:
    """``generate --sampler lcm --steps 4 --lora OUT/videobooth_lcm_lora.safetensors``, as a user runs it."""
    import json

    from cli_helpers import SMALL, ok, run_cli

    from videobooth_core.loading.checkpoint import load_mapper, load_unet
    from videobooth_core.loading.models_dir import ModelFiles
    from videobooth_core.training.config import DEFAULT_LORA_TARGETS
    from videobooth_core.training.lora_train import LoraLayers, save_kohya

    files = ModelFiles.from_models_dir(tiny_models)
    unet, mapper = load_unet(files.unet), load_mapper(files.mapper)
    unet.attach_projections(mapper.site_projections())
    layers = LoraLayers(unet, DEFAULT_LORA_TARGETS, rank=2, alpha=2.0)
    lora = save_kohya(layers, tmp_path / "videobooth_lcm_lora.safetensors")
    result = ok(run_cli(["generate", "--models", tiny_models, "--prompt", "a ball rolling", *SMALL, "--sampler", "lcm",
                         "--steps", "4", "--lora", lora, "--out", tmp_path / "lcm.gif"], tmp_path / "home"))
    summary = json.loads([line for line in result.stdout.splitlines() if line.startswith("done: ")][0][6:])
    assert (summary["sampler"], summary["steps"], summary["lcm_cfg"]) == ("lcm", 4, 1.0)
    sites = len(unet.attention_sites)
    assert f"{4 * sites} key/value layers on {6 * sites} mapper projections" in result.stdout + result.stderr
    assert (tmp_path / "lcm.gif").is_file()


def test_the_distillation_stage_checks_memory_before_training(tiny_models, synth, tmp_path, monkeypatch) -> None:
    """Stage 2's estimate with the LoRA as the trained parameters: refused on a device reporting too little, before
    any step (no metrics written), and the estimate's trained bytes are the LoRA's."""
    import videobooth_core.training.memory as memory
    from videobooth_core.training.config import TrainingError
    from videobooth_core.training.distill_loop import DistillStage, load_distill_models, train_distill

    config = _distill_config(tiny_models, synth, tmp_path / "run", memory_check=True)
    models = load_distill_models(config, torch.device("cpu"))
    stage = DistillStage(config)
    params = stage.trainable(models, torch.device("cpu"))
    try:
        estimate = memory.estimate_training_memory(stage.batch_config, models, params, "cpu")
        lora_bytes = sum(p.numel() * p.element_size() for p in params)
        assert estimate.activations_bytes > 0
        with pytest.raises(TrainingError, match="too little memory"):
            memory.check_training_memory(stage.batch_config, models, params, "cpu",
                                         available=memory.added_bytes(estimate, params) - 1)
        assert memory.added_bytes(estimate, params) == estimate.activations_bytes + 4 * lora_bytes
    finally:
        stage.close()
    monkeypatch.setattr(memory, "available_memory_bytes", lambda device: 2**20)
    with pytest.raises(TrainingError, match="too little memory"):
        train_distill(config, models=models)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
