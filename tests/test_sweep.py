"""mnist_flax.sweep: specs parse to typed values or fail in one line; runs land as separate runs."""

import json
import logging
import os
import subprocess
import sys

import pytest
from conftest import REPO, TINY_FLAGS, load_config, one_line, run_module, write_idx_dir

from mnist_flax import event_reader, sweep, sweep_results
from mnist_flax.run import config_checks


def test_values_are_typed_like_the_field():
    config = load_config()
    assert sweep.parse_sweep("learning_rate=1e-4,3e-4,1", config) == [
        ("learning_rate", 1e-4, "1e-4"), ("learning_rate", 3e-4, "3e-4"),
        ("learning_rate", 1.0, "1")]
    assert [v for _, v, _ in sweep.parse_sweep("seed=0,1,2", config)] == [0, 1, 2]
    assert [v for _, v, _ in sweep.parse_sweep("fast_ops=true,False", config)] == [True, False]
    assert [v for _, v, _ in sweep.parse_sweep("lr_schedule=cosine,'one_cycle'", config)] == [
        "cosine", "one_cycle"]
    assert [v for _, v, _ in sweep.parse_sweep("conv_features=(32,64),(64, 128)", config)] == [
        (32, 64), (64, 128)]


@pytest.mark.parametrize("field, text", [
    ("seed", "01"), ("seed", "0x10"), ("seed", "1_000"), ("learning_rate", "1e-3"),
    ("learning_rate", "3"), ("fast_ops", "t"), ("fast_ops", "0"), ("conv_features", "32"),
    ("conv_features", "[16, 32]"), ("lr_schedule", "cosine")])
def test_a_swept_value_is_what_the_same_config_flag_would_set(field, text, monkeypatch):
    """A run of the sweep is the run `python -m mnist_flax.main --config.FIELD=TEXT` would be."""
    from absl import flags
    from ml_collections import config_flags

    monkeypatch.setattr(sys, "argv", ["main", f"--config.{field}={text}"])  # Read at definition.
    values = flags.FlagValues()
    config_flags.DEFINE_config_dict("config", load_config(), flag_values=values)
    values(sys.argv)
    [(_, value, _)] = sweep.parse_sweep(f"{field}={text}", load_config())
    assert value == values.config[field] and type(value) is type(values.config[field])


@pytest.mark.parametrize("spec, message", [
    ("learning_rate", "expected key=value1,value2"),
    ("=1,2", "expected key=value1,value2"),
    ("learning_rat=1e-3", "the config has no field 'learning_rat'"),
    ("learning_rate=1e-3,abc", r"^--sweep learning_rate: 'abc' is not a number$"),
    ("learning_rate=1e-3,,2e-3", "empty value"),
    ("seed=1.5", r"^--sweep seed: '1.5' is not an integer$"),
    ("seed=x", r"^--sweep seed: 'x' is not an integer$"),  # Not "a int".
    ("seed=1,01", r"^--sweep seed: 01 is given twice \(as 1 and 01\)$"),  # As main reads 01.
    ("fast_ops=yes", "'yes' is not a bool"),
    ("conv_features=(32,", "is not a tuple"),
    ("seed=0,0,1", r"^--sweep seed: 0 is given twice$"),
    ("learning_rate=1e-3,3e-3,0.001", r"^--sweep learning_rate: 0.001 is given twice \(as 1e-3 "
                                      r"and 0.001\)$"),
    ("conv_features=(4,8),(4, 8)", r"\(4, 8\) is given twice \(as \(4,8\) and \(4, 8\)\)"),
])
def test_bad_specs_fail_with_one_line(spec, message):
    with pytest.raises(config_checks.ConfigError, match=message) as info:
        sweep.parse_sweep(spec, load_config())
    assert "\n" not in str(info.value)


def test_grid_order_and_names():
    grid = sweep.expand(["learning_rate=1e-3,3e-3", "seed=0,1"], load_config())
    assert [sweep.run_name(a) for a in grid] == [
        "learning_rate=1e-3/seed=0", "learning_rate=1e-3/seed=1",
        "learning_rate=3e-3/seed=0", "learning_rate=3e-3/seed=1"]
    with pytest.raises(config_checks.ConfigError, match="swept twice"):
        sweep.expand(["seed=0", "seed=1"], load_config())
    config = load_config()
    run = sweep.run_config(config, grid[-1])
    assert (run.learning_rate, run.seed) == (3e-3, 1)
    assert (config.learning_rate, config.seed) == (1e-3, 0)  # The base config is untouched.


