"""The frames-as-batch network of the native ComfyUI road (issue 25) equals the core denoiser bit for bit: the
conditional pass with the exemplar, the unconditional pass without, and the official guidance on host layouts."""

from __future__ import annotations

import sys

import pytest
import torch

from videobooth_core.app.tiny import tiny_unet_and_mapper
from videobooth_core.errors import SamplingError
from videobooth_core.models.frames_as_batch import (
    FramesAsBatchUNet,
    alpha_cumprod_of_sigma,
    frames_to_video,
    image_prompt_noise,
    official_cfg,
    video_to_frames,
)
from videobooth_core.sampling.denoiser import VideoDenoiser, guide
from videobooth_core.sampling.schedule import base_betas, q_sample

FRAMES, SIZE = 3, 8


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    unet, mapper = tiny_unet_and_mapper(vision_width=32, text_width=32)
    unet.attach_projections(mapper.site_projections(), release_own=True)
    generator = torch.Generator().manual_seed(7)
    width = unet.config.cross_attention_dim

    def draw(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=generator)

    return {"unet": unet, "mapper": mapper, "native": FramesAsBatchUNet(unet),
            "cond": draw(1, 77, width), "null": draw(1, 77, width),
            "x_t": draw(2, 4, FRAMES, SIZE, SIZE), "clean": draw(2, 4, 1, SIZE, SIZE),
            "noise": draw(2, 4, FRAMES, SIZE, SIZE)}


def test_layout_round_trip_keeps_every_frame_in_place() -> None:
    video = torch.arange(2 * 4 * FRAMES * 2 * 2, dtype=torch.float32).reshape(2, 4, FRAMES, 2, 2)
    frames = video_to_frames(video)
    assert frames.shape == (2 * FRAMES, 4, 2, 2)
    assert torch.equal(frames[FRAMES + 1], video[1, :, 1])  # video 1, frame 1
    assert torch.equal(frames_to_video(frames, FRAMES), video)
    with pytest.raises(SamplingError, match="not a whole number of 3-frame videos"):
        frames_to_video(frames[:-1], FRAMES)


@pytest.mark.parametrize("timestep", [999, 420, 0])
def test_conditional_and_unconditional_calls_equal_the_core_denoiser_bit_for_bit(model, timestep: int) -> None:
    unet = model["unet"]
    abar = float(torch.from_numpy(base_betas()).neg().add(1).cumprod(0)[timestep])
    exemplar_t = q_sample(model["clean"].expand(-1, -1, FRAMES, -1, -1), model["noise"], abar)
    denoiser = VideoDenoiser(unet, model["cond"], model["null"], cfg_scale=4.0, batch_passes=False)
    with torch.no_grad():
        guided, eps_cond, eps_uncond = denoiser.predict(model["x_t"], timestep, exemplar_t)
        native = model["native"]
        x = video_to_frames(model["x_t"])
        t = torch.full((x.shape[0],), float(timestep))  # hosts pass float timesteps, one per frame
        cond = native(x, t, model["cond"].expand(x.shape[0], -1, -1), FRAMES, image_prompt=model["clean"],
                      image_prompt_noise=model["noise"], image_prompt_alpha_cumprod=abar, null_context=model["null"])
        uncond = native(x, t, model["null"], FRAMES)  # the negative conditioning carries no image prompt
    assert torch.equal(frames_to_video(cond, FRAMES), eps_cond)
    assert torch.equal(frames_to_video(uncond, FRAMES), eps_uncond)
    assert torch.equal(frames_to_video(official_cfg(cond.float(), uncond.float(), 4.0), FRAMES), guided)
    assert not torch.equal(cond, uncond)  # the image prompt and the text act


def test_official_cfg_guides_channels_0_to_2_and_keeps_channel_3_conditional() -> None:
    generator = torch.Generator().manual_seed(3)
    cond, uncond = torch.randn(2, 2 * FRAMES, 4, SIZE, SIZE, generator=generator)
    out = official_cfg(cond, uncond, 7.5)
    torch.testing.assert_close(out[:, :3], uncond[:, :3] + 7.5 * (cond[:, :3] - uncond[:, :3]), rtol=0, atol=0)
    assert torch.equal(out[:, 3], cond[:, 3])
    as_video = guide(frames_to_video(cond, FRAMES), frames_to_video(uncond, FRAMES), 7.5)
    assert torch.equal(frames_to_video(out, FRAMES), as_video)
    assert torch.equal(official_cfg(cond, uncond, 7.5, "all"), uncond + 7.5 * (cond - uncond))


