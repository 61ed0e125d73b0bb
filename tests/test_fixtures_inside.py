"""The suite stands on its own: every fixture it reads lies inside the repository (a user's clone has no
``../shared``), and each fixture folder says what it is."""

from __future__ import annotations

import re
from pathlib import Path

from conftest import FIXTURES, REPO

FIXTURE_FOLDERS = ("official_tiny", "panda", "clip_tokenizer")


def test_every_fixture_folder_is_in_the_repository_with_its_readme() -> None:
    assert FIXTURES.is_relative_to(REPO)
    for name in FIXTURE_FOLDERS:
        folder = FIXTURES / name
        assert (folder / "README.md").is_file(), f"{folder} has no README saying what it is and how it was made"
        assert any(f.suffix in (".safetensors", ".json", ".txt") for f in folder.iterdir()), folder
    assert (FIXTURES / "README.md").is_file()


def test_no_test_or_benchmark_reads_outside_the_repository() -> None:
    outside = re.compile(r"""\.\./shared|parents\[\d\]\.parent|REPO\.parent|["']shared["']\s*/""")
    offenders = [f"{path.relative_to(REPO)}:{number}" for folder in ("tests", "benchmarks")
                 for path in sorted((REPO / folder).glob("*.py")) if path.name != Path(__file__).name
                 for number, line in enumerate(path.read_text().splitlines(), 1) if outside.search(line)]
    assert not offenders, f"these lines reach outside the clone: {offenders}"
