"""The suite stands on its own: every fixture it reads lies inside the repository (a user's clone has no
``../shared``), and each fixture folder says what it is."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from conftest import FIXTURES, REPO

FIXTURE_FOLDERS = ("official_tiny", "panda", "clip_tokenizer", "videocrafter_tiny")


def test_every_fixture_folder_is_in_the_repository_with_its_readme() -> None:
    assert FIXTURES.is_relative_to(REPO)
    for name in FIXTURE_FOLDERS:
        folder = FIXTURES / name
        assert (folder / "README.md").is_file(), f"{folder} has no README saying what it is and how it was made"
        assert any(f.suffix in (".safetensors", ".json", ".txt") for f in folder.rglob("*")), folder
    assert (FIXTURES / "README.md").is_file()


def test_no_test_or_benchmark_reads_outside_the_repository() -> None:
    outside = re.compile(r"""\.\./shared|parents\[\d\]\.parent|REPO\.parent|["']shared["']\s*/""")
    offenders = [f"{path.relative_to(REPO)}:{number}" for folder in ("tests", "benchmarks")
                 for path in sorted((REPO / folder).glob("*.py")) if path.name != Path(__file__).name
                 for number, line in enumerate(path.read_text().splitlines(), 1) if outside.search(line)]
    assert not offenders, f"these lines reach outside the clone: {offenders}"


VIDEOCRAFTER_KINDS = ("t2v_512_v1", "t2v_1024_v1", "t2v_512_v2", "i2v_512_v1")


@pytest.mark.parametrize("kind", VIDEOCRAFTER_KINDS)
def test_the_videocrafter_recordings_are_whole_and_load_safely(kind: str) -> None:
    """The official VideoCrafter recordings (issue 26's parity reference): each checkpoint opens with
    ``weights_only=True`` and holds exactly the keys, shapes and dtypes recorded beside it."""
    import json

    import torch
    from safetensors import safe_open

    folder = FIXTURES / "videocrafter_tiny" / kind
    state = torch.load(folder / "model.ckpt", weights_only=True, map_location="cpu", mmap=True)["state_dict"]
    expected = json.loads((folder / "state_dict_keys.json").read_text())
    assert {key: [list(t.shape), str(t.dtype)] for key, t in state.items()} == expected
    with safe_open(str(folder / "outputs.safetensors"), "pt") as outputs:
        assert {"samples", "video", "step.00.x_prev", "unet_eval.out"} <= set(outputs.keys())
