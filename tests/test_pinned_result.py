"""A small end-to-end result pinned bit for bit (latents and frames), recorded before the "one path"
refactor: any change to the default computation, however small, fails here.

The recording (``tests/data/pinned_generation.safetensors``) was made with this module's ``_generate`` on
the tiny model set (``make_tiny`` seed 0), one compute thread. Re-record only for a deliberate, documented
change of the default path: ``python tests/test_pinned_result.py --record``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

DATA = Path(__file__).resolve().parent / "data" / "pinned_generation.safetensors"
PROMPT = "a ball rolling on the grass"


def _generate(models_dir: Path) -> dict[str, torch.Tensor]:
    from videobooth_core.app.demo import synthetic_subject
    from videobooth_core.pipeline import GenerationRequest, VideoBoothPipeline

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pipe = VideoBoothPipeline.from_models_dir(str(models_dir), dtype="fp32", device="cpu")
        image, mask = synthetic_subject(width=96, height=80)
        small = {"frames": 4, "width": 64, "height": 64, "steps": 3, "seed": 7}
        official = pipe.generate(GenerationRequest(prompt=PROMPT, subject_word="ball", image=image, mask=mask, **small))
        fast = pipe.generate(GenerationRequest(prompt="waves at sunset", sampler="dpmpp_2m", **small))
    finally:
        torch.set_num_threads(threads)
    return {"official_latents": official.latents.contiguous(), "official_frames": official.frames.contiguous(),
            "text_only_dpmpp_latents": fast.latents.contiguous(), "text_only_dpmpp_frames": fast.frames.contiguous()}


def test_default_path_is_bit_identical_to_the_recording(tiny_models) -> None:
    from safetensors.torch import load_file

    expected = load_file(DATA)
    actual = _generate(tiny_models)
    assert set(actual) == set(expected)
    for name, tensor in expected.items():
        got = actual[name]
        assert got.shape == tensor.shape and got.dtype == tensor.dtype, name
        if not torch.equal(got, tensor):
            diff = (got.double() - tensor.double()).abs().max().item()
            raise AssertionError(f"{name} differs from the recording (max |diff| {diff:.3e})")


if __name__ == "__main__" and sys.argv[1:] == ["--record"]:
    import tempfile

    from safetensors.torch import save_file

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from videobooth_core.app.tiny import make_tiny

    with tempfile.TemporaryDirectory() as folder:
        make_tiny(folder)
        DATA.parent.mkdir(exist_ok=True)
        save_file(_generate(Path(folder)), DATA)
    print(f"recorded {DATA}")
