"""The end-of-run pictures for TensorBoard, drawn with PIL: the first test digits of each class
with their predictions, the confusion matrix with each class's accuracy, the surest mistakes.

Written once, on the last step, into the test run, at the end of `train.train_and_evaluate`.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from mnist_flax import input_pipeline, models
from mnist_flax.summaries import Writers
from mnist_flax.tbx import tensorboardx

# Written once at the end of training, on the last step, in the test run. The group sorts after
# the curves. Per-class accuracy is the confusion matrix's last column.
IMAGE_TAGS = ("predictions/confusion_matrix", "predictions/digits", "predictions/worst_errors")
DIGITS_PER_CLASS = 3  # Test digits shown per class: the first of each, so every class appears.
WORST_ERRORS = 20  # Misclassified test digits shown, most confident first,
ERROR_COLUMNS = 5  # in rows of five, so their captions stay readable.

# Pixels. TensorBoard shows an image about 350 px wide by default, so a picture of width W shows
# its text at FONT_SIZE * 350 / W: pictures here stay near 500 px wide so captions read at ~11 px.
FONT_SIZE = 16
# Classes drawn at most: above it, those of the test labels (`shown_classes`), so no picture grows
# with num_classes (1,000 drawn whole needed 6 GB, and failed after training).
MAX_CLASSES_SHOWN = 20


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


def confusion_image(counts: np.ndarray, names: list[str] | None = None,
                    cell: int = 40) -> np.ndarray:
    """The matrix as a picture: rows true, columns predicted, shade = share of the row; the last
    column is each true class's accuracy (its share of digits predicted right). `names` are the
    columns' (the rows' are the first ones): a last column may count the classes not drawn."""
    (n, m), names = counts.shape, names or [str(c) for c in range(counts.shape[1])]
    margin, accuracy_w = cell, 72
    width, height = margin + m * cell + accuracy_w, margin + n * cell + FONT_SIZE + 10
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    totals = counts.sum(axis=1, keepdims=True)
    shares = counts / np.maximum(totals, 1)

    def centred(x: int, y: int, text: str, fill: str = "black") -> None:
        draw.text((x, y), text, fill=fill, font=font(), anchor="mm")

    centred(margin + m * cell + accuracy_w // 2, margin // 2, "acc.")
    for p in range(m):
        centred(margin + p * cell + cell // 2, margin // 2, names[p])
    for t in range(n):
        centred(margin // 2, margin + t * cell + cell // 2, names[t])
        for p in range(m):
            share = shares[t, p]
            shade = int(255 * (1 - share))
            color = (shade, shade, 255) if t == p else (255, shade, shade)
            x, y = margin + p * cell, margin + t * cell
            draw.rectangle((x, y, x + cell - 1, y + cell - 1), fill=color, outline="lightgray")
            centred(x + cell // 2, y + cell // 2, str(counts[t, p]),
                    "white" if share > 0.6 else "black")
        accuracy = f"{shares[t, t]:.1%}" if totals[t, 0] else "-"
        centred(margin + m * cell + accuracy_w // 2, margin + t * cell + cell // 2, accuracy)
    draw.text((4, margin + n * cell + 4), "rows: true, columns: predicted", fill="black",
              font=font())
    return np.asarray(canvas)  # (H, W, 3) uint8


def message(text: str, width: int = 28 * 3 * 6, height: int = 32) -> np.ndarray:
    """A line of text as an image, for an image tag with nothing to show."""
    canvas = Image.new("RGB", (width, height), "white")
    ImageDraw.Draw(canvas).text((4, 6), text, fill="black", font=font())
    return np.asarray(canvas)


def confusion_matrix(labels: np.ndarray, predicted: np.ndarray,
                     num_classes: int = input_pipeline.NUM_CLASSES) -> np.ndarray:
    """counts[true, predicted]."""
    counts = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(counts, (labels, predicted), 1)
    return counts


def shown_classes(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """The classes the pictures draw: all up to MAX_CLASSES_SHOWN, else those the test labels
    hold (at most MAX_CLASSES_SHOWN of them)."""
    if num_classes <= MAX_CLASSES_SHOWN:
        return np.arange(num_classes)
    return np.unique(labels)[:MAX_CLASSES_SHOWN]


def index_in(values: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """Each value's position in the sorted `classes`, or len(classes) where it is none of them."""
    at = np.minimum(np.searchsorted(classes, values), len(classes) - 1)
    return np.where(classes[at] == values, at, len(classes))


def per_class_accuracy(counts: np.ndarray) -> np.ndarray:
    """Recall of each true class; NaN for a class with no test images."""
    totals = counts.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.diag(counts) / totals


def first_of_each_class(labels: np.ndarray, per_class: int = DIGITS_PER_CLASS,
                        num_classes: int = input_pipeline.NUM_CLASSES) -> np.ndarray:
    """Indices of the first `per_class` digits of each class, row-major in a grid whose column
    is the class (-1 where a class has fewer): a test split sorted by class still shows all."""
    grid = np.full((per_class, num_classes), -1)
    for digit in range(num_classes):
        found = np.flatnonzero(labels == digit)[:per_class]
        grid[:len(found), digit] = found
    return grid.ravel()