def test_sigma_maps_to_the_schedule_point_of_the_scaled_input() -> None:
    abar = float(torch.from_numpy(base_betas()).neg().add(1).cumprod(0)[500])
    sigma = ((1 - abar) / abar) ** 0.5
    assert alpha_cumprod_of_sigma(sigma) == pytest.approx(abar, rel=1e-12)
    assert alpha_cumprod_of_sigma(0.0) == 1.0
    with pytest.raises(SamplingError, match="nan"):
        alpha_cumprod_of_sigma(float("nan"))


def test_frames_of_one_video_must_share_a_timestep(model) -> None:
    native = model["native"]
    x = video_to_frames(model["x_t"])
    t = torch.arange(x.shape[0], dtype=torch.float32)
    with pytest.raises(SamplingError, match="different timesteps"):
        native(x, t, model["cond"], FRAMES)
    with pytest.raises(SamplingError, match="needs its noise"):
        native(x, torch.tensor(5.0), model["cond"], FRAMES, image_prompt=model["clean"])


@pytest.mark.parametrize("prompt", ["a dog running on the beach", "a dog chasing another dog",
                                    "dog " + "very " * 70 + "long"], ids=["once", "twice", "truncated"])
def test_spliced_positions_rebuild_the_core_splice_bit_for_bit(clip_tokenizer_dir, prompt: str) -> None:
    """What the native CONDITIONING node hands ComfyUI's text encoder (tokens with the word vectors as embedding
    entries, laid out by spliced_positions) expands to exactly the core's spliced token embeddings."""
    from videobooth_core.conditioning.text import prepare_subject_prompt, splice_subject_embeddings, spliced_positions
    from videobooth_core.conditioning.tokenizer import load_clip_tokenizer

    tokenizer = load_clip_tokenizer(clip_tokenizer_dir)
    subject = prepare_subject_prompt(tokenizer, prompt, "dog")
    generator = torch.Generator().manual_seed(5)
    table = torch.randn(49408, 6, generator=generator)  # a token-embedding table
    vectors = torch.randn(1, 5, 6, generator=generator)
    expected = splice_subject_embeddings(table[subject.input_ids], subject.input_ids, subject.placeholder_ids, vectors)
    positions = spliced_positions(subject.input_ids, subject.placeholder_ids, 5)
    rebuilt = torch.stack([table[subject.input_ids[0, p]] if p >= 0 else vectors[0, -p - 1] for p in positions])
    assert len(positions) == 77 and torch.equal(rebuilt[None], expected)
    assert sum(p < 0 for p in positions) == 5 * prompt.split().count("dog")  # every occurrence gets all 5


def test_weights_are_named_where_they_act(model) -> None:
    """A host patching by state_dict name (ComfyUI's LoRA loaders: lora_unet_<name with underscores>) reaches the
    projections the model attends with: the mapper's, under the UNet's own attn1/attn2 to_k/to_v names."""
    native, mapper = model["native"], model["mapper"]
    names = native.state_dict().keys()
    site = native.video_unet.attention_sites[0]
    block, projections = site.transformer_blocks[0], mapper.site_projections()[site.site]
    prefix = f"{site.site}.transformer_blocks.0."
    assert not any(name.startswith("unet.") or name.startswith("mapping") for name in names)
    for name, module in [("attn1.to_k", projections.attn1_key), ("attn1.to_v", projections.attn1_value),
                         ("attn1.to_k_image_prompt", projections.image_prompt_key),
                         ("attn2.to_k", projections.text_key), ("attn2.to_v", projections.text_value)]:
        assert prefix + name + ".weight" in names
        assert native.get_submodule(prefix + name) is module  # the module in use, not a copy
    assert block.attn1.key_value.key is native.get_submodule(prefix + "attn1.to_k")
    x, t = video_to_frames(model["x_t"]), torch.tensor(300.0)
    with torch.no_grad():
        before = native(x, t, model["cond"], FRAMES)
        weight = native.get_submodule(prefix + "attn2.to_k").weight
        original = weight.clone()
        weight.add_(0.5)
        after = native(x, t, model["cond"], FRAMES)
        weight.copy_(original)
        again = native(x, t, model["cond"], FRAMES)
    assert not torch.equal(before, after) and torch.equal(before, again)


def test_image_prompt_noise_depends_on_seed_and_timestep_only() -> None:
    shape = (1, 4, FRAMES, SIZE, SIZE)
    first = image_prompt_noise(7, 499.0, shape)
    assert torch.equal(first, image_prompt_noise(7, 499.0, shape))
    assert not torch.equal(first, image_prompt_noise(8, 499.0, shape))
    assert not torch.equal(first, image_prompt_noise(7, 498.0, shape))
    assert abs(float(first.mean())) < 0.2 and abs(float(first.std()) - 1) < 0.2


