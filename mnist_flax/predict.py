"""Predicts digits in people's own images with a trained workdir.

    python -m mnist_flax.predict --workdir=runs/default IMAGE [IMAGE...] [--json]
    predict = mnist_flax.predict.load("runs/default"); predict(images)  # (N, 10) probabilities

Photographs and drawings are brought to MNIST's form first (`preprocess`): grayscale, white ink on
black (inverted when the border is light), cropped to the ink, the longer side fitted into 20 px,
and placed in 28x28 with the centre of mass in the middle, which is how MNIST's digits were made.
A 28x28 image with a dark background is taken to be MNIST-style already and passes unchanged.
The model is built from the config stored in the workdir, with the newest checkpoint's params.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import warnings
from collections.abc import Callable

from mnist_flax.run import startup

# Seconds of imports before the command's boundary exists; a caller that imports this module
# (a notebook) still gets its KeyboardInterrupt.
with startup.one_line_startup(startup.PREDICT_INTERRUPTED_LINE):
    import jax
    import numpy as np
    from absl import flags
    from PIL import Image, ImageOps, UnidentifiedImageError

    from mnist_flax import checkpoints, input_pipeline, models
    from mnist_flax.checkpoints import error_line
    from mnist_flax.run import integrity, lock, logs
    from mnist_flax.run import workdir as workdir_lib

BOX = 20  # MNIST fits the digit's longer side into 20 px ...
SIZE = 28  # ... and centres it by mass in 28x28.
MIN_CONTRAST = 32  # Ink must differ from the background by this much (of 255), else "blank".
INK_FLOOR = 0.1  # After stretching to [0, 1], values below this are background (paper, noise).
TOP_K = 3  # Probabilities printed per image.
DECIMALS = 4  # Places every probability in --json output is rounded to.


class PredictError(ValueError):
    """A missing workdir or checkpoint, or an image we cannot use; one line naming it."""


# ---------------------------------------------------------------------------------------------
# Images -> MNIST-style 28x28 uint8.


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
        return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)

    background = float(np.median(_border(pixels)))
    ink = pixels.max()
    if ink - background < MIN_CONTRAST:
        raise PredictError(f"{name}: blank image (no digit found)")
    scaled = np.clip((pixels - background) / (ink - background), 0.0, 1.0)
    scaled[scaled < INK_FLOOR] = 0.0
    rows, cols = np.flatnonzero(scaled.any(axis=1)), np.flatnonzero(scaled.any(axis=0))
    crop = scaled[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]

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
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def digit_from_file(path: str) -> np.ndarray:
    """One image file as MNIST's (28, 28) uint8; whatever reading or converting it raises (PIL's
    modes, numpy's arithmetic) is PredictError naming the file, so one odd file stops no other."""
    try:
        with np.errstate(divide="raise", over="raise", invalid="raise"):  # Not a RuntimeWarning.
            return preprocess(read_image(path), path)
    except PredictError:
        raise
    except Exception as e:  # noqa: BLE001 (any image PIL opens may fail to convert)
        raise PredictError(f"{path}: cannot use it as a digit image ({error_line(e)}); save it "
                           "as a grayscale or RGB PNG or JPEG") from None


def load_images(paths: list[str]) -> np.ndarray:
    """(N, 28, 28, 1) uint8 from image files; the first bad file raises PredictError."""
    return np.stack([digit_from_file(p) for p in paths])[..., None]


# ---------------------------------------------------------------------------------------------
# The model.


def _not_a_run_line(workdir: str, is_dir: bool) -> str:
    """Why `workdir` (a file, or a directory with no checkpoint) cannot be predicted with; when
    it lies inside a run (RUN/checkpoints, RUN/train), the run to pass instead."""
    run = workdir_lib.enclosing_run(workdir)
    if run is not None:
        return f"--workdir={workdir} is inside the run {run}; use --workdir={run}"
    if not is_dir:
        return f"--workdir={workdir}: not a directory"
    writer = lock.holder(workdir)
    if writer is not None:  # Training there now: told to train, the user would be refused.
        return (f"{checkpoints.checkpoint_dir(workdir)}: no checkpoint yet; a run (pid {writer}) "
                "is training there: try again once it has saved one (at the end of its first "
                "epoch, or every --config.checkpoint_every_steps)")
    return (f"{checkpoints.checkpoint_dir(workdir)}: no checkpoint; train first with python -m "
            f"mnist_flax.main --workdir={workdir}")


