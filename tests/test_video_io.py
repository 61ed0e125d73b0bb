"""The one video module (videobooth_core/video_io.py): every format written is read back with the right frames,
the reading functions agree with each other on every kind of input, and bad input is one clear error."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from videobooth_core import video_io
from videobooth_core.errors import OutputError, VideoError


def _frames(count: int = 5, height: int = 32, width: int = 48) -> torch.Tensor:
    """Frames whose colour changes with the frame index (flat areas: lossy codecs keep them close)."""
    frames = torch.zeros(count, height, width, 3, dtype=torch.uint8)
    for index in range(count):
        frames[index, :, : width // 2] = torch.tensor([40 * index + 20, 200 - 30 * index, 90], dtype=torch.uint8)
        frames[index, :, width // 2:] = torch.tensor([250 - 40 * index, 60, 30 * index + 40], dtype=torch.uint8)
    return frames


@pytest.mark.parametrize("name, exact", [("v.mp4", False), ("v.gif", False), ("v.webp", True), ("frames", True)])
def test_every_written_format_reads_back(tmp_path, name, exact) -> None:
    frames = _frames()
    path = video_io.write_frames(frames, tmp_path / name, fps=8.0)
    decoded = video_io.read_video(path)
    assert decoded.shape == frames.shape and decoded.dtype == torch.uint8
    error = (decoded.int() - frames.int()).abs().float().mean().item()
    assert error == 0 if exact else error < 6, error
    info = video_io.video_info(path)
    assert (info.frames, info.width, info.height) == (5, 48, 32)
    # mp4 stores its rate, webp 125 ms a frame, gif 120 (hundredths of a second), PNG frames nothing
    assert info.fps == {"v.mp4": 8.0, "v.webp": 1000 / 125, "v.gif": 1000 / 120, "frames": 0.0}[name]
    assert torch.equal(video_io.read_last_frames(path, 2), decoded[-2:])
    assert torch.equal(video_io.read_frames(path, [4, 0, 4]), decoded[[4, 0, 4]])
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]  # no temporary file left behind


def test_mp4_is_deterministic_and_pads_odd_sizes(tmp_path) -> None:
    frames = _frames(count=3, height=31, width=47)
    first = video_io.write_frames(frames, tmp_path / "a.mp4")
    second = video_io.write_frames(frames, tmp_path / "b.mp4")
    assert first.read_bytes() == second.read_bytes()
    decoded = video_io.read_video(first)
    assert decoded.shape == (3, 32, 48, 3)  # yuv420p: the last row and column repeated once
    error = (decoded[:, :31, :47].int() - frames.int()).abs().float().mean().item()
    assert error < 6, error
    with pytest.raises(VideoError, match="even frame sizes"):
        video_io.write_mp4(tmp_path / "odd.mp4", frames.numpy())


def test_images_and_folders_are_videos(tmp_path) -> None:
    frames = _frames(count=3)
    (tmp_path / "frames").mkdir()
    for index, frame in enumerate(frames):  # read in name order; other files are ignored
        Image.fromarray(frame.numpy()).save(tmp_path / "frames" / f"{index:02d}.png")
    (tmp_path / "frames" / "notes.txt").write_text("not a frame")
    assert torch.equal(video_io.read_video(tmp_path / "frames"), frames)
    Image.fromarray(frames[1].numpy()).save(tmp_path / "one.png")
    assert torch.equal(video_io.read_video(tmp_path / "one.png"), frames[1:2])


@pytest.mark.parametrize("make, words", [
    (lambda tmp: tmp / "missing.mp4", "video not found"),
    (lambda tmp: (tmp / "empty").mkdir() or tmp / "empty", "no .png or .jpg frames"),
    (lambda tmp: (tmp / "clip.txt").write_text("x") and tmp / "clip.txt", "not a video this pack reads"),
    (lambda tmp: (tmp / "broken.mp4").write_bytes(b"not an mp4 at all") and tmp / "broken.mp4", "cannot read"),
])
def test_bad_input_is_one_clear_error(tmp_path, make, words) -> None:
    path = make(tmp_path)
    with pytest.raises(VideoError, match=words) as caught:
        video_io.read_video(path)
    assert path.name in str(caught.value) and "\n" not in str(caught.value)


def test_frame_indices_past_the_end_and_bad_outputs(tmp_path) -> None:
    path = video_io.write_frames(_frames(count=3), tmp_path / "v.gif")
    with pytest.raises(VideoError, match="fewer than 4 decodable frames"):
        video_io.read_frames(path, [0, 3])
    with pytest.raises(VideoError, match=">= 0"):
        video_io.read_frames(path, [-1])
    with pytest.raises(OutputError, match="unsupported output.*'v.avi'"):
        video_io.check_output_path(tmp_path / "v.avi")
    with pytest.raises(OutputError, match="already exists"):
        video_io.write_frames(_frames(count=3), path)
    assert video_io.read_video(path).shape == (3, 32, 48, 3)  # the refused write left it as it was
