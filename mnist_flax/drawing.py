"""Pictures for TensorBoard, drawn with PIL: digits with captions, a confusion matrix."""

from __future__ import annotations

import functools

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# Pixels. TensorBoard shows an image about 350 px wide by default, so a picture of width W shows
# its text at FONT_SIZE * 350 / W: pictures here stay near 500 px wide so captions read at ~11 px.
FONT_SIZE = 16


@functools.cache
def font(size: int = FONT_SIZE) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)  # Pillow's bundled font: no system fonts needed.


def digit_grid(images, captions: list[str], colors: list[str], columns: int = 8, scale: int = 3,
               title: str = "") -> np.ndarray:
    """Digits side by side, each with a caption under it: the tutorial's "look at a digit".

    A cell is as wide as the digit or its caption, whichever is wider.
    """
    caption_w = max([int(font().getlength(c)) + 14 for c in captions] + [0])
    cell_w, cell_h = max(28 * scale, caption_w), 28 * scale + FONT_SIZE + 6
    top = FONT_SIZE + 8 if title else 0
    rows = -(-len(images) // columns)
    width = max(columns * cell_w, int(font().getlength(title)) + 8 if title else 0)
    canvas = Image.new("RGB", (width, top + rows * cell_h), "white")
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((4, 3), title, fill="black", font=font())
    for i, (image, caption, color) in enumerate(zip(images, captions, colors, strict=True)):
        x, y = (i % columns) * cell_w, top + (i // columns) * cell_h
        digit = Image.fromarray(255 - image[..., 0]).resize((28 * scale, 28 * scale),
                                                            Image.NEAREST)
        canvas.paste(digit.convert("RGB"), (x + (cell_w - 28 * scale) // 2, y))
        draw.text((x + cell_w // 2, y + 28 * scale + 2), caption, fill=color, font=font(),
                  anchor="ma")  # Centred under the digit.
    return np.asarray(canvas)  # (H, W, 3) uint8


def confusion_image(counts: np.ndarray, cell: int = 40) -> np.ndarray:
    """The matrix as a picture: rows true, columns predicted, shade = share of the row; the last
    column is each true class's accuracy (its share of digits predicted right)."""
    n = len(counts)
    margin, accuracy_w = cell, 72
    width, height = margin + n * cell + accuracy_w, margin + n * cell + FONT_SIZE + 10
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    totals = counts.sum(axis=1, keepdims=True)
    shares = counts / np.maximum(totals, 1)

    def centred(x: int, y: int, text: str, fill: str = "black") -> None:
        draw.text((x, y), text, fill=fill, font=font(), anchor="mm")

    centred(margin + n * cell + accuracy_w // 2, margin // 2, "acc.")
    for t in range(n):
        centred(margin // 2, margin + t * cell + cell // 2, str(t))
        centred(margin + t * cell + cell // 2, margin // 2, str(t))
        for p in range(n):
            share = shares[t, p]
            shade = int(255 * (1 - share))
            color = (shade, shade, 255) if t == p else (255, shade, shade)
            x, y = margin + p * cell, margin + t * cell
            draw.rectangle((x, y, x + cell - 1, y + cell - 1), fill=color, outline="lightgray")
            centred(x + cell // 2, y + cell // 2, str(counts[t, p]),
                    "white" if share > 0.6 else "black")
        accuracy = f"{shares[t, t]:.1%}" if totals[t, 0] else "-"
        centred(margin + n * cell + accuracy_w // 2, margin + t * cell + cell // 2, accuracy)
    draw.text((4, margin + n * cell + 4), "rows: true, columns: predicted", fill="black",
              font=font())
    return np.asarray(canvas)  # (H, W, 3) uint8


def message(text: str, width: int = 28 * 3 * 6, height: int = 32) -> np.ndarray:
    """A line of text as an image, for an image tag with nothing to show."""
    canvas = Image.new("RGB", (width, height), "white")
    ImageDraw.Draw(canvas).text((4, 6), text, fill="black", font=font())
    return np.asarray(canvas)
