"""predict.py: MNIST-style preprocessing of people's images, load(workdir), the command line.

The workdir here holds a checkpoint of random params (no training): these tests pin the plumbing
and the preprocessing; benchmarks/predict_agreement.py measures accuracy with a trained model.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
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

from mnist_flax import checkpoints, input_pipeline, models, predict

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
        assert np.array_equal(predict.preprocess(Image.fromarray(digit)), digit)


def test_an_inverted_enlarged_digit_comes_back_close_to_the_original(digits):
    correlations = []
    for digit in digits:
        result = predict.preprocess(photograph(digit)).astype(np.float32)
        correlations.append(np.corrcoef(result.ravel(), digit.astype(np.float32).ravel())[0, 1])
        assert max(ink_box(result)) == 20
        assert np.allclose(centre_of_mass(result), (14, 14), atol=0.5)
    # Thin digits (a 1) move most under a half-pixel shift; on average they match closely.
    assert np.mean(correlations) > 0.9 and np.min(correlations) > 0.6


def test_colour_transparency_and_jpeg_give_the_same_digit(digits, tmp_path):
    digit = digits[3]
    reference = predict.preprocess(photograph(digit)).astype(np.float32)
    gray = np.asarray(photograph(digit), np.float32) / 255  # 1 = paper, 0 = ink.
    # Dark blue ink on a cream page.
    rgb = (gray[..., None] * [250, 240, 210] + (1 - gray[..., None]) * [20, 20, 90])
    colour = Image.fromarray(rgb.astype(np.uint8), "RGB")
    # Black ink on a transparent canvas (what drawing apps export).
    alpha = ((1 - gray) * 255).astype(np.uint8)
    transparent = Image.fromarray(np.stack([np.zeros_like(alpha)] * 3 + [alpha], -1), "RGBA")
    colour.save(tmp_path / "digit.jpg", quality=90)
    jpeg = predict.read_image(str(tmp_path / "digit.jpg"))
    for image in (colour, transparent, jpeg):
        result = predict.preprocess(image).astype(np.float32)
        assert np.corrcoef(result.ravel(), reference.ravel())[0, 1] > 0.95


def _png16(pixels: np.ndarray, tmp_path) -> Image.Image:
    """A 16-bit grayscale PNG, read back as predict reads files."""
    Image.fromarray(pixels.astype(np.uint16)).save(tmp_path / "digit16.png")
    image = predict.read_image(str(tmp_path / "digit16.png"))
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
        assert np.array_equal(predict.preprocess(DEEP_FORMS[form](digit, tmp_path)), digit)
        photo = np.asarray(photograph(digit))  # Through the crop-fit-centre path too.
        assert np.array_equal(predict.preprocess(DEEP_FORMS[form](photo, tmp_path)),
                              predict.preprocess(Image.fromarray(photo)))


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
    result = predict.preprocess(Image.fromarray(canvas))
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


def test_loads_overlapping_in_threads_keep_orbax_notices_out_until_the_last_ends(monkeypatch):
    """Two `load` calls in two threads: the first to end must not take the filter away from the
    one still reading (a notebook loading two workdirs at once)."""
    import threading

    from absl import logging as absl_logging

    from mnist_flax.run import logs

    logger = absl_logging.get_absl_logger()
    monkeypatch.setattr(logger, "filters", [])
    first_in, second_in, first_out = threading.Event(), threading.Event(), threading.Event()
    seen = []

    def first():
        with logs.read_only_notices_dropped():
            first_in.set()
            second_in.wait(60)
        first_out.set()

    def second():
        first_in.wait(60)
        with logs.read_only_notices_dropped():
            second_in.set()
            first_out.wait(60)
            seen.append(len(logger.filters))  # The first has ended; this one still reads.
    threads = [threading.Thread(target=f) for f in (first, second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert seen == [1] and logger.filters == []
