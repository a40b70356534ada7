"""Predicts digits in people's own images with a trained workdir.

    python -m mnist_flax.predict --workdir=runs/default IMAGE [IMAGE...] [--json] [--show=DIR]
    predict = mnist_flax.predict.load("runs/default"); predict(images)  # (N, 10) probabilities

Photographs and drawings are brought to MNIST's form first (`digit_images.preprocess`: the digit
found on the page, white ink on black, fitted into 20 px and centred by mass in 28x28, as MNIST's
digits were made); --show=DIR writes that 28x28. An answer below UNSURE_BELOW, or from a page
with more than one mark, is marked unsure: a wrong answer otherwise prints like a sure one.
The model is built from the config stored in the workdir, with the newest checkpoint's params.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable

from mnist_flax.run import startup

# Seconds of imports before the command's boundary exists; a caller that imports this module
# (a notebook) still gets its KeyboardInterrupt.
with startup.one_line_startup(startup.PREDICT_INTERRUPTED_LINE):
    import jax
    import numpy as np
    from absl import flags

    from mnist_flax import checkpoints, digit_images, input_pipeline, models, paths
    from mnist_flax.run import integrity, lock, logs, storage_errors
    from mnist_flax.run import workdir as workdir_lib

# Images and their one-line errors: `predict.load_images(paths)` is the README's API.
PredictError = digit_images.PredictError
load_images = digit_images.load_images
preprocess = digit_images.preprocess
TOP_K = 3  # Probabilities printed per image.
DECIMALS = 4  # Places every probability in --json output is rounded to.
UNSURE_BELOW = 0.8  # A top probability under this is marked unsure.
BATCH = 256  # Images read, classified and printed at a time: memory does not grow with N.


# ---------------------------------------------------------------------------------------------
# The model.


def _not_a_run_line(workdir: str, is_dir: bool) -> str:
    """Why `workdir` (a file, or a directory with no checkpoint) cannot be predicted with; when
    it lies inside a run (RUN/checkpoints, RUN/train), the run to pass instead."""
    run = workdir_lib.enclosing_run(workdir)
    if run is not None:
        return f"--workdir={workdir} is inside the run {run}; use --workdir={run}"
    if not is_dir:
        return f"--workdir={workdir}: not a directory"
    writer = lock.holder(workdir)
    if writer is not None:  # Training there now: told to train, the user would be refused.
        return (f"{checkpoints.checkpoint_dir(workdir)}: no checkpoint yet; a run (pid {writer}) "
                "is training there: try again once it has saved one (at the end of its first "
                "epoch, or every --config.checkpoint_every_steps)")
    return (f"{checkpoints.checkpoint_dir(workdir)}: no checkpoint; train first with python -m "
            f"mnist_flax.main --workdir={workdir}")


def load(workdir: str) -> Callable[[np.ndarray], np.ndarray]:
    """A function from images to (N, 10) class probabilities, with the workdir's newest params.

    It takes uint8 (0-255) or float (0-1) arrays of shape (N, 28, 28) or (N, 28, 28, 1), white
    ink on black, as MNIST (use `preprocess` for other pictures). `predict.step` is the
    checkpoint's step. Reading the checkpoint adds no orbax warning to the caller's log.
    """
    try:
        workdir = paths.parse(workdir, "--workdir")  # `~` expanded; gs:/x or s3://x: one line.
        root = workdir_lib.path(workdir)  # A gs:// workdir without the gcs extra: one line.
        try:  # Not is_dir() alone: fsspec reads a storage that does not answer as "absent".
            root.stat()
        except FileNotFoundError:
            raise PredictError(f"--workdir={workdir}: no such directory") from None
        is_dir, has_checkpoint = root.is_dir(), False
        if is_dir:
            has_checkpoint = checkpoints.latest_step(workdir) is not None
        if not has_checkpoint:
            raise PredictError(_not_a_run_line(workdir, is_dir))
        config = workdir_lib.read_config(workdir)
        model = models.create_model(config)
        dummy = np.zeros((1, *input_pipeline.IMAGE_SHAPE), np.float32)
        expected = jax.eval_shape(lambda: model.init(jax.random.key(0), dummy, train=False))
        params, step = integrity.restore_params(workdir, expected["params"])
    except (checkpoints.CheckpointError, workdir_lib.WorkdirError, paths.PathError) as e:
        raise PredictError(str(e)) from None
    except Exception as e:
        if not storage_errors.is_storage_error(e):
            raise
        raise PredictError(storage_errors.storage_unreachable_line(workdir, e)) from None
    probabilities = jax.jit(functools.partial(models.probabilities, model.apply, params))

    def predict(images: np.ndarray) -> np.ndarray:
        images = np.asarray(images)
        if images.ndim == 3:
            images = images[..., None]
        if images.ndim != 4 or images.shape[1:] != input_pipeline.IMAGE_SHAPE:
            raise ValueError(f"images must be (N, 28, 28) or (N, 28, 28, 1); got {images.shape}")
        # BATCH at a time, the last padded to a power of two: a few compiled shapes serve all N.
        size = min(BATCH, 1 << (max(len(images), 1) - 1).bit_length())
        out = []
        for chunk in (images[i:i + size] for i in range(0, max(len(images), 1), size)):
            if chunk.dtype != np.uint8:  # Floats in [0, 1]: the 0-255 scale the model expects.
                chunk = chunk.astype(np.float32) * 255.0
            padded = np.pad(chunk, [(0, size - len(chunk))] + [(0, 0)] * 3)
            out.append(np.asarray(probabilities(padded))[:len(chunk)])
        return np.concatenate(out)

    predict.step = step
    return predict


# ---------------------------------------------------------------------------------------------
# The command line. Its own FlagValues, so importing this module next to mnist_flax.main (which
# also has --workdir) defines nothing twice.

USAGE = ("usage: python -m mnist_flax.predict --workdir=DIR IMAGE [IMAGE...] [--json] "
         "[--show=DIR]")


def _flags() -> flags.FlagValues:
    """The command's own flags: no --workdir clash with mnist_flax.main in one process."""
    values = flags.FlagValues()
    flags.DEFINE_string("workdir", None, "A training workdir (holds config.json and "
                        "checkpoints/), local or gs://.", flag_values=values)
    flags.DEFINE_bool("json", False, "Print one JSON object per image (JSON Lines): image, digit, "
                      "top, probabilities (rounded to 4 places), unsure, why, step (and shown "
                      "with --show); or image and error.", flag_values=values)
    flags.DEFINE_string("show", None, "Write the 28x28 the model saw for each image to this "
                        "directory, as NAME.28x28.png (each pixel an 8x8 block).",
                        flag_values=values)
    flags.DEFINE_bool("help", False, "Show this help.", flag_values=values, short_name="h")
    return values


