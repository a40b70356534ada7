"""TensorBoard output, read back with TensorBoard's own readers: the tag names are an API.

A stand-in state (a fixed linear "model" over pixel sums) keeps these tests free of compilation;
the model summary uses a real Linen module.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator

import jax
import ml_collections
import numpy as np
import pytest
from conftest import load_config
from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.context import RequestContext
from tensorboard.plugins.hparams import api_pb2 as hparams_api
from tensorboard.plugins.hparams import metadata as hparams_metadata

from mnist_flax import event_reader, input_pipeline, models, pictures, summaries, sweep_results


def default_config() -> ml_collections.ConfigDict:
    return load_config()


def fake_dataset(n: int = 60) -> input_pipeline.Dataset:
    """`n` random images labelled 0-9 in turn, the same ones as train and test set."""
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
    with summaries.open_writers(logdir) as writer:
        summaries.write_run_info(writer, config, dataset, models.CNN(), {"w": np.zeros((3, 4))})
        summaries.write_scalars(writer, 7, dict.fromkeys(summaries.SCALAR_TAGS, 0.5))
        pictures.write_final(writer, 7, dataset, fake_probabilities(len(dataset.test_labels)),
                              config.num_classes)
    return logdir


def accumulator(logdir: str) -> EventAccumulator:
    acc = EventAccumulator(logdir, size_guidance={"tensors": 0, "images": 0, "scalars": 0})
    acc.Reload()
    return acc


def test_tags_are_the_pinned_names(logdir):
    """Keras's layout: train/ and test/ sub-runs with the same curve tags; text in the run."""
    assert {tag for run, tag in summaries.SCALAR_TAGS.values() if run == "test"} == {
        "loss", "accuracy"}
    for run in summaries.RUNS:
        expected = {tag for r, tag in summaries.SCALAR_TAGS.values() if r == run}
        assert set(accumulator(f"{logdir}/{run}").Tags()["scalars"]) == expected
    assert set(accumulator(f"{logdir}/test").Tags()["images"]) == set(pictures.IMAGE_TAGS)
    tags = accumulator(logdir).Tags()
    assert tags["scalars"] == [] and tags["images"] == []  # No single dots in the workdir's run.
    # tensorboardX names a text summary '<tag>/text_summary'; TensorBoard shows that name.
    assert {f"{t}/text_summary" for t in summaries.TEXT_TAGS} == {
        "config/text_summary", "data/text_summary", "model/num_params/text_summary",
        "model/summary/text_summary"}
    assert {f"{t}/text_summary" for t in summaries.TEXT_TAGS} <= set(tags["tensors"])


def test_the_curves_sort_first_so_they_are_the_first_screen():
    """Time Series groups tags by their first '/' part, sorts the groups, opens the first two."""
    tags = [tag for _, tag in summaries.SCALAR_TAGS.values()] + list(pictures.IMAGE_TAGS)
    groups = sorted({tag.split("/", 1)[0] for tag in tags})
    assert groups[:2] == ["accuracy", "loss"]


def test_config_text_is_plain_key_value_lines(logdir):
    text = event_reader.read_text(logdir, "config")
    assert "    conv_features: (32, 64)" in text.splitlines()
    assert "    batch_size: 128" in text.splitlines()
    assert "!!" not in text and "python/tuple" not in text
    assert sweep_results.read_data_sizes(logdir) == (60, 60)


def test_per_class_accuracy_and_confusion_matrix_values():
    counts = pictures.confusion_matrix(np.array([0, 1, 1, 2]), np.array([0, 1, 2, 2]), 3)
    assert counts.tolist() == [[1, 0, 0], [0, 1, 1], [0, 0, 1]]
    assert pictures.per_class_accuracy(counts).tolist() == [1.0, 0.5, 1.0]


def test_shown_digits_are_the_first_of_each_class():
    labels = np.array([0, 0, 0, 0, 1, 1, 2])  # Sorted by class, as the packaged sample's test.
    grid = pictures.first_of_each_class(labels, per_class=2, num_classes=3).reshape(2, 3)
    assert grid.tolist() == [[0, 4, 6], [1, 5, -1]]  # Columns are classes; -1: no second 2.


