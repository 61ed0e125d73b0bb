"""One rule for every command (issue 29): every bad number, unwritable or taken output and missing, corrupt or wrong
input file is one ``error:`` line naming the value and the fix, exit code 2, nothing written or replaced, and no
model loaded (every loader is replaced by one that records the call). In-process calls of the command line's
``main``; the SIGTERM checkpoint runs in a subprocess in test_training.py."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Callable

import pytest

from videobooth_core.app.cli import main

UNWRITABLE = "/proc/videobooth-test"
"""A folder no process can create files in, whoever runs the tests (root ignores permission bits)."""
SMALL = ["--frames", "2", "--width", "64", "--height", "64", "--steps", "1"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    from videobooth_core.dataset.synthetic import make_synthetic

    out = tmp_path_factory.mktemp("rules_data") / "synth"
    make_synthetic(out, videos=1, seed=0)
    return out


@pytest.fixture
def loaded(monkeypatch, tmp_path) -> list[str]:
    """Every model loader (and every command's heavy step) records its call instead of running."""
    import videobooth_core.app.tiny as tiny
    import videobooth_core.dataset.build as build
    import videobooth_core.dataset.check as check
    import videobooth_core.evaluation.cli as evaluation_cli
    import videobooth_core.loading.checkpoint as checkpoint
    import videobooth_core.training.loop as loop
    from videobooth_core.pipeline import VideoBoothPipeline

    calls: list[str] = []

    def recorder(name: str) -> Callable:
        def record(*args, **kwargs):
            calls.append(name)
            raise AssertionError(f"{name} ran before the bad input was refused")
        return record

    monkeypatch.setattr(VideoBoothPipeline, "from_models_dir", staticmethod(recorder("pipeline")))
    monkeypatch.setattr(VideoBoothPipeline, "from_files", staticmethod(recorder("pipeline")))
    for module, name in ((loop, "train"), (loop, "load_training_models"), (evaluation_cli, "load_scorer"),
                         (checkpoint, "convert_released_weights"), (check, "preview_sheet"),
                         (build, "build_dataset"), (tiny, "make_tiny")):
        monkeypatch.setattr(module, name, recorder(name))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # error logs (there must be none) go here
    return calls


@pytest.fixture
def work(tmp_path, tiny_models, dataset) -> Path:
    """The user's files: some to be protected, some broken inputs."""
    import shutil

    from PIL import Image

    root = tmp_path / "work"
    root.mkdir()
    (root / "mine.png").write_bytes(b"the user's picture")
    (root / "taken.gif.latents.safetensors").write_bytes(b"the user's latents of an earlier taken.gif")
    (root / "batch_taken").mkdir()
    (root / "batch_taken" / "00001.gif.latents.safetensors").write_bytes(b"the user's latents")
    (root / "converted").mkdir()
    (root / "converted" / "videobooth_mapper.safetensors").write_bytes(b"the user's earlier conversion")
    (root / "corrupt.safetensors").write_bytes(b"garbage")
    (root / "corrupt.mp4").write_bytes(b"garbage")
    (root / "corrupt.pt").write_bytes(b"garbage")
    Image.new("RGB", (32, 32), (200, 30, 30)).save(root / "dog.png")
    (root / "jobs.jsonl").write_text(json.dumps({"prompt": "a cat"}) + "\n")
    (root / "jobs_best_of.jsonl").write_text(json.dumps({"prompt": "a dog", "word": "dog", "image": "dog.png",
                                                         "best_of": 2, "frames": 2, "width": 64, "height": 64, "steps": 1}) + "\n")
    (root / "jobs_lora.jsonl").write_text(json.dumps({"prompt": "a cat", "loras": [["corrupt.safetensors", 0.5]]})
                                          + "\n")
    (root / "missing_video.jsonl").write_text(json.dumps({"video": "gone.mp4", "prompt": "a dog"}) + "\n")
    (root / "corrupt_video.jsonl").write_text(json.dumps({"video": "corrupt.mp4", "prompt": "a dog"}) + "\n")
    shutil.copytree(dataset, root / "broken_data")
    (root / "broken_data" / "entries" / "synth_0000" / "mask_1.png").unlink()
    nodino = root / "models_without_dino"
    nodino.mkdir()
    for name in ("videobooth", "vae", "clip_vision", "text_encoders"):
        (nodino / name).symlink_to(tiny_models / name)
    return root


def _tree(folder: Path) -> dict[str, bytes | None]:
    return {p.relative_to(folder).as_posix(): None if p.is_dir() else p.read_bytes() for p in folder.rglob("*")}


def _error_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip() and not line.startswith("WARNING")]
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert "Traceback" not in captured.err + captured.out and "unexpected" not in lines[0], lines[0]
    return lines[0]


