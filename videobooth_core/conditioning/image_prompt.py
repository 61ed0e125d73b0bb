"""Image-prompt preprocessing of VideoBooth (``load_data_pair`` of the official ``sample.py``).

The subject image is masked (background painted white), cropped to a box, padded to a white square and
resized twice: to 224 x 224 for the CLIP image encoder and to 256 x 256 for the VAE. The resizes match
torchvision 0.15's tensor ``Resize`` defaults: bilinear, half-pixel centres, no antialiasing, computed in
float32 and rounded half-to-even back to uint8. Box convention everywhere: (x1, y1, x2, y2) in pixels,
x2/y2 exclusive (the crop is ``rows y1:y2, cols x1:x2``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ImagePromptError
from ..files import PathLike

logger = logging.getLogger(__name__)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CLIP_SIZE = 224
VAE_SIZE = 256

BBox = tuple[int, int, int, int]


def _open(path: PathLike, what: str):
    """Open and fully decode an image with Pillow, turning every failure into an ImagePromptError."""
    from PIL import Image

    path = Path(path)
    if not path.is_file():
        raise ImagePromptError(f"{what} file not found: '{path}'; check the path (it must be an existing image file).")
    try:
        img = Image.open(path)
        img.load()  # decode now, so that truncated files fail here and not later
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ImagePromptError(
            f"cannot read {what} file '{path}' ({exc}); use a valid PNG/JPEG/WebP image."
        ) from exc
    return img


def load_image(path: PathLike) -> torch.Tensor:
    """Decode an image file to an RGB uint8 tensor of shape (H, W, 3), values 0..255.

    Grayscale, palette and RGBA/LA images go through Pillow's ``convert("RGB")``: alpha is dropped, not
    composited (transparent pixels keep their stored colour); :func:`load_subject` uses it as the mask.
    16-bit grayscale ("I;16", "I") is scaled to 8 bits (v / 257, rounded). EXIF orientation is not
    applied: boxes refer to the stored pixels.
    """
    return _rgb(_open(path, "image"))


def _rgb(img) -> torch.Tensor:
    if img.mode.startswith("I"):
        # Pillow's own I -> RGB conversion clips at 255 instead of rescaling 16-bit data.
        a = np.asarray(img, dtype=np.float64)
        a = np.clip(np.rint(a / 257.0), 0, 255).astype(np.uint8)
        return torch.from_numpy(np.repeat(a[:, :, None], 3, axis=2).copy())
    return torch.from_numpy(np.array(img.convert("RGB"), dtype=np.uint8))


def _alpha_mask(img) -> Optional[torch.Tensor]:
    """(H, W) bool, True where the picture is not fully transparent, or None when the image has no alpha
    channel (or a transparency key) or is fully opaque (an alpha channel that says nothing)."""
    if "A" in img.getbands():
        alpha = np.asarray(img.getchannel("A"))
    elif "transparency" in img.info:
        alpha = np.asarray(img.convert("RGBA").getchannel("A"))
    else:
        return None
    if alpha.min() == 255:
        return None
    return torch.from_numpy(np.array(alpha != 0))  # like masks: only exact zeros are background


def load_subject(image_path: PathLike, mask_path: Optional[PathLike] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The subject's photo (H, W, 3) uint8 and its mask (H, W) bool or None, ready for the image prompt.

    The mask comes from ``mask_path`` when given (:func:`load_mask`); otherwise a photo with a real alpha
    channel (a cut-out PNG) uses it: its non-transparent pixels are the subject (logged), so the background
    hidden by the alpha is never used. A fully opaque alpha channel is ignored (no mask).
    """
    img = _open(image_path, "image")
    image = _rgb(img)
    if mask_path is not None:
        return image, load_mask(mask_path)
    alpha = _alpha_mask(img)
    if alpha is not None:
        if not bool(alpha.any()):
            raise ImagePromptError(
                f"the image '{image_path}' is fully transparent: its alpha channel hides every pixel; use a photo "
                "in which the subject is visible (or give a mask)."
            )
        from ..settings import log_once

        log_once(f"the image '{image_path}' has an alpha channel and no mask was given: its non-transparent pixels "
                 "are used as the subject mask (the transparent background is painted white, as masks do); give a "
                 "mask to choose the subject yourself", __name__)
    return image, alpha


