"""Several subjects in one video (issue 17): each photo bound to its own word (coarse), each image-prompt stream
injected into frame 0 with its own strength and region (fine). One subject must stay the single-subject path."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from videobooth_core.app.tiny import TINY_MAPPER_HIDDEN, TINY_UNET
from videobooth_core.conditioning.subjects import (
    Subject, plan_fine_injection, prepare_subjects_prompt, splice_subjects, substitute_subjects,
)
from videobooth_core.conditioning.text import PLACEHOLDER_WORD, placeholder_token_ids
from videobooth_core.errors import ImagePromptError, PromptError
from videobooth_core.models.attention import cross_frame_attention
from videobooth_core.models.config import MapperConfig
from videobooth_core.models.mapper import Mapper
from videobooth_core.models.subjects import combine_subject_updates, region_token_weights
from videobooth_core.models.unet_3d import UNet3DModel

SMALL = {"frames": 4, "width": 64, "height": 64, "steps": 2, "seed": 7, "sampler": "dpmpp_2m"}


@pytest.fixture(autouse=True)
def one_thread():
    """One compute thread: bit-for-bit comparisons between runs, and tiny models run fastest that way on a busy
    machine (thread oversubscription made a tiny UNet call 80x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer(clip_tokenizer_dir):
    from videobooth_core.conditioning.tokenizer import load_clip_tokenizer

    return load_clip_tokenizer(clip_tokenizer_dir)


@pytest.fixture(scope="module")
def pipe(tiny_models):
    from videobooth_core.pipeline import VideoBoothPipeline

    return VideoBoothPipeline.from_models_dir(str(tiny_models))


def _photos() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from videobooth_core.app.demo import synthetic_subject

    image, mask = synthetic_subject(width=96, height=80)
    generator = torch.Generator().manual_seed(3)
    other = torch.randint(0, 256, (72, 72, 3), generator=generator, dtype=torch.uint8)
    return image, mask, other


def _generate(pipe, prompt: str, **fields):
    from videobooth_core.pipeline import GenerationRequest

    return pipe.generate(GenerationRequest(prompt=prompt, **SMALL, **fields))


# -- coarse: the splice ----------------------------------------------------------------------------------------------
def _splice_positions(tokenizer, prompt: str, words: list[str]) -> list[float]:
    """Token positions after the splice: original tokens keep their index, subject s's vector j is -(100 s + j + 1)."""
    spliced = prepare_subjects_prompt(tokenizer, prompt, words)
    embeds = torch.arange(77, dtype=torch.float64).view(1, 77, 1)
    vectors = [-(100.0 * s + torch.arange(1, 6, dtype=torch.float64)).view(1, 5, 1) for s in range(len(words))]
    out = splice_subjects(embeds, spliced.input_ids, spliced.placeholder_ids, spliced.order, vectors)
    assert out.shape == (1, 77, 1)
    return out.flatten().tolist()


@pytest.mark.parametrize(("prompt", "words", "order"), [
    ("a dog and a cat playing", ["dog", "cat"], (0, 1)),
    ("a cat and a dog playing", ["dog", "cat"], (1, 0)),
    ("a dog, a cat and a teddy bear", ["teddy bear", "dog", "cat"], (1, 2, 0)),
    ("a teddy bear, a cat and a dog", ["dog", "teddy bear", "cat"], (1, 2, 0)),
], ids=["two", "two-reversed", "three-multi-token", "three-other-order"])
def test_each_word_gets_its_own_vectors_at_its_own_position(tokenizer, prompt, words, order) -> None:
    text, found = substitute_subjects(prompt, words)
    assert found == order and text.count(PLACEHOLDER_WORD) == len(words)
    ids = [int(i) for i in tokenizer(text).input_ids]
    placeholder = list(placeholder_token_ids(tokenizer))
    starts = [i for i in range(len(ids)) if ids[i:i + 3] == placeholder]
    assert len(placeholder) == 3 and len(starts) == len(words)
    expected, cursor = [], 0
    for start, subject in zip(starts, order):
        expected += list(range(cursor, start)) + [-(100.0 * subject + j) for j in range(1, 6)]
        cursor = start + 3
    expected = (expected + list(range(cursor, 77)))[:77]
    assert _splice_positions(tokenizer, prompt, words) == expected
    # every word's vectors in prompt order, each 5 long, the prompt shifted by 2 per earlier subject
    positions = _splice_positions(tokenizer, prompt, words)
    for k, (start, subject) in enumerate(zip(starts, order)):
        assert positions[start + 2 * k: start + 2 * k + 5] == [-(100.0 * subject + j) for j in range(1, 6)]


def test_two_subjects_encode_with_both_photos(pipe) -> None:
    from videobooth_core.conditioning.subjects import encode_subjects_prompt

    first, second = (torch.randn(1, 5, 32, generator=torch.Generator().manual_seed(s)) for s in (1, 2))
    encode = lambda words, vectors: encode_subjects_prompt(pipe.text_encoder, pipe.tokenizer,  # noqa: E731
                                                           "a dog and a cat", words, vectors)[0]
    both = encode(["dog", "cat"], [first, second])
    assert both.shape == (1, 77, 32)
    assert not torch.equal(both, encode(["dog", "cat"], [first, first]))
    assert not torch.equal(both, encode(["dog", "cat"], [second, second]))
    single, _ = pipe.encode_prompt("a dog and a cat", "dog", first)  # one word: the official splice
    assert torch.equal(encode(["dog"], [first]), single)


@pytest.mark.parametrize(("words", "prompt", "message"), [
    (["dog", "horse"], "a dog and a cat",
     r"'horse' is not in the prompt 'a dog and a cat'; use one of the prompt's words: 'a', 'dog', 'and', 'cat'"),
    (["dog", "Dog"], "a dog and a cat", r"'Dog' is given twice \(subjects 1 and 2\).*own word"),
    (["bear", "teddy bear"], "a teddy bear and a dog",
     r"'teddy bear' and 'bear' overlap in the prompt 'a teddy bear and a dog'"),
    (["dog", "cat"], "a dog and " + "very " * 66 + "big cat",
     r"no longer fits CLIP's 77 tokens after splicing the subjects: the subject word 'cat' \(subject 2\) would get "
     r"its 5 word vectors at tokens 75-79 \(every subject word becomes 5 tokens; 77 tokens before the splice\); "
     r"shorten the prompt 'a dog and very .*\.\.\.' or mention the subjects earlier"),
], ids=["not-in-prompt", "same-word-twice", "overlapping", "too-long"])
def test_bad_subject_words_are_clear_errors_before_any_model(tokenizer, words, prompt, message) -> None:
    from videobooth_core.pipeline import GenerationRequest

    image, mask, other = _photos()
    request = GenerationRequest(prompt=prompt, subjects=[Subject(words[0], image, mask), Subject(words[1], other)])
    with pytest.raises(PromptError, match=message):
        request.validate(tokenizer)


def test_a_long_prompt_whose_vectors_fit_only_warns_of_the_dropped_words(tokenizer) -> None:
    from videobooth_core.pipeline import GenerationRequest

    image, mask, other = _photos()
    request = GenerationRequest(prompt="a dog and a cat " + "running fast " * 40, subjects=[
        Subject("dog", image, mask), Subject("cat", other)])
    warnings = request.validate(tokenizer)
    assert any("after splicing the subjects" in w and "dropped" in w for w in warnings)


# -- fine: frame 0's attention ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def unet() -> UNet3DModel:
    torch.manual_seed(0)
    model = UNet3DModel(TINY_UNET).eval()
    sites = tuple((site.site, site.proj_in.out_channels) for site in model.attention_sites)
    mapper = Mapper(MapperConfig(input_dim=16, hidden_dim=TINY_MAPPER_HIDDEN, output_dim=TINY_UNET.cross_attention_dim,
                                 site_channels=sites))
    model.attach_projections(mapper.site_projections(), release_own=True)
    return model.requires_grad_(False)


def _unet_inputs(unet: UNet3DModel, subjects: int):
    generator = torch.Generator().manual_seed(1)
    sample = torch.randn(1, 4, 3, 8, 8, generator=generator)
    text = torch.randn(1, 77, TINY_UNET.cross_attention_dim, generator=generator)
    exemplars = torch.randn(subjects, 4, 3, 8, 8, generator=generator)
    features = unet.capture_image_prompt_features(exemplars, 500, text.expand(subjects, -1, -1))
    return sample, text, [{site: f[i:i + 1] for site, f in features.items()} for i in range(subjects)]


@torch.no_grad()
def test_one_subject_in_the_list_is_the_official_arithmetic(unet) -> None:
    sample, text, (a,) = _unet_inputs(unet, 1)
    for strength in (1.0, 0.6):
        official = unet(sample, 500, text, image_prompt_features=a, image_prompt_strength=strength)
        listed = unet(sample, 500, text, image_prompt_features=[a], image_prompt_strength=[strength])
        assert torch.equal(listed, official)


@torch.no_grad()
def test_two_subjects_change_the_output_and_strength_zero_removes_exactly_one(unet) -> None:
    sample, text, (a, b, c) = _unet_inputs(unet, 3)
    run = lambda features, strengths, regions=None: unet(  # noqa: E731
        sample, 500, text, image_prompt_features=features, image_prompt_strength=strengths,
        image_prompt_regions=regions)
    alone_a, alone_b = run(a, 1.0), run(b, 1.0)
    both = run([a, b], [1.0, 1.0])
    assert (both - alone_a).abs().max() > 1e-3 and (both - alone_b).abs().max() > 1e-3
    assert torch.equal(run([a, b, c], [1.0, 0.7, 0.0]), run([a, b], [1.0, 0.7]))
    assert torch.equal(run([a, b], [1.0, 0.0]), alone_a)  # the single-subject path, bit for bit
    assert torch.equal(run([a, b], [0.0, 0.4]), run(b, 0.4))
    assert torch.equal(run([a, b], [0.0, 0.0]), unet(sample, 500, text))
    # a region changes where a subject acts; the full frame is no region at all
    assert not torch.equal(run([a, b], [1.0, 1.0], [(0.0, 0.0, 0.5, 1.0), (0.5, 0.0, 1.0, 1.0)]), both)
    assert torch.equal(run([a, b], [1.0, 1.0], [(0.0, 0.0, 1.0, 1.0), None]), both)


def test_region_weights_are_the_boxs_share_of_each_token() -> None:
    weights = region_token_weights((0.0, 0.0, 0.5, 1.0), 3, 4, "cpu", torch.float32).view(3, 4)
    assert weights.tolist() == [[1.0, 1.0, 0.0, 0.0]] * 3
    weights = region_token_weights((0.25, 0.5, 1.0, 1.0), 2, 2, "cpu", torch.float64).view(2, 2)
    assert weights.tolist() == [[0.0, 0.0], [0.5, 1.0]]
    assert region_token_weights(None, 2, 2, "cpu", torch.float32) is None
    assert region_token_weights((0.0, 0.0, 1.0, 1.0), 2, 2, "cpu", torch.float32) is None


@torch.no_grad()
def test_outside_every_region_frame_zero_keeps_its_own_values(unet) -> None:
    attn = unet.attention_sites[0].transformer_blocks[0].attn1
    generator = torch.Generator().manual_seed(2)
    channels = attn.to_q.in_features
    query, key, value = (torch.randn(1, 16, channels, generator=generator) for _ in range(3))
    states = [torch.randn(1, 16, channels, generator=generator) for _ in range(2)]
    left = region_token_weights((0.0, 0.0, 0.5, 1.0), 4, 4, "cpu", torch.float32)
    top = region_token_weights((0.0, 0.0, 1.0, 0.5), 4, 4, "cpu", torch.float32)
    out = combine_subject_updates(attn, query, key, value, states, [1.0, 0.5], [left, top]).view(4, 4, -1)
    grid = value.view(4, 4, -1)
    assert torch.equal(out[2:, 2:], grid[2:, 2:])  # bottom-right: in neither region
    assert not torch.equal(out[:2, :2], grid[:2, :2])
    # and the cross-frame attention takes the list form
    hidden = torch.randn(3, 16, channels, generator=generator)
    assert cross_frame_attention(attn, hidden, 3, states, [1.0, 0.5], [left, top]).shape == (3, 16, channels)


def test_a_subject_at_strength_zero_runs_no_stream() -> None:
    plan = plan_fine_injection([1.0, 0.0, 0.5], [None, None, (0.5, 0.0, 1.0, 1.0)])
    assert plan.indices == (0, 2) and plan.subject_strengths == (1.0, 0.5)
    assert plan.subject_regions == (None, (0.5, 0.0, 1.0, 1.0))
    single = plan_fine_injection([0.0, 0.8], [None, None])  # one stream left, no region: the official path
    assert single.indices == (1,) and single.subject_strengths is None and single.strength == 0.8
    assert not plan_fine_injection([0.0, 0.0], [None, None]).image_prompt


# -- end to end --------------------------------------------------------------------------------------------------------
def test_one_subject_is_bit_identical_to_image_and_word(pipe) -> None:
    image, mask, _ = _photos()
    official = _generate(pipe, "a ball on the grass", subject_word="ball", image=image, mask=mask)
    listed = _generate(pipe, "a ball on the grass", subjects=[Subject("ball", image, mask)])
    assert torch.equal(listed.latents, official.latents) and torch.equal(listed.frames, official.frames)


def test_two_subjects_end_to_end_differ_from_either_alone(pipe) -> None:
    image, mask, other = _photos()
    prompt = "a ball and a cube on the grass"
    ball, cube = Subject("ball", image, mask), Subject("cube", other)
    both = _generate(pipe, prompt, subjects=[ball, cube])
    assert both.prompt_used == f"a {PLACEHOLDER_WORD} and a {PLACEHOLDER_WORD} on the grass"
    assert both.info["subjects"] == ["ball", "cube"] and torch.isfinite(both.latents).all()
    for alone in (ball, cube):
        single = _generate(pipe, prompt, subjects=[alone])
        assert (both.latents - single.latents).abs().max() > 1e-3
    # order of the list does not matter to the fine path only; to the coarse path words find their own place
    swapped = _generate(pipe, prompt, subjects=[Subject("ball", other), Subject("cube", image, mask)])
    assert (swapped.latents - both.latents).abs().max() > 1e-3


def test_the_memory_estimate_counts_every_subjects_stream(pipe) -> None:
    from videobooth_core.sampling.denoiser import VideoDenoiser
    from videobooth_core.sampling.memory import estimate_step_memory

    cond = torch.zeros(1, 77, 32)
    shape = (1, 4, 4, 8, 8)
    activations = []
    for streams in (1, 2, 3):
        denoiser = VideoDenoiser(pipe.unet, cond, cond, subject_strengths=None if streams == 1 else (1.0,) * streams)
        activations.append(estimate_step_memory(denoiser, shape, True, "cpu").activations_bytes)
    assert activations[0] < activations[1] < activations[2]


# -- command line and jobs ---------------------------------------------------------------------------------------------
def test_subject_flags_parse_with_strength_region_and_box(tmp_path, tiny_models) -> None:
    from videobooth_core.app.cli import _request_from, build_parser
    from videobooth_core.app.subjects import parse_subject_argument

    image, mask, other = _photos()
    Image.fromarray(image.numpy()).save(tmp_path / "ball.png")
    Image.fromarray((mask.numpy() * 255).astype("uint8")).save(tmp_path / "ball_mask.png")
    Image.fromarray(other.numpy()).save(tmp_path / "cube.png")
    args = build_parser().parse_args([
        "generate", "--models", str(tiny_models), "--prompt", "a ball and a cube", "--out", "x.gif",
        "--subject", "ball", str(tmp_path / "ball.png"), str(tmp_path / "ball_mask.png"), "region=0,0,0.5,1",
        "--subject", "cube", str(tmp_path / "cube.png"), "strength=0.5", "bbox=0,0,40,40"])
    request = _request_from(args)
    ball, cube = request.subjects
    assert (ball.word, ball.region, ball.strength, ball.mask is not None) == ("ball", (0.0, 0.0, 0.5, 1.0), None, True)
    assert (cube.word, cube.strength, cube.bbox, cube.mask) == ("cube", 0.5, (0.0, 0.0, 40.0, 40.0), None)
    for bad, message in ((["ball"], "expected --subject WORD IMAGE"), (["a", "b.png", "c", "d"], "expected"),
                         (["a", "b.png", "size=3"], "unknown option 'size'"),
                         (["a", "b.png", "region=0,0,1"], "'region' .* must be 4 finite numbers")):
        with pytest.raises(ImagePromptError, match=message):
            parse_subject_argument(bad)
    args.subject.append(["cube", str(tmp_path / "cube.png"), "region=0.6,0,0.4,1"])
    with pytest.raises(ImagePromptError, match=r"region of subject 3 \('cube'\) needs 0 <= x1 < x2 <= 1"):
        _request_from(args)


def test_jobs_take_a_subjects_list(tmp_path) -> None:
    from videobooth_core.app.jobs import job_request, load_jobs
    from videobooth_core.errors import JobsError

    image, mask, other = _photos()
    Image.fromarray(image.numpy()).save(tmp_path / "ball.png")
    Image.fromarray(other.numpy()).save(tmp_path / "cube.png")
    lines = [{"prompt": "a ball and a cube", "subjects": [{"word": "ball", "image": "ball.png", "strength": 0.8},
                                                         {"word": "cube", "image": "cube.png",
                                                          "region": [0.5, 0, 1, 1]}]},
             {"prompt": "a ball", "word": "ball", "image": "ball.png"}]
    jobs_file = tmp_path / "jobs.jsonl"
    jobs_file.write_text("\n".join(json.dumps(line) for line in lines))
    first, plain = load_jobs(jobs_file)
    assert [s["word"] for s in first.subjects] == ["ball", "cube"] and first.subjects[1]["region"] == (0.5, 0, 1, 1)
    assert first.subjects[0]["image"] == str(tmp_path / "ball.png")
    assert first.describe()["subjects"][0]["strength"] == 0.8
    assert "subjects" not in plain.describe()  # done-records of runs without subjects stay valid
    request = job_request(first)
    assert [s.word for s in request.subjects] == ["ball", "cube"] and request.subjects[0].strength == 0.8
    jobs_file.write_text(json.dumps({"prompt": "a ball", "subjects": [{"word": "ball"}]}))
    with pytest.raises(JobsError, match=r"line 1: subjects\[0\]: subject 'ball' needs its 'image'"):
        load_jobs(jobs_file)
    jobs_file.write_text(json.dumps({"prompt": "a ball and a cube", "subjects": [
        {"word": "ball", "image": "ball.png"}, {"word": "ball", "image": "cube.png"}]}))
    with pytest.raises(JobsError, match=r"line 1.*'ball' is given twice"):
        load_jobs(jobs_file)