def test_a_patch_on_the_video_tokens_key_value_also_reaches_the_image_prompts() -> None:
    from videobooth_core.models.frames_as_batch import image_prompt_twin

    stem = "diffusion_model.up_blocks.3.attentions.1.transformer_blocks.0."
    assert image_prompt_twin(stem + "attn1.to_k.weight") == stem + "attn1.to_k_image_prompt.weight"
    assert image_prompt_twin(stem + "attn1.to_v.weight") == stem + "attn1.to_v_image_prompt.weight"
    for other in ("attn2.to_k.weight", "attn1.to_q.weight", "attn1.to_k.bias", "attn1.to_out.0.weight"):
        assert image_prompt_twin(stem + other) is None


def test_every_twin_names_a_weight_of_the_wrapped_model(model) -> None:
    from videobooth_core.models.frames_as_batch import image_prompt_twin

    names = set(model["native"].state_dict())
    twins = [image_prompt_twin(name) for name in names if image_prompt_twin(name)]
    assert len(twins) == 2 * len(model["native"].video_unet.attention_sites) and set(twins) <= names


def test_host_windows_anchor_every_window_on_frame_0_and_fuse_to_one() -> None:
    from videobooth_core.sampling.windows import ContextOptions, context_windows, fuse_window_predictions

    frames, options = 20, ContextOptions(window=8, overlap=2)
    seen = []

    def predict(window: list[int]) -> list[torch.Tensor]:
        seen.append(window)
        index = torch.tensor(window, dtype=torch.float32)
        # output 0: each frame's own index (fused to itself where weights sum to 1); output 1: which window ran
        return [index.view(-1, 1, 1, 1).expand(-1, 4, 2, 2), torch.full((len(window), 4, 2, 2), float(len(seen)))]

    own, which = fuse_window_predictions(frames, options, predict, dim=0)
    assert seen == context_windows(frames, 8, 2) and all(window[0] == 0 for window in seen)
    torch.testing.assert_close(own[:, 0, 0, 0], torch.arange(frames, dtype=torch.float32), rtol=0, atol=1e-5)
    assert float(which[0, 0, 0, 0]) == 1.0  # frame 0 comes from the first window alone
    assert own.shape == (frames, 4, 2, 2)


def test_a_calls_memory_counts_the_exemplar_pass_and_grows_with_the_frames(model) -> None:
    native = model["native"]
    plain = native.call_activation_bytes(4, SIZE, SIZE, image_prompt=False)
    with_prompt = native.call_activation_bytes(4, SIZE, SIZE)
    assert with_prompt > plain > 0
    assert native.call_activation_bytes(8, SIZE, SIZE) > with_prompt
    assert all(p.device.type == "cpu" for p in native.parameters())  # measured on a twin, the model untouched


def _abar(timestep: int) -> float:
    return float(torch.from_numpy(base_betas()).neg().add(1).cumprod(0)[timestep])


def _host_call(model, exemplars: int, skip: list[bool]) -> dict:
    """The arguments of one host call on video 0 of the fixture, once per entry of ``skip`` (the chunks of the call:
    the positive with its image prompt, the negative flagged to run without), with ``exemplars`` streams."""
    generator = torch.Generator().manual_seed(11)
    clean = torch.randn(exemplars, 4, 1, SIZE, SIZE, generator=generator)
    noise = torch.randn(exemplars, 4, FRAMES, SIZE, SIZE, generator=generator)
    videos = len(skip)
    texts = [model["null"] if off else model["cond"] for off in skip]
    return {"x": video_to_frames(model["x_t"][:1]).repeat(videos, 1, 1, 1),
            "context": torch.cat([text.expand(FRAMES, -1, -1) for text in texts]),
            "clean": clean, "noise": noise,
            "image_prompt": clean.repeat_interleave(videos, dim=0), "image_prompt_noise":
                noise.repeat_interleave(videos, dim=0), "image_prompt_skip": torch.tensor(skip)}


