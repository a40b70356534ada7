"""What a run writes to TensorBoard: scalars, the config, hparams, the model, pictures of digits.

tensorboardX writes the event files without TensorFlow. Only process 0 writes (`create_writer`
returns None elsewhere, and every function here accepts None). Tag names are an API: the tuples
below list them and tests/test_summaries.py reads them back with TensorBoard's own reader.
"""

from __future__ import annotations

import jax
import ml_collections
import numpy as np
from PIL import Image, ImageDraw
from tensorboardX import SummaryWriter
from tensorboardX import summary as tbx_summary

from mnist_flax import input_pipeline

# Metric names are an API: TensorBoard dashboards, the benchmark and the tests read these tags.
SCALAR_TAGS = (
    "train/loss", "train/accuracy", "test/loss", "test/accuracy",
    "train/learning_rate", "train/images_per_second", "epoch",
)
# Written once at the end of training, on the last step.
CLASS_ACCURACY_TAGS = tuple(f"test/accuracy_class_{d}" for d in range(input_pipeline.NUM_CLASSES))
IMAGE_TAGS = ("test/digits", "test/confusion_matrix", "test/worst_errors")
TEXT_TAGS = ("config", "data", "model/num_params", "model/summary")
# The metric columns of TensorBoard's HParams table (the last value of each scalar in the run).
HPARAM_METRICS = ("test/accuracy", "test/loss", "train/accuracy", "train/loss")
WORST_ERRORS = 24  # Misclassified test digits shown, most confident first.


def create_writer(workdir: str, purge_step: int | None = None) -> SummaryWriter | None:
    """`purge_step`: TensorBoard drops what earlier files logged from this step on (what a killed
    run logged after its last checkpoint, which the resumed run does again)."""
    if jax.process_index() != 0:
        return None
    return SummaryWriter(logdir=workdir, flush_secs=10, purge_step=purge_step)


def close(writer: SummaryWriter | None) -> None:
    if writer is not None:
        writer.close()


def count_params(params) -> int:
    return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))


def write_run_info(writer: SummaryWriter | None, config: ml_collections.ConfigDict,
                   dataset: input_pipeline.Dataset, params) -> None:
    """The config, the data source and the model size, written once as text."""
    if writer is None:
        return
    writer.add_text("config", "```\n" + str(config) + "\n```", 0)
    writer.add_text("data", dataset.describe(), 0)
    writer.add_scalar("data/train_images", len(dataset.train_labels), 0)
    writer.add_scalar("data/test_images", len(dataset.test_labels), 0)
    writer.add_text("model/num_params", f"{count_params(params):,}", 0)
    write_hparams(writer, config)


def hparam_values(config: ml_collections.ConfigDict) -> dict[str, bool | int | float | str]:
    """Every config field as a value the HParams plugin takes (sequences become strings)."""
    values = {}
    for name, value in sorted(config.to_dict().items()):
        ok = isinstance(value, bool | int | float | str)
        values[name] = value if ok else str(tuple(value) if isinstance(value, list) else value)
    return values


def write_hparams(writer: SummaryWriter | None, config: ml_collections.ConfigDict) -> None:
    """The config as HParams-plugin summaries in the run's own directory.

    tensorboardX's `add_hparams` would open a sub-run with a copy of the final metrics; writing
    the same protos into the run itself makes the run one row of TensorBoard's HParams table,
    with its live scalars (HPARAM_METRICS) as the metric columns.
    """
    if writer is None:
        return
    experiment, session_start, _ = tbx_summary.hparams(hparam_values(config),
                                                       dict.fromkeys(HPARAM_METRICS, 0.0))
    writer.file_writer.add_summary(experiment)
    writer.file_writer.add_summary(session_start)


def model_summary(model, input_shape: tuple[int, ...] = input_pipeline.IMAGE_SHAPE) -> str:
    """Linen's layer table: inputs, outputs, parameter shapes and counts per layer."""
    return model.tabulate(jax.random.key(0), np.zeros((1, *input_shape), np.float32),
                          train=False, compute_flops=False,
                          console_kwargs={"width": 120, "force_terminal": False})