def describe(path: str, probabilities: np.ndarray, doubts: tuple[str, ...] = ()) -> dict:
    """One image's result; every probability rounded to DECIMALS places, as printed. `unsure`
    when the top probability is under UNSURE_BELOW or the page had `doubts`; `why` says which."""
    top = np.argsort(-probabilities, kind="stable")[:TOP_K]
    why = list(doubts)
    if probabilities[top[0]] < UNSURE_BELOW:
        why.insert(0, f"top probability {probabilities[top[0]]:.2f} is under {UNSURE_BELOW}")
    return {"image": path, "digit": int(top[0]),
            "top": [{"digit": int(d), "probability": round(float(probabilities[d]), DECIMALS)}
                    for d in top],
            "probabilities": [round(float(p), DECIMALS) for p in probabilities],
            "unsure": bool(why), "why": why}


def _line(result: dict) -> str:
    """One image's line of the text output: digit, top probabilities, doubts, what was shown."""
    top = ", ".join(f"{t['digit']}: {t['probability']:.3f}" for t in result["top"])
    line = f"{result['image']}: {result['digit']}  ({top})"
    if result["unsure"]:
        line += f"  unsure: {'; '.join(result['why'])}"
    return line + (f"  model saw {result['shown']}" if "shown" in result else "")