@pytest.mark.parametrize("timestep", [999, 420])
def test_the_positive_and_the_flagged_negative_in_one_call_equal_the_core_batched_passes(model, timestep: int) -> None:
    """cond and uncond in one host call: the negative chunk runs without the image prompt and shares the exemplar
    pass's UNet call, exactly as the core denoiser's default (batched) passes, bit for bit."""
    call, abar = _host_call(model, 1, [False, True]), _abar(timestep)
    exemplar_t = q_sample(call["clean"].expand(-1, -1, FRAMES, -1, -1), call["noise"], abar)
    denoiser = VideoDenoiser(model["unet"], model["cond"], model["null"], cfg_scale=4.0, batch_passes=True)
    t = torch.full((2 * FRAMES,), float(timestep))
    with torch.no_grad():
        guided, eps_cond, eps_uncond = denoiser.predict(model["x_t"][:1], timestep, exemplar_t)
        out = model["native"](call["x"], t, call["context"], FRAMES, image_prompt=call["image_prompt"],
                              image_prompt_noise=call["image_prompt_noise"], image_prompt_alpha_cumprod=abar,
                              null_context=model["null"], image_prompt_skip=call["image_prompt_skip"])
        swapped = model["native"](call["x"], t, call["context"].flip(0), FRAMES, image_prompt=call["image_prompt"],
                                  image_prompt_noise=call["image_prompt_noise"], image_prompt_alpha_cumprod=abar,
                                  null_context=model["null"], image_prompt_skip=~call["image_prompt_skip"])
    cond, uncond = out[:FRAMES], out[FRAMES:]
    assert torch.equal(frames_to_video(cond, FRAMES), eps_cond)
    assert torch.equal(frames_to_video(uncond, FRAMES), eps_uncond)
    assert torch.equal(frames_to_video(official_cfg(cond.float(), uncond.float(), 4.0), FRAMES), guided)
    assert torch.equal(swapped[FRAMES:], cond) and torch.equal(swapped[:FRAMES], uncond)  # chunk order is the host's


def test_several_subjects_equal_the_core_denoiser_alone_and_batched_with_the_negative(model) -> None:
    """Two subjects (own strengths, one with a region): the host call equals the core's several-subjects path bit for
    bit, in a call of its own (official order) and sharing one with the flagged negative (batched passes)."""
    timestep, strengths, regions = 420, (1.0, 0.6), (None, (0.5, 0.0, 1.0, 1.0))
    abar = _abar(timestep)
    alone, shared = _host_call(model, 2, [False]), _host_call(model, 2, [False, True])
    exemplar_t = q_sample(alone["clean"].expand(-1, -1, FRAMES, -1, -1), alone["noise"], abar)
    results = {}
    with torch.no_grad():
        for batched, call in ((False, alone), (True, shared)):
            denoiser = VideoDenoiser(model["unet"], model["cond"], model["null"], cfg_scale=4.0, batch_passes=batched,
                                     subject_strengths=strengths, subject_regions=regions)
            expected = denoiser.predict(model["x_t"][:1], timestep, exemplar_t)
            t = torch.tensor(float(timestep))
            out = model["native"](call["x"], t, call["context"], FRAMES, image_prompt=call["image_prompt"],
                                  image_prompt_noise=call["image_prompt_noise"], image_prompt_alpha_cumprod=abar,
                                  null_context=model["null"], image_prompt_strength=strengths,
                                  image_prompt_regions=regions,
                                  image_prompt_skip=call["image_prompt_skip"] if batched else None)
            assert torch.equal(frames_to_video(out[:FRAMES], FRAMES), expected[1])
            if batched:
                assert torch.equal(frames_to_video(out[FRAMES:], FRAMES), expected[2])
            results[batched] = out[:FRAMES]
        single = model["native"](alone["x"], torch.tensor(float(timestep)), alone["context"], FRAMES,
                                 image_prompt=alone["clean"][:1], image_prompt_noise=alone["noise"][:1],
                                 image_prompt_alpha_cumprod=abar, null_context=model["null"])
    assert not torch.equal(results[False], single)  # the second subject acts
    with pytest.raises(SamplingError, match="2 image-prompt stream"):
        model["native"](alone["x"], torch.tensor(1.0), alone["context"], FRAMES, image_prompt=alone["clean"][:1],
                        image_prompt_noise=alone["noise"][:1], image_prompt_alpha_cumprod=abar,
                        null_context=model["null"], image_prompt_strength=strengths)


@pytest.mark.parametrize("prompt", ["a dog and a cat", "a cat chasing a dog and another dog",
                                    "dog " + "very " * 55 + "cat long"], ids=["ordered", "reversed-twice", "truncated"])
