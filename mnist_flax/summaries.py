"""What a run writes to TensorBoard (tensorboardX, no TensorFlow): scalars, config, hparams, model.

Keras's layout: the `train/` and `test/` sub-runs carry the same tags (`loss`, `accuracy`), so
TensorBoard overlays train and test; the workdir's own run holds each start's texts and one
HParams row, which describes the config and data the run ended with. Only process 0 writes
(`open_writers` yields None elsewhere; every function accepts None). Tag names are an API, pinned
by tests/test_summaries.py. tensorboardX comes through `tbx.tensorboardx()` (no torch import).
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import struct
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from tensorboard.plugins.hparams import api_pb2 as hparams_api
from tensorboard.plugins.hparams import plugin_data_pb2 as hparams_data

from mnist_flax import input_pipeline, paths
from mnist_flax.tbx import tensorboardx

if TYPE_CHECKING:
    from tensorboardX import SummaryWriter
    from tensorboardX.proto.event_pb2 import Event
    from tensorboardX.proto.summary_pb2 import Summary

# The names `train_and_evaluate` returns -> the (sub-run, tag) each is written under; Time Series
# groups tags by the part before the first '/' and opens the first two groups, accuracy and loss
# (so the health norms are "norms/", not "health/"). TFLOP/s come from XLA's cost analysis of the
# step, utilisation only where the device's peak is known (`profiling.PEAK_TFLOPS`).
SCALAR_TAGS = {
    "train/loss": ("train", "loss"), "train/accuracy": ("train", "accuracy"),
    "test/loss": ("test", "loss"), "test/accuracy": ("test", "accuracy"),
    "train/learning_rate": ("train", "optimizer/learning_rate"),
    "train/images_per_second": ("train", "speed/images_per_second"),
    "train/tflops_per_device": ("train", "speed/tflops_per_device"),
    "train/utilization": ("train", "speed/utilization"),
    "train/grad_norm": ("train", "norms/gradients"), "train/update_norm": ("train", "norms/update"),
    "train/param_norm": ("train", "norms/parameters"), "epoch": ("train", "progress/epoch"),
}
RUNS = ("train", "test")
# In the workdir's own run, at the step each start began from.
TEXT_TAGS = ("config", "data", "model/num_params", "model/summary")
# The metric columns of TensorBoard's HParams table: the last value of each (sub-run, tag).
HPARAM_METRICS = (("test", "accuracy"), ("test", "loss"), ("train", "accuracy"), ("train", "loss"))
DATA_HPARAM = "data"  # The HParams column of the data used (`Dataset.describe()`).
# The five hyperparameters the HParams dashboard shows first (marked `differs`).
KEY_HPARAMS = ("learning_rate", "num_epochs", "batch_size", "seed", DATA_HPARAM)
# The event files of one writer; the workdir's own run holds one, its latest start's. The run's
# own end in a suffix of 20 digits (`open_writers`); it never deletes or rewrites another's.
EVENTS_GLOB = "events.out.tfevents.*"
OWN_EVENTS = re.compile(r"events\.out\.tfevents\..*\.\d{20}")


@dataclasses.dataclass
class Writers:
    """One event writer per TensorBoard run: the workdir itself and its train/ and test/."""

    run: SummaryWriter
    train: SummaryWriter
    test: SummaryWriter
    start_step: int = 0  # Where this start of the run began (a resumed run: its checkpoint's).

    def flush(self) -> None:
        for writer in (self.run, self.train, self.test):
            writer.flush()


@contextlib.contextmanager
def open_writers(workdir: str, start_step: int = 0) -> Iterator[Writers | None]:
    """The run's event writers (None off process 0), closed when the block ends. A resumed run
    (`start_step` > 0) purges what the interrupted run logged after its checkpoint's step.
    The workdir's own run gets a new file holding the earlier starts' texts (those before
    `start_step`), then the earlier starts' files go, as TensorBoard takes the HParams row from
    a tag's first event only: the run's own files read whole; a damaged one is moved aside."""
    if jax.process_index() != 0:
        yield None
        return
    SummaryWriter = tensorboardx(gcs=paths.is_remote(workdir)).SummaryWriter  # noqa: N806 (the class)

    purge_step = start_step + 1 if start_step else None
    earlier = {f: _text_events(f) for f in sorted(epath.Path(workdir).glob(EVENTS_GLOB))
               if OWN_EVENTS.fullmatch(f.name)}
    texts = [event for events, _ in earlier.values() for event in events
             if event.step < start_step]
    with contextlib.ExitStack() as stack:
        def open_one(logdir: str) -> SummaryWriter:
            # A suffix of its own (OWN_EVENTS), in nanoseconds: tensorboardX names files by the
            # second and host, and TensorBoard reads them in name order, which a purge needs.
            writer = SummaryWriter(logdir=logdir, flush_secs=10, purge_step=purge_step,
                                   filename_suffix=f".{time.time_ns():020d}")
            stack.callback(_close, writer)
            return writer

        run = open_one(workdir)
        for event in texts:
            run.file_writer.add_event(event, step=event.step, walltime=event.wall_time)
        run.flush()
        for events, (_, whole) in earlier.items():  # Damaged: renamed out of TensorBoard's sight.
            if whole:
                events.unlink()
            else:
                aside = events.rename(events.with_name(
                    "damaged-" + events.name.replace(".tfevents.", ".")))
                logging.warning("The event file %s is damaged; moved aside to %s", events, aside)
        yield Writers(run, *(open_one(f"{workdir.rstrip('/')}/{name}") for name in RUNS),
                      start_step=start_step)


def _text_events(events: epath.Path) -> tuple[list[Event], bool]:
    """The TEXT_TAGS events in one event file, and whether it is intact: TensorBoard's reader
    stops quietly at a damaged record; what follows the last record read must be the start of
    one cut short (a kill mid-write), its length intact (8 bytes, then their masked crc32c)."""
    from tensorboard.backend.event_processing import event_file_loader
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c

    Event = tensorboardx().proto.event_pb2.Event  # noqa: N806 (the proto class)
    tags = {f"{tag}/text_summary" for tag in TEXT_TAGS}
    records = list(event_file_loader.RawEventFileLoader(str(events)).Load())
    found = [event for event in map(Event.FromString, records)
             if event.HasField("summary") and {v.tag for v in event.summary.value} <= tags]
    rest = events.read_bytes()[sum(len(r) + 16 for r in records):]  # A record: data + 16 bytes.
    cut_short = len(rest) < 12 or (
        struct.unpack("<I", rest[8:12])[0] == masked_crc32c(rest[:8])
        and struct.unpack("<Q", rest[:8])[0] + 16 > len(rest))
    return found, cut_short


def _close(writer: SummaryWriter) -> None:
    """Closes a writer; one that cannot (a full disk) costs its last events, not the run's error."""
    file_writers = list((writer.all_writers or {}).values())  # close() forgets them.
    try:
        writer.close()
    except Exception as e:  # noqa: BLE001 (tensorboardX raises whatever its file system does)
        logging.warning("TensorBoard events after the last flush are lost (%r)", e)
    # tensorboardX's gs:// file uploads its whole buffer again when garbage-collected, even
    # closed: at a notebook's exit, over a newer run's file, or for minutes of retries once the
    # storage is gone. Closed is final here.
    for file_writer in file_writers:
        records = getattr(getattr(getattr(file_writer.event_writer, "_ev_writer", None),
                                  "_py_recordio_writer", None), "_writer", None)
        if type(records).__name__ == "GCSRecordWriter":
            records.close = lambda: None