def test_each_value_names_one_directory_of_its_own():
    """A `/` in a value nested directories, and /tmp/a, /tmp/a/ and /tmp//a shared one run."""
    names = [sweep.run_name((("tfds_data_dir", text, text),))
             for text in ("/tmp/a", "/tmp/a/", "/tmp//a", "%2Ftmp%2Fa", "c:\\a")]
    assert names == ["tfds_data_dir=%2Ftmp%2Fa", "tfds_data_dir=%2Ftmp%2Fa%2F",
                     "tfds_data_dir=%2Ftmp%2F%2Fa", "tfds_data_dir=%252Ftmp%252Fa",
                     "tfds_data_dir=c:%5Ca"]
    # Ordinary values keep their names, as typed.
    assert [sweep.run_name(((k, None, t),)) for k, t in [
        ("learning_rate", "1e-3"), ("conv_features", "(32, 64)"), ("lr_schedule", "'cosine'"),
        ("seed", "-1")]] == ["learning_rate=1e-3", "conv_features=(32, 64)",
                             "lr_schedule='cosine'", "seed=-1"]


def _tiny_config():
    config = load_config()
    config.update(data_source="sample", num_epochs=1, batch_size=500, conv_features=(8, 16),
                  dense_features=16)
    return config


def test_runs_that_would_share_a_directory_are_refused_before_any_training(tmp_path, monkeypatch):
    """Whatever the names, two runs in one directory would be one run reported twice."""
    monkeypatch.setattr(sweep, "run_name", lambda a: "/".join(f"{k}={t}" for k, _, t in a))
    with pytest.raises(config_checks.ConfigError) as info:
        sweep.run_sweep(_tiny_config(), str(tmp_path), ["tfds_data_dir=/tmp/a,/tmp/a/"])
    assert str(info.value) == (f"--sweep: tfds_data_dir=/tmp/a and tfds_data_dir=/tmp/a/ would "
                               f"both train in {tmp_path}/tfds_data_dir=/tmp/a; sweep each value "
                               "once")
    assert not os.listdir(tmp_path)


def test_a_value_too_long_for_a_directory_name_is_refused_before_any_training(tmp_path):
    with pytest.raises(config_checks.ConfigError, match=r"^--sweep tfds_data_dir: the run "
                       r"directory for x+ would be named in 314 bytes, over the 255 a file "
                       r"system allows; sweep a shorter value$"):
        sweep.run_sweep(_tiny_config(), str(tmp_path), ["tfds_data_dir=a," + "x" * 300])
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize("where, message", [
    ("dir", "is a directory; pass a file, e.g. --results={path}/results.json"),
    ("file/r.json", "{tmp}/file is a file, not a directory; pass a file in a directory"),
    ("file/deeper/r.json", "{tmp}/file is a file, not a directory; pass a file in a directory"),
])
def test_results_that_cannot_be_written_are_refused_in_one_line(tmp_path, where, message):
    (tmp_path / "dir").mkdir()
    (tmp_path / "file").write_text("kept")
    path = str(tmp_path / where)
    with pytest.raises(config_checks.ConfigError) as info:
        sweep_results.check_results(path)
    assert str(info.value) == f"--results={path}: " + message.format(path=path, tmp=tmp_path)
    # A file that can be written: an earlier one is left as it was, a new one is not made yet.
    sweep_results.check_results(str(tmp_path / "file"))
    sweep_results.check_results(str(tmp_path / "new.json"))
    sweep_results.check_results(str(tmp_path / "new" / "r.json"))  # Its directory is made.
    assert sorted(os.listdir(tmp_path)) == ["dir", "file", "new"]
    assert (tmp_path / "file").read_text() == "kept"


