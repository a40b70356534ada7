"""What a run writes to TensorBoard: scalars, the config, hparams, the model, pictures of digits.

The layout is Keras's: the workdir's `train/` and `test/` sub-runs carry the same tags (`loss`,
`accuracy`), so TensorBoard draws train and test in one chart; and those two groups sort first,
so they are the first screen. The workdir itself holds what is written once: the config, data and
model as text, and the hyperparameters (one row of the HParams table). tensorboardX writes the
event files without TensorFlow. Only process 0 writes (`open_writer` yields None elsewhere, and
every function here accepts None). Tag names are an API: the constants below list them and
tests/test_summaries.py reads them back with TensorBoard's own reader and server.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import threading
from collections.abc import Iterator

import jax
import ml_collections
import numpy as np
from absl import logging
from tensorboard.plugins.hparams import api_pb2 as hparams_api
from tensorboard.plugins.hparams import plugin_data_pb2 as hparams_data
from tensorboardX import SummaryWriter
from tensorboardX import summary as tbx_summary
from tensorboardX.proto.summary_pb2 import Summary, SummaryMetadata

from mnist_flax import drawing, input_pipeline
from mnist_flax import workdir as workdir_lib

# Metric names are an API. Keys: the names `train_and_evaluate` returns and logs; values: the
# (sub-run, tag) each is written under. TensorBoard's Time Series groups tags by the part before
# the first '/', sorts the groups and opens the first two: `accuracy` and `loss`.
SCALAR_TAGS = {
    "train/loss": ("train", "loss"),
    "train/accuracy": ("train", "accuracy"),
    "test/loss": ("test", "loss"),
    "test/accuracy": ("test", "accuracy"),
    "train/learning_rate": ("train", "optimizer/learning_rate"),
    "train/images_per_second": ("train", "speed/images_per_second"),
    "epoch": ("train", "progress/epoch"),
}
RUNS = ("train", "test")
# Written once at the end of training, on the last step, in the test run. The group sorts after
# the curves. Per-class accuracy is the confusion matrix's last column.
IMAGE_TAGS = ("predictions/confusion_matrix", "predictions/digits", "predictions/worst_errors")
# In the workdir's own run, at step 0.
TEXT_TAGS = ("config", "data", "model/num_params", "model/summary")
# The metric columns of TensorBoard's HParams table: the last value of each (sub-run, tag).
HPARAM_METRICS = (("test", "accuracy"), ("test", "loss"), ("train", "accuracy"), ("train", "loss"))
# The HParams dashboard shows the first five hyperparameters (those marked `differs` first) and
# hides the rest behind checkboxes: these are the five a reader of a run looks for.
KEY_HPARAMS = ("learning_rate", "num_epochs", "batch_size", "seed", "lr_schedule")
DIGITS_PER_CLASS = 3  # Test digits shown per class: the first of each, so every class appears.
WORST_ERRORS = 20  # Misclassified test digits shown, most confident first,
ERROR_COLUMNS = 5  # in rows of five, so their captions stay readable.
CLOSE_TIMEOUT_S = 30.0  # For the last upload of a gs:// event file.


@dataclasses.dataclass
class Writers:
    """One event writer per TensorBoard run: the workdir itself and its train/ and test/."""

    run: SummaryWriter
    train: SummaryWriter
    test: SummaryWriter

    def flush(self) -> None:
        for writer in (self.run, self.train, self.test):
            writer.flush()


@contextlib.contextmanager
def open_writer(workdir: str, start_step: int = 0) -> Iterator[Writers | None]:
    """The run's event writers (None on processes other than 0), closed when the block ends.

    A resumed run (`start_step` > 0) makes TensorBoard drop, in each sub-run, what the
    interrupted run logged after its checkpoint, which this run logs again, but keep the
    checkpoint's own step.
    """
    if jax.process_index() != 0:
        yield None
        return
    workdir_lib.check_client(workdir)  # Else a gs:// logdir is an ImportError plus a traceback.
    purge_step = start_step + 1 if start_step else None
    with contextlib.ExitStack() as stack:
        def open_one(logdir: str) -> SummaryWriter:
            writer = SummaryWriter(logdir=logdir, flush_secs=10, purge_step=purge_step)
            if workdir_lib.is_remote(logdir):
                stack.callback(_close_remote, writer, logdir)
            else:
                stack.callback(writer.close)
            return writer

        yield Writers(open_one(workdir), *(open_one(f"{workdir.rstrip('/')}/{run}")
                                           for run in RUNS))


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


def config_text(config: ml_collections.ConfigDict) -> str:
    """`key: value` lines, sorted, values as Python writes them (no YAML tags): for logs."""
    def text(value) -> str:
        if isinstance(value, list):
            value = tuple(value)
        return repr(value) if value == "" else str(value)

    return "\n".join(f"{name}: {text(value)}" for name, value in sorted(config.to_dict().items()))


def write_run_info(writers: Writers | None, config: ml_collections.ConfigDict,
                   dataset: input_pipeline.Dataset, params) -> None:
    """The config, the data source and sizes, and the model size, written once as text."""
    if writers is None:
        return
    # Four leading spaces: Markdown code, so TensorBoard keeps the lines as they are.
    writers.run.add_text("config", "\n".join("    " + line
                                             for line in config_text(config).splitlines()), 0)
    writers.run.add_text("data", dataset.describe(), 0)
    writers.run.add_text("model/num_params", f"{count_params(params):,}", 0)
    write_hparams(writers, config)


_DATA_SIZES = re.compile(r"([\d,]+) train / ([\d,]+) test images")


def read_text(logdir: str, tag: str) -> str | None:
    """The last text written under `tag` in `logdir`'s own run, read with TensorBoard's reader."""
    from tensorboard.backend.event_processing import event_accumulator

    events = event_accumulator.EventAccumulator(logdir,
                                                size_guidance={event_accumulator.TENSORS: 0})
    events.Reload()
    name = f"{tag}/text_summary"  # tensorboardX's name for a text summary.
    if name not in events.Tags()["tensors"]:
        return None
    return events.Tensors(name)[-1].tensor_proto.string_val[0].decode()


def read_data_sizes(logdir: str) -> tuple[int, int] | None:
    """(train images, test images) a run trained and tested on, from its `data` text."""
    match = _DATA_SIZES.search(read_text(logdir, "data") or "")
    return (int(match[1].replace(",", "")), int(match[2].replace(",", ""))) if match else None


def hparam_values(config: ml_collections.ConfigDict) -> dict[str, bool | float | str]:
    """Every config field as a value the HParams plugin takes: floats and bools as they are,
    the rest as text. Integers too: the plugin's numbers are doubles, which its table prints with
    five significant digits (batch size "128.00", seed "0.0000"); as text they read "128", "0",
    and a sweep over them gets a checkbox per value instead of a min/max filter."""
    values = {}
    for name, value in sorted(config.to_dict().items()):
        ok = isinstance(value, bool | float | str)
        values[name] = value if ok else str(tuple(value) if isinstance(value, list) else value)
    return values


def _hparams_summary(tag: str, data: hparams_data.HParamsPluginData) -> Summary:
    metadata = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(
        plugin_name="hparams", content=data.SerializeToString()))
    return Summary(value=[Summary.Value(tag=tag, metadata=metadata)])


def experiment_summary(values: dict[str, bool | float | str]) -> Summary:
    """The HParams table's columns: every hyperparameter, KEY_HPARAMS marked to show by default,
    and HPARAM_METRICS read from the train/ and test/ sub-runs (the metric's `group`)."""
    types = {bool: "DATA_TYPE_BOOL", str: "DATA_TYPE_STRING"}
    infos = [hparams_api.HParamInfo(name=name, differs=name in KEY_HPARAMS,
                                    type=types.get(type(value), "DATA_TYPE_FLOAT64"))
             for name, value in values.items()]
    # The dashboard keeps the server's order, which puts `differs` first and then sorts by name.
    metrics = [hparams_api.MetricInfo(name=hparams_api.MetricName(group=run, tag=tag),
                                      display_name=f"{run} {tag}")
               for run, tag in HPARAM_METRICS]
    experiment = hparams_api.Experiment(hparam_infos=infos, metric_infos=metrics)
    return _hparams_summary("_hparams_/experiment",
                            hparams_data.HParamsPluginData(experiment=experiment, version=0))


def write_hparams(writers: Writers | None, config: ml_collections.ConfigDict) -> None:
    """The config as HParams-plugin summaries in the workdir's own run.

    That makes the run one row of TensorBoard's HParams table, with the last values of its
    train/ and test/ curves (HPARAM_METRICS) as the metric columns, as Keras's hparams callback.
    """
    if writers is None:
        return
    values = hparam_values(config)
    _, session_start, _ = tbx_summary.hparams(values, {})
    writers.run.file_writer.add_summary(experiment_summary(values))
    writers.run.file_writer.add_summary(session_start)


def model_summary(model, input_shape: tuple[int, ...] = input_pipeline.IMAGE_SHAPE) -> str:
    """Linen's layer table: inputs, outputs, parameter shapes and counts per layer."""
    return model.tabulate(jax.random.key(0), np.zeros((1, *input_shape), np.float32),
                          train=False, compute_flops=False,
                          console_kwargs={"width": 120, "force_terminal": False})


def write_model_summary(writers: Writers | None, model) -> None:
    if writers is None:
        return
    # Four leading spaces: a Markdown code block, so the table's columns stay aligned.
    table = "\n".join("    " + line for line in model_summary(model).splitlines())
    writers.run.add_text("model/summary", table, 0)


def write_scalars(writers: Writers | None, step: int, metrics: dict[str, float]) -> None:
    """`metrics` by the names of SCALAR_TAGS, each written to its sub-run and tag."""
    if writers is None:
        return
    for name, value in metrics.items():
        run, tag = SCALAR_TAGS[name]
        getattr(writers, run).add_scalar(tag, value, step)
    writers.flush()


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
    predicted = probabilities.argmax(-1)
    confidence = probabilities.max(-1)
    wrong = np.flatnonzero(predicted != labels)
    worst = wrong[np.argsort(-confidence[wrong], kind="stable")][:count]
    captions = [f"{labels[i]}->{predicted[i]} {confidence[i]:.0%}" for i in worst]
    return images[worst], captions


def write_final(writers: Writers | None, step: int, dataset: input_pipeline.Dataset,
                probabilities: np.ndarray, num_classes: int) -> None:
    """End-of-run pictures in the test run, on the last step, and the HParams session's end.

    `probabilities` are the model's (N, classes) outputs on the test set. Written: the first
    test digits of each class with their predicted labels; the confusion matrix with each class's
    accuracy; the worst misclassified digits.
    """
    if writers is None:
        return
    images, labels = dataset.test_images, dataset.test_labels
    predicted = probabilities.argmax(-1)
    shown = first_of_each_class(labels, num_classes=num_classes)
    blank = np.zeros_like(images[0])
    writers.test.add_image("predictions/digits", drawing.digit_grid(
        [images[i] if i >= 0 else blank for i in shown],
        [str(predicted[i]) if i >= 0 else "" for i in shown],
        ["black" if i < 0 or predicted[i] == labels[i] else "red" for i in shown],
        columns=num_classes, scale=2, title="Predicted digit; red: wrong"),
        step, dataformats="HWC")

    counts = confusion_matrix(labels, predicted, num_classes)
    writers.test.add_image("predictions/confusion_matrix", drawing.confusion_image(counts), step,
                           dataformats="HWC")

    error_images, error_captions = worst_errors(images, labels, probabilities)
    if len(error_images):
        gallery = drawing.digit_grid(error_images, error_captions, ["red"] * len(error_images),
                                     columns=ERROR_COLUMNS, scale=2,
                                     title="Surest mistakes: true->predicted")
    else:  # Still an image under the tag, so dashboards and tests find it.
        gallery = drawing.message("no misclassified test digits")
    writers.test.add_image("predictions/worst_errors", gallery, step, dataformats="HWC")
    _, _, session_end = tbx_summary.hparams({}, {})
    writers.run.file_writer.add_summary(session_end)
    writers.flush()
