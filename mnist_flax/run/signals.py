"""SIGTERM (a preemption) and SIGINT (Ctrl-C): the loop finishes its step, saves and stops; on a
pod every process stops after the same step."""

from __future__ import annotations

import dataclasses
import signal
import threading
from typing import Any

from absl import logging

from mnist_flax.run.workdir import on_every_process

# Exit status of a run stopped by SIGTERM after saving its checkpoint: 128 + SIGTERM, what a
# shell reports for a process SIGTERM ended, so job systems see "terminated" and can restart it.
PREEMPTED_EXIT_CODE = 128 + signal.SIGTERM
# Exit status of a run stopped by Ctrl-C (SIGINT), with or without saving: what a shell reports.
INTERRUPTED_EXIT_CODE = 128 + signal.SIGINT
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(Exception):  # noqa: N818 (a signal, not an error)
    """SIGTERM or SIGINT arrived; the checkpoint at `step` was saved and the run should exit with
    `exit_code` (143 or 130)."""

    def __init__(self, step: int, signum: int = signal.SIGTERM):
        super().__init__(stop_message(step, signum))
        self.step, self.signum = step, signum
        self.exit_code = 128 + signum




@dataclasses.dataclass
class StopFlag:
    """While installed, SIGTERM and SIGINT only set `requested` and remember the first `signum`;
    the loop finishes its step, saves and stops. A second Ctrl-C raises KeyboardInterrupt at once
    (the first puts Python's default handler back), for a user who will not wait for the save.

    A context manager: leaving it puts the previous handlers back. A signal the process ignores
    (SIGINT in a background job, nohup) stays ignored. Outside the main thread (where Python
    cannot install handlers) it does nothing and both signals keep their usual meaning.
    """

    requested: threading.Event = dataclasses.field(default_factory=threading.Event)
    signum: int | None = None
    _previous: dict[int, Any] = dataclasses.field(default_factory=dict)

    def __enter__(self) -> StopFlag:
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                if signal.getsignal(signum) is not signal.SIG_IGN:
                    self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        del frame
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)
        if self.signum is None:
            self.signum = signum
        self.requested.set()

    def __exit__(self, *exc_info: Any) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, signal.SIG_DFL if previous is None else previous)
        self._previous = {}

    def is_set(self) -> bool:
        return self.requested.is_set()

    def agreed(self) -> bool:
        """Whether any process got a stop signal. On a pod every process must stop after the same
        step, or the others wait for it in the save's collectives; a process stopped by a peer
        exits as preempted (143). One small all-gather per call when there are several processes.
        """
        anywhere = not on_every_process(not self.is_set())
        if anywhere and self.signum is None:
            self.signum = signal.SIGTERM
        return anywhere


def stop_message(step: int, signum: int) -> str:
    if signum == signal.SIGINT:
        return (f"Interrupted (Ctrl-C) at step {step}; checkpoint saved; exiting with status "
                f"{INTERRUPTED_EXIT_CODE}. Run the same command to resume.")
    return (f"SIGTERM: saved the checkpoint at step {step}; exiting with status "
            f"{128 + signum}. Run the same command again to resume.")


def log_preempted(step: int, signum: int = signal.SIGTERM) -> None:
    logging.warning("%s", stop_message(step, signum))

