"""The evaluation metrics, best-of-N and the report on the tiny model set (CPU, seconds)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from videobooth_core.evaluation.metrics import Scorer
from videobooth_core.evaluation.models import find_clip, find_dino, load_clip_for_metrics, load_dino_for_metrics


@pytest.fixture(scope="module")
def scorer(tiny_models) -> Scorer:
    return Scorer(load_clip_for_metrics(find_clip(tiny_models)), load_dino_for_metrics(find_dino(tiny_models)))


def picture(seed: int, size: int = 48) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (size, size, 3), generator=generator, dtype=torch.uint8)


def test_identical_frames_score_100_and_1_and_a_different_image_scores_lower(scorer) -> None:
    reference = picture(0)
    same = scorer.score(reference[None].repeat(3, 1, 1, 1), reference, "a dog on the beach")
    assert same["clip_i"] == pytest.approx(100.0, abs=1e-4) and same["dino"] == pytest.approx(1.0, abs=1e-4)
    assert same["consistency"] == pytest.approx(1.0, abs=1e-4)
    other = scorer.score(torch.stack([picture(1), picture(2)]), reference, "a dog on the beach")
    assert other["clip_i"] < same["clip_i"] - 1e-3 and other["dino"] < same["dino"] - 1e-3
    assert other["consistency"] < 1.0 - 1e-3


def test_clip_t_equals_torchmetrics_clip_score(scorer) -> None:
    from torchmetrics.multimodal.clip_score import CLIPScore

    class Features(torch.nn.Module):  # transformers 5 returns an output object where torchmetrics wants a tensor
        def __init__(self, model) -> None:
            super().__init__()
            self.model, self.config = model, model.config

        def get_image_features(self, *args, **kwargs):
            return self.model.get_image_features(*args, **kwargs).pooler_output

        def get_text_features(self, *args, **kwargs):
            return self.model.get_text_features(*args, **kwargs).pooler_output

    from transformers import CLIPProcessor

    processor = CLIPProcessor(image_processor=scorer.clip.image_processor, tokenizer=scorer.clip.tokenizer)
    metric = CLIPScore(model_name_or_path=lambda: (Features(scorer.clip.model), processor))
    frames = torch.stack([picture(3), picture(4), picture(5)])
    prompt = "a cat playing in the park"
    metric.update(list(frames.permute(0, 3, 1, 2)), [prompt] * 3)
    ours = scorer.score(frames, None, prompt)["clip_t"]
    assert ours == pytest.approx(float(metric.compute()), abs=1e-4)
    assert ours > 0  # the comparison is not between two clamped zeros


def test_preprocessing_is_the_models_own_processors(scorer, tiny_models) -> None:
    from transformers import CLIPImageProcessor, ViTImageProcessor

    from videobooth_core.app.tiny import METRIC_CLIP_DIR, METRIC_DINO_DIR

    frames = torch.stack([picture(6, 40), picture(7, 40)])
    images = [f.numpy() for f in frames]
    clip_pixels = CLIPImageProcessor.from_pretrained(tiny_models / METRIC_CLIP_DIR)(images=images, return_tensors="pt")
    dino_pixels = ViTImageProcessor.from_pretrained(tiny_models / METRIC_DINO_DIR)(images=images, return_tensors="pt")
    clip_expected = scorer.clip.model.get_image_features(pixel_values=clip_pixels["pixel_values"]).pooler_output
    dino_expected = scorer.dino.model(pixel_values=dino_pixels["pixel_values"]).last_hidden_state[:, 0]
    torch.testing.assert_close(scorer.clip_image_embeddings(frames),
                               torch.nn.functional.normalize(clip_expected, dim=-1))
    torch.testing.assert_close(scorer.dino_embeddings(frames), torch.nn.functional.normalize(dino_expected, dim=-1))
    assert tuple(clip_pixels["pixel_values"].shape[-2:]) == (32, 32)


def test_best_of_returns_the_argmax_and_its_seed_reproduces_the_video_alone(scorer, tiny_models) -> None:
    from videobooth_core.evaluation.best_of import generate_best_of
    from videobooth_core.pipeline import GenerationRequest, VideoBoothPipeline

    pipe = VideoBoothPipeline.from_models_dir(str(tiny_models))
    image = picture(8, 64)
    request = GenerationRequest(prompt="a dog on the beach", subject_word="dog", image=image, frames=2, width=32,
                                height=32, steps=2, sampler="dpmpp_2m", seed=5)
    ranked = generate_best_of(pipe, request, 3, "dino", scorer)
    assert sorted(c.seed for c in ranked) == [5, 6, 7]
    assert ranked[0].scores["dino"] == max(c.scores["dino"] for c in ranked)
    assert len({c.scores["dino"] for c in ranked}) == 3  # different videos, so the ranking means something
    import dataclasses

    alone = pipe.generate(dataclasses.replace(request, seed=ranked[0].seed))
    assert torch.equal(alone.frames, ranked[0].result.frames)


def test_evaluate_writes_scores_and_a_report_naming_each_video(tiny_models, tmp_path) -> None:
    from PIL import Image

    from videobooth_core.app.cli import main

    image = picture(9, 64)
    Image.fromarray(image.numpy()).save(tmp_path / "subject.png")
    (tmp_path / "frames_a").mkdir()
    for i in range(3):
        Image.fromarray(image.numpy()).save(tmp_path / "frames_a" / f"frame_{i:05d}.png")
    frames = [Image.fromarray(picture(10 + i, 64).numpy()) for i in range(3)]
    frames[0].save(tmp_path / "b.gif", save_all=True, append_images=frames[1:])
    lines = [{"id": "same", "video": "frames_a", "prompt": "a dog", "word": "dog", "image": "subject.png"},
             {"id": "other", "video": "b.gif", "prompt": "a dog", "word": "dog", "image": "subject.png"}]
    (tmp_path / "set.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    out = tmp_path / "eval"
    assert main(["evaluate", "--set", str(tmp_path / "set.jsonl"), "--models", str(tiny_models),
                 "--out", str(out)]) == 0
    scores = json.loads((out / "scores.json").read_text())
    by_id = {row["id"]: row for row in scores["videos"]}
    assert by_id["same"]["clip_i"] > by_id["other"]["clip_i"] and by_id["same"]["dino"] > by_id["other"]["dino"]
    assert set(scores["mean"]) == {"clip_t", "clip_i", "dino", "consistency"}
    rows = (out / "scores.csv").read_text().splitlines()
    assert rows[0].split(",")[-4:] == ["clip_t", "clip_i", "dino", "consistency"] and rows[-1].startswith("mean")
    for metric in ("clip_t", "clip_i", "dino", "consistency"):
        chart = Image.open(out / f"chart_{metric}.png")
        assert chart.text["Description"] == "videos: same, other"
    for video in ("same", "other"):
        assert (out / "thumbs" / f"{video}.png").is_file()
        assert f'alt="{video}"' in (out / "report.html").read_text()
    assert Image.open(out / "sheet.png").height > 2 * 96


def test_score_and_best_of_nodes(tiny_models, monkeypatch) -> None:
    from conftest import import_pack

    pack = import_pack()
    nodes = pack.NODE_CLASS_MAPPINGS
    monkeypatch.setenv("VIDEOBOOTH_MODELS_DIR", str(tiny_models))
    for name in ("VideoBoothMetricModels", "VideoBoothScore", "VideoBoothBestOfN"):
        cls = nodes[name]
        assert cls.DESCRIPTION and all(spec[1].get("tooltip") for part in cls.INPUT_TYPES().values()
                                       for spec in part.values())
    (models,) = nodes["VideoBoothMetricModels"]().load("videobooth_tiny_clip/model.safetensors",
                                                        "videobooth_tiny_dino/model.safetensors")
    photo = picture(11, 48)[None].float() / 255
    clip_t, clip_i, dino, consistency, text = nodes["VideoBoothScore"]().score(photo.repeat(2, 1, 1, 1), models, photo,
                                                                               "a dog")
    assert clip_i == pytest.approx(100.0, abs=1e-4) and dino == pytest.approx(1.0, abs=1e-4) and "clip_t" in text
    batch = torch.cat([torch.stack([picture(12, 48), picture(13, 48)]).float() / 255, photo.repeat(2, 1, 1, 1)])
    frames, best_seed, ranking = nodes["VideoBoothBestOfN"]().pick(batch, models, photo, "a dog", 2, 7, "dino", "best")
    assert best_seed == 8 and torch.equal(frames, photo.repeat(2, 1, 1, 1)) and ranking.startswith("1. seed 8")


def test_batch_jobs_best_of_records_every_candidate_and_loads_the_metric_models_once(tiny_models, tmp_path, scorer,
                                                                                     monkeypatch) -> None:
    from PIL import Image

    from videobooth_core.app.cli import main
    from videobooth_core.app.jobs import load_jobs
    from videobooth_core.evaluation import models
    from videobooth_core.pipeline import VideoBoothPipeline

    loads, loaded_before_sampling = {"clip": 0, "dino": 0}, []
    for which, name in (("clip", "load_clip_for_metrics"), ("dino", "load_dino_for_metrics")):
        def counting(*args, _load=getattr(models, name), _which=which, **kwargs):
            loads[_which] += 1
            return _load(*args, **kwargs)
        monkeypatch.setattr(models, name, counting)
    generate = VideoBoothPipeline.generate

    def watched(self, *args, **kwargs):
        loaded_before_sampling.append(dict(loads))
        return generate(self, *args, **kwargs)
    monkeypatch.setattr(VideoBoothPipeline, "generate", watched)
    Image.fromarray(picture(14, 64).numpy()).save(tmp_path / "dog.png")
    lines = [{"id": "a", "prompt": "a dog on the beach", "word": "dog", "image": "dog.png", "seed": 5, "out": "a"},
             {"id": "b", "prompt": "a cat in the park", "rank_by": "clip-t", "seed": 9}]
    jobs_file = tmp_path / "jobs.jsonl"
    jobs_file.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    command = ["generate", "--models", str(tiny_models), "--jobs", str(jobs_file), "--out-dir", str(tmp_path / "out"),
               "--frames", "2", "--width", "32", "--height", "32", "--steps", "2", "--sampler", "dpmpp_2m",
               "--best-of", "2"]
    assert main(command) == 0
    # both metric models loaded once, up front for the whole rank: not per job, not per candidate
    assert loaded_before_sampling == [{"clip": 1, "dino": 1}] * 4 and loads == {"clip": 1, "dino": 1}
    items = {item["id"]: item for item in json.loads((tmp_path / "out" / "manifest.json").read_text())["items"]}
    for job, seeds, key in (("a", [5, 6], "dino"), ("b", [9, 10], "clip_t")):
        best_of = items[job]["best_of"]
        candidates = best_of["candidates"]
        assert best_of["n"] == 2 and sorted(c["seed"] for c in candidates) == seeds, job
        assert candidates[0][key] == max(c[key] for c in candidates) and candidates[0][key] != candidates[1][key]
        assert items[job]["seed"] == candidates[0]["seed"]  # the winner's seed, which alone reproduces the output
        assert items[job]["settings"]["best_of"] == 2 and items[job]["settings"]["seed"] == seeds[0]
        done = json.loads((tmp_path / "out" / ".videobooth" / "done" / f"{job}.json").read_text())
        assert done["best_of"] == best_of and done["seed"] == items[job]["seed"]
    assert items["a"]["best_of"]["rank_by"] == "dino" and items["b"]["best_of"]["rank_by"] == "clip-t"
    # the written video (lossless PNG frames) is the winner: it scores what the winner scored, not the other
    pngs = sorted((tmp_path / "out" / "a").glob("*.png"))
    frames = torch.stack([torch.from_numpy(np.array(Image.open(p))) for p in pngs])
    winner, loser = items["a"]["best_of"]["candidates"]
    assert scorer.score(frames, None, None)["consistency"] == pytest.approx(winner["consistency"], abs=1e-6)
    assert abs(winner["consistency"] - loser["consistency"]) > 1e-4

    assert main(command) == 0 and loads == {"clip": 1, "dino": 1}  # a resume redoes nothing, loads nothing
    # best_of and rank_by are part of the fingerprint; a plain job keeps the fingerprint of earlier runs
    (a, _), (a3, _), (a_clip, _) = (load_jobs(jobs_file, {"best_of": n, "rank_by": r}, check_files=False)
                                    for n, r in ((2, "dino"), (3, "dino"), (2, "clip-i")))
    plain = load_jobs(jobs_file, check_files=False)[0]
    assert "best_of" not in plain.describe() and plain.best_of == 1
    assert len({plain.fingerprint("fp32"), a.fingerprint("fp32"), a3.fingerprint("fp32"),
                a_clip.fingerprint("fp32")}) == 4


@pytest.mark.parametrize("line, flags, words", [
    ({"prompt": "a cat", "best_of": 2}, [], ["line 1", "dino", "image prompt", "clip-t"]),
    ({"prompt": "a cat", "best_of": 0}, [], ["line 1", "at least 1", "0"]),
    ({"prompt": "a cat", "rank_by": "lpips"}, [], ["line 1", "'lpips'", "dino, clip-i, clip-t"]),
    ({"prompt": "a cat", "clip": "x"}, [], ["line 1", "--clip"]),
    ({"prompt": "a cat"}, ["--best-of", "2"], ["line 1", "dino", "clip-t"]),
    ({"prompt": "a cat"}, ["--best-of", "0"], ["--best-of", "at least 1"]),
])
def test_bad_best_of_in_jobs_is_refused_before_any_model_loads(line, flags, words, tiny_models, tmp_path,
                                                              capsys) -> None:
    from videobooth_core.app.cli import main

    (tmp_path / "jobs.jsonl").write_text(json.dumps(line) + "\n")
    assert main(["generate", "--models", str(tiny_models), "--jobs", str(tmp_path / "jobs.jsonl"), "--out-dir",
                 str(tmp_path / "out"), *flags]) == 2
    error = capsys.readouterr().err
    for word in words:
        assert word in error, error
    assert not (tmp_path / "out").exists()
