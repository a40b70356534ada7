"""TensorBoard output, read back with TensorBoard's own readers: the tag names are an API.

A stand-in state (a fixed linear "model" over pixel sums) keeps these tests free of compilation;
the model summary uses a real Linen module.
"""

from __future__ import annotations

import jax
import ml_collections
import numpy as np
import pytest
from conftest import load_config
from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.context import RequestContext
from tensorboard.plugins.hparams import metadata as hparams_metadata

from mnist_flax import input_pipeline, models, summaries


def default_config() -> ml_collections.ConfigDict:
    return load_config()


def fake_dataset(n: int = 60) -> input_pipeline.Dataset:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, 28, 28, 1)).astype(np.uint8)
    labels = (np.arange(n) % 10).astype(np.int32)
    return input_pipeline.Dataset(images, labels, images, labels, source="fake")


def fake_probabilities(n: int) -> np.ndarray:
    """Predicts the true label for labels 0-7, and 9 for the 8s and 9s, with known confidence."""
    labels = np.arange(n) % 10
    predicted = np.where(labels >= 8, 9, labels)
    logits = 4.0 * np.eye(10)[predicted] + 0.01 * np.arange(n)[:, None] / n
    return np.asarray(jax.nn.softmax(logits))


@pytest.fixture(scope="module")
def logdir(tmp_path_factory):
    logdir = str(tmp_path_factory.mktemp("tb"))
    config = default_config()
    dataset = fake_dataset()
    with summaries.open_writer(logdir) as writer:
        summaries.write_run_info(writer, config, dataset, {"w": np.zeros((3, 4))})
        summaries.write_model_summary(writer, models.CNN())
        summaries.write_scalars(writer, 7, {tag: 0.5 for tag in summaries.SCALAR_TAGS})
        summaries.write_final(writer, 7, dataset, fake_probabilities(len(dataset.test_labels)),
                              config.num_classes)
    return logdir


def accumulator(logdir: str) -> EventAccumulator:
    acc = EventAccumulator(logdir, size_guidance={"tensors": 0, "images": 0, "scalars": 0})
    acc.Reload()
    return acc


def test_tags_are_the_pinned_names(logdir):
    tags = accumulator(logdir).Tags()
    assert set(summaries.SCALAR_TAGS) | set(summaries.CLASS_ACCURACY_TAGS) <= set(tags["scalars"])
    assert set(summaries.CLASS_ACCURACY_TAGS) == {f"test/accuracy_class_{d}" for d in range(10)}
    assert set(tags["images"]) == {"test/digits", "test/confusion_matrix", "test/worst_errors"}
    # tensorboardX names a text summary '<tag>/text_summary'; TensorBoard shows that name.
    assert {f"{t}/text_summary" for t in summaries.TEXT_TAGS} == {
        "config/text_summary", "data/text_summary", "model/num_params/text_summary",
        "model/summary/text_summary"}
    assert {f"{t}/text_summary" for t in summaries.TEXT_TAGS} <= set(tags["tensors"])


def test_per_class_accuracy_and_confusion_matrix_values(logdir):
    acc = accumulator(logdir)
    values = {d: acc.Scalars(f"test/accuracy_class_{d}")[-1] for d in range(10)}
    assert all(v.step == 7 for v in values.values())
    assert [v.value for v in values.values()] == [1.0] * 8 + [0.0, 1.0]  # 8s called 9.

    counts = summaries.confusion_matrix(np.array([0, 1, 1, 2]), np.array([0, 1, 2, 2]), 3)
    assert counts.tolist() == [[1, 0, 0], [0, 1, 1], [0, 0, 1]]
    assert summaries.per_class_accuracy(counts).tolist() == [1.0, 0.5, 1.0]


def test_images_are_real_pictures(logdir):
    acc = accumulator(logdir)
    matrix = acc.Images("test/confusion_matrix")[-1]
    assert matrix.step == 7 and matrix.width >= 10 * 36 and matrix.height >= 10 * 36
    gallery = acc.Images("test/worst_errors")[-1]
    assert gallery.width == 8 * 28 * 3  # Six misclassified 8s fill one row of 8 columns.