def _no_accelerate(monkeypatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "accelerate" else real(name, *a))


def _gen(m, w, *extra):
    return ["generate", "--models", str(m), "--prompt", "a dog running", *SMALL, "--out", str(w / "new.gif"), *extra]


def _train(m, d, w, *extra):
    return ["train", "--stage", "1", "--data", str(d), "--models", str(m), "--out", str(w / "run"), "--steps", "1",
            *extra]


# case: (argv from (models, dataset, work), words of the error line, set-up or None)
CASES = {
    # silent wrong results
    "lora_strength_nan": (lambda m, d, w: _gen(m, w, "--lora", f"{w}/corrupt.safetensors:nan"),
                          ["--lora", "finite", "nan", "-10 and 10"], None),
    "lora_strength_huge": (lambda m, d, w: _gen(m, w, "--lora", f"{w}/corrupt.safetensors:1e30"),
                           ["--lora", "1e+30", "between -10 and 10"], None),
    "best_of_a_million": (lambda m, d, w: _gen(m, w, "--best-of", "1000000"), ["best-of", "at most 100", "1000000"],
                          None),
    # late failures, now early
    "generate_to_proc": (lambda m, d, w: [*_gen(m, w)[:-1], "/proc/out.gif"], ["cannot write", "/proc/out.gif"], None),
    "demo_to_proc": (lambda m, d, w: ["demo", "--models", str(m), "--out", "/proc/out.gif"],
                     ["cannot write", "/proc/out.gif"], None),
    "train_data_not_a_dataset": (lambda m, d, w: _train(m, m, w), ["not a VideoBooth dataset", "dataset synthetic"],
                                 None),
    "train_dataset_entry_broken": (lambda m, d, w: _train(m, w / "broken_data", w),
                                   ["dataset entry 'synth_0000'", "unusable", "dataset check"], None),
    "train_resume_missing": (lambda m, d, w: _train(m, d, w, "--resume", str(w / "gone.pt")),
                             ["--resume", "no such file", "gone.pt"], None),
    "train_resume_corrupt": (lambda m, d, w: _train(m, d, w, "--resume", str(w / "corrupt.pt")),
                             ["--resume", "not a training checkpoint", "corrupt.pt"], None),
    "train_mapper_corrupt": (lambda m, d, w: _train(m, d, w, "--mapper", str(w / "corrupt.safetensors")),
                             ["--mapper", "incomplete or corrupt", "corrupt.safetensors"], None),
    "train_mapper_wrong_kind": (lambda m, d, w: _train(m, d, w, "--mapper", str(m / "vae" / "videobooth_tiny_vae"
                                                                                ".safetensors")),
                                ["--mapper holds a VAE", "not a mapper a training stage can start from", "ELITE"],
                                None),
    "lora_corrupt": (lambda m, d, w: _gen(m, w, "--lora", str(w / "corrupt.safetensors")),
                     ["--lora", "incomplete or corrupt"], None),
    "lora_wrong_kind": (lambda m, d, w: _gen(m, w, "--lora", str(m / "vae" / "videobooth_tiny_vae.safetensors")),
                        ["--lora", "not LoRA weights"], None),
    "base_checkpoint_corrupt": (lambda m, d, w: _gen(m, w, "--base-checkpoint", str(w / "corrupt.safetensors")),
                                ["--base-checkpoint", "incomplete or corrupt"], None),
    "base_checkpoint_wrong_kind": (lambda m, d, w: _gen(m, w, "--base-checkpoint", str(m / "videobooth" /
                                                                                       "mapper.pt")),
                                   ["--base-checkpoint", "not a Stable Diffusion UNet"], None),
    "best_of_without_dino": (lambda m, d, w: [*_gen(w / "models_without_dino", w), "--image", str(w / "dog.png"),
                                              "--word", "dog", "--best-of", "2"], ["dino", "models_without_dino"],
                             None),
    "jobs_best_of_without_dino": (lambda m, d, w: ["generate", "--models", str(w / "models_without_dino"), "--jobs",
                                                   str(w / "jobs_best_of.jsonl"), "--out-dir", str(w / "batch")],
                                  ["dino", "models_without_dino"], None),
    "jobs_line_lora_corrupt": (lambda m, d, w: ["generate", "--models", str(m), "--jobs", str(w / "jobs_lora.jsonl"),
                                                "--out-dir", str(w / "batch")],
                               ["line 1", "loras", "incomplete or corrupt"], None),
    "evaluate_missing_video": (lambda m, d, w: ["evaluate", "--set", str(w / "missing_video.jsonl"), "--models",
                                                str(m), "--out", str(w / "eval")], ["video not found", "gone.mp4"],
                               None),
    "evaluate_corrupt_video": (lambda m, d, w: ["evaluate", "--set", str(w / "corrupt_video.jsonl"), "--models",
                                                str(m), "--out", str(w / "eval")], ["cannot read the video",
                                                                                    "corrupt.mp4"], None),
    # crashes that were "unexpected"
    "train_out_unwritable": (lambda m, d, w: [*_train(m, d, w)[:-4], "--out", UNWRITABLE, "--steps", "1"],
                             ["cannot write --out", UNWRITABLE], None),
    "dataset_build_out_unwritable": (lambda m, d, w: ["dataset", "build", "--videos", str(w), "--captions",
                                                      str(w / "jobs.jsonl"), "--masks", str(w), "--out", UNWRITABLE],
                                     ["cannot write --out", UNWRITABLE], None),
    "jobs_out_dir_unwritable": (lambda m, d, w: ["generate", "--models", str(m), "--jobs", str(w / "jobs.jsonl"),
                                                 "--out-dir", UNWRITABLE], ["cannot write --out-dir", UNWRITABLE],
                                None),
    "evaluate_out_unwritable": (lambda m, d, w: ["evaluate", "--set", str(w / "missing_video.jsonl"), "--models",
                                                 str(m), "--out", UNWRITABLE], ["cannot write --out", UNWRITABLE],
                                None),
    "preview_out_unwritable": (lambda m, d, w: ["dataset", "preview", str(d), "--out", f"{UNWRITABLE}.png"],
                               ["cannot write --out", UNWRITABLE], None),
    "demo_read_only_home": (lambda m, d, w: ["demo", "--models", str(w / "no_models"), "--out", str(w / "d.gif")],
                            ["no VideoBooth weights", "cannot write the cache folder", "XDG_CACHE_HOME"],
                            lambda mp: mp.setenv("XDG_CACHE_HOME", UNWRITABLE)),
    "train_lr_nan": (lambda m, d, w: _train(m, d, w, "--lr", "nan"), ["lr must be a finite number", "--lr"], None),
    "train_out_is_a_file": (lambda m, d, w: [*_train(m, d, w)[:-4], "--out", str(w / "mine.png"), "--steps", "1"],
                            ["--out names a file", "mine.png"], None),
    "train_cache_is_a_file": (lambda m, d, w: _train(m, d, w, "--cache", str(w / "mine.png")),
                              ["--cache names a file", "mine.png"], None),
    "extend_corrupt_video": (lambda m, d, w: _gen(m, w, "--extend", str(w / "corrupt.mp4")),
                             ["--extend: cannot read the video", "corrupt.mp4"], None),
    "train_without_the_extra": (lambda m, d, w: _train(m, d, w), ["training extra", "requirements-train.txt"],
                                _no_accelerate),
    # overwrites
    "preview_over_a_users_file": (lambda m, d, w: ["dataset", "preview", str(d), "--out", str(w / "mine.png")],
                                  ["already exists", "--overwrite"], None),
    "latents_over_a_users_file": (lambda m, d, w: [*_gen(m, w)[:-1], str(w / "taken.gif"), "--save-latents"],
                                  ["latents file", "already exists", "taken.gif.latents.safetensors", "--overwrite"],
                                  None),
    "jobs_latents_over_a_users_file": (lambda m, d, w: ["generate", "--models", str(m), "--jobs",
                                                        str(w / "jobs.jsonl"), "--out-dir", str(w / "batch_taken"),
                                                        "--save-latents"],
                                       ["line 1", "latents file already exists", "00001.gif.latents.safetensors",
                                        "--overwrite"], None),
    "convert_over_a_users_file": (lambda m, d, w: ["convert", "--mapper", str(m / "videobooth" / "mapper.pt"),
                                                   "--out", str(w / "converted")],
                                  ["already exists", "videobooth_mapper.safetensors", "--overwrite"], None),
    # messages that named the wrong problem
    "models_folder_missing": (lambda m, d, w: _gen(w / "doesnotexist", w), ["models folder not found",
                                                                              "doesnotexist"], None),
    "extend_frames_zero": (lambda m, d, w: _gen(m, w, "--extend", str(w / "corrupt.mp4"), "--extend-frames", "0"),
                           ["--extend-frames must be at least 1", "got 0"], None),
    "lora_strength_not_a_number": (lambda m, d, w: _gen(m, w, "--lora", "x:abc"),
                                   ["strength 'abc' is not a number", "PATH:STRENGTH"], None),
    "preview_limit_zero": (lambda m, d, w: ["dataset", "preview", str(d), "--limit", "0", "--out", str(w / "p.png")],
                           ["--limit must be at least 1", "got 0"], None),
    "preview_limit_negative": (lambda m, d, w: ["dataset", "preview", str(d), "--limit", "-1", "--out",
                                                str(w / "p.png")], ["--limit must be at least 1", "got -1"], None),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_before_any_model_loads(case, tiny_models, dataset, work, loaded, monkeypatch,
                                                      capsys) -> None:
    argv, words, setup = CASES[case]
    if setup is not None:
        setup(monkeypatch)
    monkeypatch.chdir(work)
    before = _tree(work)
    assert main(argv(tiny_models, dataset, work)) == 2
    line = _error_line(capsys)
    for word in words:
        assert word in line, line
    assert loaded == []  # no model loaded, no heavy step started
    assert _tree(work) == before  # nothing written, nothing replaced
    assert not (work.parent / "cache").exists()  # no bug log


def test_a_build_that_builds_nothing_fails(tmp_path, capsys) -> None:
    (tmp_path / "videos").mkdir()
    (tmp_path / "captions.csv").write_text("video,caption\n")
    assert main(["dataset", "build", "--videos", str(tmp_path / "videos"), "--captions", str(tmp_path / "captions.csv"),
                 "--masks", str(tmp_path / "videos"), "--out", str(tmp_path / "data")]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("error: no entry was built") and "videos" in line, line


def test_an_evaluation_line_without_prompt_or_image_says_which_scores_stay_empty(work, tiny_models, loaded,
                                                                                  capsys) -> None:
    from PIL import Image

    Image.new("RGB", (16, 16)).save(work / "clip.gif")
    (work / "set.jsonl").write_text(json.dumps({"video": "clip.gif"}) + "\n")
    assert main(["evaluate", "--set", str(work / "set.jsonl"), "--models", str(tiny_models), "--out",
                 str(work / "eval")]) == 1  # the recorder stands in for the metric models: a failure after the checks
    err = capsys.readouterr().err
    assert "warning: clip: no 'prompt', so its clip_t stays empty" in err
    assert "warning: clip: no 'image', so its clip_i, dino and drift stay empty" in err
    assert loaded == ["load_scorer"]


def test_check_target_and_check_output_folder_probe_without_leaving_anything(tmp_path) -> None:
    from videobooth_core.errors import OutputError
    from videobooth_core.files import check_output_folder, check_target, check_writable

    check_target(tmp_path / "a" / "b" / "new.gif")  # a missing folder is fine (created when written) ...
    check_output_folder(tmp_path / "run")
    assert list(tmp_path.iterdir()) == []  # ... and neither check creates it or leaves a probe
    for check in (lambda: check_target("/proc/x.gif"), lambda: check_output_folder("/proc/run"),
                  lambda: check_writable("/sys/x")):
        with pytest.raises(OutputError, match="cannot write"):
            check()


def test_numbers_are_checked_as_settings_are() -> None:
    from videobooth_core.errors import SamplingError
    from videobooth_core.settings import check_lora_strength, check_number

    assert check_number("--limit", 3, 16, whole=True, minimum=1) == 3 and check_number("--x", None, 1) is None
    assert check_lora_strength(-10.0) == -10.0 and check_lora_strength(0) == 0
    for value, words in ((float("nan"), "finite"), (float("inf"), "finite"), (10.5, "between -10 and 10"),
                         ("1", "a number")):
        with pytest.raises(SamplingError, match=words):
            check_lora_strength(value)
    with pytest.raises(SamplingError, match="whole number"):
        check_number("--limit", 1.5, 16, whole=True, minimum=1)