def test_subject_positions_rebuild_the_core_subjects_splice_bit_for_bit(clip_tokenizer_dir, prompt: str) -> None:
    from videobooth_core.conditioning.subjects import (
        prepare_subjects_prompt,
        splice_subjects,
        spliced_subjects_positions,
    )
    from videobooth_core.conditioning.tokenizer import load_clip_tokenizer

    tokenizer = load_clip_tokenizer(clip_tokenizer_dir)
    spliced = prepare_subjects_prompt(tokenizer, prompt, ["dog", "cat"])
    generator = torch.Generator().manual_seed(5)
    table = torch.randn(49408, 6, generator=generator)
    vectors = [torch.randn(1, 5, 6, generator=generator) for _ in range(2)]
    expected = splice_subjects(table[spliced.input_ids], spliced.input_ids, spliced.placeholder_ids, spliced.order,
                               vectors)
    positions = spliced_subjects_positions(spliced.input_ids, spliced.placeholder_ids, spliced.order, 5)
    stacked = torch.cat([v[0] for v in vectors])
    rebuilt = torch.stack([table[spliced.input_ids[0, p]] if p >= 0 else stacked[-p - 1] for p in positions])
    assert len(positions) == 77 and torch.equal(rebuilt[None], expected)
    dog = [-p - 1 for p in positions if -6 < p < 0]  # the first subject's vectors, wherever the dog is
    assert dog == list(range(5)) * prompt.split().count("dog")
    assert sum(p <= -6 for p in positions) == 5 * prompt.split().count("cat")


def test_a_known_frames_latent_under_the_hosts_inpainting_rule_is_the_cores_replacement() -> None:
    """ComfyUI's inpainting sampler (KSamplerX0Inpaint) sets ``x = x * m + (latent + sigma * noise) * (1 - m)`` before
    each call (k-diffusion scale; the model sees x / sqrt(1 + sigma^2)): with the latent and mask of
    known_frames_latent that is KnownFrames.at_level on the first frames, the rest untouched."""
    from videobooth_core.models.frames_as_batch import known_frames_latent
    from videobooth_core.sampling.known_frames import KnownFrames

    generator = torch.Generator().manual_seed(2)
    frames, known = 5, torch.randn(2, 4, SIZE, SIZE, generator=generator)
    noise, x = torch.randn(2, frames, 4, SIZE, SIZE, generator=generator)
    samples, mask = known_frames_latent(known, frames)
    assert samples.shape == (frames, 4, SIZE, SIZE) and mask.shape == (frames, 1, SIZE, SIZE)
    assert mask[:, 0, 0, 0].tolist() == [0.0, 0.0, 1.0, 1.0, 1.0] and bool((samples[2:] == 0).all())
    abar = _abar(600)
    sigma = ((1 - abar) / abar) ** 0.5
    host = (x * mask + (samples + sigma * noise) * (1 - mask)) / (1 + sigma**2) ** 0.5
    core = KnownFrames(frames_to_video(known, 2), frames_to_video(noise, frames)).at_level(
        frames_to_video(x / (1 + sigma**2) ** 0.5, frames), abar)
    torch.testing.assert_close(host, video_to_frames(core), rtol=1e-6, atol=1e-6)
    assert torch.equal(host[2:], x[2:] / (1 + sigma**2) ** 0.5)
    with pytest.raises(SamplingError, match="leave no frame to generate"):
        known_frames_latent(known, 2)


def _by_hand_control(unet, skips: list, middle):
    """SD 1.x's rule (ComfyUI's openaimodel.apply_control) put into the UNet from outside: each up block's skips get
    their residual as it takes them (popped from the end of the down path's list), the middle block's output its own;
    only in calls of the residuals' batch size (the core's other passes of a step run as they are). Returns the undo
    function, which returns the skip shapes seen, in down-path order."""
    seen, remaining, handles = [], [len(skips)], []
    for block in unet.up_blocks:
        def up(x, block_skips, *rest, _block=block):
            remaining[0] = remaining[0] or len(skips)  # a new UNet call starts over at the deepest skip
            start = remaining[0] - len(block_skips)
            remaining[0] = start
            seen.insert(0, [tuple(s.shape) for s in block_skips])
            block_skips = [s if skips[start + i] is None or skips[start + i].shape[0] != s.shape[0] else
                           s + skips[start + i] for i, s in enumerate(block_skips)]
            return type(_block).up(_block, x, block_skips, *rest)
        block.up = up
    if middle is not None:
        handles.append(unet.mid_block.register_forward_hook(lambda module, args, out: out + middle))

    def undo() -> list:
        for block in unet.up_blocks:
            del block.up
        for handle in handles:
            handle.remove()
        return [shape for block in seen for shape in block]
    return undo


