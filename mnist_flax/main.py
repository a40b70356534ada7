"""Trains the MNIST CNN: `python -m mnist_flax.main --workdir=runs/ [--config=...] [--config.x=y]`.

Flags -> config -> data -> `train.train_and_evaluate(config, workdir, hooks, dataset)` inside
`run.operations.held` (the workdir's lock, the stop signals), all inside the one error boundary
(`run.boundary`), so this file only parses, checks and reports.
"""

from __future__ import annotations

import shlex
import sys

from mnist_flax.run import startup

with startup.one_line_startup():  # Seconds of imports before the boundary exists.
    import jax
    from absl import flags, logging
    from ml_collections import config_flags

    from mnist_flax import configs, input_pipeline, paths, summaries, train
    from mnist_flax.run import boundary, config_checks, operations, process, workdir

FLAGS = flags.FLAGS


def define_flags() -> None:
    flags.DEFINE_string("workdir", None, "Directory (or gs:// URL) for TensorBoard events and "
                        "checkpoints; the same command resumes a run in it.")
    boundary.define_config_flag(boundary.DEFAULT_CONFIG)
    flags.declare_key_flag("config")  # So that --help lists it.
    flags.DEFINE_bool("multihost", False,
                      "Call jax.distributed.initialize() first (every host of a TPU pod slice, or "
                      "of a SLURM job, runs the same command); elsewhere also pass the three "
                      "settings below.")
    flags.DEFINE_string("coordinator_address", None, "--multihost: HOST:PORT of process 0.")
    flags.DEFINE_integer("num_processes", None, "--multihost: how many processes in all.")
    flags.DEFINE_integer("process_id", None, "--multihost: this process's index, 0 to N-1.")
    flags.DEFINE_float("lease_seconds", workdir.LEASE_TTL_S,
                       "gs:// workdirs: how long the run's lease on the workdir lasts unless "
                       "renewed (every third of it): how long a killed run keeps the next one out, "
                       "and how soon a run whose storage stopped answering gives up.",
                       lower_bound=3.0)
    flags.mark_flags_as_required(["workdir"])


def main(argv: list[str]) -> None:
    with boundary.one_line_errors(FLAGS.workdir):
        boundary.no_extra_arguments(argv)
        FLAGS.workdir = paths.parse(FLAGS.workdir, "--workdir")  # `~` expanded, gs:/x refused.
        process.setup_process()
        process.start_jax(FLAGS.multihost, FLAGS.coordinator_address, FLAGS.num_processes,
                          FLAGS.process_id)
        config = FLAGS.config
        config_checks.validate(config, jax.device_count())
        process.enable_compilation_cache(config.compilation_cache_dir)
        workdir.prepare(FLAGS.workdir)
        logging.info("JAX %s, backend %s: %d process(es), %d device(s): %s", jax.__version__,
                     jax.default_backend(), jax.process_count(), jax.device_count(),
                     jax.devices())
        logging.info("Config (%s):\n%s", config_flags.get_config_filename(FLAGS["config"]),
                     summaries.config_text(config))
        dataset = input_pipeline.load_dataset(config)  # Checked before the workdir is held:
        configs.check_against_data(config, dataset.train_labels)  # bad input writes nothing.
        with operations.held(FLAGS.workdir, config, FLAGS.lease_seconds) as hooks:
            train.train_and_evaluate(config, FLAGS.workdir, hooks, dataset)
        if jax.process_index() == 0:
            print(next_steps(FLAGS.workdir), file=sys.stderr)


def next_steps(workdir_path: str) -> str:
    """Where the results are and what to run next; on stderr, so the tutorial's `Test accuracy:`
    stays the last line of stdout."""
    quoted = shlex.quote(workdir_path)
    # The parent: with the run itself as the logdir, HParams names it "." and finds no metrics.
    head, sep, _ = workdir_path.rstrip("/").rpartition("/")
    parent = head if sep and head and not head.endswith(":/") else (
        workdir_path if paths.is_remote(workdir_path) else "/" if workdir_path.startswith("/")
        else ".")
    # TensorBoard's fast loader reads gs:// but not with your application-default credentials
    # (tensorflow/tensorboard #4784, #5819); the Python loader does.
    remote = " --load_fast=false" if paths.is_remote(workdir_path) else ""
    return (f"\nResults in {workdir_path}: TensorBoard events (train/, test/), checkpoints, "
            f"config.json. Next:\n"
            f"  tensorboard --logdir={shlex.quote(parent)}{remote}\n"
            f"  python -m mnist_flax.predict --workdir={quoted} my_digit.png")


def run() -> None:
    """The console script and `python -m mnist_flax.main`."""
    boundary.run_app(define_flags, main)


if __name__ == "__main__":
    run()
