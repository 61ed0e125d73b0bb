"""One home for the settings (the package videobooth_core/settings) and the one validation before any model loads:
the table against the dataclasses, the command line, the jobs schema and the node inputs; every bad input of
issue 11 (exit code 2, one ``error:`` line naming the value, nothing written); whole-word subject matching;
the 77-token check after the subject splice; a cut-out's alpha as its mask. All in-process."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from videobooth_core.errors import DeviceError, ImagePromptError, PromptError, SamplingError, VideoBoothError
from videobooth_core.pipeline import GenerationRequest, SamplingOptions
from videobooth_core.settings import SETTINGS, check_device, settings_kwargs

PROMPT = "a ball rolling on the grass"
LONG_PROMPT = " ".join(["a very long and winding road"] * 50)  # 300 words


@pytest.fixture(scope="module")
def clip_tokenizer(clip_tokenizer_dir):
    from videobooth_core.conditioning.tokenizer import load_clip_tokenizer

    return load_clip_tokenizer(clip_tokenizer_dir)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> dict[str, Path]:
    """A subject photo, its mask, and RGBA cut-outs: real alpha, opaque alpha, fully transparent."""
    from PIL import Image

    from videobooth_core.app.demo import synthetic_subject

    folder = tmp_path_factory.mktemp("photos")
    image, mask = synthetic_subject(width=96, height=80)
    Image.fromarray(image.numpy()).save(folder / "ball.png")
    Image.fromarray(mask.numpy().astype(np.uint8) * 255).save(folder / "ball_mask.png")
    rgba = np.concatenate([image.numpy(), mask.numpy()[..., None].astype(np.uint8) * 255], axis=2)
    Image.fromarray(rgba, "RGBA").save(folder / "cutout.png")
    rgba[..., 3] = 255
    Image.fromarray(rgba, "RGBA").save(folder / "opaque.png")
    rgba[..., 3] = 0
    Image.fromarray(rgba, "RGBA").save(folder / "invisible.png")
    return {"image": folder / "ball.png", "mask": folder / "ball_mask.png", "cutout": folder / "cutout.png",
            "opaque": folder / "opaque.png", "invisible": folder / "invisible.png", "truth": mask}


# -- the table --------------------------------------------------------------------------------------------
def test_the_table_is_the_dataclasses_defaults() -> None:
    request, options = GenerationRequest(prompt="x"), SamplingOptions()
    for key, spec in SETTINGS.items():
        holder = options if spec.section == "options" else request
        assert getattr(holder, spec.name) == spec.default, key
        assert spec.help and spec.flag.startswith("--"), key
    assert len({spec.flag for spec in SETTINGS.values()}) == len(SETTINGS)
    described = {f.name for f in dataclasses.fields(SamplingOptions) if "setting" in f.metadata}
    assert described == {"single_frame_image_prompt", "image_prompt_steps", "watermark_branch", "image_prompt_strength"}
    kwargs = settings_kwargs({"cfg": 6.0, "single_frame_image_prompt": True, "image_prompt_steps": [0, 0.5]})
    assert kwargs["cfg_scale"] == 6.0 and kwargs["options"].image_prompt_steps == (0, 0.5)
    assert kwargs["options"].single_frame_image_prompt is True


@pytest.mark.parametrize("change, words", [
    ({"cfg_scale": math.nan}, ["cfg", "finite", "nan"]),
    ({"cfg_scale": math.inf}, ["cfg", "finite", "inf"]),
    ({"eta": math.nan}, ["eta", "finite", "nan"]),
    ({"eta": -math.inf}, ["eta", "finite", "-inf"]),
    ({"seed": -1}, ["seed", "at least 0", "-1"]),
    ({"seed": 2**64}, ["seed", "2**64 - 1", str(2**64)]),
    ({"fps": 0}, ["fps", "greater than 0", "got 0"]),
    ({"fps": -1.0}, ["fps", "-1.0"]),
    ({"frames": 300}, ["frames", "between 1 and 256", "300"]),
    ({"steps": 16.5}, ["steps", "whole number", "16.5"]),
    ({"width": 65}, ["width must be a positive multiple of 8, got 65; try 64"]),
    ({"options": SamplingOptions}, ["image_prompt_steps", "start < end", "0.5"]),
])
def test_bad_settings_are_refused_naming_the_value(change, words) -> None:
    with pytest.raises(SamplingError) as caught:
        if change.get("options") is SamplingOptions:  # one rule everywhere: start < end (an empty window is refused)
            SamplingOptions(image_prompt_steps=(0.5, 0.5))
        GenerationRequest(prompt=PROMPT, **change).validate()
    for word in words:
        assert word in str(caught.value), str(caught.value)


def test_device_must_exist_here(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert check_device("cpu") == torch.device("cpu")
    for device in ("cuda", "cuda:1", "gpu", "mps"):
        with pytest.raises(DeviceError) as caught:
            check_device(device)
        assert repr(device) in str(caught.value) and "this machine has: cpu" in str(caught.value)


def test_mask_or_bbox_without_an_image() -> None:
    with pytest.raises(ImagePromptError, match="a mask without an image"):
        GenerationRequest(prompt=PROMPT, mask=torch.ones(8, 8, dtype=torch.bool)).validate()
    with pytest.raises(ImagePromptError, match="a bbox without an image"):
        GenerationRequest(prompt=PROMPT, bbox=(0, 0, 4, 4)).validate()


def test_warnings_beyond_what_the_model_was_trained_on(caplog) -> None:
    with caplog.at_level(logging.WARNING):
        warnings = GenerationRequest(prompt=PROMPT, frames=17, width=320).validate()
    assert any("17 frames" in w and "trained on 16" in w for w in warnings)
    assert any("320x256" in w and "256x256" in w for w in warnings)
    assert all(w in caplog.text for w in warnings)
    assert GenerationRequest(prompt=PROMPT, frames=16).validate() == []


# -- subject word and prompt length ------------------------------------------------------------------------
def test_the_subject_word_matches_whole_words() -> None:
    from videobooth_core.conditioning.text import substitute_subject

    assert substitute_subject("A hotdog and a Dog's bowl", "dog") == "a hotdog and a sdksd's bowl"
    assert substitute_subject("On the moon, a Teddy  Bear", "teddy bear") == "on the moon, a sdksd"
    assert substitute_subject("a hotdog", "dog", "official-substring") == "a hotsdksd"  # the official rule, on request
    with pytest.raises(PromptError) as caught:
        substitute_subject("a hotdog on a plate", "dog")
    message = str(caught.value)
    assert "'dog'" in message and "inside 'hotdog'" in message and "'plate'" in message
    assert "official-substring" in message


def test_prompt_fit_names_the_dropped_words(clip_tokenizer) -> None:
    from videobooth_core.conditioning.text import prompt_fit_warnings

    # 70 words then the subject: its 5 vectors fit, the splice pushes the last word past token 77
    prompt = " ".join(["red"] * 70 + ["ball", "on", "grass"])
    (warning,) = prompt_fit_warnings(clip_tokenizer, prompt, "ball")
    assert "1 word(s) are dropped: 'grass'" in warning and "after the subject splice" in warning
    (warning,) = prompt_fit_warnings(clip_tokenizer, LONG_PROMPT)
    assert "dropped" in warning and "winding road" in warning
    assert prompt_fit_warnings(clip_tokenizer, "panda in the tiny pond", "panda") == []


def test_a_subject_cut_by_the_77_token_limit_is_an_error(clip_tokenizer) -> None:
    from videobooth_core.conditioning.text import prepare_subject_prompt

    with pytest.raises(PromptError, match="77"):  # only part of the 5 vectors would fit
        prepare_subject_prompt(clip_tokenizer, " ".join(["red"] * 72 + ["ball", "on", "grass"]), "ball")
    # the old check looked for the placeholder's first token ("sd") anywhere: "sdcard" fooled it
    with pytest.raises(PromptError, match="77"):
        prepare_subject_prompt(clip_tokenizer, "an sdcard " + LONG_PROMPT + " and a ball", "ball")


# -- a cut-out's alpha is its mask ---------------------------------------------------------------------------
def test_rgba_cutout_uses_its_alpha_as_the_mask(photos, caplog) -> None:
    from videobooth_core.conditioning.image_prompt import load_image, load_mask, load_subject

    with caplog.at_level(logging.WARNING):
        image, mask = load_subject(photos["cutout"])
    assert torch.equal(image, load_image(photos["image"])) and torch.equal(mask, photos["truth"])
    assert "alpha channel" in caplog.text and "cutout.png" in caplog.text
    assert torch.equal(load_subject(photos["cutout"], photos["mask"])[1], load_mask(photos["mask"]))  # a mask wins
    assert load_subject(photos["opaque"])[1] is None and load_subject(photos["image"])[1] is None
    with pytest.raises(ImagePromptError, match="fully transparent"):
        load_subject(photos["invisible"])


# -- the command line ------------------------------------------------------------------------------------------
def _run(main, capsys, args: list[str]) -> tuple[int, list[str]]:
    code = main([str(a) for a in args])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    return code, lines


@pytest.mark.parametrize("extra, words", [
    (["--cfg", "nan"], ["cfg", "nan"]),
    (["--cfg", "inf"], ["cfg", "inf"]),
    (["--eta", "nan"], ["eta", "nan"]),
    (["--seed", "-1"], ["seed", "-1"]),
    (["--seed", str(2**64)], ["seed", str(2**64)]),
    (["--fps", "0"], ["fps", "0"]),
    (["--fps", "-1"], ["fps", "-1"]),
    (["--device", "cuda"], ["'cuda'", "cpu"]),
    (["--device", "gpu"], ["'gpu'", "cpu"]),
    (["--device", "mps"], ["'mps'", "cpu"]),
    (["--mask", "{mask}"], ["mask without an image"]),
    (["--bbox", "0", "0", "8", "8"], ["bbox without an image"]),
    (["--image", "{image}", "--word", "ball", "--prompt", LONG_PROMPT + " with a ball"], ["'ball'", "77"]),
    (["--image", "{image}", "--word", "dog", "--prompt", "a hotdog on the grass"], ["'dog'", "'hotdog'"]),
    (["--image-prompt-steps", "0.5", "0.5"], ["--image-prompt-steps", "start < end"]),
])
def test_bad_input_one_error_line_and_nothing_written(extra, words, tiny_models, photos, tmp_path, capsys,
                                                      monkeypatch) -> None:
    from videobooth_core.app.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same answer on a GPU machine
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    extra = [str(a).format(**{k: str(v) for k, v in photos.items() if isinstance(v, Path)}) for a in extra]
    prompt = [] if "--prompt" in extra else ["--prompt", PROMPT]
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    code, lines = _run(main, capsys, ["generate", "--models", tiny_models, *prompt, *extra, "--frames", "2",
                                      "--steps", "1", "--out", out_dir / "clip.gif"])
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), lines
    for word in words:
        assert word in lines[0], lines[0]
    assert list(out_dir.iterdir()) == []


def test_help_explains_every_flag_with_its_default(capsys) -> None:
    from videobooth_core.app.cli import build_parser, main

    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices  # the subcommands' own parsers
    for name in ("generate", "demo", "convert", "make-tiny"):
        sub = commands[name]
        assert sub.epilog and "examples:" in sub.epilog and f"{name}" in sub.epilog, name
        for action in sub._actions:
            if action.dest != "help":
                assert action.help and ("default" in action.help or "required" in action.help), (name, action.dest)
    with pytest.raises(SystemExit) as caught:
        main(["generate", "--help"])
    assert caught.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "hours on a CPU" in text and "--sampler dpmpp_2m --steps 25" in text and "(default: 250)" in text


def test_the_request_of_a_command_line(tiny_models, photos) -> None:
    from videobooth_core.app.cli import _request_from, build_parser

    args = build_parser().parse_args(["generate", "--models", str(tiny_models), "--image", str(photos["cutout"]),
                                      "--word", "ball", "--prompt", PROMPT, "--cfg", "6", "--padding", "3",
                                      "--single-frame-image-prompt", "--image-prompt-steps", "0", "0.5",
                                      "--no-watermark-branch", "--image-prompt-strength", "0.5"])
    request = _request_from(args)
    assert torch.equal(request.mask, photos["truth"])  # the cut-out's alpha
    assert request.cfg_scale == 6.0 and request.image_prompt_padding == 3 and request.steps == 250
    assert request.options == SamplingOptions(single_frame_image_prompt=True, image_prompt_steps=(0.0, 0.5),
                                              watermark_branch=False, image_prompt_strength=0.5)


# -- batch jobs -----------------------------------------------------------------------------------------------
def test_every_generate_flag_works_in_jobs_or_is_refused_there() -> None:
    from videobooth_core.app.cli import build_parser
    from videobooth_core.app.jobs import schema as jobs
    from videobooth_core.app.videocrafter import VIDEOCRAFTER_ONLY_FLAGS

    generate = build_parser()._subparsers._group_actions[0].choices["generate"]
    batch = {"help", "models", "jobs", "out_dir", "overwrite"}
    for action in generate._actions:
        dest = action.dest
        assert dest in batch or dest in jobs.SETTINGS or dest in jobs.CLI_ONLY_FLAGS or dest in jobs.PER_RUN_KEYS \
            or dest in jobs.BEST_OF_KEYS or dest in jobs.SD_MODEL_KEYS or dest in jobs.REFUSED_FLAGS \
            or dest in VIDEOCRAFTER_ONLY_FLAGS, dest  # the VideoCrafter road's flags: no jobs there yet (issue 26)


def test_sd_model_flags_are_every_jobs_default_and_enter_the_fingerprint(tmp_path) -> None:
    from videobooth_core.app.cli import build_parser
    from videobooth_core.app.jobs import load_jobs
    from videobooth_core.app.jobs.run import _defaults_from
    from videobooth_core.app.jobs.schema import REFUSED_FLAGS, SD_MODEL_KEYS
    from videobooth_core.errors import JobsError

    assert REFUSED_FLAGS == () and set(SD_MODEL_KEYS) == {"base_checkpoint", "lora", "lora_kv"}
    (tmp_path / "styles").mkdir()
    lora, other = tmp_path / "styles/style.safetensors", tmp_path / "styles/other.safetensors"
    lora.write_bytes(b"x")
    other.write_bytes(b"y")
    path = tmp_path / "jobs.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in [
        {"id": "flags", "prompt": "a cat"},
        {"id": "line", "prompt": "a cat", "loras": [["styles/other.safetensors", 0.5]], "lora_kv": "ignore"},
        {"id": "plain", "prompt": "a cat", "loras": []}]) + "\n")
    args = build_parser().parse_args(["generate", "--models", "m", "--jobs", str(path), "--out-dir", "o",
                                      "--lora", f"{lora}:0.7", "--lora-kv", "mapper"])
    flags, line, plain = load_jobs(path, _defaults_from(args), check_files=False)
    assert flags.loras == ((str(lora.resolve()), 0.7),) and flags.lora_kv == "mapper"
    assert line.loras == ((str(other.resolve()), 0.5),) and line.lora_kv == "ignore"
    assert not plain.styled and "loras" not in plain.describe()
    before = flags.fingerprint("fp32")
    lora.write_bytes(b"xx")  # a replaced style file redoes the job
    assert flags.fingerprint("fp32") != before
    path.write_text(json.dumps({"prompt": "a cat", "base_checkpoint": "styles/missing.safetensors"}) + "\n")
    with pytest.raises(JobsError, match="line 1.*base_checkpoint.*missing.safetensors"):
        load_jobs(path, check_files=False)


def _v1_fingerprint(job, dtype: str) -> str:
    """The fingerprint of the first jobs format (before the speed modes were keys)."""
    from videobooth_core.app.jobs.schema import FINGERPRINT_V1_KEYS, SETTINGS

    spec = {k: v for k, v in job.describe().items() if k not in SETTINGS or k in FINGERPRINT_V1_KEYS}
    return hashlib.sha256(json.dumps({**spec, "out": job.out, "dtype": dtype}, sort_keys=True).encode()).hexdigest()[:16]


def test_speed_modes_in_jobs_lines_flags_and_the_fingerprint(tmp_path) -> None:
    from videobooth_core.app.cli import build_parser
    from videobooth_core.app.jobs import job_request, load_jobs
    from videobooth_core.app.jobs.run import _defaults_from

    path = tmp_path / "jobs.jsonl"
    path.write_text(json.dumps({"id": "plain", "prompt": "a cat"}) + "\n" + json.dumps(
        {"id": "fast", "prompt": "a cat", "single_frame_image_prompt": True, "image_prompt_steps": [0, 0.5],
         "watermark_branch": False, "image_prompt_strength": 0.5, "padding": 2}) + "\n")
    plain, fast = load_jobs(path)
    assert job_request(fast).options == SamplingOptions(True, (0.0, 0.5), False, 0.5)
    assert job_request(fast).image_prompt_padding == 2 and job_request(plain).options == SamplingOptions()
    assert plain.fingerprint("fp32") == _v1_fingerprint(plain, "fp32")  # earlier done-records stay valid
    assert fast.fingerprint("fp32") != _v1_fingerprint(fast, "fp32")

    args = build_parser().parse_args(["generate", "--models", "m", "--jobs", str(path), "--out-dir", "o",
                                      "--single-frame-image-prompt", "--image-prompt-steps", "0", "0.25",
                                      "--no-watermark-branch"])
    flagged, _ = load_jobs(path, _defaults_from(args), check_files=False)
    assert job_request(flagged).options == SamplingOptions(True, (0.0, 0.25), False, 1.0)
    assert flagged.fingerprint("fp32") != plain.fingerprint("fp32")


@pytest.mark.parametrize("line, words", [
    ('{"prompt": "a cat", "cfg": NaN}', ["line 1", "cfg", "nan"]),
    ('{"prompt": "a cat", "seed": -1}', ["line 1", "seed", "-1"]),
    ('{"prompt": "a cat", "fps": 0}', ["line 1", "fps", "0"]),
    ('{"prompt": "a cat", "image_prompt_steps": [0.5, 0.5]}', ["line 1", "start < end"]),
    ('{"prompt": "a cat", "watermark_branch": "no"}', ["line 1", "'watermark_branch'", "true or false"]),
    ('{"prompt": "a cat", "stream_weights": true}', ["line 1", "--stream-weights"]),
])
def test_bad_jobs_settings(line, words, tmp_path) -> None:
    from videobooth_core.app.jobs import load_jobs

    path = tmp_path / "jobs.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(VideoBoothError) as caught:
        load_jobs(path)
    for word in words:
        assert word in str(caught.value), str(caught.value)


def test_jobs_refuse_a_long_prompt_before_anything_is_written(tiny_models, photos, tmp_path, capsys) -> None:
    from videobooth_core.app.cli import main

    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(json.dumps({"prompt": "a dog on the beach"}) + "\n" + json.dumps(
        {"id": "long", "prompt": LONG_PROMPT + " with a ball", "word": "ball", "image": str(photos["image"])}) + "\n")
    code, lines = _run(main, capsys, ["generate", "--models", tiny_models, "--jobs", jobs, "--out-dir",
                                      tmp_path / "out", "--steps", "1"])
    assert code == 2 and len(lines) == 1 and "line 2 (job long)" in lines[0] and "77" in lines[0], lines
    assert not (tmp_path / "out").exists()


# -- one validation on every road, the photo prepared once -------------------------------------------------------
def _count_preparations(monkeypatch) -> list[int]:
    from videobooth_core.conditioning import image_prompt

    calls, prepare = [], image_prompt.prepare_image_prompt
    monkeypatch.setattr(image_prompt, "prepare_image_prompt", lambda *a, **k: calls.append(1) or prepare(*a, **k))
    return calls


def test_the_command_line_prepares_the_photo_once(tiny_models, photos, tmp_path, capsys, monkeypatch) -> None:
    """Validation before the models load and the conditioning after share one preparation (it was three)."""
    from videobooth_core.app.cli import main

    calls = _count_preparations(monkeypatch)
    code, lines = _run(main, capsys, ["generate", "--models", tiny_models, "--prompt", PROMPT, "--word", "ball",
                                      "--image", photos["image"], "--mask", photos["mask"], "--frames", "2",
                                      "--width", "64", "--height", "64", "--steps", "1", "--out",
                                      tmp_path / "clip.gif"])
    assert code == 0 and (tmp_path / "clip.gif").is_file(), lines
    assert len(calls) == 1


def test_a_changed_photo_is_prepared_anew(photos, monkeypatch) -> None:
    from videobooth_core.conditioning.image_prompt import load_subject
    from videobooth_core.conditioning.subjects import prepare_photo

    calls = _count_preparations(monkeypatch)
    image, mask = load_subject(photos["image"], photos["mask"])
    request = GenerationRequest(prompt=PROMPT, subject_word="ball", image=image, mask=mask)
    request.validate()
    first = prepare_photo(request, image, mask, None)
    copy = dataclasses.replace(request, seed=11)  # best of N's candidates: the same photo
    assert prepare_photo(copy, image, mask, None) is first and len(calls) == 1
    image[0, 0] = 255 - image[0, 0]  # changed in place: prepared again
    assert prepare_photo(request, image, mask, None) is not first and len(calls) == 2
    request.image_prompt_padding = 3
    prepare_photo(request, image, mask, None)
    assert len(calls) == 3


def _two_subjects(photos) -> list:
    from videobooth_core.app.subjects import load_subjects

    return load_subjects([{"word": "ball", "image": str(photos["image"])},
                          {"word": "cube", "image": str(photos["cutout"]), "strength": 0.5}])


WINDOWED = "several subjects' image prompts and a long video (context windows) do not go together"


def test_several_subjects_with_context_windows_are_refused_by_the_one_validation(photos) -> None:
    request = GenerationRequest(prompt="a ball and a cube", subjects=_two_subjects(photos), frames=20)
    with pytest.raises(SamplingError, match=re.escape(WINDOWED)):
        request.validate()
    request.frames = 16  # one window: fine
    request.validate()
    request.frames, request.subjects[1] = 20, dataclasses.replace(request.subjects[1], strength=0.0)
    request.validate()  # one image-prompt stream: the windows go together with it


def test_the_command_line_refuses_several_subjects_with_windows_before_any_model(tiny_models, photos, tmp_path,
                                                                                  capsys, monkeypatch) -> None:
    from videobooth_core.app.cli import main
    from videobooth_core.pipeline import VideoBoothPipeline

    monkeypatch.setattr(VideoBoothPipeline, "from_models_dir", classmethod(lambda *a, **k: pytest.fail("loaded")))
    code, lines = _run(main, capsys, ["generate", "--models", tiny_models, "--prompt", "a ball and a cube",
                                      "--subject", "ball", photos["image"], "--subject", "cube", photos["cutout"],
                                      "--frames", "20", "--context-window", "8", "--out", tmp_path / "clip.gif"])
    assert code == 2 and len(lines) == 1 and WINDOWED in lines[0], lines
    assert "--frames: 20; use at most 8 frames (or a --context-window of 20 or more)" in lines[0]
    assert not (tmp_path / "clip.gif").exists()


def test_jobs_refuse_several_subjects_with_windows_naming_the_line(photos, tmp_path) -> None:
    from videobooth_core.app.jobs import load_jobs
    from videobooth_core.errors import JobsError

    path = tmp_path / "jobs.jsonl"
    subjects = [{"word": "ball", "image": str(photos["image"])}, {"word": "cube", "image": str(photos["cutout"])}]
    path.write_text(json.dumps({"prompt": "a ball and a cube", "subjects": subjects}) + "\n" + json.dumps(
        {"id": "long", "prompt": "a ball and a cube", "subjects": subjects, "frames": 24}) + "\n")
    with pytest.raises(JobsError) as caught:
        load_jobs(path)
    message = str(caught.value)
    assert message.startswith("line 2 (job long): ") and WINDOWED in message, message
    assert "'frames': 24; use at most 16 frames (or a 'context_window' of 24 or more)" in message


def test_the_request_builder_names_the_inputs_as_each_road_does(photos) -> None:
    """One builder for the command line, jobs and the Python API; only the words differ."""
    from videobooth_core.app.request import build_request
    from videobooth_core.settings import key_names

    inputs = {"prompt": PROMPT, "word": "ball", "image": str(photos["cutout"]), "cfg": 6,
              "image_prompt_steps": [0, 0.5]}
    request = build_request(inputs)
    assert torch.equal(request.mask, photos["truth"]) and request.cfg_scale == 6
    assert request.options.image_prompt_steps == (0.0, 0.5)
    for names, words in ((None, "--cfg must be"), (key_names, "'cfg' must be")):
        with pytest.raises(SamplingError, match=words):
            build_request({**inputs, "cfg": -1}, **({"names": names} if names else {}))
    with pytest.raises(ImagePromptError, match=r"give both \('image' and 'word'\)"):
        build_request({"prompt": PROMPT, "image": str(photos["image"])}, names=key_names)
    with pytest.raises(VideoBoothError, match="unknown input"):
        build_request({"prompt": PROMPT, "promt": "x"})


# -- the node inputs ------------------------------------------------------------------------------------------
WIDGET_SETTINGS = {
    # (node id, widget) -> settings key, where the widget is named otherwise (the others: their own name)
    ("VideoBoothLatentInjection", "strength"): "image_prompt_strength",
    ("VideoBoothTextEncode", "negative_prompt"): "negative",
    ("VideoBoothNativeConditioning", "negative_prompt"): "negative",
    ("VideoBoothStartFrames", "last_frames"): "extend_frames",
    ("VideoBoothBestOfN", "frames_per_video"): "frames",
    ("VideoBoothNativeContextWindows", "fuse"): "context_fuse",
    ("VideoBoothVideoCrafterSampler", "negative_prompt"): "negative",
    ("VideoBoothLCMSchedule", "steps"): "lcm_steps",
}
WIDGET_DEFAULTS = {("VideoBoothStartFrames", "last_frames"): 1}
"""Widgets whose default differs from their setting's, on purpose (a start image is one frame)."""
NODE_ONLY = {
    # numeric, boolean and choice widgets that are no generation setting (their own ranges, checked by their node)
    "chunk_size", "region_x1", "region_y1", "region_x2", "region_y2", "invert_mask", "overwrite", "kv_weights",
    "rank_by", "output", "metric", "official_guidance", "tokenizer",
}


