"""What a run writes to TensorBoard: scalars, the config, hparams, the model, pictures of digits.

tensorboardX writes the event files without TensorFlow. Only process 0 writes (`create_writer`
returns None elsewhere, and every function here accepts None). Tag names are an API: the tuples
below list them and tests/test_summaries.py reads them back with TensorBoard's own reader.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import jax
import ml_collections
import numpy as np
from absl import logging
from tensorboardX import SummaryWriter
from tensorboardX import summary as tbx_summary

from mnist_flax import drawing, input_pipeline
from mnist_flax import workdir as workdir_lib

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
CLOSE_TIMEOUT_S = 30.0  # For the last upload of a gs:// event file.


@contextlib.contextmanager
def open_writer(workdir: str, start_step: int = 0) -> Iterator[SummaryWriter | None]:
    """The run's event writer (None on processes other than 0), closed when the block ends.

    A resumed run (`start_step` > 0) makes TensorBoard drop what the interrupted run logged after
    its checkpoint, which this run logs again, but keep the checkpoint's own step.
    """
    if jax.process_index() != 0:
        yield None
        return
    workdir_lib.check_client(workdir)  # Else a gs:// logdir is an ImportError plus a traceback.
    writer = SummaryWriter(logdir=workdir, flush_secs=10,
                           purge_step=start_step + 1 if start_step else None)
    try:
        yield writer
    finally:
        if workdir_lib.is_remote(workdir):
            _close_remote(writer, workdir)
        else:
            writer.close()


def _close_remote(writer: SummaryWriter, workdir: str) -> None:
    """Closes a gs:// writer within CLOSE_TIMEOUT_S. tensorboardX uploads the whole event file on
    close and retries for 120 s when the bucket is unreachable, then again at exit (atexit and a
    destructor): a run stopping because storage went away would hang minutes and end in a
    traceback. After a failed or slow close it is abandoned (the events of the last
    `flush_secs` are lost; the checkpoints are not)."""
    errors: list[Exception] = []

    def close() -> None:
        try:
            writer.close()
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    thread = threading.Thread(target=close, daemon=True, name="close TensorBoard writer")
    thread.start()
    thread.join(CLOSE_TIMEOUT_S)
    if not thread.is_alive() and not errors:
        return
    reason = f"{type(errors[0]).__name__}" if errors else f"no answer in {CLOSE_TIMEOUT_S:.0f} s"
    logging.warning("could not upload the last TensorBoard events to %s (%s)", workdir, reason)
    try:  # tensorboardX's private attributes: without them, exit retries the upload twice.
        event_writer = writer.file_writer.event_writer
        event_writer._ev_writer._py_recordio_writer._writer.flush = lambda: None
        event_writer._closed = True
    except AttributeError:
        pass


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


def write_final(writer: SummaryWriter | None, step: int, dataset: input_pipeline.Dataset,
                probabilities: np.ndarray, num_classes: int) -> None:
    """End-of-run pictures and per-class accuracy, on the last step.

    `probabilities` are the model's (N, classes) outputs on the test set. Written: the first test
    digits with predicted and true labels; the confusion matrix; the worst misclassified digits;
    `test/accuracy_class_<d>` (the share of class d's test digits the model gets right).
    """
    if writer is None:
        return
    images, labels = dataset.test_images, dataset.test_labels
    predicted = probabilities.argmax(-1)
    first = slice(0, 32)
    captions = [f"pred {p} true {t}" for p, t in zip(predicted[first], labels[first], strict=True)]
    colors = ["black" if p == t else "red"
              for p, t in zip(predicted[first], labels[first], strict=True)]
    writer.add_image("test/digits", drawing.digit_grid(images[first], captions, colors), step,
                     dataformats="HWC")

    counts = confusion_matrix(labels, predicted, num_classes)
    writer.add_image("test/confusion_matrix", drawing.confusion_image(counts), step,
                     dataformats="HWC")
    for digit, accuracy in enumerate(per_class_accuracy(counts)):
        if np.isfinite(accuracy):
            writer.add_scalar(f"test/accuracy_class_{digit}", float(accuracy), step)

    error_images, error_captions = worst_errors(images, labels, probabilities)
    if len(error_images):
        gallery = drawing.digit_grid(error_images, error_captions, ["red"] * len(error_images),
                             title="Most confident mistakes: true->predicted, confidence")
    else:  # Still an image under the tag, so dashboards and tests find it.
        gallery = drawing.message("no misclassified test digits")
    writer.add_image("test/worst_errors", gallery, step, dataformats="HWC")
    _, _, session_end = tbx_summary.hparams({}, {})
    writer.file_writer.add_summary(session_end)
    writer.flush()
