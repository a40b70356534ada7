"""Checkpoints with orbax: the train state and its data position, saved, kept, restored; and the
run's config (workdir/config.json). Paths go through `etils.epath`: local or gs://.

Orbax writes a checkpoint into a temporary directory and renames it when complete, so a run killed
mid-save keeps the previous one. Saves are asynchronous: the loop waits only while the arrays are
copied off the device, and the files are written in a background thread while it trains on.
Every save stores a sha256 of what it holds, and every read checks it (`checkpoint_checks`);
`run.integrity` walks back past damaged ones and moves them aside.
"""

import contextlib
import errno
import os
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from mnist_flax import checkpoint_checks, paths
from mnist_flax.checkpoint_checks import (  # noqa: F401 (also this module's API)
    CHECKSUM_KEY,
    CheckpointError,
    DamagedError,
    check_shapes,
    path_name,
    tree_shapes,
)
from mnist_flax.paths import path

CHECKPOINT_DIR = "checkpoints"  # Under the workdir.
CONFIG_FILE = "config.json"  # The config the run was started (or resumed) with.
# Fields that decide which batch comes at a given step: a resumed run must keep them.
DATA_ORDER_FIELDS = ("seed", "batch_size", "num_train")


def error_line(e: BaseException, limit: int = 200) -> str:
    """'Type: first line of the message' (at most `limit` characters of it), for one-line errors."""
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:limit]}"


def checkpoint_dir(workdir: str) -> epath.Path:
    return path(workdir) / CHECKPOINT_DIR


def state_tree(state) -> dict[str, Any]:
    """The TrainState's arrays as a plain tree (typed PRNG keys are stored as their raw data)."""
    return {"params": state.params, "opt_state": state.opt_state, "step": jnp.asarray(state.step),
            "dropout_key": jax.random.key_data(state.dropout_key)}


def data_position(step: int, steps_per_epoch: int, config: ml_collections.ConfigDict,
                  num_train: int, data: str = "") -> dict[str, Any]:
    """Where in the data a step is, and which data (`Dataset.fingerprint`), stored next to the
    state for people and for the resume check."""
    epoch, index = divmod(step, steps_per_epoch)
    return {"step": step, "epoch": epoch, "step_in_epoch": index,
            "steps_per_epoch": steps_per_epoch, "seed": config.seed,
            "batch_size": config.batch_size, "num_train": num_train, "data": data}


def create_manager(workdir: str, keep: int, read_only: bool = False) -> ocp.CheckpointManager:
    """Keeps the newest `keep` checkpoints; saves only when told (the loop decides when).

    Saves are asynchronous (see `save`). The blocking part copies the arrays to host memory, so
    the next step may donate (overwrite) them; an older checkpoint is pruned only once the newer
    one is committed. A `read_only` manager creates, cleans and prunes nothing, and is never
    asked to save; orbax's own read_only=True would add only a warning at every open.
    """
    options = ocp.CheckpointManagerOptions(
        preservation_policy=None if read_only else ocp.checkpoint_managers.LatestN(keep),
        enable_async_checkpointing=not read_only, save_interval_steps=0 if read_only else 1,
        cleanup_tmp_directories=not read_only,  # Half-written saves of a killed run.
        create=not read_only)
    # Handlers named up front, so a fresh manager can read metadata before any save or restore.
    registry = ocp.handlers.create_default_handler_registry(
        state=ocp.StandardCheckpointHandler(), position=ocp.JsonCheckpointHandler())
    return ocp.CheckpointManager(checkpoint_dir(workdir), options=options,
                                 handler_registry=registry)


def latest_step(workdir: str) -> int | None:
    if not checkpoint_dir(workdir).is_dir():
        return None
    with contextlib.closing(create_manager(workdir, 1, read_only=True)) as manager:
        return manager.latest_step()


@contextlib.contextmanager
def open_manager(workdir: str, keep: int) -> Iterator[ocp.CheckpointManager]:
    """The run's manager. Leaving waits for the save in flight, so a run ends (or stops on a
    signal) with its last checkpoint committed, and a failure of that save is the one-line
    CheckpointError; after another error it is only logged, and the first error goes on."""
    if jax.process_count() > 1:  # Process 0 creates checkpoints/ now: not while another reads.
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("mnist_flax.checkpoints.open_manager")
    manager = create_manager(workdir, keep)
    try:
        yield manager
    except BaseException:
        try:
            finish(manager)
        except CheckpointError as e:
            logging.error("%s", e)
        raise
    else:
        finish(manager)
    finally:
        try:
            manager.close()
        except Exception as e:  # noqa: BLE001 (a failed save raises again here: reported above)
            logging.info("Closing the checkpoint manager: %s", error_line(e))