def worst_errors(images: np.ndarray, labels: np.ndarray, probabilities: np.ndarray,
                 count: int = WORST_ERRORS) -> tuple[np.ndarray, list[str]]:
    """The misclassified digits the model was surest about, captioned 'true->predicted
    confidence' ('4->9 97%'), short enough to fit under a digit."""
    return surest_mistakes(images, labels, probabilities.argmax(-1), probabilities.max(-1), count)


def surest_mistakes(images: np.ndarray, labels: np.ndarray, predicted: np.ndarray,
                    confidence: np.ndarray,
                    count: int = WORST_ERRORS) -> tuple[np.ndarray, list[str]]:
    """`worst_errors` from each image's top class and its probability."""
    wrong = np.flatnonzero(predicted != labels)
    worst = wrong[np.argsort(-confidence[wrong], kind="stable")][:count]
    captions = [f"{labels[i]}->{predicted[i]} {confidence[i]:.0%}" for i in worst]
    return images[worst], captions


def write_final(writers: Writers | None, step: int, dataset: input_pipeline.Dataset,
                probabilities: np.ndarray, num_classes: int) -> None:
    """End-of-run pictures in the test run, on the last step, and the HParams session's end.

    `probabilities` are the model's (N, classes) outputs on the test set. Written: the first
    test digits of each class with their predicted labels; the confusion matrix with each class's
    accuracy; the worst misclassified digits. Drawn for `shown_classes` only.
    """
    write_top(writers, step, dataset, probabilities.argmax(-1), probabilities.max(-1), num_classes)


def write_top(writers: Writers | None, step: int, dataset: input_pipeline.Dataset,
              predicted: np.ndarray, confidence: np.ndarray, num_classes: int) -> None:
    """`write_final` from each test image's top class and its probability: N numbers each, what
    holds the test set's (N, num_classes) probabilities would not be bounded."""
    if writers is None:
        return
    images, labels = dataset.test_images, dataset.test_labels
    classes = shown_classes(labels, num_classes)
    true, guess = index_in(labels, classes), index_in(predicted, classes)  # len(classes): other.
    shown = first_of_each_class(true, num_classes=len(classes))
    blank = np.zeros_like(images[0])
    writers.test.add_image("predictions/digits", digit_grid(
        [images[i] if i >= 0 else blank for i in shown],
        [str(predicted[i]) if i >= 0 else "" for i in shown],
        ["black" if i < 0 or predicted[i] == labels[i] else "red" for i in shown],
        columns=len(classes), scale=2, title="Predicted digit; red: wrong"),
        step, dataformats="HWC")

    counts = confusion_matrix(true, guess, len(classes) + 1)[:len(classes)]
    names = [str(c) for c in classes] + ["other"]  # Predicted a class that is not drawn.
    counts = counts if counts[:, -1].any() else counts[:, :-1]
    writers.test.add_image("predictions/confusion_matrix", confusion_image(counts, names), step,
                           dataformats="HWC")

    error_images, error_captions = surest_mistakes(images, labels, predicted, confidence)
    if len(error_images):
        gallery = digit_grid(error_images, error_captions, ["red"] * len(error_images),
                                     columns=ERROR_COLUMNS, scale=2,
                                     title="Surest mistakes: true->predicted")
    else:  # Still an image under the tag, so dashboards and tests find it.
        gallery = message("no misclassified test digits")
    writers.test.add_image("predictions/worst_errors", gallery, step, dataformats="HWC")
    _, _, session_end = tensorboardx().summary.hparams({}, {})
    writers.run.file_writer.add_summary(session_end)
    writers.flush()


@jax.jit
def _top(state, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    probabilities = models.probabilities(state.apply_fn, state.params, images)
    return probabilities.argmax(-1), probabilities.max(-1)


def predict_top(state, images: np.ndarray, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Each uint8 image's top class and its probability, `batch_size` at a time."""
    tops = [_top(state, images[i:i + batch_size]) for i in range(0, len(images), batch_size)]
    return tuple(np.concatenate([np.asarray(t[k]) for t in tops]) for k in (0, 1))


def write_pictures(writers: Writers | None, state, dataset: input_pipeline.Dataset,
                   config) -> None:
    """The test set's predictions as pictures (`write_final`), on the state's step."""
    if writers is not None:
        predicted, confidence = predict_top(state, dataset.test_images, config.eval_batch_size)
        write_top(writers, int(state.step), dataset, predicted, confidence, config.num_classes)


def drawn(workdir: str, step: int) -> bool:
    """Whether the workdir's test/ run holds every end-of-run picture at `step`."""
    from mnist_flax import event_reader

    steps = event_reader.read_image_steps(f"{workdir.rstrip('/')}/test")
    return all(step in steps.get(tag, []) for tag in IMAGE_TAGS)