def test_a_results_write_that_fails_mid_sweep_loses_no_run(tmp_path, caplog):
    """The sweep goes on (each run is kept in its directory); the end says so in one line."""
    path = tmp_path / "results.json"
    results = sweep_results.ResultsFile(str(path), load_config(), "python -m mnist_flax.sweep ...")
    path.mkdir()  # Made after the check, say by another program.
    run = _result("seed=0", 0.9, seed=0)
    results.write([run])  # Does not raise: the next run still trains.
    assert "not written (IsADirectoryError" in caplog.text
    with pytest.raises(config_checks.ConfigError) as info:
        results.finish("runs/s")
    assert str(info.value).startswith(f"--results={path}: not written (IsADirectoryError: ")
    assert str(info.value).endswith(
        "; every run is kept under runs/s and the table above has their results; run the same "
        "command with a writable --results to write them (no run trains again)")
    path.rmdir()
    results.write([run])  # A later write that works writes every run so far, and ends well.
    assert json.loads(path.read_text())["runs"][0]["name"] == "seed=0"
    results.finish("runs/s")


def test_every_run_is_validated_before_any_trains(tmp_path):
    with pytest.raises(config_checks.ConfigError, match="learning_rate=-1"):
        sweep.run_sweep(load_config(), str(tmp_path), ["learning_rate=1e-3,-1"])
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize("spec, overrides, message", [
    ("batch_size=500,5000", {}, "--sweep batch_size=5000: --config.batch_size=5000 is larger "
     "than the 4,000 training images; use a smaller batch"),
    ("num_classes=10,5", {}, "--sweep num_classes=5: --config.num_classes=5 but the data has "
     "label 9; use --config.num_classes=10 or more"),
    ("num_epochs=2,1", {"lr_schedule": "cosine", "warmup_epochs": 0.95},
     "--sweep num_epochs=1: --config.warmup_epochs=0.95 is 8 steps, not fewer than the run's 8 "
     "(1 epochs of 8): the cosine schedule would never decay; use a smaller warmup_epochs"),
    # Each point is checked against its own data: here 256 training images, not the sample's.
    ("data_source=sample,idx", {"verify_checksums": False}, "--sweep data_source=idx: "
     "--config.batch_size=500 is larger than the 256 training images; use a smaller batch"),
])
def test_every_point_is_checked_against_its_data_before_any_trains(tmp_path, spec, overrides,
                                                                   message):
    """`batch_size=128,5000` on 4,000 images trained 128 first, then refused 5000."""
    config = _tiny_config()
    config.update(data_dir=str(write_idx_dir(tmp_path / "mnist")), **overrides)
    with pytest.raises(config_checks.ConfigError) as info:
        sweep.run_sweep(config, str(tmp_path / "sweep"), [spec])
    assert not (tmp_path / "sweep").exists()  # Nothing trained, nothing written.
    assert str(info.value) == message


def test_cli_a_diverged_value_is_marked_and_the_others_still_train(tmp_path):
    """One diverging value stopped the whole sweep: the values after it never trained, and no
    table. Now it is a row of the table and of the JSON, with its error line, and exit 3."""
    diverged, trained = "learning_rate=1e10", "learning_rate=1e-3"
    results = tmp_path / "results.json"
    out = run_module("sweep", f"--workdir={tmp_path}/sweep", "--sweep=learning_rate=1e10,1e-3",
                     f"--results={results}", "--config.data_source=sample",
                     "--config.num_epochs=1", "--config.batch_size=500",
                     *TINY_FLAGS)
    last = one_line(out, 3)  # Not 1: the sweep ran to its end, and its table is whole.
    assert last == (f"error: 1 of 2 runs diverged ({diverged}); the table above has the others' "
                    "results")
    payload = json.loads(results.read_text())
    runs = {r["name"]: r for r in payload["runs"]}
    assert runs[diverged]["status"] == "diverged" and runs[diverged]["test_accuracy"] is None
    assert runs[diverged]["error"].startswith("training loss became nan at step "), runs[diverged]
    assert runs[trained]["status"] == "trained" and 0 <= runs[trained]["test_accuracy"] <= 1
    assert [(g["group"], g["runs"], g["diverged"]) for g in payload["summary"]["groups"]] == [
        (diverged, 0, 1), (trained, 1, 0)]
    lines = out.stdout.splitlines()
    row = {name: next(line.split() for line in lines if line.startswith(name + "  "))
           for name in runs}
    assert row[diverged][1:3] == ["diverged", "-"], out.stdout
    assert float(row[trained][1]) == pytest.approx(runs[trained]["test_accuracy"], abs=1e-4)
    assert f"{diverged}: no test accuracy (1 diverged)" in lines, out.stdout
    assert f"{diverged} diverged: {runs[diverged]['error']}" in lines, out.stdout
    # experiments/plot.py reads such a results file too (it formatted None: a TypeError).
    plot = subprocess.run([sys.executable, str(REPO / "experiments" / "plot.py"), "--table",
                           str(results)], capture_output=True, text=True, timeout=120)
    assert plot.returncode == 0, plot.stderr[-3000:]
    assert f"{diverged}: diverged" in plot.stdout and f"{trained}: " in plot.stdout


