"""experiments/: the tutorial recipe stays the tutorial's, variants stay small, results stay honest.

Also the recipe features the variants use (schedules, label smoothing, their config checks).
"""

import json
import re
import statistics

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, load_config

from mnist_flax import train
from mnist_flax.run import config_checks

EXPERIMENTS = REPO / "experiments"
VARIANTS = sorted(p.stem for p in EXPERIMENTS.glob("*.py") if p.stem not in ("default", "plot"))
RESULTS = sorted((EXPERIMENTS / "results").glob("*.json"))


def test_default_is_the_keras_tutorial():
    config = load_config("default")
    assert (tuple(config.conv_features), config.dense_features, tuple(config.dropout_rates)) == (
        (32, 64), 128, (0.25, 0.5))
    assert (config.learning_rate, config.adam_eps, config.batch_size, config.num_epochs) == (
        1e-3, 1e-7, 128, 12)
    assert config.kernel_init == "glorot_uniform"
    # Every recipe feature added since is off by default.
    assert (config.lr_schedule, config.warmup_epochs, config.label_smoothing) == (
        "constant", 0.0, 0.0)
    assert (config.augment_max_shift, config.augment_max_rotation, config.augment_max_scale) == (
        0.0, 0.0, 0.0)


@pytest.mark.parametrize("name", ["default", *VARIANTS])
def test_every_config_is_valid(name):
    config_checks.validate(load_config(name))


@pytest.mark.parametrize("name", VARIANTS)
def test_variants_override_a_few_fields_of_default(name):
    default, variant = load_config("default").to_dict(), load_config(name).to_dict()
    assert variant.keys() == default.keys()
    changed = {k for k in default if variant[k] != default[k]}
    assert 0 < len(changed) <= 10, changed  # A recipe, not a new default.
    doc = (EXPERIMENTS / f"{name}.py").read_text()
    assert f"--config=experiments/{name}.py" in doc  # The docstring gives the command.


@pytest.mark.parametrize("name", ["best", "fast"])
def test_the_issue_variants_exist(name):
    assert name in VARIANTS


def _config(**overrides):
    config = load_config("default")
    for key, value in overrides.items():
        config[key] = value
    return config


def test_constant_schedule_is_the_tutorial_step_size():
    schedule = train.learning_rate_schedule(_config(), steps_per_epoch=10)
    assert [float(schedule(s)) for s in (0, 50, 10_000)] == pytest.approx([1e-3] * 3)


def test_cosine_warms_up_then_anneals_to_zero_over_the_run():
    config = _config(lr_schedule="cosine", num_epochs=10, warmup_epochs=2.0, learning_rate=4e-3)
    schedule = train.learning_rate_schedule(config, steps_per_epoch=10)
    assert float(schedule(0)) == 0.0
    assert float(schedule(10)) == pytest.approx(2e-3)  # Half-way through the warmup.
    assert float(schedule(20)) == pytest.approx(4e-3)  # The peak, after warmup_epochs.
    assert float(schedule(60)) == pytest.approx(2e-3)  # Half-way down the cosine.
    assert float(schedule(100)) == pytest.approx(0.0, abs=1e-9)


def test_one_cycle_peaks_after_the_warmup_and_ends_near_zero():
    config = _config(lr_schedule="one_cycle", num_epochs=4, warmup_epochs=1.0, learning_rate=3e-3)
    schedule = train.learning_rate_schedule(config, steps_per_epoch=25)
    values = np.asarray(jax.jit(jax.vmap(schedule))(jnp.arange(101)))  # One compilation.
    assert values.argmax() == 25 and values.max() == pytest.approx(3e-3)
    assert values[0] == pytest.approx(3e-3 / 25) and values[-1] < 1e-6


def test_schedule_length_follows_the_data_not_the_config():
    config = _config(lr_schedule="cosine", num_epochs=2, warmup_epochs=0.0)
    short = train.learning_rate_schedule(config, steps_per_epoch=5)
    long = train.learning_rate_schedule(config, steps_per_epoch=50)
    assert float(short(10)) == pytest.approx(0.0, abs=1e-9) and float(long(10)) > 9e-4


def test_label_smoothing_zero_is_the_tutorial_loss_and_alpha_mixes_in_uniform():
    logits = np.random.default_rng(0).normal(size=(8, 10)).astype(np.float32)
    labels = np.arange(8) % 10
    loss = jax.jit(train.train_loss, static_argnums=2)  # One compilation, not one per op.
    np.testing.assert_array_equal(loss(logits, labels, 0.0),
                                  jax.jit(train.cross_entropy_loss)(logits, labels))
    log_p = logits - np.log(np.exp(np.float64(logits)).sum(-1, keepdims=True))
    expected = -(0.9 * log_p[np.arange(8), labels] + 0.1 * log_p.mean(-1))
    np.testing.assert_allclose(loss(logits, labels, 0.1), expected, rtol=1e-5)


@pytest.mark.parametrize("overrides, message", [
    ({"lr_schedule": "linear"}, "lr_schedule='linear': must be one of constant, cosine"),
    ({"adam_eps_placement": "torch"}, "adam_eps_placement='torch': must be one of optax, keras"),
    ({"lr_schedule": "cosine", "warmup_epochs": 12.0}, "warmup_epochs=12.0: must be in"),
    ({"lr_schedule": "one_cycle"}, "and > 0 for one_cycle"),
    ({"label_smoothing": 1.0}, "label_smoothing=1.0: must be in"),
    ({"adam_eps": 0.0}, "adam_eps=0.0: must be a finite number > 0, e.g. 1e-7 (at 0, Adam"),
    ({"augment_max_rotation": -5.0}, "augment_max_rotation=-5.0: must be in"),
    ({"augment_max_scale": 1.0}, "augment_max_scale=1.0: must be in"),
    ({"conv_features": ()}, "conv_features=(): must be 1 to 6 positive integers"),
    ({"conv_features": (32, 0)}, "conv_features=(32, 0): must be 1 to 6 positive integers"),
    ({"conv_features": (8,) * 7}, "must be 1 to 6 positive integers (one 3x3 convolution each)"),
])
def test_bad_recipe_values_fail_in_one_line(overrides, message):
    """Each field's check names the field, the value and what it must be."""
    with pytest.raises(config_checks.ConfigError, match=re.escape(message)) as info:
        config_checks.validate(_config(**overrides))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("path", RESULTS, ids=[p.name for p in RESULTS])
def test_recorded_results_add_up_and_are_in_the_readme(path):
    payload = json.loads(path.read_text())
    runs = payload["runs"]
    accuracies = [r["test_accuracy"] for r in runs]
    assert payload["summary"]["test_accuracy_mean"] == pytest.approx(statistics.fmean(accuracies))
    for run in runs:  # The final accuracy is the last one TensorBoard recorded.
        assert run["test_accuracy_per_epoch"][-1] == pytest.approx(run["test_accuracy"])
        assert len(run["test_accuracy_per_epoch"]) == run["epochs"]
        assert run["train_images"] == 60_000  # Full MNIST, not the packaged sample.
    assert payload["command"].startswith("python -m mnist_flax.")
    readme = (EXPERIMENTS / "README.md").read_text()
    assert f"results/{path.name}" in readme
    assert f"{100 * payload['summary']['test_accuracy_mean']:.2f}" in readme
