"""What a run writes to TensorBoard: scalars, the config, and pictures of digits.

tensorboardX writes the event files without TensorFlow. Only process 0 writes (`create_writer`
returns None elsewhere, and every function here accepts None).
"""

from __future__ import annotations

import jax
import ml_collections
import numpy as np
from PIL import Image, ImageDraw
from tensorboardX import SummaryWriter

from mnist_flax import input_pipeline

# Metric names are an API: TensorBoard dashboards, the benchmark and the tests read these tags.
SCALAR_TAGS = (
    "train/loss", "train/accuracy", "test/loss", "test/accuracy",
    "train/learning_rate", "train/images_per_second", "epoch",
)


def create_writer(workdir: str) -> SummaryWriter | None:
    if jax.process_index() != 0:
        return None
    return SummaryWriter(logdir=workdir, flush_secs=10)


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


def write_scalars(writer: SummaryWriter | None, step: int, metrics: dict[str, float]) -> None:
    if writer is None:
        return
    for tag, value in metrics.items():
        writer.add_scalar(tag, value, step)
    writer.flush()


def digit_grid(images: np.ndarray, captions: list[str], colors: list[str],
               columns: int = 8, scale: int = 3) -> np.ndarray:
    """Digits side by side, each with a caption under it: the tutorial's "look at a digit"."""
    cell_w, cell_h = 28 * scale, 28 * scale + 14
    rows = -(-len(images) // columns)
    canvas = Image.new("RGB", (columns * cell_w, rows * cell_h), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (image, caption, color) in enumerate(zip(images, captions, colors, strict=True)):
        x, y = (i % columns) * cell_w, (i // columns) * cell_h
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


def write_final(writer: SummaryWriter | None, state, dataset: input_pipeline.Dataset,
                config: ml_collections.ConfigDict, metrics: dict[str, float]) -> None:
    """End-of-run pictures: the first test digits with predicted and true labels."""
    if writer is None:
        return
    step = int(state.step)
    images, labels = dataset.test_images[:32], dataset.test_labels[:32]
    predicted = predict_labels(state, images).argmax(-1)
    captions = [f"pred {p} true {t}" for p, t in zip(predicted, labels, strict=True)]
    colors = ["black" if p == t else "red" for p, t in zip(predicted, labels, strict=True)]
    writer.add_image("test/digits", digit_grid(images, captions, colors), step,
                     dataformats="HWC")
    writer.flush()