def config_text(config: ml_collections.ConfigDict) -> str:
    """`key: value` lines, sorted, values as Python writes them (no YAML tags): for logs."""
    def text(value) -> str:
        if isinstance(value, list):
            value = tuple(value)
        return repr(value) if value == "" else str(value)

    return "\n".join(f"{name}: {text(value)}" for name, value in sorted(config.to_dict().items()))


def _code(text: str) -> str:
    """Four leading spaces: Markdown code, so TensorBoard keeps lines and columns as they are."""
    return "\n".join("    " + line for line in text.splitlines())


def write_run_info(writers: Writers | None, config: ml_collections.ConfigDict,
                   dataset: input_pipeline.Dataset, model, params) -> None:
    """The config, the data, the model's size and layer table and the hparams: on every start,
    into the workdir's own run, the texts at the step this start began from."""
    if writers is None:
        return
    step = writers.start_step
    writers.run.add_text("config", _code(config_text(config)), step)
    writers.run.add_text("data", dataset.describe(), step)
    num_params = sum(np.size(p) for p in jax.tree.leaves(params))
    writers.run.add_text("model/num_params", f"{num_params:,}", step)
    writers.run.add_text("model/summary", _code(model_summary(model)), step)
    write_hparams(writers, config, dataset.describe())
    # A finished run restarted trains nothing and writes no final summaries (`train`), so its row
    # is marked ended here, as the start that finished it did.
    if writers.start_step >= len(dataset.train_labels) // config.batch_size * config.num_epochs:
        writers.run.file_writer.add_summary(tensorboardx().summary.hparams({}, {})[2])