def load(workdir: str) -> Callable[[np.ndarray], np.ndarray]:
    """A function from images to (N, 10) class probabilities, with the workdir's newest params.

    It takes uint8 (0-255) or float (0-1) arrays of shape (N, 28, 28) or (N, 28, 28, 1), white
    ink on black, as MNIST (use `preprocess` for other pictures). `predict.step` is the
    checkpoint's step. A library call: orbax's notices that its readers are read only (two per
    manager opened) are kept out of the caller's log; its other warnings are not.
    """
    try:
        root = workdir_lib.path(workdir)  # A gs:// workdir without the gcs extra: one line.
        try:  # Not is_dir() alone: fsspec reads a storage that does not answer as "absent".
            root.stat()
        except FileNotFoundError:
            raise PredictError(f"--workdir={workdir}: no such directory") from None
        is_dir, has_checkpoint = root.is_dir(), False
        if is_dir:
            with logs.read_only_notices_dropped():
                has_checkpoint = checkpoints.latest_step(workdir) is not None
        if not has_checkpoint:
            raise PredictError(_not_a_run_line(workdir, is_dir))
        config = workdir_lib.read_config(workdir)
        model = models.create_model(config)
        dummy = np.zeros((1, *input_pipeline.IMAGE_SHAPE), np.float32)
        expected = jax.eval_shape(lambda: model.init(jax.random.key(0), dummy, train=False))
        params, step = integrity.restore_params(workdir, expected["params"])
    except (checkpoints.CheckpointError, workdir_lib.WorkdirError) as e:
        raise PredictError(str(e)) from None
    except Exception as e:
        if not workdir_lib.is_storage_error(e):
            raise
        raise PredictError(workdir_lib.storage_unreachable_line(workdir, e)) from None
    probabilities = jax.jit(functools.partial(models.probabilities, model.apply, params))

    def predict(images: np.ndarray) -> np.ndarray:
        images = np.asarray(images)
        if images.ndim == 3:
            images = images[..., None]
        if images.ndim != 4 or images.shape[1:] != input_pipeline.IMAGE_SHAPE:
            raise ValueError(f"images must be (N, 28, 28) or (N, 28, 28, 1); got {images.shape}")
        if images.dtype != np.uint8:  # Floats in [0, 1]: the 0-255 scale the model expects.
            images = images.astype(np.float32) * 255.0
        return np.asarray(probabilities(images))

    predict.step = step
    return predict


# ---------------------------------------------------------------------------------------------
# The command line. Its own FlagValues, so importing this module next to mnist_flax.main (which
# also has --workdir) defines nothing twice.

USAGE = "usage: python -m mnist_flax.predict --workdir=DIR IMAGE [IMAGE...] [--json]"


def _flags() -> flags.FlagValues:
    """The command's own flags: no --workdir clash with mnist_flax.main in one process."""
    values = flags.FlagValues()
    flags.DEFINE_string("workdir", None, "A training workdir (holds config.json and "
                        "checkpoints/), local or gs://.", flag_values=values)
    flags.DEFINE_bool("json", False, "Print one JSON object per image (JSON Lines): image, digit, "
                      "top, probabilities (rounded to 4 places), step; or image and error.",
                      flag_values=values)
    flags.DEFINE_bool("help", False, "Show this help.", flag_values=values, short_name="h")
    return values


def describe(path: str, probabilities: np.ndarray) -> dict:
    """One image's result; every probability rounded to DECIMALS places, as printed."""
    top = np.argsort(-probabilities, kind="stable")[:TOP_K]
    return {"image": path, "digit": int(top[0]),
            "top": [{"digit": int(d), "probability": round(float(probabilities[d]), DECIMALS)}
                    for d in top],
            "probabilities": [round(float(p), DECIMALS) for p in probabilities]}


def run(argv: list[str]) -> int:
    """The command: prints predictions (or one-line errors on stderr); returns the exit status.

    0 when every image was predicted, 1 when some image could not be read (the others are still
    predicted and printed), 2 for bad usage or an unusable workdir.
    """
    logs.quiet_orbax_logging()  # A damaged checkpoint is one warning line, as in main.
    workdir_lib.quiet_storage_logging()
    FLAGS = _flags()  # noqa: N806 (absl's name for it)
    if error := startup.quoted_flags_error(argv):
        print(f"error: {error}\n{USAGE}", file=sys.stderr)
        return 2
    try:
        paths = FLAGS(argv)[1:]
    except flags.Error as e:
        print(f"error: {e}\n{USAGE}", file=sys.stderr)
        return 2
    if FLAGS.help:
        print(f"{USAGE}\n\nPredicts the digit in each image with a trained workdir's newest "
              f"checkpoint.\n\n{FLAGS.get_help()}")
        return 0
    if not FLAGS.workdir or not paths:
        print(f"error: {'no images given' if FLAGS.workdir else '--workdir is required'}\n{USAGE}",
              file=sys.stderr)
        return 2
    try:
        predict = load(FLAGS.workdir)
    except PredictError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    results, images = [], []
    for path in paths:  # A bad file is reported and skipped; the others are still predicted.
        try:
            images.append(digit_from_file(path))
            results.append({"image": path})
        except PredictError as e:
            results.append({"image": path, "error": str(e)})
            print(f"error: {e}", file=sys.stderr)
    if images:
        probabilities = iter(predict(np.stack(images)[..., None]))
        results = [r if "error" in r else describe(r["image"], next(probabilities))
                   for r in results]
    if FLAGS.json:  # JSON Lines: one object per image, in the order given.
        for r in results:
            print(json.dumps({**r, "step": predict.step}))
    else:
        for r in results:
            if "error" not in r:
                top = ", ".join(f"{t['digit']}: {t['probability']:.3f}" for t in r["top"])
                print(f"{r['image']}: {r['digit']}  ({top})")
    return 1 if len(images) < len(paths) else 0


def main() -> None:
    """The console script and `python -m mnist_flax.predict`, inside the one error boundary."""
    with startup.one_line_startup(startup.PREDICT_INTERRUPTED_LINE):
        from mnist_flax.run import boundary

    with boundary.one_line_errors(interrupted_line=startup.PREDICT_INTERRUPTED_LINE):
        code = run(sys.argv)
        if sys.stdout is not None:  # None when started with stdout closed (`>&-`).
            sys.stdout.flush()  # Here, so a reader that left (`| head`) ends quietly, not in a
            # BrokenPipeError traceback from the flush at exit.
    sys.exit(code)


if __name__ == "__main__":
    main()
