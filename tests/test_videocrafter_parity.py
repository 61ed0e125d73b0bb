"""VideoCrafter1/2 against the official code (issue 26): the recordings of ``tests/fixtures/videocrafter_tiny`` (the
official AILab-CVC/VideoCrafter code run on tiny random models of the four released kinds) replayed through our UNet,
image projector, DDIM sampler and the SD VAE; the full-size architectures against the official module's key set and
parameter count (``official_full_size_keys.json.gz``, recorded from the official class on the meta device)."""

from __future__ import annotations

import gzip
import json
from functools import cache

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import FIXTURES, assert_parity_close
from videobooth_core.conditioning.vae import vae_decode
from videobooth_core.loading.vae import load_vae
from videobooth_core.loading.videocrafter import (
    UNET_PREFIX,
    component,
    infer_unet_config,
    load_image_projector,
    load_videocrafter_unet,
    read_videocrafter_checkpoint,
)
from videobooth_core.models.videocrafter.config import (
    RELEASED_UNETS,
    ImageProjectorConfig,
    VideoCrafterUNetConfig,
)
from videobooth_core.models.videocrafter.resampler import ImageProjector
from videobooth_core.models.videocrafter.unet import VideoCrafterUNet
from videobooth_core.sampling.videocrafter import (
    VideoCrafterDDIM,
    ddim_update,
    guided_unet,
    sample_videocrafter_ddim,
)

ROOT = FIXTURES / "videocrafter_tiny"
KINDS = {"t2v_512_v1": "videocrafter1-t2v-512", "t2v_1024_v1": "videocrafter1-t2v-1024",
         "t2v_512_v2": "videocrafter2", "i2v_512_v1": "videocrafter1-i2v-512"}
TINY_PROJECTOR = ImageProjectorConfig(dim=32, depth=4, dim_head=8, heads=4, num_queries=16, embedding_dim=48,
                                      output_dim=32)
"""The i2v recording's projector (its README: the harness's Resampler sizes; heads are not in the shapes)."""
assert_close = assert_parity_close  # the parity tolerance of tests/test_parity.py (conftest)


class Recording:
    """One kind's recording: its checkpoint loaded through our loaders, inputs, outputs and sampler settings."""

    def __init__(self, kind: str) -> None:
        folder = ROOT / kind
        self.folder = folder
        self.inputs = load_file(folder / "inputs.safetensors")
        self.outputs = load_file(folder / "outputs.safetensors")
        self.values = json.loads((folder / "values.json").read_text())
        self.params = json.loads((folder / "config.json").read_text())["model"]["params"]
        self.kind, self.state_dict = read_videocrafter_checkpoint(folder / "model.ckpt")
        _, self.unet = load_videocrafter_unet(folder / "model.ckpt", state_dict=self.state_dict)
        self.schedule = VideoCrafterDDIM(self.values["ddim_steps"], self.values["ddim_eta"],
                                         use_scale=self.params.get("use_scale", False),
                                         scale_b=self.params.get("scale_b", 0.3),
                                         fix_scale_bug=self.params.get("fix_scale_bug", False))
        self.projector = None
        context, uncond = self.inputs["text_context"], self.inputs["text_context_uncond"]
        if "image_encoder_tokens" in self.inputs:
            self.projector = load_image_projector(folder / "model.ckpt", self.state_dict, config=TINY_PROJECTOR)
            with torch.no_grad():
                context = torch.cat([context, self.projector(self.inputs["image_encoder_tokens"])], dim=1)
                uncond = torch.cat([uncond, self.projector(self.inputs["image_encoder_tokens_zero_image"])], dim=1)
        self.eps = guided_unet(self.unet, context, uncond, self.inputs["fps"])

    def initial(self, shape: tuple[int, ...]) -> torch.Tensor:
        return self.inputs["x_T"]

    def step(self, index: int, shape: tuple[int, ...]) -> torch.Tensor:
        return self.inputs[f"ddim_noise.{index:02d}"]


@cache
def recording(kind: str) -> Recording:
    return Recording(kind)