def test_images_are_real_pictures(logdir):
    acc = accumulator(f"{logdir}/test")
    matrix = acc.Images("predictions/confusion_matrix")[-1]
    assert matrix.step == 7 and matrix.width >= 10 * 36 and matrix.height >= 10 * 36
    gallery = acc.Images("predictions/worst_errors")[-1]
    digits = acc.Images("predictions/digits")[-1]
    # TensorBoard shows an image ~350 px wide: captions in FONT_SIZE stay >= 10 px on screen.
    for image in (matrix, gallery, digits):
        assert pictures.FONT_SIZE * 350 / image.width >= 10, image.width


def test_worst_errors_are_the_most_confident_mistakes():
    labels = np.array([0, 1, 2, 3])
    probabilities = np.array([
        [0.9, 0.1, 0.0, 0.0],  # Right.
        [0.6, 0.4, 0.0, 0.0],  # Wrong, 60%.
        [0.0, 0.95, 0.05, 0.0],  # Wrong, 95%.
        [0.0, 0.0, 0.3, 0.7],  # Wrong? No: 3 is right.
    ])
    images = np.arange(4)[:, None, None, None] * np.ones((4, 28, 28, 1), np.uint8)
    worst, captions = pictures.worst_errors(images, labels, probabilities)
    assert captions == ["2->1 95%", "1->0 60%"]
    assert worst[:, 0, 0, 0].tolist() == [2, 1]


def test_model_summary_is_a_layer_table_with_parameter_counts(logdir):
    text = summaries.model_summary(models.CNN())
    for expected in ("Conv_0", "Conv_1", "Dense_0", "Dense_1", "float32[1,26,26,32]",
                     "1,179,776", "Total Parameters: 1,199,882"):
        assert expected in text
    event = accumulator(logdir).Tensors("model/summary/text_summary")[-1]
    assert b"Total Parameters: 1,199,882" in event.tensor_proto.string_val[0]


def hparams_series(logdir: str) -> dict[str, dict]:
    """{run: {tag: time series}} of the HParams plugin, read through the data provider that
    TensorBoard's HParams dashboard itself uses (it takes each tag's first metadata)."""
    multiplexer = plugin_event_multiplexer.EventMultiplexer()
    multiplexer.AddRunsFromDirectory(logdir)
    multiplexer.Reload()
    provider = data_provider.MultiplexerDataProvider(multiplexer, logdir)
    return provider.list_tensors(RequestContext(), experiment_id="",
                                 plugin_name=hparams_metadata.PLUGIN_NAME)


def session_start(tags: dict):
    """The HParams row's values: the run's session start info."""
    return hparams_metadata.parse_session_start_info_plugin_data(
        tags[hparams_metadata.SESSION_START_INFO_TAG].plugin_content)


def test_hparams_reach_tensorboards_hparams_plugin(logdir):
    """Read through the data provider TensorBoard's HParams dashboard itself uses."""
    series = hparams_series(logdir)
    assert list(series) == ["."]  # The workdir's own run: train/ and test/ hold its metrics.
    tags = series["."]
    assert {hparams_metadata.EXPERIMENT_TAG, hparams_metadata.SESSION_START_INFO_TAG,
            hparams_metadata.SESSION_END_INFO_TAG} <= set(tags)

    start = session_start(tags)
    assert start.hparams["learning_rate"].number_value == pytest.approx(1e-3)
    assert start.hparams["batch_size"].string_value == "128"  # Not "128.00".
    assert start.hparams["conv_features"].string_value == "(32, 64)"
    assert start.hparams[summaries.DATA_HPARAM].string_value == "fake: 60 train / 60 test images"
    experiment = hparams_metadata.parse_experiment_plugin_data(
        tags[hparams_metadata.EXPERIMENT_TAG].plugin_content)
    assert [(m.name.group, m.name.tag) for m in experiment.metric_infos] == list(
        summaries.HPARAM_METRICS)
    assert {h.name for h in experiment.hparam_infos} == {*default_config().keys(),
                                                         summaries.DATA_HPARAM}
    # The dashboard shows the first five columns, `differs` ones first: the key hyperparameters.
    shown = [h.name for h in sorted(experiment.hparam_infos, key=lambda h: not h.differs)][:5]
    assert set(shown) == set(summaries.KEY_HPARAMS) >= {"learning_rate", "num_epochs",
                                                         "batch_size", "seed", "data"}