def _print(results: list[dict], probabilities, step: int, as_json: bool) -> None:
    """One batch's results in the order given (--json: JSON Lines, errors too), flushed so that
    a reader sees each batch as it is done."""
    for r in results:
        if "error" not in r:
            r = {**describe(r["image"], next(probabilities), r["doubts"]),
                 **({"shown": r["shown"]} if "shown" in r else {})}
        if as_json:
            print(json.dumps({**r, "step": step}))
        elif "error" not in r:
            print(_line(r))
    if sys.stdout is not None:
        sys.stdout.flush()


def run(argv: list[str]) -> int:
    """The command: prints predictions (or one-line errors on stderr); returns the exit status.

    0 when every image was predicted, 1 when some image could not be read (the others are still
    predicted and printed), 2 for bad usage or an unusable workdir.
    """
    logs.quiet_orbax_logging()  # A damaged checkpoint is one warning line, as in main.
    logs.quiet_storage_logging()
    FLAGS = _flags()  # noqa: N806 (absl's name for it)
    if error := startup.quoted_flags_error(argv):
        print(f"error: {error}\n{USAGE}", file=sys.stderr)
        return 2
    try:
        paths = FLAGS(argv)[1:]
    except flags.Error as e:
        print(f"error: {e}\n{USAGE}", file=sys.stderr)
        return 2
    if FLAGS.help:
        print(f"{USAGE}\n\nPredicts the digit in each image with a trained workdir's newest "
              f"checkpoint.\n\n{FLAGS.get_help()}")
        return 0
    if not FLAGS.workdir or not paths:
        print(f"error: {'no images given' if FLAGS.workdir else '--workdir is required'}\n{USAGE}",
              file=sys.stderr)
        return 2
    try:
        predict = load(FLAGS.workdir)
    except PredictError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        os.makedirs(FLAGS.show or ".", exist_ok=True)
    except OSError as e:
        print(f"error: --show={FLAGS.show}: cannot write there ({e.strerror}); give a directory "
              "you can write to", file=sys.stderr)
        return 2
    failed, shown = 0, set()
    for start in range(0, len(paths), BATCH):  # Read, classified and printed BATCH at a time.
        results, images = [], []
        for path in paths[start:start + BATCH]:  # A bad file is reported and skipped.
            try:
                digit, doubts = digit_images.prepare_file(path)
                images.append(digit)
                results.append({"image": path, "doubts": doubts})
                if FLAGS.show:
                    results[-1]["shown"] = digit_images.show(digit, path, FLAGS.show, shown)
            except PredictError as e:
                results.append({"image": path, "error": str(e)})
                print(f"error: {e}", file=sys.stderr)
        _print(results, iter(predict(np.stack(images)) if images else ()), predict.step,
               FLAGS.json)
        failed += len(results) - len(images)
    return 1 if failed else 0


def main() -> None:
    """The console script and `python -m mnist_flax.predict`, inside the one error boundary."""
    with startup.one_line_startup(startup.PREDICT_INTERRUPTED_LINE):
        from mnist_flax.run import boundary

    with boundary.one_line_errors(interrupted_line=startup.PREDICT_INTERRUPTED_LINE):
        code = run(sys.argv)
        if sys.stdout is not None:  # None when started with stdout closed (`>&-`).
            sys.stdout.flush()  # Here, so a reader that left (`| head`) ends quietly, not in a
            # BrokenPipeError traceback from the flush at exit.
    sys.exit(code)


if __name__ == "__main__":
    main()
