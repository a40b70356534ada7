"""Finds the digit's ink on paper as phones photograph it, for `digit_images.preprocess`.

A photo is not MNIST's clean black and white: the light falls off to a corner, the paper is
ruled, squared or has a margin line, and it is coloured and noisy. Taking every non-paper pixel
as ink made the crop the whole page. Here the lighting is flattened against a page-scale
estimate of the paper, the ink is thresholded (Otsu), printed lines that run across the page are
removed (the digit's pixels where a line crosses it are kept), specks dropped, and the largest
mark with the pieces near it is the digit. A larger page (a phone's 12 megapixels) is read
shrunk to PAGE_SIDE, the size these steps are made and tested for: some are a few pixels wide
(the smoothing, a line's drift), which on 6x the pixels missed the lines they are for; only a
digit too small to read there is looked for on the full page. scipy.ndimage is imported on the
first call only.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from PIL import Image

PAGE_SIDE = 640  # The longer side a page is read at (tests/photo_pages.py's pages), unless
MIN_READ = 20  # the digit is smaller than MNIST's 20 px box there.
WORK_SIDE = 96  # The paper's brightness is estimated on the page shrunk to this longer side ...
PAPER_WINDOW = 6  # ... where anything narrower than 1/6 of the page is not paper, ...
SMOOTH = 6  # ... and smoothed by 1/6 of that window (a softer estimate misses shadows).
LINE_SPAN = 0.75  # A printed line runs across at least 3/4 of the page, ...
LINE_THIN = 60  # ... is at most 1/60 of the page thick (a digit's strokes are more), ...
MAX_TILT = 3  # ... may be tilted up to 3 degrees (a page photographed a little askew) ...
LINE_TILT = 5  # ... and drift by this many pixels across it after that is undone.
SPECK = 0.02  # Marks under 2% of the digit's area are specks (noise, dust, line remains).
NEAR = 0.3  # Pieces within 30% of the digit's size of it belong to it (a 5's top bar).
RIVAL = 0.25  # Another mark of 25% of the digit's area or more makes the page unclear.
MIN_SIDE = 1 / 200  # A digit is at least 1/200 of the page's longer side.


class Ink(NamedTuple):
    """The digit cropped to its box, in [0, 1] (1 = full ink), and what made it doubtful."""

    crop: np.ndarray
    notes: list[str]


def _shrunk(pixels: np.ndarray, side: int) -> np.ndarray:
    """`pixels` with the longer side at most `side`, each block of the page its darkest pixel: a
    pen's line thinner than a block stays as dark as it is (an average would fade it into the
    paper)."""
    factor = -(-max(pixels.shape) // side)
    if factor <= 1 or min(pixels.shape) < factor:  # A strip a block thick stays as it is.
        return pixels
    height, width = (n // factor * factor for n in pixels.shape)
    blocks = pixels[:height, :width].reshape(height // factor, factor, width // factor, factor)
    return blocks.min(axis=(1, 3))


def flatten_lighting(pixels: np.ndarray) -> np.ndarray:
    """Ink in [0, 1] of dark marks on light paper (0-255): 1 - pixel / paper's brightness there.

    The paper's brightness is a grey closing (strokes and lines vanish in it) of the page shrunk
    to WORK_SIDE, smoothed and enlarged back: it follows a shadow or a darker corner, so they
    are paper, not ink. A ratio, so a black mark is full ink however dark the paper around it.
    """
    from scipy import ndimage

    height, width = pixels.shape
    scale = min(1.0, WORK_SIDE / max(height, width))
    small_size = (max(1, round(width * scale)), max(1, round(height * scale)))
    small = np.asarray(Image.fromarray(pixels, "F").resize(small_size, Image.Resampling.BOX))
    window = max(3, round(max(small.shape) / PAPER_WINDOW))
    paper = ndimage.gaussian_filter(ndimage.grey_closing(small, size=window), window / SMOOTH,
                                    mode="nearest")
    paper = np.asarray(Image.fromarray(paper.astype(np.float32), "F").resize(
        (width, height), Image.Resampling.BILINEAR))
    return np.clip(1 - pixels / np.maximum(paper, 1.0), 0, 1).astype(np.float32)


def otsu_threshold(values: np.ndarray) -> float:
    """The threshold that best splits `values` (in [0, 1]) into two classes (Otsu, 1979)."""
    counts, edges = np.histogram(values, bins=256, range=(0.0, float(values.max()) or 1.0))
    centres = (edges[:-1] + edges[1:]) / 2
    below = np.cumsum(counts)
    above = below[-1] - below
    mass = np.cumsum(counts * centres)
    with np.errstate(divide="ignore", invalid="ignore"):
        mean_below, mean_above = mass / below, (mass[-1] - mass) / above
        between = below * above * (mean_below - mean_above) ** 2
    return float(edges[1:][np.nanargmax(np.where(np.isfinite(between), between, -1))])


def printed_lines(mask: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """(axis, pixels of `mask` on lines along that axis across the page): rows' lines on 1."""
    found = []
    for axis in (0, 1):  # 1: horizontal lines (runs along a row), 0: vertical ones.
        rows = mask if axis == 1 else mask.T
        lines = _rows_lines(rows)
        if lines.any():
            found.append((axis, lines if axis == 1 else lines.T))
    return found