def test_worst_errors_are_the_most_confident_mistakes():
    labels = np.array([0, 1, 2, 3])
    probabilities = np.array([
        [0.9, 0.1, 0.0, 0.0],  # Right.
        [0.6, 0.4, 0.0, 0.0],  # Wrong, 60%.
        [0.0, 0.95, 0.05, 0.0],  # Wrong, 95%.
        [0.0, 0.0, 0.3, 0.7],  # Wrong? No: 3 is right.
    ])
    images = np.arange(4)[:, None, None, None] * np.ones((4, 28, 28, 1), np.uint8)
    worst, captions = summaries.worst_errors(images, labels, probabilities)
    assert captions == ["2->1 95%", "1->0 60%"]
    assert worst[:, 0, 0, 0].tolist() == [2, 1]


def test_model_summary_is_a_layer_table_with_parameter_counts(logdir):
    text = summaries.model_summary(models.CNN())
    for expected in ("Conv_0", "Conv_1", "Dense_0", "Dense_1", "float32[1,26,26,32]",
                     "1,179,776", "Total Parameters: 1,199,882"):
        assert expected in text
    event = accumulator(logdir).Tensors("model/summary/text_summary")[-1]
    assert b"Total Parameters: 1,199,882" in event.tensor_proto.string_val[0]


def test_hparams_reach_tensorboards_hparams_plugin(logdir):
    """Read through the data provider TensorBoard's HParams dashboard itself uses."""
    multiplexer = plugin_event_multiplexer.EventMultiplexer()
    multiplexer.AddRunsFromDirectory(logdir)
    multiplexer.Reload()
    provider = data_provider.MultiplexerDataProvider(multiplexer, logdir)
    series = provider.list_tensors(RequestContext(), experiment_id="",
                                   plugin_name=hparams_metadata.PLUGIN_NAME)
    assert list(series) == ["."]  # The run itself (not a sub-run as add_hparams would make).
    tags = series["."]
    assert {hparams_metadata.EXPERIMENT_TAG, hparams_metadata.SESSION_START_INFO_TAG,
            hparams_metadata.SESSION_END_INFO_TAG} <= set(tags)

    start = hparams_metadata.parse_session_start_info_plugin_data(
        tags[hparams_metadata.SESSION_START_INFO_TAG].plugin_content)
    assert start.hparams["learning_rate"].number_value == pytest.approx(1e-3)
    assert start.hparams["batch_size"].number_value == 128
    assert start.hparams["conv_features"].string_value == "(32, 64)"
    experiment = hparams_metadata.parse_experiment_plugin_data(
        tags[hparams_metadata.EXPERIMENT_TAG].plugin_content)
    assert [m.name.tag for m in experiment.metric_infos] == list(summaries.HPARAM_METRICS)
    assert {h.name for h in experiment.hparam_infos} == set(default_config().keys())


def test_nothing_is_written_off_process_zero():
    for write in (lambda: summaries.write_scalars(None, 1, {"a": 1.0}),
                  lambda: summaries.write_hparams(None, default_config()),
                  lambda: summaries.write_model_summary(None, models.CNN())):
        write()  # Accepts None (what open_writer gives on other processes).


def test_a_resumed_run_keeps_the_metrics_of_its_checkpoint_step(idx_dir, tmp_path):
    """Resuming at an epoch end must not purge that epoch's test metrics from TensorBoard."""
    from conftest import load_config
    from tensorboard.backend.event_processing import event_accumulator

    from mnist_flax import train

    config = load_config()
    config.update(data_dir=str(idx_dir), verify_checksums=False, batch_size=32, num_epochs=1)
    workdir = str(tmp_path / "run")
    train.train_and_evaluate(config, workdir)  # Ends with a checkpoint at step 8.
    config.num_epochs = 2
    train.train_and_evaluate(config, workdir)  # Resumes at step 8.
    events = event_accumulator.EventAccumulator(
        workdir, size_guidance={event_accumulator.SCALARS: 0})
    events.Reload()
    assert [e.step for e in events.Scalars("test/accuracy")] == [8, 16]
