"""predict.py and digit_images.py: people's images in MNIST's form, load(workdir), the command line.

The workdir here holds a checkpoint of random params (no training): these tests pin the plumbing
and the preprocessing; benchmarks/predict_agreement.py measures accuracy with a trained model.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import types

import jax
import numpy as np
import pytest
from conftest import REPO, tiny_config
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from mnist_flax import checkpoints, configs, digit_images, input_pipeline, models, predict
from mnist_flax.run import workdir as workdir_lib

ROOT = str(REPO)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A workdir as training leaves it: config.json and a checkpoint (of random params)."""
    workdir = str(tmp_path_factory.mktemp("run"))
    config = tiny_config()
    model = models.create_model(config)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), np.zeros((1, 28, 28, 1)),
                                               train=False))["params"]
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: rng.normal(0, 0.1, s.shape).astype(np.float32), shapes)
    state = types.SimpleNamespace(params=params, opt_state={"count": np.zeros((), np.int32)},
                                  step=np.int32(12), dropout_key=jax.random.key(0))
    with contextlib.closing(checkpoints.create_manager(workdir, keep=1)) as manager:
        checkpoints.save(manager, state, {"step": 12})
    checkpoints.write_config(workdir, config)
    return workdir, model, params


@pytest.fixture(scope="module")
def digits():
    """Ten real MNIST digits (one per class) from the packaged sample."""
    dataset = input_pipeline.load_packaged_sample()
    index = [int(np.flatnonzero(dataset.test_labels == d)[0]) for d in range(10)]
    return dataset.test_images[index, ..., 0]


def photograph(digit: np.ndarray, size: int = 112) -> Image.Image:
    """What the acceptance check feeds in: black ink on white, scaled up."""
    return Image.fromarray(255 - digit).resize((size, size), Image.BICUBIC)


def centre_of_mass(image: np.ndarray) -> tuple[float, float]:
    ys, xs = np.indices(image.shape)
    total = image.sum()
    return (ys * image).sum() / total, (xs * image).sum() / total


def ink_box(image: np.ndarray) -> tuple[int, int]:
    rows, cols = np.flatnonzero(image.any(axis=1)), np.flatnonzero(image.any(axis=0))
    return rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1


# ---------------------------------------------------------------------------------------------
# Preprocessing.


def test_a_raw_28x28_mnist_digit_passes_unchanged(digits):
    for digit in digits:
        assert np.array_equal(digit_images.preprocess(Image.fromarray(digit)), digit)


def test_an_inverted_enlarged_digit_comes_back_close_to_the_original(digits):
    correlations = []
    for digit in digits:
        result = digit_images.preprocess(photograph(digit)).astype(np.float32)
        correlations.append(np.corrcoef(result.ravel(), digit.astype(np.float32).ravel())[0, 1])
        assert max(ink_box(result)) == 20
        assert np.allclose(centre_of_mass(result), (14, 14), atol=0.5)
    # Thin digits (a 1) move most under a half-pixel shift; on average they match closely.
    assert np.mean(correlations) > 0.9 and np.min(correlations) > 0.6


def test_colour_transparency_and_jpeg_give_the_same_digit(digits, tmp_path):
    digit = digits[3]
    reference = digit_images.preprocess(photograph(digit)).astype(np.float32)
    gray = np.asarray(photograph(digit), np.float32) / 255  # 1 = paper, 0 = ink.
    # Dark blue ink on a cream page.
    rgb = (gray[..., None] * [250, 240, 210] + (1 - gray[..., None]) * [20, 20, 90])
    colour = Image.fromarray(rgb.astype(np.uint8), "RGB")
    # Black ink on a transparent canvas (what drawing apps export).
    alpha = ((1 - gray) * 255).astype(np.uint8)
    transparent = Image.fromarray(np.stack([np.zeros_like(alpha)] * 3 + [alpha], -1), "RGBA")
    colour.save(tmp_path / "digit.jpg", quality=90)
    jpeg = digit_images.read_image(str(tmp_path / "digit.jpg"))
    for image in (colour, transparent, jpeg):
        result = digit_images.preprocess(image).astype(np.float32)
        assert np.corrcoef(result.ravel(), reference.ravel())[0, 1] > 0.95


