"""SIGTERM (a preemption), SIGINT (Ctrl-C) and SIGHUP (the terminal or ssh session that started
the run closed): the loop finishes its step, saves and stops; on a pod every process stops after
the same step, agreed on the devices one dispatch late, so that the host never waits for them to
agree."""

from __future__ import annotations

import dataclasses
import functools
import signal
import threading
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mnist_flax.run import startup

# Exit status of a run stopped by SIGTERM after saving its checkpoint: 128 + SIGTERM, what a
# shell reports for a process SIGTERM ended, so job systems see "terminated" and can restart it.
PREEMPTED_EXIT_CODE = 128 + signal.SIGTERM
# Exit status of a run stopped by Ctrl-C (SIGINT), with or without saving: what a shell reports.
INTERRUPTED_EXIT_CODE = startup.INTERRUPTED_EXIT_CODE
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class Preempted(Exception):  # noqa: N818 (a signal, not an error)
    """A stop signal arrived; the checkpoint at `step` was saved and the run should exit with
    `exit_code`, 128 + the signal, as a shell reports it (143 SIGTERM, 130 Ctrl-C, 129 SIGHUP)."""

    def __init__(self, step: int, signum: int = signal.SIGTERM):
        why = " (the terminal or ssh session closed)" if signum == signal.SIGHUP else ""
        super().__init__(
            f"Interrupted (Ctrl-C) at step {step}; checkpoint saved; exiting with status "
            f"{INTERRUPTED_EXIT_CODE}. Run the same command to resume." if signum == signal.SIGINT
            else f"{signal.Signals(signum).name}{why}: saved the checkpoint at step {step}; "
            f"exiting with status {128 + signum}. Run the same command again to resume.")
        self.step, self.signum = step, signum
        self.exit_code = 128 + signum


@dataclasses.dataclass
class StopFlag:
    """While installed, the STOP_SIGNALS only set `requested` and remember the first `signum`;
    the loop finishes its step, saves and stops. A second Ctrl-C raises KeyboardInterrupt at once
    (the first puts Python's default handler back), for a user who will not wait for the save.

    A context manager: leaving it puts the previous handlers back. A signal the process ignores
    (SIGINT in a background job, nohup) stays ignored. Outside the main thread (where Python
    cannot install handlers) it does nothing and the signals keep their usual meaning.
    """

    requested: threading.Event = dataclasses.field(default_factory=threading.Event)
    signum: int | None = None
    _previous: dict[int, Any] = dataclasses.field(default_factory=dict)
    _in_flight: jax.Array | None = None  # The agreement the last `agreed` call started.

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
        """Whether any process got a stop signal; on a pod all stop after the same step (or the
        others wait in the save's collectives), and one stopped by a peer exits as preempted.
        Each call (one per dispatch, on every process) queues an all-reduce of the flags behind
        the dispatch just made and reads the previous call's, which the devices have run by the
        time the host would wait for them anyway: agreeing never idles them."""
        if jax.process_count() == 1:
            return self.is_set()
        previous, self._in_flight = self._in_flight, _any_process(self.is_set())
        anywhere = previous is not None and bool(previous.addressable_data(0))
        if anywhere and self.signum is None:
            self.signum = signal.SIGTERM
        return anywhere


@functools.cache
def _any_over_devices() -> tuple[NamedSharding, Callable[[jax.Array], jax.Array]]:
    """(one flag per device, the jitted any of them, replicated): built once, not per dispatch."""
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("process",))
    return NamedSharding(mesh, P("process")), jax.jit(
        lambda flags: jnp.any(flags > 0), out_shardings=NamedSharding(mesh, P()))


def _any_process(flag: bool) -> jax.Array:
    """Whether `flag` holds on any process, as a replicated device scalar (not waited for)."""
    per_device, any_of = _any_over_devices()
    local = np.full(jax.local_device_count(), flag, np.int32)
    return any_of(jax.make_array_from_process_local_data(per_device, local))


