"""People's digit pictures -> MNIST-style (28, 28) uint8, as `mnist_flax.predict` feeds them.

Photographs and drawings are brought to MNIST's form (`preprocess`): grayscale, dark ink on
light paper (inverted first when the border is dark), the digit found on the page (`paper`:
uneven lighting flattened, ruled, squared and margin lines and specks dropped), cropped to it,
strokes thinner than MNIST's widened (a pen's line on a large photo), the longer side fitted into
20 px and placed in 28x28 with the centre of mass in the middle, which is how MNIST's digits were
made. A 28x28 image with a dark background is taken to be MNIST-style already and passes
unchanged. What made a digit doubtful comes back with it (`prepare`).
"""

from __future__ import annotations

import os
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from mnist_flax import configs, paper
from mnist_flax.checkpoints import error_line

BOX = 20  # MNIST fits the digit's longer side into 20 px ...
SIZE = 28  # ... and centres it by mass in 28x28.
MIN_STROKE = 1 / 12  # MNIST's strokes are 1/8-1/6 of its 20 px box; a thinner one is widened.
MIN_CONTRAST = 32  # Ink must differ from the background by this much (of 255), else "blank".
SHOW_SCALE = 8  # --show writes each of the 28x28 pixels the model saw as an 8x8 block.


class PredictError(configs.UserError):
    """A missing workdir or checkpoint, or an image we cannot use; one line naming it."""


def _header_size(path: str) -> tuple[int, int]:
    """(width, height) from the file's header alone: what PIL's DecompressionBombError omits.

    PIL's limit is a module global: it is lifted only while the header is read (nothing decoded).
    """
    limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        with Image.open(path) as image:
            return image.size
    finally:
        Image.MAX_IMAGE_PIXELS = limit


def read_image(path: str) -> Image.Image:
    if not os.path.exists(path):
        raise PredictError(f"{path}: no such file")
    if os.path.isdir(path):
        raise PredictError(f"{path}: is a directory, not an image")
    if os.path.getsize(path) == 0:
        raise PredictError(f"{path}: empty file")
    limit = Image.MAX_IMAGE_PIXELS
    try:
        with warnings.catch_warnings():  # Over the limit PIL only warns, then decodes it all.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(path)
            image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        width, height = _header_size(path)
        raise PredictError(f"{path}: too large ({width} x {height} pixels, over PIL's limit of "
                           f"{limit:,}); scale it down first (a digit needs a few hundred "
                           "pixels a side)") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        detail = "not an image PIL can read" if isinstance(e, UnidentifiedImageError) else str(e)
        raise PredictError(f"{path}: unreadable ({detail}); use a PNG or JPEG") from None
    return ImageOps.exif_transpose(image)  # Phone photos store their rotation in EXIF.


def to_255(pixels: np.ndarray) -> np.ndarray:
    """float32 pixels on MNIST's 0-255 scale, whatever their type, so contrast means the same.

    uint8 stays as it is, bool is x255 and uint16 is /257 (its full range: 65535 -> 255). Wider
    integers and floats go by their values: within 0-255 as they are; floats within [0, 1] x255;
    integers within 0-65535 /257 (16-bit data in a 32-bit "I" image, as Pillow before 10 opened a
    16-bit PNG); anything else is stretched from its own min..max to 0-255. NaN or infinite
    pixels have no place on any scale: PredictError.
    """
    pixels = np.asarray(pixels)
    if pixels.dtype == np.uint8 or pixels.size == 0:
        return pixels.astype(np.float32)
    finite = np.isfinite(pixels) if pixels.dtype.kind in "fc" else None
    if finite is not None and not finite.all():
        bad = pixels.size - np.count_nonzero(finite)
        raise PredictError(f"{bad:,} of {pixels.size:,} pixels are NaN or infinite; save it with "
                           "finite values (or as an 8-bit PNG)")
    if pixels.dtype == np.bool_:
        return pixels.astype(np.float32) * 255
    if pixels.dtype.kind == "u" and pixels.dtype.itemsize == 2:
        return pixels.astype(np.float32) / 257
    low, high = float(pixels.min()), float(pixels.max())
    values, is_float = pixels.astype(np.float64), pixels.dtype.kind == "f"
    if is_float and low >= 0 and high <= 1:
        values = values * 255
    elif not is_float and low >= 0 and 255 < high <= 65535:
        values = values / 257
    elif low < 0 or high > 255:  # No known scale: its own range (a constant image stays blank).
        values = (values - low) * (255 / (high - low) if high > low else 0.0)
    return values.astype(np.float32)


def to_grayscale(image: Image.Image) -> np.ndarray:
    """float32 (H, W) in [0, 255]; transparent pixels become white paper.

    16-bit ("I;16", "I;16B", ...), 32-bit integer ("I") and float ("F") images are scaled by
    `to_255`, not clipped to 8 bits as convert("L") does (a digit would keep two grey levels).
    """
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        return to_255(np.asarray(image))
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        paper = Image.new("RGBA", rgba.size, "white")
        image = Image.alpha_composite(paper, rgba)
    return np.asarray(image.convert("L"), np.float32)


def _border(pixels: np.ndarray) -> np.ndarray:
    return np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])


