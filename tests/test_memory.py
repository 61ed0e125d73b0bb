"""Peak-memory estimate (dry run on the meta device) and the release of the UNet's unused projections."""

from __future__ import annotations

import logging
import platform
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from videobooth_core import allocator
from videobooth_core.sampling import memory
from videobooth_core.sampling.memory import LiveTensorTracker, estimate_step_memory, meta_twin, peak_activation_bytes
from videobooth_core.sampling.denoiser import VideoDenoiser
from videobooth_core.app.tiny import tiny_unet_and_mapper

SHAPE = (1, 4, 4, 16, 16)


def _tiny_denoiser(release: bool = True, **options) -> VideoDenoiser:
    unet, mapper = tiny_unet_and_mapper(vision_width=32, text_width=32)
    unet.attach_projections(mapper.site_projections(), release_own=release)
    text = torch.randn((2, 77, 32), generator=torch.Generator().manual_seed(0))
    denoiser = VideoDenoiser(unet, text[:1], text[1:], 4.0, **options)
    denoiser._mapper = mapper
    return denoiser


def test_tracker_counts_live_storages_and_their_peak() -> None:
    x = torch.ones(1000)  # made before tracking: not counted

    def run() -> torch.Tensor:
        a = x * 2  # 4000 B live
        view = a.view(10, 100)  # a view adds nothing
        b = view + 1  # 8000 B live
        del a, view  # a's storage is freed only when its last view goes
        c = b * 3  # 8000 B live again
        c.add_(1)  # in place: nothing new
        return c

    with torch.inference_mode():
        tracker = LiveTensorTracker()
        with tracker:
            out = run()
        assert tracker.peak_bytes == 8000
        assert tracker.live_bytes == 4000  # only the returned tensor is alive
        del out
        assert tracker.live_bytes == 0


@pytest.mark.parametrize("options", [
    {}, {"batch_passes": False}, {"single_frame_image_prompt": True}, {"watermark_branch": False},
], ids=["exact", "unbatched", "single-frame", "no-watermark"])
def test_meta_dry_run_allocates_exactly_what_the_real_step_allocates(options: dict) -> None:
    denoiser = _tiny_denoiser(**options)
    x_t = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    exemplar = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))
    real = peak_activation_bytes(lambda: denoiser.predict(x_t, 500, exemplar))

    twin = meta_twin(denoiser.unet)
    meta = torch.device("meta")
    dry = VideoDenoiser(twin, denoiser.cond_text.to(meta), denoiser.null_text.to(meta), 4.0, **options)
    dry_peak = peak_activation_bytes(lambda: dry.predict(x_t.to(meta), 500, exemplar.to(meta)))
    assert real > 100_000
    # meta kernels may pick a less favourable output layout than the CPU ones (one more copy in a rearrange)
    assert real <= dry_peak <= 1.02 * real


def test_estimate_counts_weights_once_and_grows_with_frames() -> None:
    denoiser = _tiny_denoiser()
    modules = [denoiser.unet, denoiser._mapper]
    params = {id(p): p for m in modules for p in [*m.parameters(), *m.buffers()]}
    expected_weights = sum(p.numel() * p.element_size() for p in params.values())
    small = estimate_step_memory(denoiser, SHAPE, True, "cpu", [denoiser._mapper])
    large = estimate_step_memory(denoiser, (1, 4, 8, 16, 16), True, "cpu", [denoiser._mapper])
    text_only = estimate_step_memory(denoiser, SHAPE, False, "cpu", [denoiser._mapper])
    assert small.weights_bytes == expected_weights
    assert small.runtime_bytes >= memory.CPU_RUNTIME_BYTES  # at least; more when the process already holds more
    assert large.activations_bytes > 1.3 * small.activations_bytes  # activations grow with the frames
    assert text_only.activations_bytes < small.activations_bytes
    assert "estimated peak memory on cpu" in small.describe()
    assert small.as_dict()["estimated_peak_mb"] == round(small.total_bytes / 2**20, 1)


def test_releasing_the_unused_projections_frees_them_and_changes_nothing() -> None:
    kept, released = _tiny_denoiser(release=False), _tiny_denoiser(release=True)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    sites = kept.unet.attention_sites
    unused = sum(b.attn1.to_k.weight.numel() * 2 + b.attn2.to_k.weight.numel() * 2
                 for b in (s.transformer_blocks[0] for s in sites))
    assert count(kept.unet) - count(released.unet) == unused
    x_t = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    exemplar = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(released.predict(x_t, 300, exemplar)[0], kept.predict(x_t, 300, exemplar)[0],
                                   rtol=0, atol=0)
    with pytest.raises(ValueError, match="load the UNet again"):
        released.unet.attach_projections(None)