def test_every_node_widget_agrees_with_the_settings() -> None:
    """Every widget of every node that is a setting has the setting's default, range, step and choices, from the
    one table; the rest are named above (a new widget must be one or the other)."""
    from conftest import import_pack

    from videobooth_core.settings import (
        CONVERT_PRECISION, DEFAULT_DEVICE, LCM_STEPS, LORA_STRENGTH_RANGE, PRECISIONS, SAMPLER_BATCH,
        VIDEOCRAFTER_SETTINGS,
    )

    checked = set()
    for node, cls in import_pack().NODE_CLASS_MAPPINGS.items():
        # a VideoCrafter node's widgets come from the VideoCrafter table (its own defaults and ranges)
        table = VIDEOCRAFTER_SETTINGS if node.startswith("VideoBoothVideoCrafter") else \
            {**SETTINGS, "batch": SAMPLER_BATCH, "lcm_steps": LCM_STEPS}
        schema = cls.INPUT_TYPES()
        for name, spec in {**schema["required"], **schema.get("optional", {})}.items():
            kind, options = spec[0], (spec[1] if len(spec) > 1 else {})
            widget = isinstance(kind, list) or kind in ("INT", "FLOAT", "BOOLEAN", "STRING")
            if name.endswith("_name") or not widget:
                continue  # model files and sockets
            if name == "precision":
                expected = [CONVERT_PRECISION, *[p for p in PRECISIONS if p != CONVERT_PRECISION]] \
                    if node == "VideoBoothConvertWeights" else ["auto", *PRECISIONS]
                assert sorted(kind) == sorted(expected) and options["default"] == expected[0], node
                continue
            if name == "device":
                assert kind == ["auto", DEFAULT_DEVICE], node
                continue
            if name in ("strength_model", "strength_clip"):
                assert (options["min"], options["max"]) == LORA_STRENGTH_RANGE, (node, name)
                continue
            if node == "VideoBoothLatentInjection" and name in ("start", "end"):
                window = SETTINGS["image_prompt_steps"]
                expected = (window.default[name == "end"], window.minimum, window.maximum)
                assert (options["default"], options["min"], options["max"]) == expected, name
                continue
            key = WIDGET_SETTINGS.get((node, name), name)
            if key not in table:
                assert name in NODE_ONLY or kind == "STRING", (node, name)
                continue
            setting = table[key]
            checked.add((node, name))
            unset = setting.default is None  # the model's own value: the widget's 0 stands for it
            assert options["default"] == WIDGET_DEFAULTS.get((node, name), 0 if unset else setting.default), \
                (node, name)
            if setting.choices is not None:
                assert tuple(kind) == setting.choices, (node, name)
            elif setting.kind in ("int", "float"):
                assert kind == setting.kind.upper(), (node, name)
                low = 0 if unset else setting.minimum if setting.minimum is not None else setting.above
                assert (options["min"], options.get("max")) == (low, setting.maximum), (node, name)
                if setting.multiple_of:
                    assert options["step"] == setting.multiple_of, (node, name)
            else:
                assert kind == {"bool": "BOOLEAN", "str": "STRING"}[setting.kind], (node, name)
    assert {("VideoBoothSampler", "seed"), ("VideoBoothSampler", "batch"),
            ("VideoBoothContextOptions", "context_window"), ("VideoBoothContextOptions", "noise_reuse"),
            ("VideoBoothStartFrames", "last_frames"),
            ("VideoBoothNativeContextWindows", "context_overlap"), ("VideoBoothImagePrompt", "padding"),
            ("VideoBoothTextEncode", "negative_prompt"), ("VideoBoothLCMSchedule", "steps")} <= checked
    videocrafter = {"frames", "width", "height", "sampler", "steps", "eta", "cfg", "fps", "seed", "negative_prompt"}
    assert {("VideoBoothVideoCrafterSampler", name) for name in videocrafter} <= checked