@pytest.mark.parametrize("kind", KINDS)
def test_the_kind_and_the_unet_config_are_read_from_the_keys(kind: str) -> None:
    rec = recording(kind)
    assert rec.kind == KINDS[kind]
    official = rec.params["unet_config"]["params"]
    expected = VideoCrafterUNetConfig(**{k: v for k, v in official.items() if k in VideoCrafterUNetConfig.__dataclass_fields__})
    inferred = infer_unet_config(component(rec.state_dict, UNET_PREFIX))
    if not expected.use_relative_position:  # the temporal length sizes nothing then, and the keys cannot tell it
        inferred = VideoCrafterUNetConfig(**{**inferred.to_dict(), "temporal_length": expected.temporal_length})
    assert inferred == expected


@pytest.mark.parametrize("kind", KINDS)
def test_the_ddim_schedule_is_the_official_one(kind: str) -> None:
    rec, out = recording(kind), recording(kind).outputs
    schedule = rec.schedule
    assert torch.equal(schedule.alphas_cumprod, out["schedule.alphas_cumprod"])
    assert schedule.timesteps.tolist() == out["schedule.sampler.ddim_timesteps"].tolist() == [1, 251, 501, 751]
    assert torch.equal(schedule.ddim_alphas, out["schedule.sampler.ddim_alphas"])
    assert np.array_equal(schedule.ddim_alphas_prev, out["schedule.sampler.ddim_alphas_prev"].numpy())
    assert schedule.ddim_alphas_prev[0] == out["schedule.alphas_cumprod"][0].item() != 1.0  # the a_prev quirk
    assert torch.equal(schedule.ddim_sqrt_one_minus_alphas, out["schedule.sampler.ddim_sqrt_one_minus_alphas"])
    # float64 sigma, equal to a few float64 ulps of the torch/numpy mix (at most one float32 ulp once rounded)
    np.testing.assert_allclose(schedule.ddim_sigmas, out["schedule.sampler.ddim_sigmas"].numpy(), rtol=1e-6, atol=0)
    if "schedule.scale_arr" in out:
        assert torch.equal(schedule.scale_arr, out["schedule.scale_arr"])
        assert len(schedule.scale_arr) == (1000 if rec.params.get("fix_scale_bug") else 1400)
        assert torch.equal(schedule.ddim_scale_arr, out["schedule.sampler.ddim_scale_arr"])
        assert np.array_equal(schedule.ddim_scale_arr_prev, out["schedule.sampler.ddim_scale_arr_prev"].numpy())
    else:
        assert schedule.scale_arr is None and not rec.values["use_scale"]


@pytest.mark.parametrize("kind", KINDS)
def test_the_unet_matches_the_official_one_with_and_without_fps(kind: str) -> None:
    rec = recording(kind)
    x, t, context, fps = (rec.inputs[f"unet_eval.{name}"] for name in ("x", "t", "context", "fps"))
    with torch.no_grad():
        out = rec.unet(x, t, context, fps)
        default_fps = rec.unet(x, t, context)
    assert_close("unet_eval.out", out, rec.outputs["unet_eval.out"])
    assert_close("unet_eval.out_fps_default16", default_fps, rec.outputs["unet_eval.out_fps_default16"])
    # fps acts exactly where the official UNet embeds it (not in VideoCrafter1 T2V 512)
    assert torch.equal(out, default_fps) == (not rec.unet.config.fps_cond)


def test_the_image_projector_matches_the_official_one() -> None:
    rec = recording("i2v_512_v1")
    with torch.no_grad():
        cond = rec.projector(rec.inputs["image_encoder_tokens"])
        uncond = rec.projector(rec.inputs["image_encoder_tokens_zero_image"])
    assert_close("image_proj.cond", cond, rec.outputs["image_proj.cond"])
    assert_close("image_proj.uncond", uncond, rec.outputs["image_proj.uncond"])