def _result(name: str, accuracy: float, **overrides) -> dict:
    """A run's result as run_sweep records it (only the fields the summary reads)."""
    group = "/".join(f"{k}={v}" for k, v in overrides.items() if k != "seed")
    return {"name": name, "group": group, "overrides": overrides, "status": "trained",
            "test_accuracy": accuracy, "test_loss": 0.1, "epochs": 1, "run_seconds": 1.0}


def test_summary_is_mean_and_sample_std():
    runs = [_result(f"seed={i}", a, seed=i) for i, a in enumerate((0.990, 0.992, 0.994))]
    summary = sweep_results.summarize(runs)
    assert summary["test_accuracy_mean"] == pytest.approx(0.992)  # What experiments/plot.py reads.
    assert summary["test_accuracy_std"] == pytest.approx(0.002)
    [group] = summary["groups"]
    assert group["runs"] == 3 and group["test_accuracy_mean"] == pytest.approx(0.992)
    assert sweep_results.format_table(runs).splitlines()[-1] == (
        "test accuracy 99.20 ± 0.20% (mean ± sample std over 3 runs)")
    assert sweep.group_name((("seed", 2, "2"),)) == ""


def test_summary_is_per_learning_rate_over_its_seeds_not_over_all_runs():
    """A mean ± std over different learning rates means nothing: one per group of seeds."""
    accuracy = {(1e-3, 0): 0.90, (1e-3, 1): 0.92, (3e-3, 0): 0.96, (3e-3, 1): 0.98}
    runs = [_result(f"learning_rate={lr}/seed={seed}", a, learning_rate=lr, seed=seed)
            for (lr, seed), a in accuracy.items()]
    summary = sweep_results.summarize(runs)
    assert "test_accuracy_mean" not in summary and summary["runs"] == 4
    assert [(g["group"], g["overrides"], g["runs"]) for g in summary["groups"]] == [
        ("learning_rate=0.001", {"learning_rate": 1e-3}, 2),
        ("learning_rate=0.003", {"learning_rate": 3e-3}, 2)]
    assert [g["test_accuracy_mean"] for g in summary["groups"]] == pytest.approx([0.91, 0.97])
    assert [g["test_accuracy_std"] for g in summary["groups"]] == pytest.approx([0.02 / 2**0.5] * 2)
    assert sweep_results.format_table(runs).splitlines()[-2:] == [
        "learning_rate=0.001: test accuracy 91.00 ± 1.41% (mean ± sample std over 2 runs)",
        "learning_rate=0.003: test accuracy 97.00 ± 1.41% (mean ± sample std over 2 runs)"]
    # run_sweep's name for a group: the run's name without its seed.
    assert sweep.group_name((("learning_rate", 1e-3, "1e-3"), ("seed", 0, "0"))) == (
        "learning_rate=1e-3")


def test_reading_events_back_logs_nothing_at_info(tmp_path, caplog):
    """TensorBoard's reader says "No path found after <file>" at INFO per file; the sweep reads
    every run back, so those lines drowned its table. Quiet only for the read: the level is back."""
    from tensorboardX import SummaryWriter

    with SummaryWriter(logdir=str(tmp_path)) as writer:
        writer.add_scalar("accuracy", 0.5, 1)
        writer.add_text("data", "4,000 train / 1,000 test images", 0)
    tensorboard_logger = logging.getLogger("tensorboard")
    level = tensorboard_logger.level
    caplog.set_level(logging.INFO)
    assert event_reader.read_scalars(str(tmp_path), "accuracy") == [(1, 0.5)]
    assert sweep_results.read_data_sizes(str(tmp_path)) == (4000, 1000)
    assert [r.getMessage() for r in caplog.records if r.name.startswith("tensorboard")] == []
    assert tensorboard_logger.level == level


