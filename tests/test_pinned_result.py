"""A small end-to-end result pinned bit for bit (latents and frames), recorded before the "one path"
refactor: any change to the default computation, however small, fails here.

The recordings (``tests/data/pinned_generation*.safetensors``) were made with this module's ``_generate`` on
the tiny model set (``make_tiny`` seed 0), one compute thread. Re-record only for a deliberate, documented
change of the default path: ``python tests/test_pinned_result.py --record``.

Bit-for-bit equality holds on one kind of CPU only: the float kernels torch picks (MKL, oneDNN) differ from one
instruction set to another. The first recording was made on the machine of that session; on 2026-12-07 the same
code (f723acc) gave 7.5e-6 relative differences on an AVX512-FP16 Xeon, with every MKL/oneDNN/ATen instruction-set
cap tried. So each recording carries the signature of its CPU (``platform``, in the file's metadata): a machine with
a recording of its own must match it bit for bit; any other must stay within the parity tolerance of the first
recording (rtol 1e-4, atol 1e-4 x max(1, max|x|); frames within one 8-bit level) and is told how to record its own.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import torch
from conftest import PARITY_RTOL, parity_atol

DATA_DIR = Path(__file__).resolve().parent / "data"
DATA = DATA_DIR / "pinned_generation.safetensors"
"""The first recording (its CPU's signature was not recorded); the reference of the tolerance check."""


def platform_signature() -> str:
    """torch's version and CPU capability and a digest of the CPU model and its instruction-set flags."""
    cpu = ""
    try:
        info = Path("/proc/cpuinfo").read_text()
        model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "")
        flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
        cpu = model + " " + " ".join(sorted(f for f in flags if f.startswith(("avx", "amx", "fma", "sse", "f16c"))))
    except OSError:  # not Linux: the processor name only
        import platform

        cpu = platform.processor()
    digest = hashlib.sha1(cpu.encode()).hexdigest()[:10]
    return f"torch{torch.__version__.split('+')[0]}-{torch.backends.cpu.get_cpu_capability()}-{digest}"


def recording_for(signature: str) -> Path | None:
    """The recording made on a CPU of ``signature``, if any."""
    from safetensors import safe_open

    for path in sorted(DATA_DIR.glob("pinned_generation*.safetensors")):
        with safe_open(str(path), "pt") as handle:
            if (handle.metadata() or {}).get("platform") == signature:
                return path
    return None
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

    signature = platform_signature()
    own = recording_for(signature)
    actual = _generate(tiny_models)
    if own is not None:  # this kind of CPU has its own recording: bit for bit
        expected = load_file(own)
        assert set(actual) == set(expected)
        for name, tensor in expected.items():
            got = actual[name]
            assert got.shape == tensor.shape and got.dtype == tensor.dtype, name
            if not torch.equal(got, tensor):
                diff = (got.double() - tensor.double()).abs().max().item()
                raise AssertionError(f"{name} differs from the recording {own.name} (max |diff| {diff:.3e})")
        return
    expected = load_file(DATA)
    assert set(actual) == set(expected)
    for name, tensor in expected.items():
        got = actual[name]
        assert got.shape == tensor.shape and got.dtype == tensor.dtype, name
        if name.endswith("frames"):
            level = 1.0 if got.dtype == torch.uint8 or float(tensor.max()) > 1.5 else 1.0 / 255.0
            worst = (got.double() - tensor.double()).abs().max().item()
            assert worst <= level + 1e-6, (f"{name} differs from {DATA.name} by {worst:.3e} (> one 8-bit level) on "
                                           f"CPU {signature}, which has no recording of its own")
        else:
            atol = parity_atol(tensor)
            torch.testing.assert_close(got, tensor, rtol=PARITY_RTOL, atol=atol, msg=lambda m: (
                f"{name} on CPU {signature} (no recording of its own) is outside the parity tolerance of "
                f"{DATA.name}: {m}; if the default path was changed deliberately, re-record with "
                "`python tests/test_pinned_result.py --record`"))


if __name__ == "__main__" and sys.argv[1:] == ["--record"]:
    import tempfile

    from safetensors.torch import save_file

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from videobooth_core.app.tiny import make_tiny

    signature = platform_signature()
    target = recording_for(signature) or DATA_DIR / f"pinned_generation_{signature}.safetensors"
    with tempfile.TemporaryDirectory() as folder:
        make_tiny(folder)
        DATA_DIR.mkdir(exist_ok=True)
        save_file(_generate(Path(folder)), target, metadata={"platform": signature})
    print(f"recorded {target} for CPU {signature}")