def test_a_controlnets_residuals_land_on_the_skips_and_middle_as_in_sd1x(model) -> None:
    native, unet = model["native"], model["unet"]
    x, t = video_to_frames(model["x_t"]), torch.tensor(300.0)
    with torch.no_grad():
        plain = native(x, t, model["cond"], FRAMES)
        undo = _by_hand_control(unet, [None] * 8, None)  # the tiny UNet's 8 skips, as SD 1.x's 8 input blocks
        native(x, t, model["cond"], FRAMES)
        shapes = undo()
        mid_shape = (2, 64, FRAMES, 1, 1)
        generator = torch.Generator().manual_seed(9)
        skips = [torch.randn(shape, generator=generator) for shape in shapes]
        middle = torch.randn(mid_shape, generator=generator)
        zero = native(x, t, model["cond"], FRAMES, skip_residuals=[video_to_frames(torch.zeros(s)) for s in shapes],
                      middle_residual=video_to_frames(torch.zeros(mid_shape)))
        controlled = native(x, t, model["cond"], FRAMES, skip_residuals=[video_to_frames(s) for s in skips],
                            middle_residual=video_to_frames(middle))
        undo = _by_hand_control(unet, skips, middle)
        by_hand = native(x, t, model["cond"], FRAMES)
        undo()
        one = native(x, t, model["cond"], FRAMES, skip_residuals=[None] * 5 + [video_to_frames(skips[5])] + [None] * 2)
        undo = _by_hand_control(unet, [None] * 5 + [skips[5]] + [None] * 2, None)
        one_by_hand = native(x, t, model["cond"], FRAMES)
        undo()
    assert len(shapes) == 8 and torch.equal(zero, plain)
    assert torch.equal(controlled, by_hand) and not torch.equal(controlled, plain)
    assert torch.equal(one, one_by_hand) and not torch.equal(one, plain)
    with pytest.raises(SamplingError, match="8 skip connections; the ControlNet gives residuals for: 7"):
        native(x, t, model["cond"], FRAMES, skip_residuals=[video_to_frames(s) for s in skips[:7]])
    with pytest.raises(SamplingError, match="residual for skip connection 0 has shape"):
        native(x, t, model["cond"], FRAMES, skip_residuals=[video_to_frames(s)[:, :1] for s in skips])


def test_a_controlnet_in_the_call_shared_by_the_positive_and_the_negative(model) -> None:
    """With a ControlNet the negative still shares the exemplar pass's UNet call, with its slice of the residuals (the
    exemplar takes zeros): a zero control equals none bit for bit, and the shared call equals the core's batched passes
    with the same residuals put in by hand."""
    call, abar = _host_call(model, 1, [False, True]), _abar(420)
    generator = torch.Generator().manual_seed(4)
    undo = _by_hand_control(model["unet"], [None] * 8, None)
    with torch.no_grad():
        model["native"](call["x"][:FRAMES], torch.tensor(1.0), model["cond"], FRAMES)
    shapes = [(FRAMES, *shape[1:2], *shape[3:]) for shape in undo()]
    residuals = [torch.randn((2 * shape[0], *shape[1:]), generator=generator) for shape in shapes]
    t = torch.tensor(420.0)
    common = {"image_prompt_alpha_cumprod": abar, "null_context": model["null"]}
    with torch.no_grad():
        both = model["native"](call["x"], t, call["context"], FRAMES, image_prompt=call["image_prompt"],
                               image_prompt_noise=call["image_prompt_noise"], image_prompt_skip=call["image_prompt_skip"],
                               skip_residuals=residuals, **common)
        cond = model["native"](call["x"][:FRAMES], t, model["cond"], FRAMES, image_prompt=call["clean"],
                               image_prompt_noise=call["noise"], skip_residuals=[r[:FRAMES] for r in residuals],
                               **common)
        uncond = model["native"](call["x"][FRAMES:], t, model["null"], FRAMES,
                                 skip_residuals=[r[FRAMES:] for r in residuals])
        plain = model["native"](call["x"], t, call["context"], FRAMES, image_prompt=call["image_prompt"],
                                image_prompt_noise=call["image_prompt_noise"],
                                image_prompt_skip=call["image_prompt_skip"], **common)
        zero = model["native"](call["x"], t, call["context"], FRAMES, image_prompt=call["image_prompt"],
                               image_prompt_noise=call["image_prompt_noise"], image_prompt_skip=call["image_prompt_skip"],
                               skip_residuals=[torch.zeros_like(r) for r in residuals], **common)
        exemplar_t = q_sample(call["clean"].expand(-1, -1, FRAMES, -1, -1), call["noise"], abar)
        video_residuals = [frames_to_video(r[FRAMES:], FRAMES) for r in residuals]  # the negative's
        # by hand: the exemplar rows (after the negative's in the shared call) get no residual
        undo = _by_hand_control(model["unet"], [torch.cat([r, torch.zeros_like(r)]) for r in video_residuals], None)
        denoiser = VideoDenoiser(model["unet"], model["cond"], model["null"], cfg_scale=4.0, batch_passes=True)
        _, _, eps_uncond = denoiser.predict(model["x_t"][:1], 420, exemplar_t)
        undo()
    assert torch.equal(zero, plain) and not torch.equal(both, plain)
    assert torch.equal(frames_to_video(both[FRAMES:], FRAMES), eps_uncond)
    assert torch.allclose(both[:FRAMES], cond, rtol=0, atol=1e-4)  # the same positive (its own call: kernel order)
    assert torch.allclose(both[FRAMES:], uncond, rtol=0, atol=1e-4)


