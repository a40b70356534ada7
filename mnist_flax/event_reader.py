"""A run's TensorBoard events read back with TensorBoard's own reader, which reads every file of
a run in order and honours the purge a resumed run writes (so each step appears once): the last
text of a tag, a scalar's (step, value) pairs, the steps an image tag was written at.

TensorBoard is imported on the first read, not with this module.
"""

from __future__ import annotations

import contextlib
import logging as python_logging
from collections.abc import Iterator
from typing import Any


@contextlib.contextmanager
def _quiet_tensorboard_reader() -> Iterator[None]:
    """TensorBoard's reader logs "No path found after <events file>" (INFO, through the
    "tensorboard" logger to absl's handler) for each file it reads: noise under a sweep's table
    or a run's log. Its warnings and errors still pass, and the level is restored after the read."""
    from tensorboard.util import tb_logging

    logger = tb_logging.get_logger()
    level = logger.level
    logger.setLevel(max(level, python_logging.WARNING))
    try:
        yield
    finally:
        logger.setLevel(level)


def _loaded(logdir: str, kind: str) -> Any:
    """An EventAccumulator over `logdir` that kept every event of `kind` ('tensors', 'scalars',
    'images'), loaded."""
    from tensorboard.backend.event_processing import event_accumulator

    events = event_accumulator.EventAccumulator(logdir, size_guidance={kind: 0})
    with _quiet_tensorboard_reader():
        events.Reload()
    return events


def read_text(logdir: str, tag: str) -> str | None:
    """The last text written under `tag` in `logdir`'s own run."""
    events = _loaded(logdir, "tensors")
    name = f"{tag}/text_summary"  # tensorboardX's name for a text summary.
    if name not in events.Tags()["tensors"]:
        return None
    return events.Tensors(name)[-1].tensor_proto.string_val[0].decode()


def read_scalars(logdir: str, tag: str) -> list[tuple[int, float]]:
    """(step, value) of `tag` in `logdir`'s event files."""
    events = _loaded(logdir, "scalars")
    if tag not in events.Tags()["scalars"]:
        return []
    return [(e.step, e.value) for e in events.Scalars(tag)]


def read_image_steps(logdir: str) -> dict[str, list[int]]:
    """Each image tag in `logdir`'s event files -> the steps it was written at."""
    events = _loaded(logdir, "images")
    return {tag: [image.step for image in events.Images(tag)] for tag in events.Tags()["images"]}
