"""`python -m mnist_flax.main` end to end: a tiny run that writes readable TensorBoard events,
and one-line errors (no traceback, nothing written) for bad flags and configs."""

from __future__ import annotations

import glob
import logging
import warnings

import jax
import numpy as np
import pytest
from conftest import run_module
from tensorboard.backend.event_processing import event_accumulator

from mnist_flax import pictures, profiling, summaries
from mnist_flax.run import process


def run_main(*args: str, env: dict | None = None, timeout: int = 300):
    return run_module("main", *args, env=env, timeout=timeout)


def read_events(workdir) -> event_accumulator.EventAccumulator:
    """TensorBoard's own reader, as the TensorBoard server would load the run."""
    accumulator = event_accumulator.EventAccumulator(
        str(workdir), size_guidance={event_accumulator.SCALARS: 0, event_accumulator.IMAGES: 0})
    accumulator.Reload()
    return accumulator


def test_tiny_run_writes_events_tensorboard_can_read_and_a_rerun_compiles_nothing(tmp_path,
                                                                                   idx_dir):
    """A tiny run, then the same config again on another workdir: config.compilation_cache_dir
    (its own, empty at first) holds what the first compiled, and the second (a fresh process)
    finds every program it runs there, saves nothing and ends with the same result."""
    workdir, cache = tmp_path / "run", tmp_path / "cache"
    args = [f"--config.data_dir={idx_dir}", "--config.num_epochs=2", "--config.batch_size=32",
            "--config.verify_checksums=False", f"--config.compilation_cache_dir={cache}"]
    result = run_main(f"--workdir={workdir}", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert lines[-2].startswith("Test loss:") and lines[-1].startswith("Test accuracy:")
    # The end of the log says where the results are and what to run next.
    assert f"Results in {workdir}" in result.stderr
    assert f"tensorboard --logdir={workdir.parent}\n" in result.stderr  # The run's parent.
    assert f"python -m mnist_flax.predict --workdir={workdir}" in result.stderr
    assert "Unable to initialize backend" not in result.stderr  # JAX's probe of absent TPUs.
    assert "Variant folder" not in result.stderr  # TFDS's probe of a folder that is not there.
    assert "idx (" in result.stderr and "256 train / 64 test" in result.stderr  # Source logged.
    assert "images/s" in result.stderr and "ETA" in result.stderr  # Progress lines.
    assert glob.glob(str(workdir / "events.out.tfevents.*"))

    train, test = read_events(workdir / "train"), read_events(workdir / "test")
    no_peak = profiling.peak_tflops(jax.devices()[0].device_kind, "float32") is None  # CPUs.
    for run, events in (("train", train), ("test", test)):
        assert {tag for r, tag in summaries.SCALAR_TAGS.values() if r == run} - (
            {"speed/utilization"} if no_peak else set()) == set(events.Tags()["scalars"])
        assert [e.step for e in events.Scalars("accuracy")] == [8, 16]  # Every epoch.
    assert train.Scalars("progress/epoch")[-1].value == 2
    assert train.Scalars("speed/tflops_per_device")[-1].value > 0
    final_accuracy = test.Scalars("accuracy")[-1].value
    assert float(lines[-1].split()[-1]) == pytest.approx(final_accuracy, abs=1e-4)
    assert set(pictures.IMAGE_TAGS) == set(test.Tags()["images"])

    saved = sorted(p.name for p in cache.iterdir())
    assert any("train_step" in name or "run" in name for name in saved), saved
    second = run_main(f"--workdir={tmp_path / 'again'}", *args)
    assert second.returncode == 0, second.stderr[-3000:]
    assert sorted(p.name for p in cache.iterdir()) == saved, second.stderr[-3000:]  # All hits.
    assert second.stdout.splitlines()[-2:] == lines[-2:]  # Same result.


def test_help_lists_the_config_flag():
    result = run_main("--help")  # absl exits 1 after its help; parse_flags makes it 0.
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "--config" in result.stdout and "--workdir" in result.stdout


def test_default_command_offline_uses_the_packaged_sample_and_says_so(tmp_path):
    """The README's run command with no data and no network: trains on the sample, loudly."""
    result = run_main(f"--workdir={tmp_path / 'run'}", "--config.num_epochs=1",
                      env={"TFDS_DATA_DIR": str(tmp_path / "tfds"),
                           # A closed local port stands in for the unreachable TFDS host.
                           "MNIST_FLAX_TFDS_URL": "http://127.0.0.1:9/"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "PACKAGED SAMPLE" in result.stderr and "4,000 train / 1,000 test" in result.stderr
    assert "PACKAGED SAMPLE, sample" not in result.stderr  # Said once, not twice.
    assert "Variant folder" not in result.stderr  # TFDS probed no missing folder.
    accuracy = float(result.stdout.strip().splitlines()[-1].split()[-1])
    assert accuracy > 0.85


@pytest.mark.parametrize(
    "args, message",
    [
        (["--config.num_epochs=-1"], "--config.num_epochs=-1: must be a positive integer"),
        (["--config.batch_size=0"], "--config.batch_size=0: must be a positive integer"),
        (["--config.learning_rate=nan"], "--config.learning_rate=nan: must be a finite number"),
        (["--config.learning_rat=0.1"],
         'no such field in the config; did you mean "learning_rate"'),
        (["--config.num_epochs=abc"], "--config.num_epochs=abc"),
        (["--config=experiments/nope.py"], "cannot load the config file"),
        (["--config.data_source=sample", "--config.batch_size=5000"],
         "larger than the 4,000 training images"),
        (["--config.compute_dtype=float16"], "--config.compute_dtype='float16': must be one of"),
        (["--config.kernel_init=glorot"], "--config.kernel_init='glorot': must be one of"),
        (["--config.steps_per_dispatch=-1"],
         "--config.steps_per_dispatch=-1: must be an integer >= 0"),
        (["--config.data_source=idx", "--config.data_dir=/nonexistent"],
         "/nonexistent: not a directory"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, args, message):
    workdir = tmp_path / "run"
    result = run_main(f"--workdir={workdir}", *args)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not glob.glob(str(workdir / "**" / "*"), recursive=True)  # Nothing written.


def test_missing_or_unusable_workdir(tmp_path):
    result = run_main()
    assert result.returncode != 0 and "--workdir" in result.stderr.strip().splitlines()[-1]
    a_file = tmp_path / "file"
    a_file.write_text("keep me")
    result = run_main(f"--workdir={a_file}")
    assert "exists and is not a directory" in result.stderr.strip().splitlines()[-1]
    assert a_file.read_text() == "keep me"
    result = run_main(f"--workdir={a_file}/sub")
    assert "cannot write there" in result.stderr.strip().splitlines()[-1]


def test_an_unusable_compilation_cache_is_one_warning_and_no_cache(tmp_path, caplog):
    """A cache path under a file: one warning naming it and the fix, no cache (JAX warned at each
    compilation)."""
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me")
    before = jax.config.jax_compilation_cache_dir  # The session's (conftest).
    try:
        with caplog.at_level(logging.INFO), warnings.catch_warnings(record=True) as raised:
            warnings.simplefilter("always")
            assert process.enable_compilation_cache(f"{a_file}/cache") == ""
            jax.block_until_ready(jax.jit(lambda x: x * 3 + 1)(np.arange(7.0)))  # New: compiled.
    finally:
        process.enable_compilation_cache(before)
    lines = [r.getMessage() for r in caplog.records if "compil" in r.getMessage()]
    assert lines[0] == (f"The compilation cache {a_file}/cache is unusable (NotADirectoryError: "
                        "Not a directory); compiling without it. Set "
                        "--config.compilation_cache_dir to a writable directory, or '' to turn "
                        "it off"), lines
    assert not [w for w in raised if "compilation cache" in str(w.message)]
    assert a_file.read_text() == "keep me"
