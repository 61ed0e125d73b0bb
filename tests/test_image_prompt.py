"""Parity of the image-prompt preprocessing with the official VideoBooth outputs (panda fixture), and errors.

The fixture folder comes from $VIDEOBOOTH_PANDA_FIXTURE, else tests/fixtures/panda. A missing fixture is a
failure, not a skip. The fixture holds the official function's recorded inputs and outputs (the decoded photo and
mask as tensors), not the official repository's image files; the file-reading road is tested by writing those
tensors to lossless files. Tolerance (fixture README): the uint8 rounding after the float32 bilinear
resize may flip by one level on at most 0.05% of the values (thread-count sensitive); all else exact.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from videobooth_core.errors import ImagePromptError
from videobooth_core.conditioning.image_prompt import (
    CLIP_MEAN,
    CLIP_SIZE,
    CLIP_STD,
    VAE_SIZE,
    PreparedImagePrompt,
    load_image,
    load_mask,
    mask_bbox,
    prepare_image_prompt,
)

FIXTURE = Path(
    os.environ.get(
        "VIDEOBOOTH_PANDA_FIXTURE",
        Path(__file__).resolve().parent / "fixtures" / "panda",
    )
)
MAX_FLIP_FRACTION = 0.0005  # 0.05% of the elements may differ by one uint8 level


@pytest.fixture(scope="module")
def fx() -> dict:
    files = [FIXTURE / n for n in ("preprocess.safetensors", "preprocess.json")]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        pytest.fail(f"panda fixture missing: {missing}; set VIDEOBOOTH_PANDA_FIXTURE to the fixture folder")
    tensors = load_file(str(FIXTURE / "preprocess.safetensors"))
    tensors["cfg"] = json.loads((FIXTURE / "preprocess.json").read_text())
    return tensors


def _clip_levels(normalized: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return torch.round((normalized * std + mean) * 255.0)


def _assert_levels(ours: torch.Tensor, ref: torch.Tensor, name: str) -> None:
    """ours/ref: float uint8 levels; equal except one level on at most MAX_FLIP_FRACTION of elements."""
    assert ours.shape == ref.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    diff = (ours - ref).abs()
    n_diff = int((diff > 0).sum())
    assert float(diff.max()) <= 1.0, f"{name}: max level difference {float(diff.max())}"
    assert n_diff <= MAX_FLIP_FRACTION * ref.numel(), f"{name}: {n_diff} of {ref.numel()} values differ by one level"


def _assert_parity(p: PreparedImagePrompt, fx: dict) -> None:
    assert p.bbox == tuple(fx["cfg"]["bbox_int_xyxy"])
    assert p.square.dtype == torch.uint8 and torch.equal(p.square, fx["square_uint8"])
    assert p.clip_pixels.shape == (1, 3, CLIP_SIZE, CLIP_SIZE) and p.clip_pixels.dtype == torch.float32
    assert p.vae_pixels.shape == (1, 3, VAE_SIZE, VAE_SIZE) and p.vae_pixels.dtype == torch.float32
    ours_clip = _clip_levels(p.clip_pixels)
    ref_clip = torch.round(fx["clip_input_unnormalized"] * 255.0)[None]
    _assert_levels(ours_clip, ref_clip, "clip_input_unnormalized")
    _assert_levels(ours_clip, _clip_levels(fx["clip_input_normalized"]), "clip_input_normalized levels")
    same = ours_clip == ref_clip  # where the uint8 level agrees, the normalised value must agree too
    torch.testing.assert_close(p.clip_pixels[same], fx["clip_input_normalized"][same], rtol=0, atol=1e-6)
    _assert_levels(torch.round((p.vae_pixels + 1) * 127.5), torch.round((fx["vae_input"] + 1) * 127.5), "vae_input")
    assert float(p.vae_pixels.min()) >= -1.0 and float(p.vae_pixels.max()) <= 1.0


def test_parity_from_fixture_tensors(fx):
    p = prepare_image_prompt(fx["image_rgb"], fx["mask"], fx["cfg"]["bbox_xyxy"])
    _assert_parity(p, fx)


@pytest.fixture(scope="module")
def panda_files(fx, tmp_path_factory) -> tuple[Path, Path]:
    """The recorded photo as a lossless RGB PNG and the recorded mask as a palette PNG (index 1 = panda), the
    format of the official segmentation masks."""
    folder = tmp_path_factory.mktemp("panda")
    Image.fromarray(fx["image_rgb"].numpy(), mode="RGB").save(folder / "panda.png")
    mask = Image.fromarray(fx["mask"].numpy(), mode="P")
    mask.putpalette([0, 0, 0, 255, 255, 255] + [0] * (256 * 3 - 6))
    mask.save(folder / "mask_1.png")
    return folder / "panda.png", folder / "mask_1.png"


def test_decoding_matches_fixture(fx, panda_files):
    image = load_image(panda_files[0])
    mask = load_mask(panda_files[1])
    assert image.dtype == torch.uint8 and image.shape == (163, 310, 3)
    assert mask.dtype == torch.bool and torch.equal(mask, fx["mask"] != 0)
    diff = (image.int() - fx["image_rgb"].int()).abs()
    assert int(diff.max()) == 0, f"decode differs from image_rgb: max {int(diff.max())}, {int((diff > 0).sum())} values"


def test_parity_from_files(fx, panda_files):
    p = prepare_image_prompt(load_image(panda_files[0]), load_mask(panda_files[1]), fx["cfg"]["bbox_xyxy"])
    _assert_parity(p, fx)


def test_float_image_same_as_uint8(fx):
    a = prepare_image_prompt(fx["image_rgb"], fx["mask"], fx["cfg"]["bbox_xyxy"])
    b = prepare_image_prompt(fx["image_rgb"].float() / 255.0, fx["mask"].float(), fx["cfg"]["bbox_xyxy"])
    c = prepare_image_prompt(fx["image_rgb"][None], fx["mask"].bool()[None], fx["cfg"]["bbox_xyxy"])
    for other in (b, c):
        assert other.bbox == a.bbox
        assert torch.equal(other.square, a.square)
        assert torch.equal(other.clip_pixels, a.clip_pixels)
        assert torch.equal(other.vae_pixels, a.vae_pixels)


def test_derived_bbox_from_mask(fx):
    mask = fx["mask"]
    # The reference doc gives the tight box as inclusive [6, 21, 219, 161]; ours is end-exclusive.
    assert mask_bbox(mask) == (6, 21, 220, 162)
    p = prepare_image_prompt(fx["image_rgb"], mask)
    assert p.bbox == (6, 21, 220, 162)
    assert p.square.shape == (3, 214, 214)  # crop 141 x 214 padded to a square
    assert torch.equal(p.square[:, 36:177, :], fx["image_rgb"].masked_fill(mask[..., None] == 0, 255)[21:162, 6:220].permute(2, 0, 1))
    assert bool((p.square[:, :36] == 255).all()) and bool((p.square[:, 177:] == 255).all())
    assert p.clip_pixels.shape == (1, 3, 224, 224) and p.vae_pixels.shape == (1, 3, 256, 256)


def test_padding_and_whole_image(fx):
    image = fx["image_rgb"]
    p = prepare_image_prompt(image, fx["mask"], padding=10)
    assert p.bbox == (0, 11, 230, 163)  # grown by 10, clamped to the 310 x 163 image
    whole = prepare_image_prompt(image)
    assert whole.bbox == (0, 0, 310, 163) and whole.square.shape == (3, 310, 310)
    assert torch.equal(whole.square[:, 73:236], image.permute(2, 0, 1))  # (310-163)//2 = 73 rows on top


def test_preview(fx):
    p = prepare_image_prompt(fx["image_rgb"], fx["mask"], fx["cfg"]["bbox_xyxy"])
    prev = p.preview()
    assert prev.shape == (1, 256, 256, 3) and prev.dtype == torch.float32
    assert float(prev.min()) >= 0.0 and float(prev.max()) <= 1.0
    torch.testing.assert_close(prev.permute(0, 3, 1, 2) * 2 - 1, p.vae_pixels, rtol=0, atol=1e-6)


def test_error_empty_mask(fx):
    with pytest.raises(ImagePromptError, match="mask is empty"):
        prepare_image_prompt(fx["image_rgb"], torch.zeros(163, 310, dtype=torch.uint8))


def test_error_mask_shape(fx):
    with pytest.raises(ImagePromptError, match=r"\(100, 310\).*\(163, 310\)"):
        prepare_image_prompt(fx["image_rgb"], torch.ones(100, 310, dtype=torch.bool))


@pytest.mark.parametrize(
    "bbox, text",
    [
        ((-5.0, 0.0, 100.0, 100.0), "-5"),
        ((0.0, 0.0, 311.0, 100.0), "311"),
        ((0.0, 0.0, 100.0, 170.0), "170"),
        ((400.0, 200.0, 500.0, 300.0), "400"),
        ((50.0, 50.0, 50.5, 80.0), "empty"),
        ((1.0, 2.0, 3.0), r"\(1\.0, 2\.0, 3\.0\)"),
        (("a", 2.0, 3.0, 4.0), "'a'"),
        ("1234", "'1234'"),
    ],
)
def test_error_bad_bbox(fx, bbox, text):
    with pytest.raises(ImagePromptError, match=text):
        prepare_image_prompt(fx["image_rgb"], fx["mask"], bbox)


def test_error_bad_image():
    with pytest.raises(ImagePromptError, match=r"\(8, 8, 4\)"):
        prepare_image_prompt(torch.zeros(8, 8, 4, dtype=torch.uint8))
    with pytest.raises(ImagePromptError, match=r"\[0\.0, 255\.0\]"):
        prepare_image_prompt(torch.tensor([0.0, 255.0]).repeat(4, 1).view(2, 4, 1).expand(2, 4, 3))
    with pytest.raises(ImagePromptError, match="padding"):
        prepare_image_prompt(torch.zeros(8, 8, 3, dtype=torch.uint8), padding=-1)


def test_error_files(tmp_path):
    missing = tmp_path / "nope.png"
    with pytest.raises(ImagePromptError, match="nope.png"):
        load_image(missing)
    with pytest.raises(ImagePromptError, match="nope.png"):
        load_mask(missing)
    bad = tmp_path / "garbage.jpg"
    bad.write_bytes(b"this is not an image")
    with pytest.raises(ImagePromptError, match="garbage.jpg"):
        load_image(bad)
    with pytest.raises(ImagePromptError, match="garbage.jpg"):
        load_mask(bad)


def test_image_and_mask_modes(tmp_path):
    rgba = Image.new("RGBA", (5, 4), (10, 20, 30, 0))
    rgba.save(tmp_path / "rgba.png")
    assert torch.equal(load_image(tmp_path / "rgba.png"), torch.tensor([10, 20, 30], dtype=torch.uint8).expand(4, 5, 3))
    Image.new("L", (5, 4), 77).save(tmp_path / "gray.png")
    assert bool((load_image(tmp_path / "gray.png") == 77).all())
    Image.new("I;16", (5, 4), 65535).save(tmp_path / "g16.png")
    assert bool((load_image(tmp_path / "g16.png") == 255).all())
    m = Image.new("L", (5, 4), 0)
    m.putpixel((2, 1), 200)
    m.save(tmp_path / "m.png")
    mask = load_mask(tmp_path / "m.png")
    assert mask.dtype == torch.bool and int(mask.sum()) == 1 and bool(mask[1, 2])
    assert mask_bbox(mask) == (2, 1, 3, 2)
    rgb = Image.new("RGB", (5, 4), (0, 0, 0))
    rgb.putpixel((4, 3), (0, 0, 1))  # faint pure blue: 0 in luminance, still subject
    rgb.save(tmp_path / "rgbm.png")
    assert mask_bbox(load_mask(tmp_path / "rgbm.png")) == (4, 3, 5, 4)
