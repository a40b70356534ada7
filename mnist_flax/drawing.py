"""Pictures for TensorBoard, drawn with PIL: digits with captions, a confusion matrix."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw


def digit_grid(images: np.ndarray, captions: list[str], colors: list[str],
               columns: int = 8, scale: int = 3, title: str = "") -> np.ndarray:
    """Digits side by side, each with a caption under it: the tutorial's "look at a digit"."""
    cell_w, cell_h = 28 * scale, 28 * scale + 14
    top = 16 if title else 0
    rows = -(-len(images) // columns)
    canvas = Image.new("RGB", (columns * cell_w, top + rows * cell_h), "white")
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((2, 2), title, fill="black")
    for i, (image, caption, color) in enumerate(zip(images, captions, colors, strict=True)):
        x, y = (i % columns) * cell_w, top + (i // columns) * cell_h
        digit = Image.fromarray(255 - image[..., 0]).resize((28 * scale, 28 * scale),
                                                            Image.NEAREST)
        canvas.paste(digit.convert("RGB"), (x, y))
        draw.text((x + 2, y + 28 * scale), caption, fill=color)
    return np.asarray(canvas)  # (H, W, 3) uint8


def confusion_image(counts: np.ndarray, cell: int = 36) -> np.ndarray:
    """The matrix as a picture: rows true, columns predicted, shade = share of the row."""
    n = len(counts)
    margin = cell
    canvas = Image.new("RGB", (margin + n * cell, margin + n * cell + 16), "white")
    draw = ImageDraw.Draw(canvas)
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    for t in range(n):
        draw.text((margin // 3, margin + t * cell + cell // 3), str(t), fill="black")
        draw.text((margin + t * cell + cell // 3, margin // 3), str(t), fill="black")
        for p in range(n):
            share = shares[t, p]
            shade = int(255 * (1 - share))
            color = (shade, shade, 255) if t == p else (255, shade, shade)
            x, y = margin + p * cell, margin + t * cell
            draw.rectangle((x, y, x + cell - 1, y + cell - 1), fill=color, outline="lightgray")
            draw.text((x + 3, y + cell // 3), str(counts[t, p]),
                      fill="white" if share > 0.6 else "black")
    draw.text((2, margin + n * cell + 2), "rows: true, columns: predicted", fill="black")
    return np.asarray(canvas)  # (H, W, 3) uint8


def message(text: str, width: int = 28 * 3 * 4, height: int = 28) -> np.ndarray:
    """A line of text as an image, for an image tag with nothing to show."""
    canvas = Image.new("RGB", (width, height), "white")
    ImageDraw.Draw(canvas).text((4, 8), text, fill="black")
    return np.asarray(canvas)
