"""Shared test set-up: fixture locations (overridable by environment variables), offline mode."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
# every fixture the suite needs lives in the repository (tests/fixtures/README.md says what each is and how it
# was made), so a fresh clone passes on its own; the environment variables point a run at another recording
FIXTURES = REPO / "tests" / "fixtures"


PARITY_RTOL = 1e-4
"""The parity suite's tolerance against an official recording (the fixture README's): rtol 1e-4 and
:func:`parity_atol`. Every parity test uses these, so the bar is one."""


def parity_atol(expected: torch.Tensor) -> float:
    """atol 1e-4 * max(1, max|expected|): relative to the recording's size, at least 1e-4."""
    return 1e-4 * max(1.0, expected.abs().max().item())


def assert_parity_close(name: str, actual: torch.Tensor, expected: torch.Tensor) -> None:
    """``actual`` within the parity tolerance of the recorded ``expected`` (shape first, then the values)."""
    expected = expected.to(actual.dtype)
    atol = parity_atol(expected)
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    diff = (actual - expected).abs().max().item()
    assert torch.allclose(actual, expected, rtol=PARITY_RTOL, atol=atol), (
        f"{name}: max |diff| {diff:.3g} (atol {atol:.3g})")


def fixture_dir(env_var: str, default: Path) -> Path:
    path = Path(os.environ.get(env_var, default))
    if not path.is_dir():
        pytest.fail(f"test fixture folder {path} is missing (set {env_var} to its location)")
    return path


@pytest.fixture(scope="session")
def parity_fixture() -> Path:
    return fixture_dir("VIDEOBOOTH_PARITY_FIXTURE", FIXTURES / "official_tiny")


@pytest.fixture(scope="session")
def clip_tokenizer_dir() -> Path:
    return fixture_dir("VIDEOBOOTH_CLIP_TOKENIZER", FIXTURES / "clip_tokenizer")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> Path:
    """A complete tiny model set written by ``make-tiny`` (shared by every test of the session)."""
    from videobooth_core.app.tiny import make_tiny

    out = tmp_path_factory.mktemp("tiny_models")
    make_tiny(out)
    return out


PACK_NAME = "videobooth_pack_under_test"


def import_pack():
    """Import the repository as the ComfyUI pack package (relative imports work, as in ComfyUI); once per session."""
    if PACK_NAME in sys.modules:
        return sys.modules[PACK_NAME]
    spec = importlib.util.spec_from_file_location(PACK_NAME, REPO / "__init__.py", submodule_search_locations=[str(REPO)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK_NAME] = module
    spec.loader.exec_module(module)
    return module