SHARED_CONSTANTS = {"VAE_SCALE", "MAX_SEED", "CONTEXT_WINDOW", "CONTEXT_OVERLAP", "FUSE_MODES", "TRAINED_FRAMES",
                    "TRAINED_SIZE", "DEFAULT_PRECISION", "DEFAULT_ATTENTION"}
"""Constants every road shares: defined once, in ``videobooth_core/settings/constants.py``."""
RETIRED_CONSTANTS = {"DEFAULT_WINDOW", "DEFAULT_OVERLAP"}
"""Old copies of CONTEXT_WINDOW and CONTEXT_OVERLAP: defined nowhere."""


def _constant_definitions(paths: list[Path]) -> list[str]:
    """``"file: NAME"`` for every assignment of a shared or retired constant in ``paths``, and ``"file: 2**64"``
    for every literal ``2**64`` (the seed range, MAX_SEED's)."""
    import ast

    watched, found = SHARED_CONSTANTS | RETIRED_CONSTANTS, []
    for path in paths:
        for item in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets = item.targets if isinstance(item, ast.Assign) else [item.target] \
                if isinstance(item, ast.AnnAssign) else []
            found += [f"{path.name}: {t.id}" for t in targets if isinstance(t, ast.Name) and t.id in watched]
            if isinstance(item, ast.BinOp) and isinstance(item.op, ast.Pow) and getattr(item.right, "value", 0) == 64:
                found.append(f"{path.name}: 2**64")
    return found