def test_hparams_after_a_resume_are_the_last_starts_and_a_finished_run_stays_ended(tmp_path):
    """TensorBoard keeps a run's first HParams metadata: each start must replace the previous
    start's row, so a resume with more epochs shows the new num_epochs; a finished run that is
    started again (it trains nothing, writes no final summaries) still shows as ended. Each
    start's config text stays, at the step it began from; starts in the same second (no sleep
    here) write files of their own."""
    workdir, dataset, config = str(tmp_path / "run"), fake_dataset(1024), default_config()
    assert len(dataset.train_labels) // config.batch_size == 8  # Steps per epoch.

    def start(num_epochs: int, start_step: int) -> dict:
        config.num_epochs = num_epochs
        with summaries.open_writers(workdir, start_step) as writers:
            summaries.write_run_info(writers, config, dataset, models.CNN(), {"w": np.zeros(3)})
            for step in range(start_step + 8, 8 * num_epochs + 1, 8):
                summaries.write_scalars(writers, step, dict.fromkeys(summaries.SCALAR_TAGS, 0.5))
        return hparams_series(workdir)["."]

    start(num_epochs=1, start_step=0)  # Interrupted before its end: no final summaries.
    tags = start(num_epochs=2, start_step=8)  # Resumed with a second epoch.
    assert session_start(tags).hparams["num_epochs"].string_value == "2"
    assert session_start(tags).hparams[summaries.DATA_HPARAM].string_value == (
        "fake: 1,024 train / 1,024 test images")
    assert hparams_metadata.SESSION_END_INFO_TAG not in tags  # Running (never finished here).
    tags = start(num_epochs=2, start_step=16)  # Finished: started again, trains nothing.
    assert session_start(tags).hparams["num_epochs"].string_value == "2"
    end = hparams_metadata.parse_session_end_info_plugin_data(
        tags[hparams_metadata.SESSION_END_INFO_TAG].plugin_content)
    assert end.status == hparams_api.STATUS_SUCCESS
    texts = {event.step: event.tensor_proto.string_val[0].decode()
             for event in accumulator(workdir).Tensors("config/text_summary")}
    assert sorted(texts) == [0, 8, 16]
    assert ["num_epochs: 1" in texts[0], "num_epochs: 2" in texts[8]] == [True, True]
    assert len(list(tmp_path.glob("run/events.out.tfevents.*"))) == 1
    # The curves of all three starts, none written over: steps 8 (first) and 16 (second).
    assert [s.step for s in accumulator(f"{workdir}/train").Scalars("loss")] == [8, 16]


def test_nothing_is_written_off_process_zero():
    for write in (lambda: summaries.write_scalars(None, 1, {"a": 1.0}),
                  lambda: summaries.write_hparams(None, default_config(), "fake"),
                  lambda: summaries.write_run_info(None, default_config(), fake_dataset(),
                                                   models.CNN(), {})):
        write()  # Accepts None (what open_writer gives on other processes).


