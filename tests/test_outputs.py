"""Nothing lost, no traceback: existing outputs are refused before any model loads (a user's folder is never
deleted, not even with --overwrite), outputs appear atomically, out of memory and write errors are one line
naming the fix, an unexpected error is one line plus a log with the traceback, and in a batch a job that fails
is recorded and the rest go on. In-process, with the pipeline replaced by a fake where sampling is not the
point (the real pipeline runs in test_cli.py and test_jobs.py)."""

from __future__ import annotations

import errno
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from videobooth_core import video_io
from videobooth_core.app.cli import main
from videobooth_core.errors import OutputError
from videobooth_core.pipeline import VideoBoothPipeline

SMALL = ["--frames", "2", "--width", "64", "--height", "64", "--steps", "1"]
FRAMES = torch.arange(2 * 16 * 16 * 3, dtype=torch.int64).remainder(251).to(torch.uint8).reshape(2, 16, 16, 3)


class FakePipeline:
    """Stands in for a loaded pipeline: ``fail`` maps a prompt to the exception its generation raises."""

    def __init__(self, fail: dict[str, BaseException] | None = None) -> None:
        self.fail = fail or {}
        self.prompts: list[str] = []

    def generate(self, request, callback=None):
        self.prompts.append(request.prompt)
        if request.prompt in self.fail:
            raise self.fail[request.prompt]
        return SimpleNamespace(frames=FRAMES, prompt_used=request.prompt, info={}, image_prompt=None)


@pytest.fixture(autouse=True)
def cache(monkeypatch, tmp_path_factory) -> Path:
    """The cache folder, where the command line writes its error logs (never the real one)."""
    folder = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("XDG_CACHE_HOME", str(folder))
    return folder


@pytest.fixture
def fake(monkeypatch) -> FakePipeline:
    pipe = FakePipeline()
    monkeypatch.setattr(VideoBoothPipeline, "from_models_dir", staticmethod(lambda *args, **kwargs: pipe))
    return pipe