def test_the_shared_constants_have_one_home() -> None:
    """The settings package defines each shared constant exactly once, in its ``constants`` module (the other
    modules import it), and no other module of the core or the nodes defines one (the trainer is being rewritten
    elsewhere)."""
    from conftest import REPO

    package = REPO / "videobooth_core" / "settings"
    modules = sorted(package.glob("*.py"))
    assert {p.name for p in modules} >= {"__init__.py", "constants.py", "table.py", "generation.py"}
    assert sorted(_constant_definitions(modules)) == \
        sorted([f"constants.py: {name}" for name in SHARED_CONSTANTS] + ["constants.py: 2**64"])
    others = [path for path in [*(REPO / "videobooth_core").rglob("*.py"), *(REPO / "nodes").rglob("*.py")]
              if "training" not in path.parts and package not in path.parents]
    assert len(others) > 50
    assert _constant_definitions(others) == []


def test_the_one_home_check_sees_a_second_definition(tmp_path) -> None:
    """The scan above finds a constant defined twice, an annotated copy, a retired name and a literal 2**64."""
    module = tmp_path / "copy.py"
    module.write_text("VAE_SCALE = 8\nVAE_SCALE: int = 8\nDEFAULT_WINDOW = 16\nLIMIT = 2**64 - 1\nOTHER = 8\n")
    assert _constant_definitions([module]) == ["copy.py: VAE_SCALE", "copy.py: VAE_SCALE", "copy.py: DEFAULT_WINDOW",
                                               "copy.py: 2**64"]
