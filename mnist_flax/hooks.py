"""What `train.train_and_evaluate` lets its caller add around the loop: three methods. These
defaults train bare (a notebook, a test); main's `run.Operations` overrides them to check the
config of a resumed run, stop on signals, and refuse to save after losing the workdir's lease.
Everything every caller needs (checksums, the diverged-state check, pictures) is the core's."""

from typing import Any

from mnist_flax import checkpoints


class Hooks:
    """The loop calls `restore` once, then after each dispatch `should_stop`, and `before_save`
    before each checkpoint."""

    def restore(self, workdir: str, state: Any, position: dict[str, int]) -> Any:
        """The state to start from: the newest intact checkpoint's, or `state` if there is none."""
        return checkpoints.restore(workdir, state, position)

    def should_stop(self, step: int) -> bool:
        """After each dispatch before the last: True saves a checkpoint and returns early."""
        return False

    def before_save(self, step: int) -> None:
        """May refuse the save at `step` (raise)."""