def _comfy_lcm_denoised(x: torch.Tensor, eps: torch.Tensor, sigma: float, timestep: int) -> torch.Tensor:
    """ComfyUI 0.3.64's ``ModelSamplingDiscrete(lcm)`` boundary (``nodes_model_advanced.LCM``), written out: in the
    host's scale ``x = x0 + sigma * noise``, with ``c_skip`` on that unscaled ``x`` (diffusers puts it on ``x_t``)."""
    scaled = timestep * 10.0
    c_skip = 0.25 / (scaled ** 2 + 0.25)
    c_out = scaled / (scaled ** 2 + 0.25) ** 0.5
    return c_out * (x - eps * sigma) + c_skip * x


class _Replay:
    """The core's noise source with fixed draws, so the host loop below can use the same ones."""

    def __init__(self, draws: dict) -> None:
        self.draws = draws

    def initial(self, shape: tuple[int, ...]) -> torch.Tensor:
        return self.draws["z"]

    def exemplar(self, step: int, shape: tuple[int, ...]) -> torch.Tensor:
        return self.draws["exemplar"][step]

    def step(self, step: int, shape: tuple[int, ...]) -> torch.Tensor:
        return self.draws["step"][step]


def test_comfyuis_lcm_sampler_on_the_native_model_is_the_core_lcm_sampler(model, monkeypatch) -> None:
    """KSampler ``lcm`` after ``ModelSamplingDiscrete(lcm)`` on the native model (its loop, input scaling, boundary and
    re-noising, written out as ComfyUI 0.3.64 computes them) equals the core's ``sample_lcm`` at the same timesteps
    with the same draws, within float rounding and ComfyUI's ``c_skip`` convention (at most ``c_skip * (1/sqrt(abar)
    - 1) * |x_t|``: 4e-7 relative at t = 999). ComfyUI visits 999, 759, 499, 259 at 4 steps (its 50-point grid is
    every 20th timestep, ``simple`` picks every 12.5th point); the core 999, 758, 518, 277 (the LoRA's grid)."""
    from videobooth_core.sampling import lcm

    host_steps = [999, 759, 499, 259]
    monkeypatch.setattr(lcm, "lcm_timesteps", lambda steps, skip=lcm.DEFAULT_SKIP: host_steps)
    generator = torch.Generator().manual_seed(11)
    shape = (1, 4, FRAMES, SIZE, SIZE)
    draws = {"z": torch.randn(shape, generator=generator),
             "exemplar": [torch.randn(shape, generator=generator) for _ in host_steps],
             "step": [torch.randn(shape, generator=generator) for _ in host_steps]}
    cond, null, clean = model["cond"], model["null"], model["clean"][:1]
    denoiser = VideoDenoiser(model["unet"], cond, null, cfg_scale=4.0, batch_passes=False)
    table = torch.from_numpy(base_betas()).neg().add(1).cumprod(0)
    with torch.no_grad():
        core = lcm.sample_lcm(denoiser, 4, shape, _Replay(draws), exemplar_clean=clean)  # cfg 1: one pass a step
        sigmas = [float(((1 - table[t]) / table[t]) ** 0.5) for t in host_steps] + [0.0]
        x = video_to_frames(draws["z"]) * (1 + sigmas[0] ** 2) ** 0.5  # noise_scaling at the model's sigma_max
        for i, timestep in enumerate(host_steps):
            x_t = x / (sigmas[i] ** 2 + 1) ** 0.5  # EPS.calculate_input
            eps = model["native"](x_t, torch.full((x.shape[0],), float(timestep)), cond.expand(x.shape[0], -1, -1),
                                  FRAMES, image_prompt=clean, image_prompt_noise=draws["exemplar"][i],
                                  image_prompt_alpha_cumprod=alpha_cumprod_of_sigma(sigmas[i]), null_context=null)
            x = _comfy_lcm_denoised(x, eps, sigmas[i], timestep)
            if sigmas[i + 1] > 0:  # sample_lcm re-noises with the sampler's noise (here the core's draw)
                x = x + sigmas[i + 1] * video_to_frames(draws["step"][i])
    host = frames_to_video(x, FRAMES)
    scale = core.abs().max().item()
    assert scale > 1.0 and host.shape == core.shape
    torch.testing.assert_close(host, core, rtol=0, atol=1e-5 * scale)
    # the boundary's one convention difference, exactly where it is: c_skip multiplies x_t / sqrt(abar) in ComfyUI
    abar = float(table[999])
    x_t, eps = draws["z"].double(), torch.randn(shape, generator=generator).double()  # float64: the term is 4e-7
    comfy = _comfy_lcm_denoised(x_t / abar ** 0.5, eps, ((1 - abar) / abar) ** 0.5, 999)
    c_skip = lcm.consistency_coefficients(999)[0]
    core_f = lcm.consistency_output(x_t, eps, 999, abar)
    torch.testing.assert_close(comfy, core_f + c_skip * (abar ** -0.5 - 1) * x_t, rtol=1e-12, atol=1e-12)
    assert not torch.equal(comfy, core_f) and 0 < c_skip * (abar ** -0.5 - 1) < 5e-7