def test_a_resumed_run_keeps_the_metrics_of_its_checkpoint_step(idx_dir, tmp_path, caplog):
    """Resuming at an epoch end must not purge that epoch's test metrics from TensorBoard; and
    restarting a finished run writes no second copy of its final summaries (main's pictures)."""
    from conftest import load_config, train_as_main
    from tensorboard.backend.event_processing import event_accumulator

    config = load_config()
    config.update(data_dir=str(idx_dir), verify_checksums=False, batch_size=32, num_epochs=1)
    workdir = str(tmp_path / "run")
    train_as_main(config, workdir)  # Ends with a checkpoint at step 8.
    config.num_epochs = 2
    train_as_main(config, workdir)  # Resumes at step 8.
    for run in summaries.RUNS:
        events = event_accumulator.EventAccumulator(
            f"{workdir}/{run}", size_guidance={event_accumulator.SCALARS: 0})
        events.Reload()
        assert [e.step for e in events.Scalars("accuracy")] == [8, 16], run
    # HParams shows the config the run ended with, and which data it used.
    start = session_start(hparams_series(workdir)["."])
    assert start.hparams["num_epochs"].string_value == "2"
    assert start.hparams[summaries.DATA_HPARAM].string_value.startswith(f"idx ({idx_dir}): ")

    caplog.set_level(logging.INFO)
    train_as_main(config, workdir)  # Finished: evaluates, trains nothing.
    assert "finished all 2 epochs" in caplog.text and "epoch 3" not in caplog.text
    assert hparams_metadata.SESSION_END_INFO_TAG in hparams_series(workdir)["."]
    events = event_accumulator.EventAccumulator(
        f"{workdir}/test", size_guidance={event_accumulator.IMAGES: 0})
    events.Reload()
    assert [e.step for e in events.Images("predictions/digits")] == [8, 16]  # None added.


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def tensorboard_server(logdir: str, runs: set[str], timeout_s: float = 60.0,
                       args: list[str] | None = None) -> Iterator[str]:
    """A real `tensorboard` on loopback, serving `logdir` (or given the arguments `args` of a
    printed command); yields its URL once `runs` loaded."""
    port = free_port()
    args = args or [f"--logdir={logdir}", "--load_fast=false"]
    server = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", *args, "--host=127.0.0.1", f"--port={port}",
         "--reload_interval=1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if runs <= set(get_json(f"{url}/data/runs")):
                    break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                pytest.fail(f"tensorboard did not serve {logdir}: {server.stderr.read()[-2000:]}")
            time.sleep(0.3)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def get_json(url: str, body: dict | None = None):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def test_tensorboard_serves_train_and_test_curves_and_the_key_hparams(tmp_path):
    """What a user's browser gets from `tensorboard --logdir=runs/` (README), over HTTP, for a
    run of 8 steps an epoch stopped after its first epoch and resumed with num_epochs=2."""
    workdir = str(tmp_path / "run")
    dataset = fake_dataset(1024)
    config = default_config()
    for epoch, step in enumerate((8, 16), start=1):
        config.num_epochs = epoch
        time.sleep(1.1 if epoch > 1 else 0)  # tensorboardX names event files by the second.
        with summaries.open_writers(workdir, start_step=step - 8) as writer:
            summaries.write_run_info(writer, config, dataset, models.CNN(),
                                     {"w": np.zeros((3, 4))})
            summaries.write_scalars(writer, step, {**dict.fromkeys(summaries.SCALAR_TAGS, 0.5),
                                                   "epoch": epoch})
            if epoch == 2:  # The run's end.
                pictures.write_final(writer, step, dataset, fake_probabilities(len(
                    dataset.test_labels)), config.num_classes)

    with tensorboard_server(str(tmp_path), {"run", "run/train", "run/test"}) as url:
        assert set(get_json(f"{url}/data/runs")) == {"run", "run/train", "run/test"}
        scalars = get_json(f"{url}/data/plugin/scalars/tags")
        # The same two tags in both runs: one chart each, train and test overlaid.
        assert set(scalars["run/test"]) == {"loss", "accuracy"}
        assert {"loss", "accuracy"} <= set(scalars["run/train"])
        assert "run" not in scalars  # Nothing written once shows as a single dot.
        for run in ("run/train", "run/test"):
            for tag in ("loss", "accuracy"):
                points = get_json(f"{url}/data/plugin/scalars/scalars?run={run}&tag={tag}")
                assert [step for _, step, _ in points] == [8, 16], (run, tag)
        images = get_json(f"{url}/data/plugin/images/tags")
        assert set(images["run/test"]) == set(pictures.IMAGE_TAGS)
        text = get_json(f"{url}/data/plugin/text/tags")
        assert set(text["run"]) == {f"{t}/text_summary" for t in summaries.TEXT_TAGS}
        plugins = get_json(f"{url}/data/plugins_listing")
        assert all(plugins[p]["enabled"] for p in ("scalars", "images", "text", "hparams"))
        # The HParams dashboard asks for these, shows the first five hyperparameters, and reads
        # each metric column from the run's train/ or test/ curve.
        experiment = get_json(f"{url}/data/plugin/hparams/experiment", {"experimentName": ""})
        first_five = [h["name"] for h in experiment["hparamInfos"]][:5]
        assert set(first_five) == set(summaries.KEY_HPARAMS)
        assert [(m["name"]["group"], m["name"]["tag"]) for m in experiment["metricInfos"]] == list(
            summaries.HPARAM_METRICS)
        groups = get_json(f"{url}/data/plugin/hparams/session_groups", {
            "experimentName": "", "allowedStatuses": ["STATUS_SUCCESS"], "colParams": [],
            "startIndex": 0, "sliceSize": 10})
        [group] = groups["sessionGroups"]
        assert group["hparams"]["batch_size"] == "128"  # Shown as 128, not 128.00.
        assert group["hparams"]["num_epochs"] == "2"  # The resumed run's, not its first start's.
        assert group["hparams"][summaries.DATA_HPARAM] == dataset.describe()
        assert {(m["name"]["group"], m["name"]["tag"]): (m["trainingStep"], m["value"])
                for m in group["metricValues"]} == dict.fromkeys(summaries.HPARAM_METRICS,
                                                                 (16, 0.5))


