"""What `train.train_and_evaluate` lets its caller add around the loop: one small seam. These
defaults train bare (a notebook, a test); main's `run.Operations` holds the workdir, verifies
checkpoints, stops on signals and draws the end-of-run pictures through the same methods."""

import contextlib
from typing import Any

import jax

from mnist_flax import checkpoints


class Hooks:
    """The loop calls these in this order: hold (around everything), restore, then per dispatch
    before_dispatch and should_stop, before_save before each checkpoint, after_training last."""

    def hold(self, workdir: str) -> contextlib.AbstractContextManager:
        """Entered before the workdir is read; while it is held, the workdir is this run's."""
        return contextlib.nullcontext()

    def restore(self, workdir: str, state: Any, position: dict[str, int]) -> Any:
        return checkpoints.restore(workdir, state, position)

    def before_dispatch(self, state: Any, step: int, num_steps: int) -> tuple[Any, int]:
        """May change the state or run fewer steps (fault injection in tests)."""
        return state, num_steps

    def should_stop(self, step: int) -> bool:
        """After each dispatch: True saves a checkpoint and returns early."""
        return False

    def before_save(self, state: Any, position: dict[str, Any],
                    pending: list[dict[str, jax.Array]]) -> dict[str, Any]:
        """May refuse the save (raise) or add to the position JSON saved with the state."""
        return position

    def after_training(self, state: Any, dataset: Any, writers: Any) -> None:
        """After the last step, and again whenever a finished run is started again (main's draw
        the pictures then only if they are missing)."""