def load_mask(path: PathLike) -> torch.Tensor:
    """Decode a mask file to a bool tensor of shape (H, W); True marks the subject.

    Palette ("P") PNGs, as written by Grounded-SAM, are read as palette indices (index != 0 is subject,
    like the official code). Single-band images ("1", "L", "I", "I;16", "F"): nonzero is subject.
    Other modes (RGB, RGBA, LA, ...) are converted to RGB (alpha dropped): a pixel whose colour has any
    nonzero channel is subject (a luminance conversion would round faint pure-blue pixels to 0).
    """
    img = _open(path, "mask")
    if img.mode in ("P", "PA"):
        a = np.asarray(img)
        a = a[..., 0] if a.ndim == 3 else a  # PA: band 0 holds the indices
    elif len(img.getbands()) == 1:
        a = np.asarray(img)
    else:
        a = np.asarray(img.convert("RGB")).any(axis=2)
    return torch.from_numpy(np.array(a != 0))


def mask_bbox(mask: torch.Tensor) -> BBox:
    """Tight box (x1, y1, x2, y2) of the nonzero pixels of a (H, W) mask, x2/y2 exclusive.

    E.g. the panda mask covers columns 6..219 and rows 21..161, so this returns (6, 21, 220, 162).
    """
    if mask.ndim != 2:
        raise ImagePromptError(f"the mask must have shape (H, W); got shape {tuple(mask.shape)}.")
    ys, xs = torch.nonzero(mask, as_tuple=True)
    if xs.numel() == 0:
        raise ImagePromptError(
            "the mask is empty: no pixel marks the subject; draw/segment the subject or pass no mask."
        )
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


@dataclass(frozen=True)
class PreparedImagePrompt:
    """The preprocessed image prompt.

    square: (3, S, S) uint8, the masked, cropped, white-padded square (input of both resizes).
    clip_pixels: (1, 3, 224, 224) float32, CLIP mean/std-normalised (input of the CLIP vision encoder).
    vae_pixels: (1, 3, 256, 256) float32 in [-1, 1] (input of the VAE encoder).
    bbox: (x1, y1, x2, y2) integer crop box actually used, x2/y2 exclusive.
    """

    square: torch.Tensor
    clip_pixels: torch.Tensor
    vae_pixels: torch.Tensor
    bbox: BBox

    def preview(self) -> torch.Tensor:
        """The 256 x 256 VAE input for display: float32 (1, 256, 256, 3) in [0, 1] (exact k/255 levels)."""
        levels = torch.round((self.vae_pixels + 1.0) * 127.5)  # undo /127.5 - 1 back to the uint8 levels
        return (levels / 255.0).permute(0, 2, 3, 1).contiguous()


def _as_uint8_image(image: torch.Tensor) -> torch.Tensor:
    if not isinstance(image, torch.Tensor):
        raise ImagePromptError(f"the image must be a torch.Tensor of shape (H, W, 3); got {type(image).__name__}.")
    if image.ndim == 4 and image.shape[0] == 1:
        image = image[0]  # accept a batch of one (ComfyUI IMAGE layout)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ImagePromptError(
            f"the image must have shape (H, W, 3) (RGB, channels last); got shape {tuple(image.shape)}; "
            "convert it to RGB (alpha/grayscale are not supported here, load_image converts files)."
        )
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise ImagePromptError(f"the image is empty: shape {tuple(image.shape)}.")
    if image.dtype == torch.uint8:
        return image
    if image.is_floating_point():
        lo, hi = float(image.min()), float(image.max())
        if not (math.isfinite(lo) and math.isfinite(hi)) or lo < -1e-3 or hi > 1.0 + 1e-3:
            raise ImagePromptError(
                f"a float image must hold values in [0, 1]; got range [{lo}, {hi}]; "
                "divide 0..255 data by 255 or pass a uint8 tensor."
            )
        return torch.round(image.float() * 255.0).clamp(0, 255).to(torch.uint8)
    raise ImagePromptError(f"the image dtype must be uint8 or floating point; got {image.dtype}.")


def _as_bool_mask(mask: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor):
        raise ImagePromptError(f"the mask must be a torch.Tensor of shape (H, W); got {type(mask).__name__}.")
    if mask.ndim == 3 and mask.shape[0] == 1:
        mask = mask[0]  # accept a batch of one (ComfyUI MASK layout)
    if tuple(mask.shape) != hw:
        raise ImagePromptError(
            f"the mask shape {tuple(mask.shape)} does not match the image size (H, W) = {hw}; "
            "use the mask made for this image (same height and width)."
        )
    if mask.is_floating_point() and not bool(torch.isfinite(mask).all()):
        raise ImagePromptError("the mask contains NaN or infinite values.")
    return mask != 0  # official rule: only exact zeros are background