def hparam_values(config: ml_collections.ConfigDict,
                  data: str) -> dict[str, bool | float | str]:
    """Every config field as an HParams value: floats and bools as they are, the rest as text
    (integers too: as doubles the table prints batch size "128.00"; as text, "128"); and the
    data used (DATA_HPARAM), which data_source="auto" alone does not say."""
    values = {name: value if isinstance(value, bool | float | str) else str(
        tuple(value) if isinstance(value, list) else value)
        for name, value in config.to_dict().items()}
    return dict(sorted({**values, DATA_HPARAM: data}.items()))


def experiment_summary(values: dict[str, bool | float | str]) -> Summary:
    """The HParams table's columns: every hyperparameter, KEY_HPARAMS marked to show by default,
    and HPARAM_METRICS read from the train/ and test/ sub-runs (the metric's `group`)."""
    summary_pb2 = tensorboardx().proto.summary_pb2
    Summary, SummaryMetadata = summary_pb2.Summary, summary_pb2.SummaryMetadata  # noqa: N806

    data_types = {bool: "DATA_TYPE_BOOL", str: "DATA_TYPE_STRING"}
    infos = [hparams_api.HParamInfo(name=name, differs=name in KEY_HPARAMS,
                                    type=data_types.get(type(value), "DATA_TYPE_FLOAT64"))
             for name, value in values.items()]
    # The dashboard keeps the server's order, which puts `differs` first and then sorts by name.
    metrics = [hparams_api.MetricInfo(name=hparams_api.MetricName(group=run, tag=tag),
                                      display_name=f"{run} {tag}")
               for run, tag in HPARAM_METRICS]
    data = hparams_data.HParamsPluginData(version=0, experiment=hparams_api.Experiment(
        hparam_infos=infos, metric_infos=metrics))
    metadata = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(
        plugin_name="hparams", content=data.SerializeToString()))
    return Summary(value=[Summary.Value(tag="_hparams_/experiment", metadata=metadata)])


def write_hparams(writers: Writers | None, config: ml_collections.ConfigDict,
                  data: str) -> None:
    """The config and `data` (`Dataset.describe()`) as one row of TensorBoard's HParams table,
    whose metric columns are the last values of the train/ and test/ curves (HPARAM_METRICS), as
    Keras's hparams callback does."""
    if writers is None:
        return
    values = hparam_values(config, data)
    _, session_start, _ = tensorboardx().summary.hparams(values, {})
    writers.run.file_writer.add_summary(experiment_summary(values))
    writers.run.file_writer.add_summary(session_start)


def model_summary(model, input_shape: tuple[int, ...] = input_pipeline.IMAGE_SHAPE) -> str:
    """Linen's layer table: inputs, outputs, parameter shapes and counts per layer."""
    return model.tabulate(jax.random.key(0), np.zeros((1, *input_shape), np.float32),
                          train=False, compute_flops=False,
                          console_kwargs={"width": 120, "force_terminal": False})


def write_scalars(writers: Writers | None, step: int, metrics: dict[str, float]) -> None:
    """`metrics` by the names of SCALAR_TAGS, each written to its sub-run and tag."""
    if writers is None:
        return
    for name, value in metrics.items():
        run, tag = SCALAR_TAGS[name]
        getattr(writers, run).add_scalar(tag, value, step)
    writers.flush()


