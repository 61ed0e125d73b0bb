"""The attention kernels against the official computation, at tiny shapes.

Reference: a per-frame loop over the official sparse-causal rule (frame f attends to the concatenation
[frame 0 ; frame max(f-1, 0)]) with the ``"math"`` kernel, in float64 so that rounding of the kernels
under test is what is measured.
"""

from __future__ import annotations

import pytest
import torch

from videobooth_core.errors import SamplingError
from videobooth_core.models.attention import (
    ATTENTION_BACKENDS,
    Attention,
    cross_frame_attention,
    first_and_previous_frames,
    multi_head_attention,
    sparse_causal_attention,
)


def _projected(batch: int, frames: int, tokens: int, channels: int, dtype: torch.dtype, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(batch * frames, tokens, channels, generator=generator, dtype=torch.float64)
    key = 2 * torch.randn(batch, frames, tokens, channels, generator=generator, dtype=torch.float64)
    value = torch.randn(batch, frames, tokens, channels, generator=generator, dtype=torch.float64)
    return query.to(dtype), key.to(dtype), value.to(dtype)


def _reference(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, num_heads: int) -> torch.Tensor:
    batch, frames = key.shape[:2]
    query = query.double().reshape(batch, frames, *query.shape[1:])
    out = torch.empty_like(query)
    for f in range(frames):
        frame_key = torch.cat([key[:, 0], key[:, max(f - 1, 0)]], dim=1).double()
        frame_value = torch.cat([value[:, 0], value[:, max(f - 1, 0)]], dim=1).double()
        out[:, f] = multi_head_attention(query[:, f], frame_key, frame_value, num_heads, "math")
    return out.reshape(batch * frames, *out.shape[2:])


@pytest.mark.parametrize("backend", ATTENTION_BACKENDS)
@pytest.mark.parametrize("frames", [1, 2, 3, 5])
def test_sparse_causal_attention_matches_the_per_frame_reference(backend: str, frames: int) -> None:
    query, key, value = _projected(2, frames, 6, 8, torch.float32)
    expected = _reference(query, key, value, num_heads=2)
    actual = sparse_causal_attention(query, key, value, 2, backend)
    assert actual.shape == expected.shape and actual.dtype == torch.float32
    torch.testing.assert_close(actual.double(), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("backend", ATTENTION_BACKENDS)
def test_bfloat16_kernels_stay_close_to_the_reference(backend: str) -> None:
    query, key, value = _projected(1, 4, 16, 16, torch.bfloat16, seed=1)
    expected = _reference(query, key, value, num_heads=2)
    actual = sparse_causal_attention(query, key, value, 2, backend)
    assert actual.dtype == torch.bfloat16
    # bf16 keeps 8 bits of mantissa: inputs are already rounded, so this bounds the kernel's own rounding
    torch.testing.assert_close(actual.double(), expected, rtol=0, atol=2e-2)


def test_dedup_really_attends_to_one_copy_of_frame_zero() -> None:
    """Frames 0 and 1 see frame 0 only once: a change to frame 1's keys must not move them, and a change
    to frame 0's keys must (a kernel that ignored frame 0 would pass the reference test only by luck)."""
    query, key, value = _projected(1, 3, 5, 8, torch.float32, seed=2)
    out = sparse_causal_attention(query, key, value, 2, "dedup")
    moved_key = key.clone()
    moved_key[:, 1] += 1.0
    out_moved = sparse_causal_attention(query, moved_key, value, 2, "dedup")
    assert torch.equal(out[:2], out_moved[:2])  # frames 0 and 1 (the first axis is batch * frames)
    assert not torch.equal(out[2], out_moved[2])  # frame 2 attends to frame 1
    moved_key = key.clone()
    moved_key[:, 0] += 1.0
    assert not torch.equal(out[0], sparse_causal_attention(query, moved_key, value, 2, "dedup")[0])


def test_the_default_backend_is_unchanged_by_the_dedup_kernel() -> None:
    """The default (sdpa) gathers [frame 0 ; previous] per frame; its bits are pinned end to end elsewhere,
    here it is checked against the same gather done by hand."""
    query, key, value = _projected(1, 4, 6, 8, torch.float32, seed=3)
    previous = [0, 0, 1, 2]
    gathered_key = torch.cat([key[:, [0] * 4], key[:, previous]], dim=2).flatten(0, 1)
    gathered_value = torch.cat([value[:, [0] * 4], value[:, previous]], dim=2).flatten(0, 1)
    expected = multi_head_attention(query, gathered_key, gathered_value, 2, "sdpa")
    assert torch.equal(sparse_causal_attention(query, key, value, 2, "sdpa"), expected)


def test_cross_frame_attention_with_dedup_matches_sdpa() -> None:
    torch.manual_seed(0)
    attn = Attention(16, num_heads=2).eval()
    hidden = torch.randn(2 * 4, 9, 16)
    with torch.no_grad():
        expected = cross_frame_attention(attn, hidden, 4)
        attn.backend = "dedup"
        actual = cross_frame_attention(attn, hidden, 4)
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-6)


def test_an_unknown_backend_is_refused() -> None:
    query, key, value = _projected(1, 2, 3, 4, torch.float32)
    with pytest.raises(SamplingError, match="flash"):
        multi_head_attention(query, key[:, 0], value[:, 0], 2, "flash")


@torch.no_grad()
def test_dedup_backend_meets_the_official_parity_tolerance(parity_fixture, clip_tokenizer_dir) -> None:
    """The opt-in kernel on the official fixture: the whole loop from z, with the parity suite's tolerance."""
    from test_parity import Official, ReplayedNoise, _denoiser, assert_close

    from videobooth_core.sampling.ddpm import sample_ddpm
    from videobooth_core.sampling.schedule import RespacedDDPM

    official = Official(parity_fixture, clip_tokenizer_dir, "unet.safetensors", "mapper.safetensors", "dedup")
    inp, out = official.inputs, official.outputs
    assert inp["z"].shape[2] > 2  # frames beyond the first two, so both halves of the kernel run
    final = sample_ddpm(_denoiser(official), RespacedDDPM(official.sampling["num_steps"]), tuple(inp["z"].shape),
                        ReplayedNoise(inp, out), exemplar_clean=inp["exemplar_latent_clean"])
    assert_close("final_sample", final, out["final_sample"])


def test_dedup_needs_no_more_memory_than_the_default() -> None:
    """Measured by the pre-sampling dry run (every intermediate tensor's lifetime): frames 0 and 1 gather no
    keys, so the opt-in kernel's working memory is at most the default's."""
    from test_memory import SHAPE, _tiny_denoiser

    from videobooth_core.sampling.memory import estimate_step_memory

    denoiser = _tiny_denoiser()
    default = estimate_step_memory(denoiser, SHAPE, True, "cpu")
    denoiser.unet.set_attention_backend("dedup")
    dedup = estimate_step_memory(denoiser, SHAPE, True, "cpu")
    assert 0 < dedup.activations_bytes <= default.activations_bytes


def test_first_and_previous_frames_is_the_gather_of_frame_zero_and_the_previous_frame() -> None:
    states = torch.randn(2, 5, 3, 4)
    previous = [max(f - 1, 0) for f in range(5)]
    expected = torch.cat([states[:, [0] * 5], states[:, previous]], dim=2)
    assert torch.equal(first_and_previous_frames(states), expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_group_norm_keeps_float32_statistics(dtype: torch.dtype) -> None:
    """The CPU's mixed-precision kernel (half input, float32 weights) against casting to float32 and back:
    the same statistics, so at most one rounding step apart, in a few outputs."""
    from videobooth_core.models.blocks import GroupNorm32

    torch.manual_seed(0)
    norm = GroupNorm32(4, 32, eps=1e-5)
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    x = (torch.randn(2, 32, 4, 8, 8) * 3 + 1).to(dtype)
    half = norm.to(dtype)
    actual = half(x)
    cast = torch.nn.functional.group_norm(x.float(), 4, half.weight.float(), half.bias.float(), 1e-5).to(dtype)
    assert actual.dtype == dtype
    ulp = torch.finfo(dtype).eps * cast.float().abs().clamp_min(1.0)
    assert bool(((actual.float() - cast.float()).abs() <= ulp).all())
    assert (actual != cast).float().mean() < 1e-3