def _rows_lines(mask: np.ndarray) -> np.ndarray:
    """The pixels of `mask` on lines across it, nearly along its rows (tilted up to MAX_TILT).

    The page is sheared by the tilt that makes its rows' ink counts peakiest, so the lines lie
    along rows. A line then survives an opening by a run LINE_SPAN of the page long (the mask is
    widened by LINE_TILT across the run, for what the shear left), and one by 1/8 of that without
    widening (so only the line's own pixels, not a stroke beside it, are taken); and it is thin:
    its mean thickness at most 1/LINE_THIN of the page across it. A digit's stroke is shorter,
    or thicker for its page (a 1 cropped to its height), except where it lies on a line.
    """
    from scipy import ndimage

    height, width = mask.shape
    run = int(width * LINE_SPAN) | 1
    if run < 15:
        return np.zeros_like(mask)
    every = max(1, width // 160)  # Columns sampled to choose the tilt.
    slopes = np.tan(np.radians(np.linspace(-MAX_TILT, MAX_TILT, 2 * MAX_TILT * 2 + 1)))
    slope = max(slopes, key=lambda s: np.square(
        _shear(mask[:, ::every], s * every).sum(axis=1, dtype=np.int64)).sum())
    level = _shear(mask, slope).view(np.uint8)
    widened = ndimage.maximum_filter1d(level, LINE_TILT, axis=0)
    opened = _opened(widened, run, 1) & _opened(level, run // 8 | 1, 1)
    labels, _ = ndimage.label(opened, np.ones((3, 3), bool))
    areas = np.bincount(labels.ravel())
    thin = [i for i, box in enumerate(ndimage.find_objects(labels), 1)
            if (span := box[1].stop - box[1].start) >= run
            and areas[i] * LINE_THIN <= span * height]
    return _shear(np.isin(labels, thin), -slope) & mask


def _shear(mask: np.ndarray, slope: float) -> np.ndarray:
    """`mask` with each column moved up by `slope` times its distance from the middle column, so
    a line of that slope lies along a row; what leaves the page is dropped. -slope undoes it."""
    height, width = mask.shape
    offsets = np.rint(slope * (np.arange(width) - width // 2)).astype(np.intp)
    rows = np.arange(height)[:, None] + offsets
    inside = (rows >= 0) & (rows < height)
    return np.take_along_axis(mask, np.clip(rows, 0, height - 1), axis=0) & inside


def _opened(mask: np.ndarray, run: int, axis: int) -> np.ndarray:
    """The pixels of `mask` (uint8) on a run of at least `run` along `axis` (an opening)."""
    from scipy import ndimage

    eroded = ndimage.minimum_filter1d(mask, run, axis=axis)
    return ndimage.maximum_filter1d(eroded, run, axis=axis).astype(bool)


def _crossed(marks: np.ndarray, axis: int, line: np.ndarray) -> np.ndarray:
    """The pixels of `line` (along `axis`) with marks on both sides across it: where the digit
    crosses the line, which removing the line took out of it."""
    from scipy import ndimage

    span, across = 2 * LINE_TILT + 1, 1 - axis
    closed = ndimage.minimum_filter1d(ndimage.maximum_filter1d(
        marks.view(np.uint8), span, axis=across), span, axis=across)
    return line & closed.astype(bool)


def find_digit(pixels: np.ndarray, min_contrast: float) -> Ink | None:
    """The digit among dark marks on light paper (0-255), or None when the page has none.

    `min_contrast` (0-1) is the least ink a digit's darkest part must have over the paper.
    """
    shrunk = _shrunk(pixels, PAGE_SIDE)
    if shrunk is not pixels:
        found = _find_digit(shrunk, min_contrast)
        if found is not None and max(found.crop.shape) >= MIN_READ:
            return found
    return _find_digit(pixels, min_contrast)


def _find_digit(pixels: np.ndarray, min_contrast: float) -> Ink | None:
    from scipy import ndimage

    ink = flatten_lighting(pixels)
    smooth = ndimage.gaussian_filter(ink, 1.0) if min(ink.shape) >= 8 else ink
    if smooth.max() < min_contrast:
        return None
    threshold = max(otsu_threshold(smooth), min_contrast)
    marks = smooth > threshold
    found = printed_lines(smooth > threshold / 2)  # Faint lines too, so none is left in dashes.
    lines = np.zeros_like(marks)
    for _, line in found:
        lines |= line
    kept = marks & ~lines
    for axis, line in found:
        kept |= _crossed(kept, axis, line & marks)
    marks = kept

    labels, count = ndimage.label(marks, np.ones((3, 3), bool))
    if count == 0:
        return None
    areas = np.bincount(labels.ravel())[1:]
    boxes = ndimage.find_objects(labels)
    largest = int(np.argmax(areas))
    box = boxes[largest]
    extent = max(box[0].stop - box[0].start, box[1].stop - box[1].start)
    if extent < max(pixels.shape) * MIN_SIDE:
        return None
    near = [(s.start - NEAR * extent, s.stop + NEAR * extent) for s in box]
    parts, notes = [largest + 1], []
    for i, other in enumerate(boxes):
        if i == largest or areas[i] < SPECK * areas[largest]:
            continue
        if all(o.start < high and o.stop > low for o, (low, high) in zip(other, near, strict=True)):
            parts.append(i + 1)
        elif areas[i] >= RIVAL * areas[largest]:
            notes.append("more than one mark on the page; the largest was taken")
    digit = np.isin(labels, parts)
    region = ndimage.maximum_filter(digit.view(np.uint8), 3).astype(bool) & ~(lines & ~digit)
    strength = float(np.percentile(ink[digit], 95)) or 1.0
    values = np.where(region, np.clip(ink / strength, 0, 1), 0)
    rows, cols = np.flatnonzero(values.any(axis=1)), np.flatnonzero(values.any(axis=0))
    if not rows.size:  # No ink left where the marks were (a constant page).
        return None
    return Ink(values[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1], sorted(set(notes)))