def preprocess(image: Image.Image | np.ndarray, name: str = "image") -> np.ndarray:
    """Any digit picture -> (28, 28) uint8, white ink on black, as MNIST's digits are.

    An array is scaled to 0-255 by `to_255` (floats in [0, 1] x255), as images are. Raises
    PredictError for an empty, blank (no ink) or non-finite image. `name` goes into the message.
    """
    return prepare(image, name)[0]


def prepare(image: Image.Image | np.ndarray, name: str = "image") -> tuple[np.ndarray, list[str]]:
    """`preprocess`'s digit, and why it may not be the digit meant (several marks on the page)."""
    try:
        pixels = to_grayscale(image) if isinstance(image, Image.Image) else to_255(
            np.asarray(image).squeeze())
    except PredictError as e:
        raise PredictError(f"{name}: {e}") from None
    if pixels.ndim != 2 or pixels.size == 0:
        raise PredictError(f"{name}: empty image (shape {pixels.shape})")
    if np.median(_border(pixels)) > 127:  # Light background: dark ink on paper.
        pixels = 255.0 - pixels
    if pixels.shape == (SIZE, SIZE):  # MNIST-style already.
        if pixels.max() - pixels.min() < MIN_CONTRAST:
            raise PredictError(f"{name}: blank image (no digit found)")
        return np.clip(np.rint(pixels), 0, 255).astype(np.uint8), []

    found = paper.find_digit(255.0 - pixels, MIN_CONTRAST / 255)
    if found is None:
        raise PredictError(f"{name}: blank image (no digit found)")
    crop = _thickened(found.crop)

    h, w = crop.shape
    factor = BOX / max(h, w)
    new_h, new_w = max(1, round(h * factor)), max(1, round(w * factor))
    fitted = Image.fromarray((crop * 255).astype(np.uint8)).resize(
        (new_w, new_h), Image.Resampling.LANCZOS)
    fitted = np.asarray(fitted, np.float32)

    total = fitted.sum()
    if total == 0:  # Specks far apart: fitted into 20 px, their ink averages away.
        raise PredictError(f"{name}: blank image (no digit found)")
    ys, xs = np.indices(fitted.shape)
    centre_y, centre_x = (ys * fitted).sum() / total, (xs * fitted).sum() / total
    top, left = round(SIZE / 2 - centre_y), round(SIZE / 2 - centre_x)
    out = np.zeros((SIZE, SIZE), np.float32)
    # Paste with clipping: a lopsided digit may be shifted partly past the edge, as in MNIST.
    y0, x0 = max(top, 0), max(left, 0)
    y1, x1 = min(top + new_h, SIZE), min(left + new_w, SIZE)
    out[y0:y1, x0:x1] = fitted[y0 - top:y1 - top, x0 - left:x1 - left]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8), found.notes


def _thickened(crop: np.ndarray) -> np.ndarray:
    """`crop` with strokes widened to MIN_STROKE of its longer side if they are thinner (a pen's
    line on a large photo), which fitting into 20 px would otherwise average away."""
    from scipy import ndimage

    ink = crop > 0.5
    edge = np.count_nonzero(ink & ~ndimage.binary_erosion(ink))
    width = 2 * np.count_nonzero(ink) / max(edge, 1)  # Area over half the outline.
    grow = round(max(crop.shape) * MIN_STROKE - width)
    if grow < 1:
        return crop
    return ndimage.maximum_filter(np.pad(crop, grow), grow + 1)


def prepare_file(path: str) -> tuple[np.ndarray, list[str]]:
    """One image file as MNIST's (28, 28) uint8 and its doubts (`prepare`); whatever reading or
    converting it raises (PIL's modes, numpy's arithmetic) is PredictError naming the file, so
    one odd file stops no other."""
    try:
        with np.errstate(divide="raise", over="raise", invalid="raise"):  # Not a RuntimeWarning.
            return prepare(read_image(path), path)
    except PredictError:
        raise
    except Exception as e:  # noqa: BLE001 (any image PIL opens may fail to convert)
        raise PredictError(f"{path}: cannot use it as a digit image ({error_line(e)}); save it "
                           "as a grayscale or RGB PNG or JPEG") from None


def digit_from_file(path: str) -> np.ndarray:
    """One image file as MNIST's (28, 28) uint8 (`prepare_file` without the doubts)."""
    return prepare_file(path)[0]


def show(digit: np.ndarray, path: str, directory: str, taken: set[str]) -> str:
    """Writes the 28x28 the model saw for the image `path` as DIRECTORY/NAME.28x28.png (each
    pixel an 8x8 block, so it can be looked at), a name not in `taken`; returns where."""
    stem = os.path.splitext(os.path.basename(path))[0] or "image"
    shown, n = os.path.join(directory, f"{stem}.28x28.png"), 1
    while shown in taken:  # Two inputs of one name (a/1.png, b/1.png): 1.28x28.png, 1-2.28x28.png
        n += 1
        shown = os.path.join(directory, f"{stem}-{n}.28x28.png")
    taken.add(shown)
    Image.fromarray(digit).resize((SIZE * SHOW_SCALE,) * 2, Image.Resampling.NEAREST).save(shown)
    return shown


def load_images(paths: list[str]) -> np.ndarray:
    """(N, 28, 28, 1) uint8 from image files; the first bad file raises PredictError."""
    return np.stack([digit_from_file(p) for p in paths])[..., None]