@pytest.fixture
def no_models(monkeypatch) -> None:
    """Loading a model is a test failure: every refusal must come before it."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the output was checked")

    monkeypatch.setattr(VideoBoothPipeline, "from_models_dir", staticmethod(refuse))


def _error_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert "Traceback" not in captured.err + captured.out
    return lines[0]


def _tree(folder: Path) -> dict[str, bytes | None]:
    """Every path under ``folder`` with its content (None for folders): compared before and after."""
    return {p.relative_to(folder).as_posix(): None if p.is_dir() else p.read_bytes() for p in folder.rglob("*")}


def _generate(models: Path, out: str | Path, *extra: str) -> int:
    return main(["generate", "--models", str(models), "--prompt", "a dog running", *SMALL, "--out", str(out), *extra])


# -- single run: existing outputs ---------------------------------------------------------------------------------
def _user_folder(root: Path) -> Path:
    (root / "photos").mkdir()
    (root / "photos" / "holiday.jpg").write_bytes(b"the user's photo")
    (root / "photos" / "frame_00000.png").write_bytes(b"looks like ours, is not alone")
    return root / "photos"


EXISTING = {
    # name: (make the existing target under root -> the --out value, words of the error line)
    "folder_with_a_users_file": (_user_folder, ["existing folder", "never deleted", "photos"]),
    "current_folder": (lambda root: (root / "keep.txt").write_text("mine") and Path("."), ["current", "'.'"]),
    "parent_folder": (lambda root: (root / "keep.txt").write_text("mine") and Path(".."), ["existing folder", "'..'"]),
    "file_without_suffix": (lambda root: (root / "notes").write_text("mine") and root / "notes", ["taken by a file"]),
    "folder_named_like_a_video": (lambda root: (root / "x.gif").mkdir() or root / "x.gif",
                                  ["existing folder", "x.gif"]),
    "video_file": (lambda root: (root / "clip.gif").write_bytes(b"GIF89a mine") and root / "clip.gif",
                   ["already exists", "--overwrite"]),
}


# with --overwrite too, except for a video file: that one is replaced (see the test below)
@pytest.mark.parametrize(("case", "overwrite"), [(case, overwrite) for case in EXISTING for overwrite in (False, True)
                                                 if not (case == "video_file" and overwrite)])
def test_an_existing_output_is_refused_before_any_model_loads(case, overwrite, tiny_models, tmp_path, monkeypatch,
                                                             capsys, no_models) -> None:
    make, words = EXISTING[case]
    root = tmp_path / "work" / "here"
    root.mkdir(parents=True)
    monkeypatch.chdir(root)
    out = make(root)
    before = _tree(tmp_path / "work")
    assert _generate(tiny_models, out, *(["--overwrite"] if overwrite else [])) == 2
    line = _error_line(capsys)
    for word in words if not overwrite else words[:1]:
        assert word in line, line
    assert _tree(tmp_path / "work") == before  # nothing deleted, nothing left behind


def test_overwrite_replaces_only_what_the_command_writes(tiny_models, tmp_path, capsys, fake) -> None:
    work = tmp_path / "work"
    (work / "frames").mkdir(parents=True)
    (work / "clip.gif").write_bytes(b"GIF89a an old result")
    for i in range(5):  # an earlier, longer result
        (work / "frames" / f"frame_{i:05d}.png").write_bytes(b"old")
    for out in ("clip.gif", "frames"):
        code = _generate(tiny_models, work / out, "--overwrite")
        assert code == 0, capsys.readouterr().err
    assert sorted(p.name for p in (work / "frames").iterdir()) == ["frame_00000.png", "frame_00001.png"]
    assert (work / "clip.gif").read_bytes().startswith(b"GIF89a") and (work / "clip.gif").stat().st_size > 100
    assert sorted(p.name for p in work.iterdir()) == ["clip.gif", "frames"]  # nothing left behind


def test_write_frames_refuses_a_target_that_appeared_during_the_run(tmp_path) -> None:
    (tmp_path / "late.webp").write_bytes(b"made meanwhile")
    with pytest.raises(OutputError, match="already exists"):
        video_io.write_frames(FRAMES, tmp_path / "late.webp")
    assert (tmp_path / "late.webp").read_bytes() == b"made meanwhile"


# -- single run: failures after the models are loaded -------------------------------------------------------------
def test_a_write_error_is_one_line_and_leaves_nothing(tiny_models, tmp_path, monkeypatch, capsys, fake) -> None:
    class FullDisk:
        def save(self, *args, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(video_io, "_pil", lambda frame: FullDisk())
    work = tmp_path / "work"
    work.mkdir()
    for out in ("clip.gif", "frames"):
        assert _generate(tiny_models, work / out) == 2
        line = _error_line(capsys)
        assert "No space left on device" in line and out in line and "free space" in line
    assert list(work.iterdir()) == []  # no output, no temporary file


OUT_OF_MEMORY = {
    "cuda": torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity\n"
                                   "of 8 GiB of which 1.2 GiB is free."),
    "cpu_allocator": RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: not enough memory: "
                                  "you tried to allocate 4294967296 bytes."),
    "python": MemoryError(),
}


@pytest.mark.parametrize("case", list(OUT_OF_MEMORY))
def test_out_of_memory_is_one_line_naming_the_fixes(case, tiny_models, tmp_path, cache, capsys, fake) -> None:
    fake.fail["a dog running"] = OUT_OF_MEMORY[case]
    assert _generate(tiny_models, tmp_path / "clip.gif") == 2
    line = _error_line(capsys)
    assert "out of memory" in line
    for fix in ("--stream-weights", "--dtype bf16", "--frames", "--width"):
        assert fix in line, line
    assert list(tmp_path.iterdir()) == []  # no output
    assert list(cache.iterdir()) == []  # not taken for a bug: no error log


def test_an_unexpected_error_is_one_line_and_a_log_with_the_traceback(tiny_models, tmp_path, cache, capsys,
                                                                     fake) -> None:
    fake.fail["a dog running"] = ZeroDivisionError("float division by zero")
    assert _generate(tiny_models, tmp_path / "clip.gif") == 1
    line = _error_line(capsys)
    assert "unexpected ZeroDivisionError: float division by zero" in line
    (log,) = (cache / "videobooth" / "logs").iterdir()
    assert str(log) in line
    text = log.read_text()
    assert "Traceback" in text and "ZeroDivisionError" in text and "generate" in text  # the command line too
    assert not (tmp_path / "clip.gif").exists()


def test_interrupt_exits_130(tiny_models, tmp_path, capsys, fake) -> None:
    fake.fail["a dog running"] = KeyboardInterrupt()
    assert _generate(tiny_models, tmp_path / "clip.gif") == 130
    assert _error_line(capsys) == "error: interrupted"


# -- batch jobs ---------------------------------------------------------------------------------------------------
def _batch(models: Path, lines: list[dict], out_dir: Path, *extra: str) -> int:
    jobs = out_dir.parent / "jobs.jsonl"
    jobs.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return main(["generate", "--models", str(models), "--jobs", str(jobs), "--out-dir", str(out_dir), *SMALL, *extra])


@pytest.mark.parametrize("out", [".", "../x.gif", "./", "/tmp/x.gif"])
def test_a_job_out_outside_the_out_dir_is_refused(out, tiny_models, tmp_path, capsys, no_models) -> None:
    out_dir = tmp_path / "renders"
    out_dir.mkdir()
    (out_dir / "precious.txt").write_text("the user's")
    before = _tree(out_dir)
    assert _batch(tiny_models, [{"prompt": "a dog running", "out": out}], out_dir) == 2
    line = _error_line(capsys)
    assert "line 1" in line and "'out'" in line
    assert _tree(out_dir) == before and sorted(p.name for p in tmp_path.iterdir()) == ["jobs.jsonl", "renders"]


@pytest.mark.parametrize("overwrite", [False, True], ids=["plain", "overwrite"])
def test_a_job_never_replaces_a_users_files(overwrite, tiny_models, tmp_path, capsys, no_models) -> None:
    out_dir = tmp_path / "renders"
    (out_dir / "mine").mkdir(parents=True)
    (out_dir / "mine" / "holiday.jpg").write_text("the user's")
    (out_dir / "clip.gif").write_bytes(b"GIF89a the user's")
    before = _tree(out_dir)
    lines = [{"prompt": "a dog running", "out": "mine" if overwrite else "clip.gif"}]
    assert _batch(tiny_models, lines, out_dir, *(["--overwrite"] if overwrite else [])) == 2
    line = _error_line(capsys)
    assert "line 1" in line and ("never deleted" if overwrite else "not written by this job") in line, line
    assert _tree(out_dir) == before


def test_a_failing_job_is_recorded_the_batch_goes_on_and_a_rerun_retries_it(tiny_models, tmp_path, monkeypatch,
                                                                             capsys, fake) -> None:
    out_dir = tmp_path / "renders"
    lines = [{"id": "big", "prompt": "a huge dog"}, {"id": "ok", "prompt": "a dog running"},
             {"id": "full", "prompt": "a cat sleeping", "out": "cat.webp"}]
    fake.fail["a huge dog"] = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")
    real_pil = video_io._pil

    class FullDisk:
        def save(self, *args, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(video_io, "_pil", lambda frame: FullDisk() if fake.prompts[-1] == "a cat sleeping"
                        else real_pil(frame))
    assert _batch(tiny_models, lines, out_dir) == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error")]
    assert len(errors) == 2 and "Traceback" not in err
    assert "line 1 (job big)" in errors[0] and "--stream-weights" in errors[0]
    assert "line 3 (job full)" in errors[1] and "No space left on device" in errors[1]
    manifest = json.loads((out_dir / "manifest.json").read_text())
    assert [item["id"] for item in manifest["items"]] == ["ok"] and manifest["pending"] == ["big", "full"]
    failed = {entry["id"]: entry for entry in manifest["failed"]}
    assert failed.keys() == {"big", "full"} and failed["big"]["line"] == 1 and failed["full"]["line"] == 3
    assert "out of memory" in failed["big"]["error"] and "No space left" in failed["full"]["error"]
    visible = sorted(p.name for p in out_dir.iterdir() if not p.name.startswith("."))
    assert visible == ["manifest.json", "ok.gif"]  # no partial output of the failed jobs
    assert not [p for p in out_dir.rglob("*") if p.name.endswith(".partial")]

    fake.fail.clear()  # the rerun retries only the failed jobs, and the manifest forgets the failures
    monkeypatch.setattr(video_io, "_pil", real_pil)
    fake.prompts.clear()
    assert _batch(tiny_models, lines, out_dir) == 0
    assert fake.prompts == ["a huge dog", "a cat sleeping"]
    manifest = json.loads((out_dir / "manifest.json").read_text())
    assert manifest["complete"] and manifest["failed"] == [] and len(manifest["items"]) == 3


def test_a_rerun_replaces_only_its_own_outputs(tiny_models, tmp_path, capsys, fake) -> None:
    out_dir = tmp_path / "renders"
    lines = [{"id": "a", "prompt": "a dog running", "out": "a"}, {"id": "b", "prompt": "a cat sleeping"}]
    assert _batch(tiny_models, lines, out_dir) == 0
    # a kill between b's output and its done-record: the claim proves the output is b's
    record = out_dir / ".videobooth" / "done" / "b.json"
    record.unlink()
    claim = out_dir / ".videobooth" / "claims" / "b.json"
    claim.write_text(json.dumps({"id": "b", "output": "b.gif"}))
    lines[0]["seed"] = 3  # a changed line replaces its own earlier output (a folder of frames)
    fake.prompts.clear()
    code = _batch(tiny_models, lines, out_dir)
    assert code == 0, capsys.readouterr().err
    capsys.readouterr()
    assert fake.prompts == ["a dog running", "a cat sleeping"] and record.exists() and not claim.exists()
    # ...but not once the user has put a file of their own in it
    (out_dir / "a" / "notes.txt").write_text("the user's")
    lines[0]["seed"] = 4
    assert _batch(tiny_models, lines, out_dir) == 2
    assert "never deleted" in _error_line(capsys)
    assert (out_dir / "a" / "notes.txt").read_text() == "the user's"