def _png16(pixels: np.ndarray, tmp_path) -> Image.Image:
    """A 16-bit grayscale PNG, read back as predict reads files."""
    Image.fromarray(pixels.astype(np.uint16)).save(tmp_path / "digit16.png")
    image = digit_images.read_image(str(tmp_path / "digit16.png"))
    assert np.asarray(image).max() > 255  # Really 16 bits in the file.
    return image


# The same picture in each deep form; 8 bits `d` (uint8) is what each must come back as.
DEEP_FORMS = {
    "I;16": lambda d, _: Image.fromarray(d.astype(np.uint16) * 257),
    "I;16B": lambda d, _: Image.frombytes("I;16B", d.shape[::-1],
                                          (d.astype(">u2") * 257).tobytes(), "raw", "I;16B"),
    "16-bit PNG": lambda d, tmp_path: _png16(d.astype(np.uint16) * 257, tmp_path),
    "I, 16-bit values": lambda d, _: Image.fromarray(d.astype(np.int32) * 257),
    "I, any range": lambda d, _: Image.fromarray(d.astype(np.int32) * 1000 - 100_000),
    "F in [0, 1]": lambda d, _: Image.fromarray(d.astype(np.float32) / 255),
    "F in 0-255": lambda d, _: Image.fromarray(d.astype(np.float32)),
    "float array in [0, 1]": lambda d, _: d / np.float64(255),
    "uint16 array": lambda d, _: d.astype(np.uint16) * 257,
}


@pytest.mark.parametrize("form", list(DEEP_FORMS))
def test_16_bit_32_bit_and_float_images_are_scaled_not_clipped_to_8_bits(digits, tmp_path, form):
    """Deeper images are scaled to 0-255 by their type's range (floats in [0, 1] x255), so a
    digit keeps its grey levels and is not called blank; clipping left two levels, 0 and 255."""
    for digit in digits[:3]:
        assert np.array_equal(digit_images.preprocess(DEEP_FORMS[form](digit, tmp_path)), digit)
        photo = np.asarray(photograph(digit))  # Through the crop-fit-centre path too.
        assert np.array_equal(digit_images.preprocess(DEEP_FORMS[form](photo, tmp_path)),
                              digit_images.preprocess(Image.fromarray(photo)))


@settings(max_examples=25, deadline=None)
@given(height=st.integers(3, 300), width=st.integers(3, 300), light=st.booleans(),
       top=st.floats(0, 1), left=st.floats(0, 1))
