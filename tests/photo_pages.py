"""Real MNIST digits written onto synthetic photographed paper, for predict's accuracy tests.

Each kind of page is one way students' photos broke predict: ruled and squared paper, a red
margin, light falling off to a corner, coloured paper and ink, sensor noise with blur and JPEG,
and a notebook page with all of those at once. The digit (an MNIST test digit scaled up) lands
anywhere on a page several times its size. Every page also gets a little noise and a JPEG pass,
as any phone photo does. Deterministic: the same digit, kind and seed give the same page.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image
from scipy import ndimage

KINDS = ("plain", "ruled", "squared", "margin", "tilted", "shadow", "coloured", "noisy",
         "notebook")
PAGE = (480, 640)  # (height, width) of every page, in pixels.
WHITE_PAPER, BLACK_INK, BLUE_INK = (246, 244, 238), (35, 35, 40), (25, 45, 165)
PAPERS = ((250, 240, 170), (250, 215, 220), (205, 230, 250), (215, 245, 210), (235, 225, 205))
INKS = ((25, 45, 165), (175, 25, 30), (20, 110, 45), (95, 30, 130))


def _layer(page: np.ndarray, coverage: np.ndarray, colour) -> np.ndarray:
    """`colour` laid over `page` where `coverage` (0-1) says: ink and printed lines absorb light,
    so each layer multiplies the light that passes (blue over red lines comes out darker)."""
    transmit = 1 - coverage[..., None] * (1 - np.asarray(colour, np.float32) / 255)
    return page * transmit


def _lines(shape: tuple[int, int], spacing: int, width: int, axis: int, offset: int) -> np.ndarray:
    """Coverage of printed lines `width` px thick every `spacing` px, across the page."""
    coverage = np.zeros(shape, np.float32)
    index = [slice(None), slice(None)]
    for start in range(offset, shape[axis], spacing):
        index[axis] = slice(start, start + width)
        coverage[tuple(index)] = 1
    return coverage


def _lighting(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Light falling off towards a random corner (down to 45-65%), with a soft shadow patch."""
    ys, xs = np.indices(shape, np.float32)
    corner_y, corner_x = rng.integers(0, 2, 2) * np.array(shape)
    distance = np.hypot(ys - corner_y, xs - corner_x) / np.hypot(*shape)
    light = 1 - rng.uniform(0.35, 0.55) * np.clip(1 - distance, 0, 1) ** 1.5
    blob = np.zeros(shape, np.float32)
    cy, cx = rng.integers(0, shape[0]), rng.integers(0, shape[1])
    blob[max(cy - 120, 0):cy + 120, max(cx - 160, 0):cx + 160] = 1
    return light * (1 - 0.2 * ndimage.gaussian_filter(blob, 40))


def make_page(digit: np.ndarray, kind: str, seed: int) -> Image.Image:
    """An RGB photo of `digit` (MNIST's 28x28 uint8, white on black) written on a `kind` page."""
    rng = np.random.default_rng(seed)
    shape = PAGE
    paper, ink = WHITE_PAPER, BLACK_INK
    if kind in ("ruled", "margin", "tilted", "notebook"):
        ink = BLUE_INK
    if kind == "coloured":
        paper, ink = PAPERS[rng.integers(len(PAPERS))], INKS[rng.integers(len(INKS))]
    page = np.ones((*shape, 3), np.float32) * paper
    spacing = int(rng.integers(24, 36))
    if kind in ("ruled", "margin", "tilted", "notebook"):
        page = _layer(page, _lines(shape, spacing, int(rng.integers(1, 3)), 0,
                                   int(rng.integers(0, spacing))), (140, 175, 225))
    if kind == "squared":
        for axis in (0, 1):
            page = _layer(page, _lines(shape, spacing, int(rng.integers(1, 3)), axis,
                                       int(rng.integers(0, spacing))), (150, 170, 200))
    margin = int(rng.integers(60, 140))
    if kind in ("margin", "tilted", "notebook"):
        page = _layer(page, _lines(shape, shape[1], int(rng.integers(2, 4)), 1, margin),
                      (225, 70, 70))

    # The digit: MNIST's 28x28 box scaled so the digit is 1.3-3.5 line spacings tall (60-150 px).
    side = int(rng.uniform(60, 150) * 28 / 20)
    coverage = np.asarray(Image.fromarray(digit).resize((side, side), Image.BICUBIC),
                          np.float32) / 255
    inset = 25 if kind == "tilted" else 0  # Turning the page moves its corners by up to 21 px.
    top = int(rng.integers(inset, shape[0] - side - inset))
    left = int(rng.integers(inset, shape[1] - side - inset))
    if kind == "margin" and rng.random() < 0.5:  # Half of them written across the margin line.
        left = int(np.clip(margin - side // 2 + rng.integers(-side // 4, side // 4), 0,
                           shape[1] - side))
    placed = np.zeros(shape, np.float32)
    placed[top:top + side, left:left + side] = np.clip(coverage, 0, 1)
    page = _layer(page, placed * rng.uniform(0.85, 1.0), ink)

    if kind == "tilted":  # The corners it turns in are the same white paper.
        angle = rng.uniform(1, 3) * rng.choice([-1, 1])
        page = np.asarray(Image.fromarray(np.clip(np.rint(page), 0, 255).astype(np.uint8)).rotate(
            angle, Image.BILINEAR, fillcolor=paper), np.float32)
    if kind in ("shadow", "notebook"):
        page = page * _lighting(shape, rng)[..., None]
    noise, blur, quality = 2.0, 0.0, 90
    if kind in ("noisy", "notebook"):
        noise, blur, quality = rng.uniform(6, 12), rng.uniform(0.8, 1.8), int(rng.integers(30, 60))
    if blur:
        page = ndimage.gaussian_filter(page, (blur, blur, 0))
    page = page + rng.normal(0, noise, page.shape)
    buffer = io.BytesIO()
    Image.fromarray(np.clip(np.rint(page), 0, 255).astype(np.uint8)).save(
        buffer, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def pages(digits: np.ndarray, labels: np.ndarray, kind: str, seed: int = 0):
    """(image, label) for each digit written on a `kind` page; the seed differs per page."""
    base = KINDS.index(kind) * 100_000 + seed * 1_000
    for i, (digit, label) in enumerate(zip(digits, labels, strict=True)):
        yield make_page(digit, kind, base + i), int(label)
