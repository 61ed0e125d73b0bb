"""``evaluate --reference``: videos against the reference of the same seed, prompt and image prompt, the latent
MSE per configuration (issue 27's quality readout) on the tiny metric models (CPU, seconds)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from videobooth_core.evaluation.compare import save_latents


def _picture(seed: int, size: int = 48) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (size, size, 3), generator=generator, dtype=torch.uint8)


def _latents(seed: int) -> torch.Tensor:
    return torch.randn(1, 4, 2, 4, 4, generator=torch.Generator().manual_seed(seed))


def _write_sets(folder: Path) -> dict[str, torch.Tensor]:
    """Two cases (seeds 7, 8); the reference (teacher) set, and a student set of two configurations.
    -> every video's latents by its id."""
    from PIL import Image

    for name, seed in (("dog.png", 1), ("cat.png", 2)):
        Image.fromarray(_picture(seed).numpy()).save(folder / name)
    cases = [{"seed": 7, "prompt": "a dog running", "word": "dog", "image": "dog.png"},
             {"seed": 8, "prompt": "a cat sitting", "word": "cat", "image": "cat.png"}]
    latents, sets = {}, {"teacher": [], "student": []}
    for index, (kind, config) in enumerate([("teacher", None), ("student", "lcm 1 steps"),
                                            ("student", "lcm 4 steps")]):
        for number, case in enumerate(cases):
            video_id = f"{kind}{index}_{number}"
            frames = [Image.fromarray(_picture(100 + 10 * index + 2 * number + f).numpy()) for f in range(2)]
            frames[0].save(folder / f"{video_id}.gif", save_all=True, append_images=frames[1:])
            latents[video_id] = _latents(10 * index + number)
            save_latents(folder / f"{video_id}.safetensors", latents[video_id])
            sets[kind].append({"id": video_id, "video": f"{video_id}.gif", "latents": f"{video_id}.safetensors",
                               **case, **({"config": config} if config else {})})
    for kind, lines in sets.items():
        (folder / f"{kind}.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return latents


def test_evaluate_reference_reports_latent_mse_per_configuration_as_computed_by_hand(tiny_models, tmp_path) -> None:
    from PIL import Image

    from videobooth_core.app.cli import main

    latents = _write_sets(tmp_path)
    out = tmp_path / "eval"
    assert main(["evaluate", "--set", str(tmp_path / "student.jsonl"), "--reference", str(tmp_path / "teacher.jsonl"),
                 "--models", str(tiny_models), "--out", str(out)]) == 0

    def by_hand(video_id: str) -> tuple[float, float]:  # its reference: the teacher's video of the same case
        mine, reference = latents[video_id].double(), latents[f"teacher0_{video_id[-1]}"].double()
        mse = ((mine - reference) ** 2).mean().item()
        return mse, mse / (reference ** 2).mean().item()

    scores = json.loads((out / "scores.json").read_text())
    for row in scores["videos"]:
        assert (row["latent_mse"], row["latent_rel_mse"]) == pytest.approx(by_hand(row["id"]), rel=1e-12)
    table = {row["config"]: row for row in csv.DictReader((out / "compare.csv").open())}
    assert list(table) == ["reference", "lcm 1 steps", "lcm 4 steps"]
    for index, config in ((1, "lcm 1 steps"), (2, "lcm 4 steps")):
        expected = [sum(by_hand(f"student{index}_{n}")[k] for n in (0, 1)) / 2 for k in (0, 1)]
        assert float(table[config]["latent_mse"]) == pytest.approx(expected[0], rel=1e-5)
        assert float(table[config]["latent_rel_mse"]) == pytest.approx(expected[1], rel=1e-5)
        assert table[config]["videos"] == "2"
    assert float(table["reference"]["latent_mse"]) == 0.0
    teacher = {row["id"]: row for row in scores["reference"]["videos"]}
    assert set(teacher) == {"teacher0_0", "teacher0_1"}
    assert float(table["reference"]["dino"]) == pytest.approx((teacher["teacher0_0"]["dino"] +
                                                               teacher["teacher0_1"]["dino"]) / 2, abs=1e-6)
    assert "| lcm 4 steps | 2 |" in (out / "compare.md").read_text()
    header = (out / "scores.csv").read_text().splitlines()[0].split(",")
    assert header[-3:] == ["consistency", "latent_mse", "latent_rel_mse"] and "config" in header
    chart = Image.open(out / "chart_compare.png")
    assert chart.text["Description"] == "configurations: reference, lcm 1 steps, lcm 4 steps"


def test_a_video_without_a_reference_is_refused_before_any_metric_model_loads(tiny_models, tmp_path, capsys,
                                                                               monkeypatch) -> None:
    from videobooth_core.app.cli import main
    from videobooth_core.evaluation import cli

    _write_sets(tmp_path)
    teacher = (tmp_path / "teacher.jsonl").read_text().splitlines()
    (tmp_path / "teacher.jsonl").write_text(teacher[0] + "\n")  # the seed-8 cat case has no reference now
    monkeypatch.setattr(cli, "load_scorer", lambda *a, **k: pytest.fail("metric models loaded before the check"))
    assert main(["evaluate", "--set", str(tmp_path / "student.jsonl"), "--reference", str(tmp_path / "teacher.jsonl"),
                 "--models", str(tiny_models), "--out", str(tmp_path / "eval")]) == 2
    error = capsys.readouterr().err
    for word in ("student1_1", "seed 8", "'a cat sitting'", "cat.png", "reference set"):
        assert word in error, error
    assert not (tmp_path / "eval" / "scores.json").exists()


def test_latents_of_another_shape_than_the_reference_are_refused(tmp_path) -> None:
    from videobooth_core.errors import EvaluationError
    from videobooth_core.evaluation.compare import latent_mse

    with pytest.raises(EvaluationError, match=r"\(4, 2, 4, 4\) differs from its reference's \(4, 3, 4, 4\)"):
        latent_mse(torch.zeros(4, 2, 4, 4), torch.zeros(4, 3, 4, 4))


def test_a_video_or_reference_without_latents_keeps_an_empty_latent_mse_and_says_so(tmp_path, caplog) -> None:
    from videobooth_core.evaluation.compare import latent_columns, match_references
    from videobooth_core.evaluation.media import read_set

    _write_sets(tmp_path)
    lines = [json.loads(line) for line in (tmp_path / "student.jsonl").read_text().splitlines()]
    del lines[0]["latents"]
    (tmp_path / "student.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    items, references = read_set(tmp_path / "student.jsonl"), read_set(tmp_path / "teacher.jsonl")
    with caplog.at_level("WARNING"):
        columns = latent_columns(items, match_references(items, references, "teacher.jsonl"))
    assert columns["student1_0"] == {"latent_mse": None, "latent_rel_mse": None}
    assert columns["student1_1"]["latent_mse"] > 0
    assert "student1_0: it has no 'latents' file" in caplog.text


# -- the command-line road: generate --save-latents (batch jobs) -> evaluate --manifest --reference ----------------
@pytest.fixture(scope="module")
def latent_runs(tiny_models, tmp_path_factory) -> tuple[Path, dict[str, list[str]]]:
    """Issue 27's readout from the command line on the tiny models: a "teacher" (ddim, 3 steps) and a "student"
    (ddim, 1 step) jobs run of the same two seeds, prompt and image prompt, both saving their latents: the teacher
    by ``--save-latents`` (every line's default), the student by its lines' ``save_latents`` key.
    -> (the folder, each run's command line)."""
    from PIL import Image

    from videobooth_core.app.cli import main

    folder = tmp_path_factory.mktemp("latent_runs")
    Image.fromarray(_picture(1, 64).numpy()).save(folder / "dog.png")
    case = {"prompt": "a dog running", "word": "dog", "image": "dog.png"}
    for run, extra in (("teacher", {}), ("student", {"save_latents": True})):
        (folder / f"{run}.jsonl").write_text("".join(json.dumps({"id": f"seed{seed}", **case, "seed": seed, **extra})
                                                     + "\n" for seed in (7, 8)))
    small = ["--frames", "2", "--width", "64", "--height", "64", "--sampler", "ddim"]
    commands = {run: ["generate", "--models", str(tiny_models), "--jobs", str(folder / f"{run}.jsonl"), "--out-dir",
                      str(folder / run), *small, *flags]
                for run, flags in (("teacher", ["--steps", "3", "--save-latents"]), ("student", ["--steps", "1"]))}
    for command in commands.values():
        assert main(command) == 0
    return folder, commands


def test_latents_saved_by_two_jobs_runs_give_evaluate_reference_the_latent_mse_by_hand(latent_runs,
                                                                                        tiny_models) -> None:
    from safetensors.torch import load_file

    from videobooth_core.app.cli import main

    folder, _ = latent_runs
    saved = {}
    for run in ("teacher", "student"):  # the manifest names each item's latents file, beside its video
        for item in json.loads((folder / run / "manifest.json").read_text())["items"]:
            assert item["latents"] == item["output"] + ".latents.safetensors" == f"{item['id']}.gif.latents.safetensors"
            tensor = load_file(folder / run / item["latents"])["latents"]
            assert tensor.dtype == torch.float32 and tensor.shape == (1, 4, 2, 8, 8)
            saved[run, item["seed"]] = tensor
    assert sorted(saved) == [("student", 7), ("student", 8), ("teacher", 7), ("teacher", 8)]
    out = folder / "eval"
    assert main(["evaluate", "--manifest", str(folder / "student"), "--reference",
                 str(folder / "teacher" / "manifest.json"), "--models", str(tiny_models), "--out", str(out)]) == 0

    by_hand = {seed: float(((saved["student", seed].double() - saved["teacher", seed].double()) ** 2).mean())
               for seed in (7, 8)}
    assert all(mse > 0 for mse in by_hand.values())  # 1 step is not 3 steps: the comparison measures something
    scores = json.loads((out / "scores.json").read_text())
    assert {row["id"]: row["latent_mse"] for row in scores["videos"]} == pytest.approx(
        {f"seed{seed}": mse for seed, mse in by_hand.items()}, rel=1e-12)
    table = {row["config"]: row for row in csv.DictReader((out / "compare.csv").open())}
    assert list(table) == ["reference", "ddim 1 steps"]
    assert table["ddim 1 steps"]["videos"] == "2"
    assert float(table["ddim 1 steps"]["latent_mse"]) == pytest.approx(sum(by_hand.values()) / 2, rel=1e-5)


def test_a_resumed_job_whose_latents_file_is_gone_is_redone(latent_runs, capsys) -> None:
    from safetensors.torch import load_file

    from videobooth_core.app.cli import main

    folder, commands = latent_runs
    student = folder / "student"
    first, second = json.loads((student / "manifest.json").read_text())["items"]
    gone, kept = student / first["latents"], student / second["latents"]
    before, kept_stamp = load_file(gone)["latents"], kept.stat().st_mtime_ns
    gone.unlink()
    capsys.readouterr()
    assert main(commands["student"]) == 0
    captured = capsys.readouterr()
    assert f"redoing {first['id']}" in captured.err
    summary = json.loads(captured.out.split("finished: ", 1)[1].splitlines()[0])
    assert (summary["done"], summary["skipped"]) == (1, 1)
    assert torch.equal(load_file(gone)["latents"], before)  # the same job again: the same latents
    assert kept.stat().st_mtime_ns == kept_stamp  # the finished one untouched
    assert json.loads((student / "manifest.json").read_text())["items"][0]["latents"] == first["latents"]