def write_model_summary(writer: SummaryWriter | None, model) -> None:
    if writer is None:
        return
    # Four leading spaces: a Markdown code block, so the table's columns stay aligned.
    table = "\n".join("    " + line for line in model_summary(model).splitlines())
    writer.add_text("model/summary", table, 0)


def write_scalars(writer: SummaryWriter | None, step: int, metrics: dict[str, float]) -> None:
    if writer is None:
        return
    for tag, value in metrics.items():
        writer.add_scalar(tag, value, step)
    writer.flush()


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


def predict_labels(state, images: np.ndarray, batch_size: int = 1000) -> np.ndarray:
    """Class probabilities for `images` (uint8), on whatever devices hold the state."""
    outputs = []
    for start in range(0, len(images), batch_size):
        logits = state.apply_fn({"params": state.params},
                                input_pipeline.normalize(images[start:start + batch_size]),
                                train=False)
        outputs.append(np.asarray(jax.nn.softmax(logits)))
    return np.concatenate(outputs)


def confusion_matrix(labels: np.ndarray, predicted: np.ndarray,
                     num_classes: int = input_pipeline.NUM_CLASSES) -> np.ndarray:
    """counts[true, predicted]."""
    counts = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(counts, (labels, predicted), 1)
    return counts


def per_class_accuracy(counts: np.ndarray) -> np.ndarray:
    """Recall of each true class; NaN for a class with no test images."""
    totals = counts.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.diag(counts) / totals


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


def worst_errors(images: np.ndarray, labels: np.ndarray, probabilities: np.ndarray,
                 count: int = WORST_ERRORS) -> tuple[np.ndarray, list[str]]:
    """The misclassified digits the model was surest about, captioned 'true->predicted
    confidence' ('4->9 97%'), short enough to fit under a digit."""
    predicted = probabilities.argmax(-1)
    confidence = probabilities.max(-1)
    wrong = np.flatnonzero(predicted != labels)
    worst = wrong[np.argsort(-confidence[wrong], kind="stable")][:count]
    captions = [f"{labels[i]}->{predicted[i]} {confidence[i]:.0%}" for i in worst]
    return images[worst], captions


def write_final(writer: SummaryWriter | None, state, dataset: input_pipeline.Dataset,
                config: ml_collections.ConfigDict, metrics: dict[str, float]) -> None:
    """End-of-run pictures and per-class accuracy, on the last step.

    The first test digits with predicted and true labels; the confusion matrix; the worst
    misclassified digits; `test/accuracy_class_<d>` (the share of class d's test digits the model
    gets right).
    """
    if writer is None:
        return
    step = int(state.step)
    images, labels = dataset.test_images, dataset.test_labels
    probabilities = predict_labels(state, images, config.eval_batch_size)
    predicted = probabilities.argmax(-1)
    first = slice(0, 32)
    captions = [f"pred {p} true {t}" for p, t in zip(predicted[first], labels[first], strict=True)]
    colors = ["black" if p == t else "red"
              for p, t in zip(predicted[first], labels[first], strict=True)]
    writer.add_image("test/digits", digit_grid(images[first], captions, colors), step,
                     dataformats="HWC")

    counts = confusion_matrix(labels, predicted, config.num_classes)
    writer.add_image("test/confusion_matrix", confusion_image(counts), step, dataformats="HWC")
    for digit, accuracy in enumerate(per_class_accuracy(counts)):
        if np.isfinite(accuracy):
            writer.add_scalar(f"test/accuracy_class_{digit}", float(accuracy), step)

    error_images, error_captions = worst_errors(images, labels, probabilities)
    if len(error_images):
        gallery = digit_grid(error_images, error_captions, ["red"] * len(error_images),
                             title="Most confident mistakes: true->predicted, confidence")
    else:  # Still an image under the tag, so dashboards and tests find it.
        canvas = Image.new("RGB", (28 * 3 * 4, 28), "white")
        ImageDraw.Draw(canvas).text((4, 8), "no misclassified test digits", fill="black")
        gallery = np.asarray(canvas)
    writer.add_image("test/worst_errors", gallery, step, dataformats="HWC")
    _, _, session_end = tbx_summary.hparams({}, {})
    writer.file_writer.add_summary(session_end)
    writer.flush()
