"""Numerical parity with the official VideoBooth code (fixtures recorded by running it on tiny weights).

The fixture folder is ``$VIDEOBOOTH_PARITY_FIXTURE`` (default ``tests/fixtures/official_tiny``); nothing
here assumes this particular fixture's sizes, prompt, step count or guidance scale: all are read from it.
Order follows the fixture README: CLIP features → mapper → injected embeddings → text states → single UNet
evaluations → one teacher-forced step → the whole loop from z with replayed noise → final_sample.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import assert_parity_close
from safetensors.torch import load_file

from videobooth_core.loading.checkpoint import load_mapper, load_unet
from videobooth_core.models.config import UNetConfig
from videobooth_core.conditioning.clip import clip_vision_features
from videobooth_core.loading.clip import load_clip_text_encoder, load_clip_vision_encoder
from videobooth_core.conditioning.tokenizer import load_clip_tokenizer
from videobooth_core.sampling.ddpm import sample_ddpm
from videobooth_core.sampling.denoiser import VideoDenoiser
from videobooth_core.sampling.schedule import RespacedDDPM
from videobooth_core.loading.streaming import load_unet_streamed
from videobooth_core.conditioning.text import NULL_PROMPT, encode_text, prepare_subject_prompt, tokenize

assert_close = assert_parity_close  # the parity tolerance (conftest), by the name these tests and their importers use


class Official:
    """Everything the fixture recorded, plus our models loaded through the real loading code."""

    def __init__(self, folder, tokenizer_dir, unet_file: str, mapper_file: str, backend: str,
                 stream_weights: bool = False) -> None:
        self.config = json.loads((folder / "config.json").read_text())
        self.inputs = load_file(str(folder / "inputs.safetensors"))
        self.outputs = load_file(str(folder / "outputs.safetensors"))
        self.meta_inputs = json.loads((folder / "inputs.json").read_text())
        unet_config = UNetConfig.from_official(
            self.config["unet"], tuple(self.config["unet_watermark_block_out_channels"])
        )
        if stream_weights:  # blocks read their weights from the file at every call
            self.unet = load_unet_streamed(folder / unet_file, unet_config)
        else:
            self.unet = load_unet(folder / unet_file, unet_config)
        self.unet.set_attention_backend(backend)
        self.mapper = load_mapper(folder / mapper_file)
        self.unet.attach_projections(self.mapper.site_projections(), release_own=stream_weights)
        self.text_encoder = load_clip_text_encoder(folder / "text_encoder")
        self.vision_encoder = load_clip_vision_encoder(folder / "image_encoder")
        self.tokenizer = load_clip_tokenizer(tokenizer_dir)
        self.sampling = self.config["sampling"]


@pytest.fixture(scope="module", params=[("unet.pt", "mapper.pt", "sdpa", False),
                                        ("unet.safetensors", "mapper.safetensors", "math", False),
                                        ("unet.safetensors", "mapper.safetensors", "sdpa", True)],
                ids=["pt-sdpa", "safetensors-math", "streamed-sdpa"])
def official(request, parity_fixture, clip_tokenizer_dir) -> Official:
    unet_file, mapper_file, backend, stream_weights = request.param
    return Official(parity_fixture, clip_tokenizer_dir, unet_file, mapper_file, backend, stream_weights)


def test_token_ids(official: Official) -> None:
    prompt = prepare_subject_prompt(official.tokenizer, official.sampling["text_prompt"], official.sampling["replace_word"])
    assert prompt.text == official.meta_inputs["prompts"]["conditional_prompt"]
    assert torch.equal(prompt.input_ids, official.inputs["cond_input_ids"])
    assert list(prompt.placeholder_ids) == official.inputs["placeholder_ids"][0].tolist()
    assert torch.equal(tokenize(official.tokenizer, NULL_PROMPT), official.inputs["null_input_ids"])


@torch.no_grad()
def test_clip_features_and_mapper(official: Official) -> None:
    features = clip_vision_features(official.vision_encoder, official.inputs["clip_pixel_values"])
    names = ["last_hidden_state", "hidden_states_4", "hidden_states_8", "hidden_states_12", "hidden_states_16"]
    for name, feature in zip(names, features):
        assert_close(f"clip.{name}", feature, official.outputs[f"clip.{name}"])
    # the mapper is checked on the recorded features so a CLIP rounding difference cannot mask it
    recorded = [official.outputs[f"clip.{name}"] for name in names]
    assert_close("mapper.inj_embedding", official.mapper(recorded), official.outputs["mapper.inj_embedding"])


@torch.no_grad()
def test_text_states(official: Official) -> None:
    out = official.outputs
    ids, placeholder = official.inputs["cond_input_ids"], tuple(official.inputs["placeholder_ids"][0].tolist())
    cond = encode_text(official.text_encoder, ids, out["mapper.inj_embedding"], placeholder)
    assert_close("text.cond_inputs_embeds", cond.inputs_embeds, out["text.cond_inputs_embeds"])
    assert_close("text.cond_embeddings_out", cond.embeddings, out["text.cond_embeddings_out"])
    assert_close("text.cond_last_hidden_state", cond.last_hidden_state, out["text.cond_last_hidden_state"])
    null = encode_text(official.text_encoder, official.inputs["null_input_ids"])
    assert_close("text.null_last_hidden_state", null.last_hidden_state, out["text.null_last_hidden_state"])


def test_schedule(official: Official) -> None:
    out = official.outputs
    schedule = RespacedDDPM(official.sampling["num_steps"])
    assert schedule.timestep_map == out["schedule.timestep_map"].tolist()
    torch.testing.assert_close(torch.from_numpy(schedule.betas), out["schedule.betas"], rtol=1e-12, atol=0)
    torch.testing.assert_close(torch.from_numpy(schedule.alphas_cumprod), out["schedule.alphas_cumprod"], rtol=1e-12, atol=0)
    torch.testing.assert_close(torch.from_numpy(schedule.base_alphas_cumprod), out["schedule.base_alphas_cumprod"], rtol=1e-12, atol=0)


def _denoiser(official: Official, batch_passes: bool = True) -> VideoDenoiser:
    out = official.outputs
    return VideoDenoiser(official.unet, out["text.cond_last_hidden_state"], out["text.null_last_hidden_state"],
                         official.sampling["cfg_scale"], "official", batch_passes=batch_passes)


@torch.no_grad()
def test_single_unet_evaluations(official: Official) -> None:
    inp, out, unet = official.inputs, official.outputs, official.unet
    x_t, t, exemplar_t = inp["unet_eval.x_t"], inp["unet_eval.t"], inp["unet_eval.exemplar_t"]
    cond, null = out["text.cond_last_hidden_state"], out["text.null_last_hidden_state"]
    frames = x_t.shape[2]
    clean = inp["exemplar_latent_clean"].expand(-1, -1, frames, -1, -1)
    exemplar = RespacedDDPM(1000).add_noise(clean, inp["unet_eval.exemplar_noise"], int(exemplar_t))
    assert_close("unet_eval.exemplar_latent_t", exemplar, out["unet_eval.exemplar_latent_t"])

    assert_close("unet_eval.eps_uncond", unet(x_t, t, null), out["unet_eval.eps_uncond"])
    assert_close("unet_eval.eps_cond_no_exemplar", unet(x_t, t, cond), out["unet_eval.eps_cond_no_exemplar"])
    features = unet.capture_image_prompt_features(exemplar, exemplar_t, null)
    assert_close("unet_eval.eps_cond", unet(x_t, t, cond, image_prompt_features=features), out["unet_eval.eps_cond"])

    for batch_passes in (True, False):
        guided, _, _ = _denoiser(official, batch_passes).predict(x_t, int(t), exemplar, int(exemplar_t))
        # the official batch-2 output's first half is what sampling keeps
        assert_close("unet_eval.cfg_output[0]", guided, out["unet_eval.cfg_output"][:1])


@torch.no_grad()
def test_teacher_forced_steps(official: Official) -> None:
    """Every recorded step, from the recorded x_t and noise: exemplar noising, predictions, update."""
    inp, out = official.inputs, official.outputs
    schedule = RespacedDDPM(official.sampling["num_steps"])
    denoiser = _denoiser(official)
    steps = out["loop.t_respaced"].tolist()
    assert out["loop.t_original"].tolist() == [schedule.timestep_map[i] for i in steps]
    for k, index in enumerate(steps):
        x_t = out["loop.x"][k][:1]
        clean = inp["exemplar_latent_clean"].expand(-1, -1, x_t.shape[2], -1, -1)
        exemplar = schedule.add_noise(clean, out["loop.exemplar_noise"][k][:1], index)
        assert_close(f"loop.exemplar_latent_t_used[{k}]", exemplar, out["loop.exemplar_latent_t_used"][k])
        guided, eps_cond, eps_uncond = denoiser.predict(x_t, schedule.timestep_map[index], exemplar)
        assert_close(f"loop.eps_cond[{k}]", eps_cond, out["loop.eps_cond"][k])
        assert_close(f"loop.eps_uncond[{k}]", eps_uncond, out["loop.eps_uncond"][k])
        assert_close(f"loop.model_output[{k}]", guided, out["loop.model_output"][k][:1])
        x_prev, pred_x0 = schedule.step(out["loop.model_output"][k][:1], x_t, index, out["loop.sample_noise"][k][:1])
        assert_close(f"loop.pred_xstart[{k}]", pred_x0, out["loop.pred_xstart"][k][:1])
        assert_close(f"loop.x[{k + 1}]", x_prev, out["loop.x"][k + 1][:1])


class ReplayedNoise:
    """The official run's random draws, first batch half (the second half never reaches the model)."""

    def __init__(self, inputs, outputs) -> None:
        self.inputs, self.outputs = inputs, outputs

    def initial(self, shape):
        assert tuple(self.inputs["z"].shape) == tuple(shape)
        return self.inputs["z"]

    def exemplar(self, step, shape):
        return self.outputs["loop.exemplar_noise"][step][:1]

    def step(self, step, shape):
        return self.outputs["loop.sample_noise"][step][:1]


