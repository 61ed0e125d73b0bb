"""Batch jobs (``generate --jobs FILE.jsonl --out-dir DIR``) on the tiny model set: a single-process run, a
resume that redoes nothing, a two-rank CPU run under torchrun, a kill -9 and resume, and bad jobs files."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import SMALL, ok, read_frames, run_cli, start_cli

IDS = ["ball-mask", "00002", "dog", "00005"]
OUTPUTS = {"ball-mask": "ball-mask.gif", "00002": "boxed.webp", "dog": "videos/dog_frames", "00005": "00005.gif"}


def _command(tiny_models: Path, jobs: Path, out_dir: Path, *extra: str) -> list[str]:
    return ["generate", "--models", str(tiny_models), "--jobs", str(jobs), "--out-dir", str(out_dir), *extra]


def _finished(result: subprocess.CompletedProcess) -> list[dict]:
    """The closing summary line of every rank."""
    return [json.loads(line.split("finished: ", 1)[1]) for line in result.stdout.splitlines() if "finished: " in line]


def _leftovers(out_dir: Path) -> list[Path]:
    """Temporary files of an interrupted write: write_frames' .videobooth-* folders, *.partial files."""
    return [p for p in out_dir.rglob("*") if p.name.startswith(".videobooth-") or p.name.endswith(".partial")]


def _visible(out_dir: Path) -> set[str]:
    """Top-level-or-nested visible entries, as paths relative to out_dir (hidden state folder excluded)."""
    found = set()
    for p in out_dir.rglob("*"):
        rel = p.relative_to(out_dir)
        if not any(part.startswith(".") for part in rel.parts):
            found.add(rel.as_posix())
    return found


