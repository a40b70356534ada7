"""Every path and URL a user gives (--workdir of main, sweep and predict; sweep's --results; the
config's data_dir, tfds_data_dir and compilation_cache_dir) goes through one parser: `~` expanded,
a URL spelt wrongly or of a scheme we cannot use refused in one line that says what works."""

from __future__ import annotations

import contextlib
import io

import pytest
from conftest import run_module

from mnist_flax import configs, predict, sweep_results
from mnist_flax.run import config_checks

TWO_SLASHES = "a URL is spelt with two slashes: "
NOT_SUPPORTED = "is not supported; only local paths and gs:// URLs are"


@pytest.mark.parametrize("where, flag, value, expected", [
    # The config's fields, checked by config_checks.validate: the parsed value, or the line.
    ("config", "data_dir", "~/mnist", "{home}/mnist"),
    ("config", "tfds_data_dir", "~/tfds", "{home}/tfds"),
    ("config", "compilation_cache_dir", "gs://bucket/cache", "gs://bucket/cache"),
    ("config", "compilation_cache_dir", "auto", "auto"),
    ("config", "data_dir", "", ""),
    ("config", "data_dir", "runs:1/mnist", "runs:1/mnist"),  # A colon alone is no scheme.
    ("config", "compilation_cache_dir", "s3://bucket/cache",
     "error: --config.compilation_cache_dir='s3://bucket/cache': s3:// " + NOT_SUPPORTED),
    ("config", "tfds_data_dir", "gs:/bucket/tfds",
     f"error: --config.tfds_data_dir='gs:/bucket/tfds': {TWO_SLASHES}"
     "--config.tfds_data_dir=gs://bucket/tfds"),
    ("config", "data_dir", "gs://bucket/mnist",  # The IDX reader reads local files only.
     "error: --config.data_dir='gs://bucket/mnist': gs:// is not supported; only local paths are"),
    # The entry points' --workdir, as users run them: the one line.
    ("main", "workdir", "gs:/bucket/x",
     f"error: --workdir=gs:/bucket/x: {TWO_SLASHES}--workdir=gs://bucket/x"),
    ("sweep", "workdir", "http://host/x",
     "error: --workdir=http://host/x: http:// " + NOT_SUPPORTED),
    ("predict", "workdir", "~/run", "error: --workdir={home}/run: no such directory"),
    # sweep's --results, checked before any training (sweep_results.check_results).
    ("results", "results", "gs:/bucket/r.json",
     f"error: --results=gs:/bucket/r.json: {TWO_SLASHES}--results=gs://bucket/r.json"),
    ("results", "results", "s3://bucket/r.json",
     "error: --results=s3://bucket/r.json: s3:// " + NOT_SUPPORTED),
])
def test_every_path_goes_through_one_parser(where, flag, value, expected, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    expected = expected.format(home=tmp_path)
    if where == "config":
        config = configs.load()
        config[flag] = value
        try:
            config_checks.validate(config)
            result = config[flag]
        except configs.ConfigError as e:
            result = f"error: {e}"
    elif where == "results":
        with pytest.raises(configs.ConfigError) as refused:
            sweep_results.check_results(value)
        result = f"error: {refused.value}"
    elif where == "predict":  # In-process: predict.run is the command without its boundary.
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            assert predict.run(["predict", f"--workdir={value}", "digit.png"]) == 2
        result = err.getvalue().strip().splitlines()[-1]
    else:
        extra = ["--sweep=seed=1,2"] if where == "sweep" else []
        process = run_module(where, f"--workdir={value}", *extra, env={"HOME": str(tmp_path)},
                             timeout=240)
        assert process.returncode != 0, process.stderr[-2000:]
        result = process.stderr.strip().splitlines()[-1]
        assert "Traceback" not in process.stderr, process.stderr[-2000:]
    assert result == expected
