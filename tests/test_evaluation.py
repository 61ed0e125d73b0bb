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