def test_any_blob_is_fitted_into_20_px_and_centred(height, width, light, top, left):
    canvas = np.zeros((height + 40, width + 40), np.uint8)
    h, w = max(1, height // 2), max(1, width // 2)
    y, x = int(top * (height + 40 - h)), int(left * (width + 40 - w))
    canvas[y:y + h, x:x + w] = 255
    if light:
        canvas = 255 - canvas
    result = digit_images.preprocess(Image.fromarray(canvas))
    assert result.shape == (28, 28) and result.dtype == np.uint8
    if canvas.shape != (28, 28):
        assert max(ink_box(result)) == 20
        assert np.allclose(centre_of_mass(result.astype(np.float64)), (14, 14), atol=0.5)


# ---------------------------------------------------------------------------------------------
# load(workdir).


def test_load_gives_the_models_probabilities_for_any_layout(workdir, digits):
    path, model, params = workdir
    predict_fn = predict.load(path)
    assert predict_fn.step == 12
    probabilities = predict_fn(digits)
    assert probabilities.shape == (10, 10)
    assert np.allclose(probabilities.sum(axis=1), 1, atol=1e-5)
    logits = model.apply({"params": params}, digits[..., None] / np.float32(255), train=False)
    assert np.allclose(probabilities, jax.nn.softmax(logits), atol=1e-6)
    assert np.array_equal(predict_fn(digits[..., None]), probabilities)  # (N, 28, 28, 1)
    assert np.allclose(predict_fn(digits / np.float32(255)), probabilities, atol=1e-6)  # floats
    with pytest.raises(ValueError, match=r"\(N, 28, 28\)"):
        predict_fn(np.zeros((2, 32, 32), np.uint8))


def test_load_refuses_a_checkpoint_of_another_model(workdir, tmp_path):
    path, _, _ = workdir
    shutil.copytree(str(checkpoints.checkpoint_dir(path)), tmp_path / checkpoints.CHECKPOINT_DIR)
    wider = tiny_config()
    wider.dense_features = 32
    checkpoints.write_config(str(tmp_path), wider)
    with pytest.raises(predict.PredictError, match=r"params/Dense_0/bias has shape \(16,\) in "
                                                   r"the checkpoint but \(32,\) in the config"):
        predict.load(str(tmp_path))


def with_config(workdir: str, tmp_path, drop=(), **changes) -> str:
    """A copy of `workdir` whose config.json has `changes` and lacks the fields in `drop`."""
    shutil.copytree(str(checkpoints.checkpoint_dir(workdir)), tmp_path / checkpoints.CHECKPOINT_DIR)
    fields = json.loads((checkpoints.path(workdir) / checkpoints.CONFIG_FILE).read_text())
    fields = {k: v for k, v in {**fields, **changes}.items() if k not in drop}
    (tmp_path / checkpoints.CONFIG_FILE).write_text(json.dumps(fields))
    return str(tmp_path)


def test_a_config_json_missing_a_field_takes_the_defaults_value(workdir, digits, tmp_path):
    """A run trained before a field existed (its config.json lacks it) predicts as before."""
    path, _, _ = workdir
    stored = json.loads((checkpoints.path(path) / checkpoints.CONFIG_FILE).read_text())
    assert workdir_lib.read_config(path).to_dict() == stored  # A complete file: as it is.
    older = with_config(path, tmp_path, drop=("compute_dtype", "kernel_init"))
    assert workdir_lib.read_config(older).compute_dtype == configs.load().compute_dtype
    assert np.array_equal(predict.load(older)(digits), predict.load(path)(digits))


# A config.json field each way wrong -> the one line's middle (file first, fix last).
BAD_CONFIGS = {
    "float for int": ({"num_classes": 10.0}, "num_classes is 10.0, must be an int like the "
                      "default's 10, not a float"),
    "null": ({"dense_features": None}, "dense_features is null, must be an int like the "
             "default's 128"),
    "str for tuple": ({"conv_features": "abc"}, 'conv_features is "abc", must be a tuple of int '
                      "like the default's (32, 64), not a str"),
    "out of range": ({"conv_features": [8, 0]}, "conv_features is [8, 0], must be 1 to 6 "
                     "positive integers"),
    "unknown choice": ({"kernel_init": "zzz"}, 'kernel_init is "zzz", must be one of '
                       "glorot_uniform, "),
    "typo'd field": ({"learnin_rate": 0.1}, "sets 'learnin_rate', which is not a field of the "
                     'config (did you mean "learning_rate"?)'),
    "another version's field": ({"use_batchnorm": True}, "sets 'use_batchnorm', which is not a "
                                "field of the config (written by another version of mnist_flax?)"),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_a_config_json_with_a_bad_field_is_one_line_naming_file_field_and_fix(
        workdir, images, tmp_path, case):
    """config.json is held to the config's schema and value checks, as a --config file is."""
    change, message = BAD_CONFIGS[case]
    bad = with_config(workdir[0], tmp_path, **change)
    status, out, err = run_cli(f"--workdir={bad}", images[0])
    assert (status, out) == (2, "")
    assert err.startswith(f"error: {tmp_path / checkpoints.CONFIG_FILE}: {message}")
    assert err.endswith("; fix config.json or train a new workdir\n") and err.count("\n") == 1


def test_enclosing_run_is_the_nearest_run_above(tmp_path, monkeypatch):
    run = tmp_path / "runs" / "a"
    for inner in ("checkpoints/31", "train", "nested/checkpoints"):
        (run / inner).mkdir(parents=True)
    (run / "config.json").write_text("{}")
    (run / "nested" / "config.json").write_text("{}")  # A run inside a run: the nearest counts.
    assert workdir_lib.enclosing_run(str(run / "checkpoints" / "31")) == str(run)
    assert workdir_lib.enclosing_run(str(run / "train")) == str(run)
    assert workdir_lib.enclosing_run(str(run / "nested" / "checkpoints")) == str(run / "nested")
    assert workdir_lib.enclosing_run(str(run)) is None  # The run itself is not inside one.
    assert workdir_lib.enclosing_run(str(tmp_path / "runs")) is None
    monkeypatch.chdir(run / "checkpoints")
    assert workdir_lib.enclosing_run("31") == ".."  # Relative stays relative.
    monkeypatch.chdir(tmp_path)
    assert workdir_lib.enclosing_run("runs/a/train") == os.path.join("runs", "a")


@pytest.mark.parametrize("inner", ["checkpoints", "checkpoints/12", "config.json"])
def test_a_workdir_inside_a_run_names_the_run_to_use(workdir, images, inner):
    path, _, _ = workdir
    status, out, err = run_cli(f"--workdir={path}/{inner}", images[0])
    assert (status, out) == (2, "")
    assert err == (f"error: --workdir={path}/{inner} is inside the run {path}; use "
                   f"--workdir={path}\n")


# ---------------------------------------------------------------------------------------------
# The command line: one line per image, --json, one-line errors.


def run_cli(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = predict.run(["predict", *args])
    return status, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def images(tmp_path_factory, digits):
    directory = tmp_path_factory.mktemp("images")
    paths = {}
    for d in (0, 7):
        photograph(digits[d]).save(directory / f"{d}.png")
        paths[d] = str(directory / f"{d}.png")
    Image.new("L", (64, 64), 255).save(directory / "blank.png")
    (directory / "empty.png").write_bytes(b"")
    (directory / "notes.png").write_text("not an image")
    Image.fromarray(digits[7]).save(directory / "raw.png")
    paths.update(blank=str(directory / "blank.png"), empty=str(directory / "empty.png"),
                 text=str(directory / "notes.png"), raw=str(directory / "raw.png"),
                 missing=str(directory / "missing.png"))
    return paths


def test_cli_prints_digit_and_top_probabilities(workdir, images):
    path, _, _ = workdir
    status, out, err = run_cli(f"--workdir={path}", images[0], images[7])
    assert status == 0 and err == ""
    lines = out.strip().splitlines()
    assert len(lines) == 2
    expected = predict.load(path)(predict.load_images([images[0], images[7]]))
    for line, image, probabilities in zip(lines, (images[0], images[7]), expected, strict=True):
        digit = int(np.argmax(probabilities))
        assert line.startswith(f"{image}: {digit}  ({digit}: {probabilities[digit]:.3f}, ")


@pytest.mark.parametrize("key, message", [
    ("blank", "blank image (no digit found)"),
    ("empty", "empty file"),
    ("text", "unreadable (not an image PIL can read); use a PNG or JPEG"),
    ("missing", "no such file"),
])
def test_cli_bad_images_are_one_line_errors_and_the_rest_still_predicted(workdir, images, key,
                                                                        message):
    path, _, _ = workdir
    status, out, err = run_cli(f"--workdir={path}", "--json", images[key], images["raw"])
    assert status == 1
    assert err == f"error: {images[key]}: {message}\n"
    results = [json.loads(line) for line in out.splitlines()]  # One object per image.
    assert results[0] == {"image": images[key], "error": f"{images[key]}: {message}", "step": 12}
    assert results[1]["image"] == images["raw"] and 0 <= results[1]["digit"] <= 9
    assert sum(results[1]["probabilities"]) == pytest.approx(1, abs=1e-3)


@pytest.mark.parametrize("limit", [5_000, 8_000])  # Over 2x the limit PIL raises; over 1x it warns.
def test_cli_too_large_image_is_one_line_error_and_the_rest_still_predicted(workdir, images,
                                                                           monkeypatch, limit):
    """A decompression bomb (more pixels than PIL's MAX_IMAGE_PIXELS) is refused before decoding,
    in one line naming its size; the 112x112 test image stands in for one under a low limit."""
    path, _, _ = workdir
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    status, out, err = run_cli(f"--workdir={path}", "--json", images[0], images["raw"])
    assert status == 1
    message = (f"{images[0]}: too large (112 x 112 pixels, over PIL's limit of {limit:,}); "
               "scale it down first (a digit needs a few hundred pixels a side)")
    assert err == f"error: {message}\n"
    results = [json.loads(line) for line in out.splitlines()]
    assert results[0] == {"image": images[0], "error": message, "step": 12}
    assert results[1]["image"] == images["raw"] and 0 <= results[1]["digit"] <= 9
    assert Image.MAX_IMAGE_PIXELS == limit  # Lifted only while the header was read.


def _float_image(value: float) -> Image.Image:
    pixels = np.zeros((40, 40), np.float32)
    pixels[10:30, 15:25] = 200.0
    pixels[12:14, 12:30] = value
    return Image.fromarray(pixels, "F")


def _specks() -> Image.Image:
    pixels = np.full((2000, 2000), 255, np.uint8)
    pixels[0, 0] = pixels[-1, -1] = 0  # Fitted into 20 px, each is 1/10,000 of a pixel.
    return Image.fromarray(pixels)


# Images PIL opens but that cannot become a digit: each is its own line, whatever the cause.
ODD_IMAGES = {
    "LAB": (lambda: Image.new("LAB", (40, 40)), "cannot use it as a digit image (ValueError: "
            "conversion from LAB to RGB not supported); save it as a grayscale or RGB PNG or JPEG"),
    "F with NaN": (lambda: _float_image(np.nan), "36 of 1,600 pixels are NaN or infinite; save "
                   "it with finite values (or as an 8-bit PNG)"),
    "F with Inf": (lambda: _float_image(np.inf), "36 of 1,600 pixels are NaN or infinite"),
    "specks": (lambda: _specks(), "blank image (no digit found)"),  # Was 0 / 0 centring them.
}


@pytest.mark.parametrize("kind", list(ODD_IMAGES))
@pytest.mark.parametrize("as_json", [False, True])
def test_cli_an_image_that_cannot_be_converted_is_one_line_and_the_rest_still_predicted(
        workdir, images, tmp_path, recwarn, kind, as_json):
    make, message = ODD_IMAGES[kind]
    odd = str(tmp_path / "odd.tif")
    make().save(odd)
    flags = ["--json"] if as_json else []
    status, out, err = run_cli(f"--workdir={workdir[0]}", *flags, images[0], odd, images[7])
    assert status == 1
    assert err.startswith(f"error: {odd}: {message}") and err.count("\n") == 1
    if as_json:
        results = [json.loads(line) for line in out.splitlines()]
        assert [r["image"] for r in results] == [images[0], odd, images[7]]
        assert results[1] == {"image": odd, "error": err[len("error: "):-1], "step": 12}
        assert "digit" in results[0] and "digit" in results[2]
    else:
        assert [line.split(":")[0] for line in out.splitlines()] == [images[0], images[7]]
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]
    with pytest.raises(predict.PredictError, match=f"^{re.escape(odd)}: "):  # The library too.
        predict.load_images([images[0], odd])


def test_cli_missing_workdir_or_checkpoint_is_one_line(tmp_path, images):
    status, out, err = run_cli(f"--workdir={tmp_path / 'nope'}", images[0])
    assert (status, out) == (2, "")
    assert err == f"error: --workdir={tmp_path / 'nope'}: no such directory\n"
    status, out, err = run_cli(f"--workdir={tmp_path}", images[0])
    assert (status, out) == (2, "")
    assert err.startswith(f"error: {tmp_path}/checkpoints: no checkpoint; train first")
    assert err.count("\n") == 1


def test_cli_end_to_end_in_a_subprocess(workdir, images):
    path, _, _ = workdir
    result = subprocess.run(
        [sys.executable, "-m", "mnist_flax.predict", f"--workdir={path}", images[7], "--json"],
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"},
        timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    [line] = result.stdout.splitlines()
    entry = json.loads(line)
    assert entry["step"] == 12
    expected = predict.load(path)(predict.load_images([images[7]]))[0]
    assert entry["digit"] == int(np.argmax(expected))
    assert entry["probabilities"] == [round(float(p), 4) for p in expected]  # As printed.
    assert [t["digit"] for t in entry["top"]] == list(np.argsort(-expected, kind="stable")[:3])
    assert [t["probability"] for t in entry["top"]] == [
        entry["probabilities"][t["digit"]] for t in entry["top"]]  # Rounded the same way.


def test_help_works_and_names_the_flags():
    for run in (lambda: run_cli("--help"), lambda: run_cli("-h")):
        status, out, err = run()
        assert status == 0 and err == ""
        assert out.startswith(predict.USAGE) and "--workdir" in out and "--json" in out
    result = subprocess.run([sys.executable, "-m", "mnist_flax.predict", "--help"],
                            capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0 and "--workdir" in result.stdout, result.stderr[-2000:]


def test_load_logs_no_orbax_warnings(workdir, caplog, monkeypatch):
    """`load` is the library's Python API (README): no entry point's log filters are in place,
    so whatever orbax logs at WARNING reaches the caller. It must log none: reading a checkpoint
    is not a warning. The absl logger's filters are emptied first, so that the CLI tests' global
    ones (`logs.quiet_orbax_logging`) cannot hide what load itself would log."""
    import logging

    from absl import logging as absl_logging

    monkeypatch.setattr(absl_logging.get_absl_logger(), "filters", [])
    caplog.set_level(logging.WARNING)
    predict.load(workdir[0])
    orbax = [record.getMessage() for record in caplog.records
             if f"{os.sep}orbax{os.sep}" in record.pathname and record.levelno >= logging.WARNING]
    assert not orbax, orbax


def traced_batch_sizes(monkeypatch) -> list[int]:
    """The batch sizes the model is compiled for from now on (models.probabilities is traced
    once per input shape): what bounds the memory of one call."""
    sizes, real = [], models.probabilities

    def recording(apply_fn, params, images):
        sizes.append(images.shape[0])
        return real(apply_fn, params, images)
    monkeypatch.setattr(models, "probabilities", recording)
    return sizes


@pytest.mark.parametrize("n", [1, 37, 3 * predict.BATCH + 5])
def test_load_classifies_in_bounded_batches_with_the_unbatched_results(workdir, monkeypatch, n):
    path, model, params = workdir
    sizes = traced_batch_sizes(monkeypatch)
    images = np.random.default_rng(n).integers(0, 256, (n, 28, 28), np.uint8)
    probabilities = predict.load(path)(images)
    assert sizes and max(sizes) <= predict.BATCH and len(set(sizes)) <= 2, sizes
    logits = model.apply({"params": params}, images[..., None] / np.float32(255), train=False)
    assert np.allclose(probabilities, jax.nn.softmax(logits), atol=1e-6)  # All at once.


def test_cli_reads_classifies_and_prints_a_batch_at_a_time(workdir, images, monkeypatch):
    """Each batch's lines are out before the next batch's images are read, and the model sees
    no more than BATCH images at once; the lines are those of one unbatched call."""
    keys = [0, 7, "raw", "blank", 0, "raw", 7, "text"]
    paths = [images[k] for k in keys]
    unbatched = run_cli(f"--workdir={workdir[0]}", "--json", *paths)
    monkeypatch.setattr(predict, "BATCH", 3)
    sizes = traced_batch_sizes(monkeypatch)
    out, printed_when_read, prepare_file = io.StringIO(), [], digit_images.prepare_file

    def prepare(path):
        printed_when_read.append(out.getvalue().count("\n"))
        return prepare_file(path)
    monkeypatch.setattr(digit_images, "prepare_file", prepare)
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        status = predict.run(["predict", f"--workdir={workdir[0]}", "--json", *paths])
    assert printed_when_read == [i // 3 * 3 for i in range(len(paths))]
    assert sizes and max(sizes) <= 3, sizes
    assert status == unbatched[0] == 1
    batched, whole = ([json.loads(line) for line in o.splitlines()] for o in (out.getvalue(),
                                                                            unbatched[1]))
    assert [r["image"] for r in batched] == [r["image"] for r in whole] == paths
    for b, w in zip(batched, whole, strict=True):  # Rounded to 4 places: equal within 1e-4.
        assert b.keys() == w.keys() and b.get("digit") == w.get("digit")
        assert np.allclose(b.get("probabilities", []), w.get("probabilities", []), atol=1e-4)