@torch.no_grad()
def test_whole_loop_from_z(official: Official) -> None:
    inp, out = official.inputs, official.outputs
    schedule = RespacedDDPM(official.sampling["num_steps"])
    trajectory = []
    final = sample_ddpm(
        _denoiser(official), schedule, tuple(inp["z"].shape), ReplayedNoise(inp, out),
        exemplar_clean=inp["exemplar_latent_clean"], callback=lambda step, total, o: trajectory.append(o.x_prev),
    )
    assert len(trajectory) == schedule.num_steps
    for k, x in enumerate(trajectory):
        assert_close(f"loop.x[{k + 1}]", x, out["loop.x"][k + 1][:1])
    assert_close("final_sample", final, out["final_sample"])


@torch.no_grad()
def test_image_prompt_matters(official: Official) -> None:
    """Guard against a silently ignored image prompt: our injected features must change the prediction,
    and injecting them at zero strength must give exactly the prediction without them."""
    inp, out, unet = official.inputs, official.outputs, official.unet
    x_t, t, exemplar_t = inp["unet_eval.x_t"], inp["unet_eval.t"], inp["unet_eval.exemplar_t"]
    cond, null = out["text.cond_last_hidden_state"], out["text.null_last_hidden_state"]
    clean = inp["exemplar_latent_clean"].expand(-1, -1, x_t.shape[2], -1, -1)
    exemplar = RespacedDDPM(1000).add_noise(clean, inp["unet_eval.exemplar_noise"], int(exemplar_t))
    features = unet.capture_image_prompt_features(exemplar, exemplar_t, null)
    with_prompt = unet(x_t, t, cond, image_prompt_features=features)
    without = unet(x_t, t, cond)
    zero_strength = unet(x_t, t, cond, image_prompt_features=features, image_prompt_strength=0.0)
    assert (with_prompt - without).abs().max() > 1e-3
    torch.testing.assert_close(zero_strength, without, rtol=0, atol=0)