def test_cli_sweeps_into_separate_tensorboard_runs(tmp_path):
    workdir, results = tmp_path / "sweep", tmp_path / "results.json"
    cmd = [sys.executable, "-m", "mnist_flax.sweep", f"--workdir={workdir}",
           "--sweep=learning_rate=1e-3,3e-3", "--sweep=seed=0,1",
           "--config.data_source=sample", "--config.num_epochs=1", "--config.batch_size=500",
           *TINY_FLAGS, f"--results={results}"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert sorted(os.listdir(workdir)) == ["learning_rate=1e-3", "learning_rate=3e-3"]
    payload = json.loads(results.read_text())
    names = [f"learning_rate={lr}/seed={seed}" for lr in ("1e-3", "3e-3") for seed in (0, 1)]
    assert [r["name"] for r in payload["runs"]] == names
    for run in payload["runs"]:
        assert 0.0 <= run["test_accuracy"] <= 1.0
        # What TensorBoard shows for the run is what the run returned.
        assert run["test_accuracy_per_epoch"] == [pytest.approx(run["test_accuracy"])]
        assert run["train_images"] == 4000 and run["run_seconds"] > 0
    assert payload["config"]["learning_rate"] == 1e-3 and payload["process_seconds"] > 0
    # One mean ± std per learning rate, over its two seeds; none over all four runs.
    groups = payload["summary"]["groups"]
    assert [(g["group"], g["runs"]) for g in groups] == [
        ("learning_rate=1e-3", 2), ("learning_rate=3e-3", 2)]
    assert "test_accuracy_mean" not in payload["summary"]
    lines = out.stdout.splitlines()
    for g in groups:
        assert (f"{g['group']}: test accuracy {100 * g['test_accuracy_mean']:.2f} ± "
                f"{100 * g['test_accuracy_std']:.2f}% (mean ± sample std over 2 runs)") in lines
    assert "over 4 runs" not in out.stdout
    assert "No path found" not in out.stderr  # TensorBoard's reader, reading the runs back.


def test_cli_bad_spec_is_one_line_error(tmp_path):
    cmd = [sys.executable, "-m", "mnist_flax.sweep", f"--workdir={tmp_path}",
           "--sweep=nope=1,2"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode != 0
    assert out.stderr.strip().splitlines()[-1] == (
        "error: --sweep=nope=1,2: the config has no field 'nope'")


def test_cli_results_in_a_directory_is_one_line_before_any_training(tmp_path):
    """It used to train the first run, then stop with a traceback file and 'please report it'."""
    cmd = [sys.executable, "-m", "mnist_flax.sweep", f"--workdir={tmp_path}/sweep",
           "--config.data_source=sample", "--config.num_epochs=1", "--sweep=seed=0,1",
           f"--results={tmp_path}"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1] == (
        f"error: --results={tmp_path}: is a directory; pass a file, e.g. "
        f"--results={tmp_path}/results.json")
    assert os.listdir(tmp_path) == []  # No run trained.


def test_cli_mistyped_config_key_is_one_line_error(tmp_path):
    """The sweep shares main's --config flag: a typo is one line, not a traceback."""
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "mnist_flax.sweep", f"--workdir={tmp_path}/sweep",
         "--config.learning_rat=1", "--sweep=seed=0"],
        capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        'error: --config.learning_rat: no such field in the config; did you mean "learning_rate"?')


def test_cli_workdir_trained_with_another_model_is_one_line_error(tmp_path):
    """Re-running a sweep after changing the model stops in one line and keeps the old runs."""
    def run(conv_features: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "mnist_flax.sweep", f"--workdir={tmp_path}",
               "--config.data_source=sample",
               "--config.num_epochs=1", "--config.batch_size=500", "--config.dense_features=16",
               f"--config.conv_features={conv_features}", "--sweep=seed=0"]
        return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)

    assert run("(8,16)").returncode == 0
    saved = sorted((tmp_path / "seed=0" / "checkpoints").iterdir())
    out = run("(8,8,16)")
    assert out.returncode != 0 and "Traceback" not in out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "use another --workdir" in last, last
    assert sorted((tmp_path / "seed=0" / "checkpoints").iterdir()) == saved


def test_help_exits_0_and_names_the_flags():
    result = subprocess.run([sys.executable, "-m", "mnist_flax.sweep", "--help"],
                            capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    for flag in ("--workdir", "--sweep", "--config", "--results"):
        assert flag in result.stdout