def test_tensorboardx_is_imported_without_torch_or_gcs_and_both_still_import_after(tmp_path):
    """tensorboardX's writer imports torch where installed (seconds, for tensors nothing here
    passes it), and google-cloud-storage (0.7 s, for gs:// event files only). A stand-in torch
    on the path records whether it was imported, and when; the real GCS client is installed."""
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text(
        "import sys\nIMPORTED_WITH = set(sys.modules)\n")
    script = (
        "import sys\n"
        "import mnist_flax.main\n"
        "from mnist_flax import summaries, tbx\n"
        "assert 'torch' not in sys.modules and 'tensorboardX' not in sys.modules\n"
        "tbx = tbx.tensorboardx()\n"
        "assert 'torch' not in sys.modules, 'tensorboardX imported torch'\n"
        "assert 'google.cloud.storage' not in sys.modules, 'tensorboardX imported GCS'\n"
        "assert tbx.SummaryWriter and tbx.summary.hparams and tbx.proto.event_pb2.Event\n"
        "assert tbx is summaries.tensorboardx(gcs=True) and tbx.record_writer.GCS_ENABLED\n"
        "assert tbx.record_writer.storage is sys.modules['google.cloud.storage']\n"
        "import torch\n"
        "assert 'tensorboardX' in torch.IMPORTED_WITH, torch.__file__\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=120, env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.parametrize("num_classes", [10, 100, 1000])
def test_pictures_are_bounded_by_the_classes_in_the_data_not_num_classes(tmp_path, num_classes):
    """A model of 1,000 classes on MNIST's 10: the pictures are drawn for the classes the test
    labels hold (a prediction of any other is counted as "other"), so their size, and the memory
    drawing them takes, cannot grow with num_classes (1,000 needed 6 GB, after training)."""
    dataset = fake_dataset()
    n = len(dataset.test_labels)
    probabilities = np.zeros((n, num_classes), np.float32)
    predicted = np.where(np.arange(n) % 7, dataset.test_labels, num_classes - 1)  # Some "other".
    probabilities[np.arange(n), predicted] = 1
    with summaries.open_writers(str(tmp_path)) as writer:
        pictures.write_final(writer, 7, dataset, probabilities, num_classes)
    acc = accumulator(f"{tmp_path}/test")
    sizes = {tag: (acc.Images(tag)[-1].width, acc.Images(tag)[-1].height)
             for tag in pictures.IMAGE_TAGS}
    assert all(w * h <= 1000 * 1000 for w, h in sizes.values()), sizes
    rows = 10 * 40 + 40 + pictures.FONT_SIZE + 10  # The 10 classes of the labels, as for 10.
    assert sizes["predictions/confusion_matrix"][1] == rows, sizes
