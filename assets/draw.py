"""Draws the pack's own pictures with PIL (nothing downloaded, no third-party art):

* ``videobooth_subject.png``: the example subject photo of the workflows, a cartoon dog on a transparent
  background. Its alpha channel is the subject mask (ComfyUI's LoadImage turns it into MASK = 1 - alpha,
  which the workflows' Image Prompt reads with ``invert_mask`` on).
* ``icon.png``: the registry icon (square, 400 x 400).

Run ``python assets/draw.py`` from the repository root to redraw both.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent
SUPERSAMPLE = 4  # drawn large, then downsampled: smooth edges without an anti-aliasing renderer


def _dog(draw: ImageDraw.ImageDraw, s: float, dx: float = 0.0, dy: float = 0.0) -> None:
    """A side-view cartoon dog facing right in a 512 x 512 frame, scaled by ``s`` and shifted by (dx, dy)."""
    def box(x0, y0, x1, y1):
        return [(x0 + dx) * s, (y0 + dy) * s, (x1 + dx) * s, (y1 + dy) * s]

    fur, dark, light = (196, 132, 72, 255), (120, 72, 36, 255), (236, 206, 160, 255)
    draw.line([((120 + dx) * s, (250 + dy) * s), ((78 + dx) * s, (178 + dy) * s)], fill=fur, width=int(26 * s))  # tail
    draw.ellipse(box(62, 160, 94, 192), fill=fur)
    for x in (150, 198, 300, 348):  # legs, the far pair darker
        shade = dark if x in (198, 348) else fur
        draw.rounded_rectangle(box(x, 300, x + 38, 430), radius=16 * s, fill=shade)
        draw.ellipse(box(x - 6, 412, x + 46, 444), fill=shade)
    draw.ellipse(box(110, 210, 400, 350), fill=fur)  # body
    draw.ellipse(box(170, 270, 340, 345), fill=light)  # belly
    draw.polygon([((340 + dx) * s, (250 + dy) * s), ((380 + dx) * s, (160 + dy) * s), ((430 + dx) * s, (180 + dy) * s),
                  ((400 + dx) * s, (290 + dy) * s)], fill=fur)  # neck
    draw.ellipse(box(330, 90, 460, 215), fill=fur)  # head
    draw.rounded_rectangle(box(410, 150, 492, 205), radius=26 * s, fill=light)  # snout
    draw.ellipse(box(470, 148, 498, 172), fill=(30, 24, 20, 255))  # nose
    draw.ellipse(box(405, 122, 425, 142), fill=(30, 24, 20, 255))  # eye
    draw.ellipse(box(411, 125, 418, 132), fill=(255, 255, 255, 255))
    draw.ellipse(box(338, 100, 388, 210), fill=dark)  # floppy ear
    draw.arc(box(440, 170, 485, 200), start=20, end=160, fill=(90, 40, 30, 255), width=int(4 * s))  # mouth
    draw.rounded_rectangle(box(352, 200, 428, 222), radius=10 * s, fill=(200, 40, 50, 255))  # collar
    draw.ellipse(box(380, 214, 398, 232), fill=(250, 200, 40, 255))


def subject_photo(size: int = 512) -> Image.Image:
    """The cartoon dog, RGBA with alpha 255 on the subject and 0 elsewhere (after downsampling, soft edges)."""
    big = Image.new("RGBA", (size * SUPERSAMPLE, size * SUPERSAMPLE), (255, 255, 255, 0))
    _dog(ImageDraw.Draw(big), s=SUPERSAMPLE * size / 512, dy=20)
    return big.resize((size, size), Image.LANCZOS)


def icon(size: int = 400) -> Image.Image:
    """The registry icon: the dog framed by a film strip on a dark rounded square."""
    s = SUPERSAMPLE * size / 400
    big = Image.new("RGBA", (size * SUPERSAMPLE, size * SUPERSAMPLE), (0, 0, 0, 0))
    draw = ImageDraw.Draw(big)
    draw.rounded_rectangle([0, 0, 400 * s, 400 * s], radius=72 * s, fill=(32, 36, 52, 255))
    draw.rounded_rectangle([36 * s, 70 * s, 364 * s, 330 * s], radius=20 * s, fill=(240, 200, 90, 255))  # frame
    draw.rounded_rectangle([60 * s, 94 * s, 340 * s, 306 * s], radius=10 * s, fill=(120, 190, 230, 255))
    for x in range(52, 364, 40):  # sprocket holes
        for y in (76, 312):
            draw.rounded_rectangle([x * s, y * s, (x + 20) * s, (y + 12) * s], radius=3 * s, fill=(32, 36, 52, 255))
    _dog(draw, s=s * 0.52, dx=60, dy=150)
    return big.resize((size, size), Image.LANCZOS)


if __name__ == "__main__":
    subject_photo().save(HERE / "videobooth_subject.png", optimize=True)
    icon().save(HERE / "icon.png", optimize=True)