def test_comfyuis_lcm_loop_with_the_lcm_schedule_node_is_the_core_lcm_sampler_at_its_own_timesteps(
        model, monkeypatch) -> None:
    """VideoBooth LCM Schedule's MODEL and SIGMAS in ComfyUI's ``lcm`` loop (SamplerCustom: the start noise scaled at
    sigma_max, EPS input scaling, the sampling object's ``timestep`` and LCM boundary, re-noising with
    ``noise_scaling``; ComfyUI 0.3.64's classes by the stand-in) equal the core's ``sample_lcm`` at the core's own
    timesteps (999, 758, 518, 277: no monkeypatch) with the same draws, within float rounding."""
    import comfy_stand_in
    from conftest import PACK_NAME, import_pack

    from videobooth_core.sampling import lcm

    import_pack()
    node = sys.modules[f"{PACK_NAME}.nodes.native_lcm"].VideoBoothLCMSchedule()
    comfy_stand_in.install(monkeypatch)
    patched, sigmas = node.schedule(comfy_stand_in.native_patcher(), 4)
    sampling = patched.object_patches["model_sampling"]
    timesteps = [int(sampling.timestep(sigma)) for sigma in sigmas[:-1]]
    assert timesteps == lcm.lcm_timesteps(4) == [999, 758, 518, 277] and float(sigmas[-1]) == 0.0
    assert float(sampling.sigma_max) == float(sigmas[0])  # SamplerCustom's max_denoise: z * sqrt(1 + sigma^2)
    generator = torch.Generator().manual_seed(11)
    shape = (1, 4, FRAMES, SIZE, SIZE)
    draws = {"z": torch.randn(shape, generator=generator),
             "exemplar": [torch.randn(shape, generator=generator) for _ in timesteps],
             "step": [torch.randn(shape, generator=generator) for _ in timesteps]}
    cond, null, clean = model["cond"], model["null"], model["clean"][:1]
    denoiser = VideoDenoiser(model["unet"], cond, null, cfg_scale=4.0, batch_passes=False)
    with torch.no_grad():
        core = lcm.sample_lcm(denoiser, 4, shape, _Replay(draws), exemplar_clean=clean)  # cfg 1: one pass a step
        z = video_to_frames(draws["z"])
        x = sampling.noise_scaling(sigmas[0], z, torch.zeros_like(z), max_denoise=True)
        for i in range(len(timesteps)):
            sigma = sigmas[i] * x.new_ones(x.shape[0])  # k-diffusion's s_in: one sigma per frame
            eps = model["native"](sampling.calculate_input(sigma, x), sampling.timestep(sigma).float(),
                                  cond.expand(x.shape[0], -1, -1), FRAMES, image_prompt=clean,
                                  image_prompt_noise=draws["exemplar"][i],
                                  image_prompt_alpha_cumprod=alpha_cumprod_of_sigma(float(sigmas[i])),
                                  null_context=null)
            x = sampling.calculate_denoised(sigma, eps, x)
            if sigmas[i + 1] > 0:  # sample_lcm re-noises with the sampler's noise (here the core's draw)
                x = sampling.noise_scaling(sigmas[i + 1], video_to_frames(draws["step"][i]), x)
    host = frames_to_video(x, FRAMES)
    scale = core.abs().max().item()
    assert scale > 1.0 and host.shape == core.shape
    torch.testing.assert_close(host, core, rtol=0, atol=1e-5 * scale)