@pytest.mark.parametrize("kind", KINDS)
def test_every_step_matches_the_official_one_from_its_recorded_input(kind: str) -> None:
    """Teacher-forced: each step's UNet passes from the recorded x_in, and its update from the recorded eps."""
    rec, out = recording(kind), recording(kind).outputs
    guidance = rec.values["unconditional_guidance_scale"]
    for i, step in enumerate(rec.schedule.steps()):
        p = f"step.{i:02d}."
        assert out[p + "t"].tolist() == [step.timestep]
        with torch.no_grad():
            eps_cond, eps_uncond = rec.eps(out[p + "x_in"], out[p + "t"])
        assert_close(p + "eps_cond", eps_cond, out[p + "eps_cond"])
        assert_close(p + "eps_uncond", eps_uncond, out[p + "eps_uncond"])
        eps = out[p + "eps_uncond"] + guidance * (out[p + "eps_cond"] - out[p + "eps_uncond"])
        x_prev, pred_x0 = ddim_update(out[p + "x_in"], eps, step, rec.inputs[f"ddim_noise.{i:02d}"])
        assert_close(p + "x_prev", x_prev, out[p + "x_prev"])
        assert_close(p + "pred_x0", pred_x0, out[p + "pred_x0"])


@pytest.mark.parametrize("kind", KINDS)
def test_the_whole_run_replays_the_official_one(kind: str) -> None:
    """From x_T and the recorded per-step noise to the final latent and the decoded video, free-running."""
    rec, out = recording(kind), recording(kind).outputs
    records = []
    with torch.no_grad():
        final = sample_videocrafter_ddim(rec.eps, rec.schedule, tuple(rec.values["noise_shape"]), rec,
                                         guidance=rec.values["unconditional_guidance_scale"], on_step=records.append)
    assert len(records) == rec.values["ddim_steps"]
    for record in records:
        p = f"step.{record.index:02d}."
        for name in ("x_in", "eps_cond", "eps_uncond", "x_prev", "pred_x0"):
            assert_close(p + name, getattr(record, name), out[p + name])
    assert_close("samples", final, out["samples"])
    vae = load_vae(rec.folder / "model.ckpt")  # the first_stage_model.* inside the checkpoint
    frames = vae_decode(vae, final.permute(0, 2, 1, 3, 4).flatten(0, 1), scaling_factor=rec.params["scale_factor"])
    video = frames.unflatten(0, (final.shape[0], final.shape[2])).permute(0, 2, 1, 3, 4)
    assert_close("video", video, out["video"])


@cache
def official_full_size() -> dict:
    with gzip.open(ROOT / "official_full_size_keys.json.gz") as f:
        return json.load(f)["kinds"]


@pytest.mark.parametrize("kind", RELEASED_UNETS)
def test_the_full_size_unet_has_the_official_keys_and_parameter_count(kind: str) -> None:
    official = official_full_size()[kind]
    with torch.device("meta"):
        unet = VideoCrafterUNet(RELEASED_UNETS[kind])
    assert {k: list(v.shape) for k, v in unet.state_dict().items()} == official["unet_keys"]
    assert sum(p.numel() for p in unet.parameters()) == official["unet_parameters"]
    if "projector_keys" in official:
        with torch.device("meta"):
            projector = ImageProjector(ImageProjectorConfig())
        assert {k: list(v.shape) for k, v in projector.state_dict().items()} == official["projector_keys"]
        assert sum(p.numel() for p in projector.parameters()) == official["projector_parameters"]


def test_the_full_size_parameter_counts() -> None:
    """The counts stated in the README (the official module at the official configs)."""
    counts = {kind: entry["unet_parameters"] for kind, entry in official_full_size().items()}
    assert counts == {"videocrafter1-t2v-512": 1_144_485_956, "videocrafter1-t2v-1024": 1_146_536_516,
                      "videocrafter2": 1_413_284_420, "videocrafter1-i2v-512": 1_438_843_460}
    assert official_full_size()["videocrafter1-i2v-512"]["projector_parameters"] == 48_541_696


@pytest.mark.parametrize("kind", RELEASED_UNETS)
def test_a_released_checkpoint_is_told_and_read_from_its_keys(kind: str) -> None:
    """The official full-size key sets (as a released model.ckpt holds them) give their kind and, from their
    shapes, the official config (the 64-wide heads read from init_attn's 8 heads)."""
    from videobooth_core.loading.videocrafter import detect_videocrafter_kind

    shapes = official_full_size()[kind]["unet_keys"]
    keys = {UNET_PREFIX + k for k in shapes} | {"first_stage_model.encoder.conv_in.weight"}
    assert detect_videocrafter_kind(keys) == kind
    inferred = infer_unet_config({k: torch.empty(shape, device="meta") for k, shape in shapes.items()})
    assert inferred == RELEASED_UNETS[kind]