def _check_bbox(bbox: Sequence[float], w: int, h: int) -> BBox:
    if isinstance(bbox, (str, bytes)):  # a string would iterate into characters
        raise ImagePromptError(f"the bbox must be 4 numbers (x1, y1, x2, y2) in pixels; got the string {bbox!r}.")
    try:
        values = [float(v) for v in bbox]
    except (TypeError, ValueError) as exc:
        raise ImagePromptError(f"the bbox must be 4 numbers (x1, y1, x2, y2) in pixels; got {bbox!r}.") from exc
    if len(values) != 4 or not all(math.isfinite(v) for v in values):
        raise ImagePromptError(f"the bbox must be 4 finite numbers (x1, y1, x2, y2) in pixels; got {bbox!r}.")
    x1, y1, x2, y2 = (int(v) for v in values)  # truncation toward zero, as the official code
    if x1 < 0 or y1 < 0 or x2 > w or y2 > h:
        raise ImagePromptError(
            f"the bbox {tuple(values)} (integer {(x1, y1, x2, y2)}) extends outside the image of "
            f"width {w} and height {h}; use pixel coordinates with 0 <= x1 < x2 <= {w} and 0 <= y1 < y2 <= {h}."
        )
    if x2 <= x1 or y2 <= y1:
        raise ImagePromptError(
            f"the bbox {tuple(values)} (integer {(x1, y1, x2, y2)}) is empty; it needs x2 > x1 and y2 > y1 "
            "(order x1, y1, x2, y2, with at least one whole pixel on each axis)."
        )
    return x1, y1, x2, y2


def _resize_uint8(square: torch.Tensor, size: int) -> torch.Tensor:
    """(3, S, S) uint8 -> (3, size, size) uint8, like torchvision 0.15's tensor Resize (antialias off)."""
    x = F.interpolate(square[None].float(), size=(size, size), mode="bilinear", align_corners=False, antialias=False)
    return torch.round(x[0]).clamp(0, 255).to(torch.uint8)


def prepare_image_prompt(
    image: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    bbox: Optional[Sequence[float]] = None,
    padding: int = 0,
) -> PreparedImagePrompt:
    """Mask, crop, pad and resize a subject image exactly like the official VideoBooth preprocessing.

    image: (H, W, 3) RGB, uint8 0..255 or float in [0, 1] (converted with round(x * 255)); a leading
        batch axis of size 1 is accepted.
    mask: (H, W) bool/uint8/float, nonzero = subject, or None (no masking). Background becomes white.
    bbox: (x1, y1, x2, y2) pixel floats (e.g. a detector box), truncated with int(); None derives the
        tight box of the mask, or the whole image when there is no mask either.
    padding: extra pixels added on every side of the box (given or derived), clamped to the image;
        0 (default) reproduces the official preprocessing.
    """
    img = _as_uint8_image(image)
    h, w = int(img.shape[0]), int(img.shape[1])
    if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
        raise ImagePromptError(f"padding must be an integer >= 0 (pixels); got {padding!r}.")
    subject = None if mask is None else _as_bool_mask(mask, (h, w))
    if subject is not None:
        derived = mask_bbox(subject)  # raises on an empty mask
    if bbox is not None:
        box = _check_bbox(bbox, w, h)
    elif subject is not None:
        box = derived
    else:
        box = (0, 0, w, h)
    if padding:
        box = (max(box[0] - padding, 0), max(box[1] - padding, 0), min(box[2] + padding, w), min(box[3] + padding, h))
    x1, y1, x2, y2 = box

    if subject is not None:
        img = img.masked_fill(~subject[:, :, None], 255)
        if not bool(subject[y1:y2, x1:x2].any()):
            logger.warning("the bbox %s contains no masked subject pixel; the image prompt is all white", box)
    crop = img[y1:y2, x1:x2].permute(2, 0, 1)  # (3, h, w)
    ch, cw = int(crop.shape[1]), int(crop.shape[2])
    side = max(ch, cw)
    # White square; the odd extra pixel goes to the bottom/right, as torchvision's pad split in the original.
    square = torch.full((3, side, side), 255, dtype=torch.uint8)
    top, left = (side - ch) // 2, (side - cw) // 2
    square[:, top : top + ch, left : left + cw] = crop
    logger.debug("image prompt: box %s, crop %dx%d (h x w), square %d", box, ch, cw, side)

    clip_u8 = _resize_uint8(square, CLIP_SIZE)
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=torch.float32).view(1, 3, 1, 1)
    clip_pixels = (clip_u8[None].float() / 255.0 - mean) / std
    vae_pixels = _resize_uint8(square, VAE_SIZE)[None].float() / 127.5 - 1.0
    return PreparedImagePrompt(square=square, clip_pixels=clip_pixels, vae_pixels=vae_pixels, bbox=box)
