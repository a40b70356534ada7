"""mnist_flax.sweep: specs parse to typed values or fail in one line; runs land as separate runs."""

import json
import logging
import os
import subprocess
import sys

import pytest
from conftest import REPO, load_config

from mnist_flax import sweep
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


@pytest.mark.parametrize("spec, message", [
    ("learning_rate", "expected key=value1,value2"),
    ("=1,2", "expected key=value1,value2"),
    ("learning_rat=1e-3", "the config has no field 'learning_rat'"),
    ("learning_rate=1e-3,abc", "'abc' is not a float"),
    ("learning_rate=1e-3,,2e-3", "empty value"),
    ("seed=1.5", "'1.5' is not an int"),
    ("fast_ops=yes", "'yes' is not a bool"),
    ("conv_features=32", "is not a tuple"),
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


def test_every_run_is_validated_before_any_trains(tmp_path):
    with pytest.raises(config_checks.ConfigError, match="learning_rate=-1"):
        sweep.run_sweep(load_config(), str(tmp_path), ["learning_rate=1e-3,-1"])
    assert not os.listdir(tmp_path)


def _result(name: str, accuracy: float, **overrides) -> dict:
    """A run's result as run_sweep records it (only the fields the summary reads)."""
    group = "/".join(f"{k}={v}" for k, v in overrides.items() if k != "seed")
    return {"name": name, "group": group, "overrides": overrides,
            "test_accuracy": accuracy, "test_loss": 0.1, "epochs": 1, "run_seconds": 1.0}


def test_summary_is_mean_and_sample_std():
    runs = [_result(f"seed={i}", a, seed=i) for i, a in enumerate((0.990, 0.992, 0.994))]
    summary = sweep.summarize(runs)
    assert summary["test_accuracy_mean"] == pytest.approx(0.992)  # What experiments/plot.py reads.
    assert summary["test_accuracy_std"] == pytest.approx(0.002)
    [group] = summary["groups"]
    assert group["runs"] == 3 and group["test_accuracy_mean"] == pytest.approx(0.992)
    assert sweep.format_table(runs).splitlines()[-1] == (
        "test accuracy 99.20 ± 0.20% (mean ± sample std over 3 runs)")
    assert sweep.group_name((("seed", 2, "2"),)) == ""


def test_summary_is_per_learning_rate_over_its_seeds_not_over_all_runs():
    """A mean ± std over different learning rates means nothing: one per group of seeds."""
    accuracy = {(1e-3, 0): 0.90, (1e-3, 1): 0.92, (3e-3, 0): 0.96, (3e-3, 1): 0.98}
    runs = [_result(f"learning_rate={lr}/seed={seed}", a, learning_rate=lr, seed=seed)
            for (lr, seed), a in accuracy.items()]
    summary = sweep.summarize(runs)
    assert "test_accuracy_mean" not in summary and summary["runs"] == 4
    assert [(g["group"], g["overrides"], g["runs"]) for g in summary["groups"]] == [
        ("learning_rate=0.001", {"learning_rate": 1e-3}, 2),
        ("learning_rate=0.003", {"learning_rate": 3e-3}, 2)]
    assert [g["test_accuracy_mean"] for g in summary["groups"]] == pytest.approx([0.91, 0.97])
    assert [g["test_accuracy_std"] for g in summary["groups"]] == pytest.approx([0.02 / 2**0.5] * 2)
    assert sweep.format_table(runs).splitlines()[-2:] == [
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
    assert sweep.read_scalars(str(tmp_path), "accuracy") == [(1, 0.5)]
    assert sweep.read_data_sizes(str(tmp_path)) == (4000, 1000)
    assert [r.getMessage() for r in caplog.records if r.name.startswith("tensorboard")] == []
    assert tensorboard_logger.level == level


def test_cli_sweeps_into_separate_tensorboard_runs(tmp_path):
    workdir, results = tmp_path / "sweep", tmp_path / "results.json"
    cmd = [sys.executable, "-m", "mnist_flax.sweep", f"--workdir={workdir}",
           "--sweep=learning_rate=1e-3,3e-3", "--sweep=seed=0,1",
           "--config.data_source=sample", "--config.num_epochs=1", "--config.batch_size=500",
           "--config.conv_features=(4,8)", "--config.dense_features=16", f"--results={results}"]
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

    assert run("(4,8)").returncode == 0
    saved = sorted((tmp_path / "seed=0" / "checkpoints").iterdir())
    out = run("(4,4,8)")
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