# -- fixtures ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def jobs_file(tmp_path_factory) -> Path:
    """Four jobs: two with an image prompt (mask; bbox), two text-only; a blank line (ids follow line numbers)."""
    from PIL import Image

    from videobooth_core.app.demo import synthetic_subject

    folder = tmp_path_factory.mktemp("jobs")
    (folder / "subject").mkdir()
    image, mask = synthetic_subject(width=96, height=80)
    Image.fromarray(image.numpy()).save(folder / "subject" / "ball.png")
    Image.fromarray(mask.numpy().astype(np.uint8) * 255).save(folder / "subject" / "ball_mask.png")
    lines = [
        {"id": "ball-mask", "prompt": "a ball rolling on the grass", "word": "ball", "image": "subject/ball.png",
         "mask": "subject/ball_mask.png"},
        {"prompt": "a red ball on a table", "word": "ball", "image": str(folder / "subject" / "ball.png"),
         "bbox": [20, 10, 90, 75], "seed": 3, "out": "boxed.webp"},
        {"id": "dog", "prompt": "a dog running on the beach", "out": "videos/dog_frames", "cfg": 6},
    ]
    text = "\n".join(json.dumps(line) for line in lines) + "\n\n"
    text += json.dumps({"prompt": "a cat sleeping on a sofa", "steps": 3, "seed": 11}) + "\n"
    path = folder / "jobs.jsonl"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def single_run(tiny_models, jobs_file, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    out_dir = tmp_path_factory.mktemp("single") / "out"
    result = run_cli(_command(tiny_models, jobs_file, out_dir, *SMALL), out_dir.parent / "home")
    return out_dir, result


def _check_complete(out_dir: Path, expected_settings: bool = True) -> dict:
    for job_id, output in OUTPUTS.items():
        frames = read_frames(out_dir / output)
        assert len(frames) == 4 and frames[0].shape == (64, 64, 3), job_id
    manifest = json.loads((out_dir / "manifest.json").read_text())
    assert manifest["complete"] is True and manifest["total"] == 4 and manifest["finished"] == 4
    assert manifest["pending"] == []
    assert [item["id"] for item in manifest["items"]] == IDS
    for item in manifest["items"]:
        assert item["output"] == OUTPUTS[item["id"]]
        assert item["seconds"] > 0 and item["seed"] == item["settings"]["seed"]
        record = json.loads((out_dir / ".videobooth" / "done" / f"{item['id']}.json").read_text())
        assert {k: v for k, v in record.items() if k != "fingerprint"} == item
    if expected_settings:
        items = {item["id"]: item for item in manifest["items"]}
        assert items["00002"]["seed"] == 3 and items["00002"]["settings"]["bbox"] == [20.0, 10.0, 90.0, 75.0]
        subject = Path(manifest["jobs_file"]).parent / "subject" / "ball.png"  # resolved next to the jobs file
        assert items["ball-mask"]["settings"]["image"] == str(subject)
        assert items["dog"]["settings"]["cfg"] == 6.0 and items["dog"]["settings"]["word"] is None
        assert items["00005"]["settings"]["steps"] == 3 and items["00005"]["settings"]["frames"] == 4
        assert items["ball-mask"]["prompt_used"] == "a sdksd rolling on the grass"
    assert _leftovers(out_dir) == []
    assert _visible(out_dir) == {"manifest.json", "ball-mask.gif", "boxed.webp", "00005.gif", "videos",
                                 "videos/dog_frames", *(f"videos/dog_frames/frame_{i:05d}.png" for i in range(4))}
    return manifest


# -- runs --------------------------------------------------------------------------------------------------
def test_single_process_run_writes_every_item_and_the_manifest(single_run) -> None:
    out_dir, result = single_run
    ok(result)
    _check_complete(out_dir)
    (summary,) = _finished(result)
    assert summary["done"] == 4 and summary["skipped"] == 0 and summary["failed"] == 0 and summary["jobs"] == 4
    assert summary["seconds"] > 0 and summary["peak_rss_mb"] > 0 and summary["finished"] == 4
    done_lines = [line for line in result.stdout.splitlines() if line.startswith("done ")]
    assert [line.split()[1] for line in done_lines] == IDS  # one progress line per finished item
    assert all('"seconds"' in line and '"seed"' in line for line in done_lines)


def test_resume_redoes_nothing(tiny_models, jobs_file, single_run) -> None:
    out_dir, first = single_run
    ok(first)
    watched = [p for p in out_dir.rglob("*") if p.is_file() and p.name != "manifest.json"]
    before = {p: p.stat().st_mtime_ns for p in watched}
    result = ok(run_cli(_command(tiny_models, jobs_file, out_dir, *SMALL), out_dir.parent / "home"))
    (summary,) = _finished(result)
    assert summary["done"] == 0 and summary["skipped"] == 4 and summary["failed"] == 0
    assert "models loaded" not in result.stderr  # nothing to do: the models are not even loaded
    assert {p: p.stat().st_mtime_ns for p in watched} == before
    _check_complete(out_dir)


def test_a_changed_line_is_redone_and_only_it(tiny_models, jobs_file, single_run, tmp_path) -> None:
    out_dir, first = single_run
    ok(first)
    copy = tmp_path / "out"
    shutil.copytree(out_dir, copy)  # copy2 keeps the mtimes
    changed = jobs_file.with_name("jobs_changed.jsonl")
    lines = jobs_file.read_text().splitlines()
    dog = json.loads(lines[2])
    lines[2] = json.dumps({**dog, "seed": 99})
    changed.write_text("\n".join(lines) + "\n")
    before = {p: p.stat().st_mtime_ns for p in copy.rglob("*") if p.is_file()}
    result = ok(run_cli(_command(tiny_models, changed, copy, *SMALL), tmp_path / "home"))
    (summary,) = _finished(result)
    assert summary["done"] == 1 and summary["skipped"] == 3
    assert "redoing dog" in result.stderr
    for path, mtime in before.items():
        if "dog" not in path.relative_to(copy).as_posix() and path.name != "manifest.json":
            assert path.stat().st_mtime_ns == mtime, path
    manifest = json.loads((copy / "manifest.json").read_text())
    assert {item["id"]: item["seed"] for item in manifest["items"]}["dog"] == 99
    assert not np.array_equal(read_frames(copy / OUTPUTS["dog"])[0], read_frames(out_dir / OUTPUTS["dog"])[0])


def test_two_rank_cpu_run_under_torchrun(tiny_models, jobs_file, single_run, tmp_path) -> None:
    out_dir = tmp_path / "out"
    result = ok(run_cli(_command(tiny_models, jobs_file, out_dir, *SMALL), tmp_path / "home", torchrun=2))
    _check_complete(out_dir)
    summaries = sorted(_finished(result), key=lambda s: s["rank"])
    assert [(s["rank"], s["world_size"], s["done"], s["skipped"]) for s in summaries] == [(0, 2, 2, 0), (1, 2, 2, 0)]
    assert summaries[0]["finished"] == 4 and summaries[0]["total"] == 4  # rank 0's final manifest has everything
    ranks = {}
    for job_id in IDS:
        record = json.loads((out_dir / ".videobooth" / "done" / f"{job_id}.json").read_text())
        assert record["world_size"] == 2 and record["device"] == "cpu"
        ranks.setdefault(record["rank"], []).append(job_id)
    assert ranks == {0: ["ball-mask", "dog"], 1: ["00002", "00005"]}  # job i -> rank i % 2
    # the seed, not the rank, decides the frames: identical to the single-process run
    single_dir, single_result = single_run
    ok(single_result)
    for output in OUTPUTS.values():
        a, b = read_frames(out_dir / output), read_frames(single_dir / output)
        assert len(a) == len(b) == 4 and all(np.array_equal(x, y) for x, y in zip(a, b)), output


def test_kill_and_resume(tiny_models, jobs_file, tmp_path) -> None:
    out_dir = tmp_path / "out"
    jobs = tmp_path / "slow.jsonl"  # three slow items (60 steps, about 2 s each here)
    subject = jobs_file.parent / "subject"
    jobs.write_text("\n".join(json.dumps(line) for line in [
        {"id": "a", "prompt": "a ball rolling", "word": "ball", "image": str(subject / "ball.png"),
         "mask": str(subject / "ball_mask.png")},
        {"id": "b", "prompt": "a dog running on the beach"},
        {"id": "c", "prompt": "a cat sleeping on a sofa", "out": "c.webp"},
    ]) + "\n")
    args = _command(tiny_models, jobs, out_dir, "--frames", "4", "--width", "64", "--height", "64", "--steps", "60")
    home = tmp_path / "home"
    home.mkdir()
    proc = start_cli(args, home, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first_record = out_dir / ".videobooth" / "done" / "a.json"
    deadline = time.monotonic() + 120
    try:
        while not first_record.exists():
            assert proc.poll() is None, "the run ended before its first item was done"
            assert time.monotonic() < deadline, "the first item took too long"
            time.sleep(0.02)
    finally:
        os.kill(proc.pid, signal.SIGKILL)  # in the middle of item b
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    first_mtimes = {p: p.stat().st_mtime_ns for p in (out_dir / "a.gif", first_record)}

    # only complete files are visible: item a (and the manifest, if its rebuild got that far)
    visible = _visible(out_dir)
    assert visible in ({"a.gif"}, {"a.gif", "manifest.json"}), visible
    assert len(read_frames(out_dir / "a.gif")) == 4
    if "manifest.json" in visible:
        manifest = json.loads((out_dir / "manifest.json").read_text())
        assert [item["id"] for item in manifest["items"]] == ["a"] and manifest["pending"] == ["b", "c"]
    # what a kill during a write would leave (files.atomic_path's temporary file and folder, a half-written
    # record), next to a user's file that merely looks similar (never touched)
    (out_dir / ".videobooth-b.gif.x1y2z3.partial").write_bytes(b"GIF89a half")
    (out_dir / ".videobooth-frames.q7.partial").mkdir()
    (out_dir / ".videobooth-frames.q7.partial" / "frame_00000.png").write_bytes(b"half")
    (out_dir / ".videobooth" / "done" / ".videobooth-b.json.123.partial").write_text("{")
    (out_dir / "download.partial").write_text("the user's")

    result = ok(run_cli(args, home))
    (summary,) = _finished(result)
    assert summary["done"] == 2 and summary["skipped"] == 1 and summary["failed"] == 0
    assert "removed" in result.stderr and ".videobooth-b.gif.x1y2z3.partial" in result.stderr
    assert {p: p.stat().st_mtime_ns for p in first_mtimes} == first_mtimes  # a was not redone
    assert (out_dir / "download.partial").read_text() == "the user's"
    (out_dir / "download.partial").unlink()
    assert _leftovers(out_dir) == []
    assert _visible(out_dir) == {"a.gif", "b.gif", "c.webp", "manifest.json"}
    for output in ("a.gif", "b.gif", "c.webp"):
        assert len(read_frames(out_dir / output)) == 4
    manifest = json.loads((out_dir / "manifest.json").read_text())
    assert manifest["complete"] and [item["id"] for item in manifest["items"]] == ["a", "b", "c"]


def test_missing_weights_end_the_run_before_anything_is_written(tiny_models, jobs_file, tmp_path) -> None:
    models = tmp_path / "models"
    shutil.copytree(tiny_models, models)
    (models / "videobooth" / "mapper.pt").unlink()
    out_dir = tmp_path / "out"
    result = run_cli(_command(models, jobs_file, out_dir, *SMALL), tmp_path / "home")
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and "mapper" in errors[0], result.stderr
    assert not out_dir.exists()


# -- bad jobs files ------------------------------------------------------------------------------------------
BAD_JOBS = {
    # name: (lines, words the error line must contain)
    "invalid_json": (['{"prompt": "a dog running"}', '{"prompt": "a cat"'], ["line 2", "not valid JSON"]),
    "unknown_key": (['{"prompt": "a dog running", "promt": "x"}'], ["line 1", "unknown key 'promt'"]),
    "bad_type": (['{"prompt": "a dog running"}', '{"prompt": "a cat", "frames": "many"}'],
                 ["line 2", "'frames' must be a whole number"]),
    "zero_frames": (['{"prompt": "a dog"}', "", '{"prompt": "a cat", "frames": 0}'],
                    ["line 3", "'frames' must be at least 1"]),
    "size_not_multiple_of_8": (['{"prompt": "a cat", "width": 65}'], ["line 1", "width", "multiple of 8"]),
    "word_not_in_prompt": (['{"prompt": "a dog running", "word": "ball", "image": "subject/ball.png"}'],
                           ["line 1", "'ball' is not in the prompt"]),
    "missing_image": (['{"prompt": "a ball", "word": "ball", "image": "subject/nope.png"}'], ["line 1", "nope.png", "not found"]),
    "image_without_word": (['{"prompt": "a ball", "image": "subject/ball.png"}'],
                           ["line 1", "needs both the image and the subject word", "give both ('image' and 'word')"]),
    "duplicate_id": (['{"id": "x", "prompt": "a dog"}', '{"id": "x", "prompt": "a cat"}'], ["line 2", "'x'", "line 1"]),
    "duplicate_out": (['{"prompt": "a dog", "out": "v.gif"}', '{"prompt": "a cat", "out": "v.gif"}'], ["line 2", "v.gif"]),
    "out_escapes": (['{"prompt": "a dog", "out": "../v.gif"}'], ["line 1", "'out'", "../v.gif"]),
    "out_is_the_out_dir": (['{"prompt": "a dog", "out": "."}'], ["line 1", "'out'", "not the folder itself"]),
    "out_in_the_state_folder": (['{"prompt": "a dog", "out": ".videobooth/x.gif"}'], ["line 1", "'out'", "hidden"]),
    "out_inside_png_folder": (['{"prompt": "a dog", "out": "clips"}', '{"prompt": "a cat", "out": "clips/cat.gif"}'],
                              ["line 2", "inside the PNG folder 'clips'", "line 1"]),
    "per_run_key": (['{"prompt": "a dog", "dtype": "fp16"}'], ["line 1", "--dtype"]),
    "empty_file": (["", ""], ["holds no jobs"]),
}
CLI_CASES = ("invalid_json", "zero_frames", "word_not_in_prompt")


def _write_bad(jobs_file: Path, tmp_path: Path, lines: list[str]) -> Path:
    path = jobs_file.parent / f"bad_{tmp_path.name}.jsonl"  # next to subject/, for the relative image paths
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("case", list(BAD_JOBS))
def test_bad_jobs_file_is_refused_before_anything_is_written(case, jobs_file, tmp_path) -> None:
    from videobooth_core.errors import VideoBoothError
    from videobooth_core.app.jobs import load_jobs

    lines, words = BAD_JOBS[case]
    path = _write_bad(jobs_file, tmp_path, lines)
    with pytest.raises(VideoBoothError) as caught:
        load_jobs(path)
    message = str(caught.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message


@pytest.mark.parametrize("case", CLI_CASES)
def test_bad_jobs_file_from_the_command_line(case, tiny_models, jobs_file, tmp_path) -> None:
    lines, words = BAD_JOBS[case]
    path = _write_bad(jobs_file, tmp_path, lines)
    out_dir = tmp_path / "out"
    result = run_cli(_command(tiny_models, path, out_dir, *SMALL), tmp_path / "home")
    assert result.returncode == 2, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    error_lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(error_lines) == 1 and error_lines[0].startswith("error: "), result.stderr
    for word in words:
        assert word in error_lines[0], error_lines[0]
    assert not out_dir.exists()  # nothing written, not even the folder
    assert result.stdout == ""


def test_jobs_defaults_ids_and_paths(jobs_file) -> None:
    from videobooth_core.app.jobs import load_jobs

    jobs = load_jobs(jobs_file, {"steps": 7, "frames": 5, "seed": 1})
    assert [job.id for job in jobs] == IDS and [job.line for job in jobs] == [1, 2, 3, 5]
    assert [job.out for job in jobs] == [OUTPUTS[i] for i in IDS]
    assert jobs[0].image == str(jobs_file.parent / "subject" / "ball.png")  # relative to the jobs file
    assert jobs[0].settings["steps"] == 7 and jobs[3].settings["steps"] == 3  # command line default, line wins
    assert jobs[0].settings["seed"] == 1 and jobs[1].settings["seed"] == 3
    assert jobs[0].settings["frames"] == 5 and jobs[0].settings["width"] == 256
    assert jobs[2].word is None and jobs[2].image is None and jobs[2].settings["cfg"] == 6.0


def test_jobs_flag_conflicts_with_single_video_flags(tiny_models, jobs_file, tmp_path, capsys) -> None:
    from videobooth_core.app.cli import main

    code = main(["generate", "--models", str(tiny_models), "--jobs", str(jobs_file), "--out-dir",
                 str(tmp_path / "out"), "--prompt", "a dog"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --prompt does not go with --jobs")
    assert not (tmp_path / "out").exists()