def save(manager: ocp.CheckpointManager, state, position: dict[str, Any]) -> bool:
    """Starts writing the checkpoint for `position['step']` with `position` as its JSON (once: a
    second call at the same step is a no-op), after the previous save: if that one failed, its
    failure is raised here, naming its step. Returns once the arrays are copied to the host."""
    step, tree = position["step"], state_tree(state)
    if manager.latest_step() == step:
        return False
    finish(manager)
    position = {**position, CHECKSUM_KEY: checkpoint_checks.state_checksum(tree, position)}
    try:
        return manager.save(step, force=True, args=ocp.args.Composite(
            state=ocp.args.StandardSave(tree), position=ocp.args.JsonSave(position)))
    except Exception as e:  # noqa: BLE001 (orbax, tensorstore and storage clients raise many kinds)
        raise CheckpointError(_save_failed(manager, step, e)) from None


def finish(manager: ocp.CheckpointManager) -> None:
    """Waits until the save in flight, if any, is committed; its failure becomes the one-line
    CheckpointError naming its step (orbax lists a step from the moment its save starts)."""
    step = manager.latest_step()
    try:
        manager.wait_until_finished()
    except Exception as e:  # noqa: BLE001 (whatever the background write raised)
        raise CheckpointError(_save_failed(manager, step, e)) from None


def _save_failed(manager: ocp.CheckpointManager, step: int, e: Exception) -> str:
    """The one-line error for a failed save. The half-written save is a tmp directory that no
    restore reads (the next manager deletes it), so the newest complete checkpoint is intact."""
    full = getattr(e, "errno", None) == errno.ENOSPC or "No space left on device" in str(e)
    try:
        last = manager.latest_step()
    except Exception:  # noqa: BLE001 (storage unreachable: the listing fails too)
        last = None
    kept = f"the checkpoint at step {last} is intact" if last is not None else "no checkpoint yet"
    return (f"{manager.directory}: saving the checkpoint at step {step} failed "
            f"({'no space left on device' if full else error_line(e, limit=160)}); {kept}; "
            f"{'free space' if full else 'fix that (is the storage reachable?)'} and run the same "
            "command to resume")


def read(manager: ocp.CheckpointManager, step: int, target: Any,
         where: epath.Path) -> tuple[Any, dict[str, Any]]:
    """The (tree, position JSON) saved at `step`, after checking its shapes against `target`'s,
    verified (DamagedError); the arrays land where `target`'s (arrays or ShapeDtypeStructs) say."""
    saved = manager.item_metadata(step)["state"].tree
    check_shapes(tree_shapes(saved), tree_shapes(target), where)
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), position=ocp.args.JsonRestore()))
    damage = checkpoint_checks.damage(step, restored["state"], restored["position"])
    if damage:
        raise DamagedError(damage)
    return restored["state"], restored["position"]


def adopt(state, tree: Any, saved_position: dict[str, Any], position: dict[str, Any],
          where: epath.Path):
    """`state` holding the restored `tree`, after checking the data order and the data itself
    match `position`'s (a position with no data fingerprint accepts any)."""
    for name in DATA_ORDER_FIELDS:
        if saved_position[name] != position[name]:
            raise CheckpointError(
                f"{where}: was trained with {name}={saved_position[name]} but this run has "
                f"{position[name]}; resuming would change the data order; use another --workdir "
                "or the same config and data")
    saved, this = saved_position.get("data", ""), position.get("data", "")
    if saved and this and saved != this:  # Checkpoints before fingerprints have none.
        raise CheckpointError(
            f"{where}: was trained on other data (fingerprint {saved}) than this run's ({this}); "
            "resuming would train on a mix: point the config at the data it was trained on, use "
            "another --workdir, or pass --config.resume_on_other_data=True to resume on these")
    return state.replace(params=tree["params"], opt_state=tree["opt_state"], step=tree["step"],
                         dropout_key=jax.random.wrap_key_data(tree["dropout_key"]))


def restore(workdir: str, state, position: dict[str, int]):
    """The newest checkpoint's state in `workdir`, or `state` when there is none. `state` is this
    config's fresh state: shapes are checked against it and its shardings say where arrays go."""
    step = latest_step(workdir)
    if step is None:
        return state
    where = checkpoint_dir(workdir) / str(step)
    with contextlib.closing(create_manager(workdir, 1, read_only=True)) as manager:
        try:
            tree, saved_position = read(manager, step, state_tree(state), where)
        except DamagedError as e:
            raise DamagedError(f"{where}: damaged ({e}); `python -m mnist_flax.main "
                               f"--workdir={workdir}` moves it aside and resumes from the one "
                               "before") from None
    return adopt(state, tree, saved_position, position, where)


def write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
    """Writes workdir/config.json (process 0 only), whole: predict builds the model from it."""
    if jax.process_index() == 0:
        target = path(workdir) / CONFIG_FILE
        target.parent.mkdir(parents=True, exist_ok=True)
        text = config.to_json(indent=2, sort_keys=True)
        if paths.is_remote(workdir):  # An object is written whole; a bucket's renames copy.
            target.write_text(text)
            return
        tmp = target.with_name(f"{CONFIG_FILE}.tmp.{os.getpid()}")
        try:
            tmp.write_text(text)
            tmp.replace(target)  # Atomic: a reader never sees half a file.
        finally:
            tmp.unlink(missing_ok=True)