def test_pipeline_estimates_before_sampling_and_warns_when_it_cannot_fit(tiny_models, monkeypatch, caplog) -> None:
    from videobooth_core.pipeline import GenerationRequest, VideoBoothPipeline

    pipe = VideoBoothPipeline.from_models_dir(str(tiny_models))
    assert pipe.unet.released_own_projections
    monkeypatch.setattr("videobooth_core.pipeline.available_memory_bytes", lambda device: 1024)
    seen_estimate_before_step: list[bool] = []
    request = GenerationRequest(prompt="a cat", frames=2, width=32, height=32, steps=2)
    with caplog.at_level(logging.INFO, logger="videobooth_core.pipeline"):
        result = pipe.generate(request, callback=lambda *_: seen_estimate_before_step.append(
            pipe.last_memory_estimate is not None), decode=False)
    assert seen_estimate_before_step == [True, True]
    assert result.info["estimated_peak_mb"] > result.info["estimated_weights_mb"] > 0
    # the memory warning (32x32 also warns that the model was trained at 256x256)
    warning = [r for r in caplog.records if r.levelno == logging.WARNING and "GB available" in r.getMessage()]
    assert warning and "more than the 0.00 GB available" in warning[0].getMessage()
    assert "--stream-weights" in warning[0].getMessage()

    monkeypatch.setattr("videobooth_core.pipeline.available_memory_bytes",  # enough for the step's working memory
                        lambda device: pipe.last_memory_estimate.activations_bytes + 1)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="videobooth_core.pipeline"):
        pipe.generate(request, decode=False)
    assert not [r for r in caplog.records if r.levelno == logging.WARNING and "GB available" in r.getMessage()]


def test_decoding_memory_grows_only_by_the_frames_themselves(tiny_models) -> None:
    """VAE decode works in frame chunks: 4x the frames add their latents and pixels, not 4x the working set."""
    from videobooth_core.conditioning.vae import vae_decode
    from videobooth_core.loading.vae import load_vae
    from videobooth_core.loading.models_dir import ModelFiles

    vae = load_vae(ModelFiles.from_models_dir(tiny_models).vae)
    peaks, sizes = {}, {}
    for frames in (4, 16):
        latents = torch.randn((frames, 4, 16, 16), generator=torch.Generator().manual_seed(0))
        out = []
        peaks[frames] = peak_activation_bytes(lambda: out.append(vae_decode(vae, latents, chunk_size=4)))  # noqa: B023
        sizes[frames] = out[0].numel() * out[0].element_size() + latents.numel() * latents.element_size()
    # 16 frames need at most one 4-frame chunk's whole peak plus the 16 frames' latents and pixels ...
    assert peaks[16] <= peaks[4] + sizes[16]
    # ... far less than decoding them in one go
    unchunked = peak_activation_bytes(lambda: vae_decode(vae, latents, chunk_size=16))
    assert unchunked > 1.5 * peaks[16]


def test_the_twin_follows_the_attention_backend() -> None:
    """The materialised-attention ("math") backend holds score matrices the fused kernels never allocate."""
    from videobooth_core.models.attention import Attention

    denoiser = _tiny_denoiser()  # projections released: the twin must still line up module by module
    fused = estimate_step_memory(denoiser, SHAPE, True, "cpu")
    denoiser.unet.set_attention_backend("math")
    assert {m.backend for m in meta_twin(denoiser.unet).modules() if isinstance(m, Attention)} == {"math"}
    materialised = estimate_step_memory(denoiser, SHAPE, True, "cpu")
    assert materialised.activations_bytes > fused.activations_bytes


_REUSE_PROBE = """
import ctypes, resource, sys
from videobooth_core.allocator import apply_allocator
assert apply_allocator(sys.argv[1])
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
size = 48 << 20  # an fp32 activation at the 32x32 level is 42 MB: above glibc's 32 MB mmap ceiling
def use_a_block():
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)
    libc.free(block)
use_a_block()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    use_a_block()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_the_fast_allocator_reuses_large_blocks_the_others_fault_them_in_again() -> None:
    """What `fast` buys (measured: README, Speed and memory): a large block freed and allocated again is served from
    memory already touched, not mapped and page-faulted in anew as under glibc's default and `lean`."""
    faults = {}
    for name in allocator.ALLOCATORS:
        done = subprocess.run([sys.executable, "-c", _REUSE_PROBE, name], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parents[1], check=True)
        faults[name] = int(done.stdout.split()[-1])
    pages = 3 * (48 << 20) // resource.getpagesize()
    assert faults["fast"] < 0.05 * pages, faults
    assert faults["glibc"] > 0.9 * pages and faults["lean"] > 0.9 * pages, faults


def test_an_unknown_allocator_is_named_with_the_choices() -> None:
    with pytest.raises(ValueError, match="'quick'.*fast"):
        allocator.apply_allocator("quick")
