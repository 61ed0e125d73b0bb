"""The drift readout: per-frame likeness to the image prompt (DINO, else CLIP-I), its figures, the ``evaluate``
summary and report, and the VideoBooth Drift node, on the tiny metric models (CPU, seconds)."""

from __future__ import annotations

import json

import pytest
import torch

from videobooth_core.errors import EvaluationError
from videobooth_core.evaluation.drift import Drift, drift_metric, measure_drift
from videobooth_core.evaluation.metrics import Scorer
from videobooth_core.evaluation.models import find_clip, find_dino, load_clip_for_metrics, load_dino_for_metrics


@pytest.fixture(scope="module")
def scorer(tiny_models) -> Scorer:
    return Scorer(load_clip_for_metrics(find_clip(tiny_models)), load_dino_for_metrics(find_dino(tiny_models)))


def subject(seed: int, size: int = 48) -> torch.Tensor:
    """A patterned subject on white, like a prepared image prompt: (size, size, 3) uint8."""
    generator = torch.Generator().manual_seed(seed)
    image = torch.full((size, size, 3), 255, dtype=torch.uint8)
    image[size // 4:3 * size // 4, size // 4:3 * size // 4] = torch.randint(0, 256, (size // 2, size // 2, 3),
                                                                           generator=generator, dtype=torch.uint8)
    return image


def fading(image: torch.Tensor, frames: int) -> torch.Tensor:
    """The subject fading into the white background, frame 0 the image itself: (frames, H, W, 3) uint8."""
    weight = torch.linspace(0, 1, frames)[:, None, None, None]
    return (image.float() * (1 - weight) + 255 * weight).round().to(torch.uint8)


def test_per_frame_scores_have_one_value_per_frame_and_average_to_the_video_score(scorer) -> None:
    reference = subject(0)
    frames = fading(reference, 40)  # not a multiple of the 16-frame model chunks
    curves = scorer.per_frame(frames, reference, "a dog")
    for key in ("clip_t", "clip_i", "dino"):
        assert curves[key].shape == (40,), key
    assert curves["consistency"].shape == (39,)
    scores = scorer.score(frames, reference, "a dog")
    for key in ("clip_t", "clip_i", "dino", "consistency"):
        assert scores[key] == pytest.approx(float(curves[key].mean()), abs=1e-6), key
    drift = measure_drift(scorer, frames, reference)
    assert drift.metric == "dino" and drift.frames == 40 and drift.mean == pytest.approx(scores["dino"], abs=1e-6)
    # frame by frame: each value is that frame scored alone
    assert drift.per_frame[17] == pytest.approx(scorer.score(frames[17:18], reference)["dino"], abs=1e-5)


@pytest.mark.parametrize("choice, metric, top", [("auto", "dino", 1.0), ("clip-i", "clip_i", 100.0)])
def test_the_image_prompt_repeated_scores_its_maximum_at_every_frame(scorer, choice, metric, top) -> None:
    reference = subject(1)
    drift = measure_drift(scorer, reference[None].repeat(20, 1, 1, 1), reference, choice)
    assert drift.metric == metric and drift.frames == 20
    assert drift.per_frame == pytest.approx([top] * 20, abs=1e-4 * top)
    assert drift.change == pytest.approx(0.0, abs=1e-4 * top) and drift.trend == pytest.approx(0.0, abs=1e-4 * top)


@pytest.mark.parametrize("choice", ["auto", "clip-i"])
def test_a_video_fading_away_from_the_subject_drifts(scorer, choice) -> None:
    reference = subject(2)
    drift = measure_drift(scorer, fading(reference, 8), reference, choice)
    values = drift.per_frame
    assert all(later < earlier for earlier, later in zip(values, values[1:])), values
    assert drift.lowest_frame == 7 and drift.change < 0 and drift.trend < 0
    assert drift.first == pytest.approx(1.0 if drift.metric == "dino" else 100.0, rel=1e-4)


def test_figures_of_a_known_curve() -> None:
    drift = Drift.from_curve(torch.tensor([0.9, 0.95, 0.7, 0.8, 0.5]), "dino")
    assert (drift.first, drift.last, drift.lowest, drift.lowest_frame) == pytest.approx((0.9, 0.5, 0.5, 4))
    assert drift.change == pytest.approx(-0.4) and drift.mean == pytest.approx(0.77)
    assert drift.trend == pytest.approx(-0.095 * 16)  # least-squares slope: -0.95 / 10 per frame
    assert drift.summary() == ("DINO likeness over 5 frames: first 0.900, last 0.500 (-0.400), lowest 0.500 at "
                               "frame 4, trend -1.520 per 16 frames")
    record = drift.as_dict()
    assert record["per_frame"] == pytest.approx([0.9, 0.95, 0.7, 0.8, 0.5]) and record["lowest_frame"] == 4
    assert Drift.from_curve(torch.tensor([0.7]), "dino").trend is None
    assert "trend" not in Drift.from_curve(torch.tensor([0.7]), "dino").summary()


def test_the_metric_is_dino_when_loaded_else_clip_i_and_a_missing_one_is_refused(scorer) -> None:
    clip_only, dino_only = Scorer(clip=scorer.clip), Scorer(dino=scorer.dino)
    assert drift_metric(scorer) == "dino" and drift_metric(clip_only) == "clip_i"
    assert drift_metric(scorer, "clip-i") == "clip_i"
    with pytest.raises(EvaluationError, match="--clip"):
        drift_metric(dino_only, "clip-i")
    with pytest.raises(EvaluationError, match="'lpips'.*auto, dino, clip-i"):
        drift_metric(scorer, "lpips")
    with pytest.raises(EvaluationError, match="image prompt"):
        measure_drift(scorer, subject(3)[None], None)
    with pytest.raises(EvaluationError, match="one value per frame"):
        Drift.from_curve(torch.zeros(2, 3), "dino")


def test_evaluate_prints_the_drift_and_the_report_plots_and_records_it(tiny_models, tmp_path, capsys) -> None:
    from PIL import Image

    from videobooth_core.app.cli import main

    reference = subject(4, 64)
    Image.fromarray(reference.numpy()).save(tmp_path / "subject.png")
    for name, frames in (("steady", reference[None].repeat(6, 1, 1, 1)), ("fading", fading(reference, 6))):
        (tmp_path / name).mkdir()
        for i, frame in enumerate(frames):
            Image.fromarray(frame.numpy()).save(tmp_path / name / f"frame_{i:05d}.png")
    lines = [{"id": "steady", "video": "steady", "prompt": "a dog", "word": "dog", "image": "subject.png"},
             {"id": "fading", "video": "fading", "prompt": "a dog", "word": "dog", "image": "subject.png"},
             {"id": "no_image", "video": "fading", "prompt": "a dog"}]
    (tmp_path / "set.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    out = tmp_path / "eval"
    assert main(["evaluate", "--set", str(tmp_path / "set.jsonl"), "--models", str(tiny_models),
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.count("drift: DINO likeness over 6 frames") == 2  # not for the video without an image prompt
    assert "drift: DINO likeness over 6 frames: first 1.000, last 1.000 (+0.000)" in printed
    videos = {row["id"]: row for row in json.loads((out / "scores.json").read_text())["videos"]}
    assert videos["no_image"]["drift"] is None
    steady, fade = videos["steady"]["drift"], videos["fading"]["drift"]
    assert steady["metric"] == fade["metric"] == "dino" and len(fade["per_frame"]) == 6
    assert fade["per_frame"] == sorted(fade["per_frame"], reverse=True) and fade["lowest_frame"] == 5
    assert fade["mean"] == pytest.approx(videos["fading"]["dino"], abs=1e-6)
    assert fade["trend_per_16_frames"] < 0 and steady["per_frame"] == pytest.approx([1.0] * 6, abs=1e-4)
    chart = Image.open(out / "drift.png")
    assert chart.text["Description"] == "videos: steady, fading" and chart.width > 300
    page = (out / "report.html").read_text()
    assert '<img src="drift.png"' in page and "lowest" in page and page.count("DINO likeness over 6 frames") == 2


def test_drift_node(tiny_models, monkeypatch) -> None:
    from conftest import import_pack

    nodes = import_pack().NODE_CLASS_MAPPINGS
    node = nodes["VideoBoothDrift"]
    assert node.DESCRIPTION and all(spec[1].get("tooltip") for part in node.INPUT_TYPES().values()
                                    for spec in part.values())
    assert len(node.RETURN_TYPES) == len(node.RETURN_NAMES) == len(node.OUTPUT_TOOLTIPS)
    monkeypatch.setenv("VIDEOBOOTH_MODELS_DIR", str(tiny_models))
    (models,) = nodes["VideoBoothMetricModels"]().load("videobooth_tiny_clip/model.safetensors",
                                                        "videobooth_tiny_dino/model.safetensors")
    photo = subject(5)[None].float() / 255
    plot, text = node().drift(fading(subject(5), 5).float() / 255, models, photo, "auto")
    assert plot.ndim == 4 and plot.shape[0] == 1 and plot.shape[-1] == 3 and plot.dtype == torch.float32
    assert 0 <= float(plot.min()) and float(plot.max()) <= 1 and float(plot.std()) > 0.01  # a drawn plot
    summary, values = text.split("\n")
    assert summary.startswith("DINO likeness over 5 frames: first 1.000") and "lowest" in summary
    assert len(values.removeprefix("per frame: ").split(", ")) == 5
    _, clip_text = node().drift(photo.repeat(3, 1, 1, 1), models, photo, "clip-i")
    assert clip_text.startswith("CLIP-I likeness over 3 frames: first 100.00, last 100.00")


def test_without_matplotlib_the_node_is_refused_before_the_models_run_and_the_report_skips_the_chart(
        scorer, tmp_path, monkeypatch) -> None:
    import sys

    from videobooth_core.evaluation.drift import drift_with_plot
    from videobooth_core.evaluation.report import write_drift_chart

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    monkeypatch.setattr(Scorer, "per_frame", lambda *args, **kwargs: pytest.fail("the metric models ran"))
    with pytest.raises(EvaluationError, match="pip install matplotlib"):
        drift_with_plot(scorer, subject(6)[None], subject(6))
    rows = [{"id": "a", "drift": Drift.from_curve(torch.tensor([0.9, 0.8]), "dino").as_dict()}]
    assert write_drift_chart(tmp_path, rows) is None and not (tmp_path / "drift.png").exists()
