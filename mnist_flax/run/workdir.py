"""The workdir as a place: its path (local or gs://), whether it can be used, its config.json.

Every path under a workdir goes through `etils.epath`, the path layer orbax uses, so a local
directory and a `gs://` bucket behave the same (gcsfs underneath, from the `gcs` extra). With
several processes (a pod slice), `check_shared` stops a run whose hosts do not all see the same
workdir.
"""

from __future__ import annotations

import importlib.util
import json
import os
import secrets

import jax
import ml_collections
import numpy as np
from etils import epath

from mnist_flax import checkpoints, configs
from mnist_flax.checkpoints import error_line
from mnist_flax.run import config_checks
from mnist_flax.run import lease as lease_lib
from mnist_flax.run.storage_errors import (
    forbidden,
    forbidden_reason,
    is_storage_error,
    storage_unreachable_line,
)

LOCK_FILE = ".lock"  # Held by the run using the workdir; holds that run's pid (or its lease).
SHARED_CHECK_FILE = ".shared_check"  # Written by process 0, read by all: do they share the dir?
# How long a gs:// workdir stays locked after its run dies without releasing it (kill -9, a lost
# VM); a live run renews its lease every third of it. docs/tpu.md says why a lease.
LEASE_TTL_S = lease_lib.DEFAULT_TTL_S
GCS_EXTRA = "pip install 'mnist_flax[gcs]'"


class WorkdirError(ValueError):
    """A workdir that cannot be used (a file, not writable, busy, unreadable config); one line."""


def path(workdir: str | os.PathLike) -> epath.Path:
    """The workdir as an epath: absolute when local, unchanged when a URL such as gs://."""
    text = os.fspath(workdir)
    if is_remote(text):
        check_client(text)
    return checkpoints.path(text)


def is_remote(workdir: str | os.PathLike) -> bool:
    return "://" in os.fspath(workdir)


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:  # A parent package (google.cloud) is missing.
        return False


def check_client(workdir: str) -> None:
    """One line if `workdir` is a URL we cannot write: not gs://, or the `gcs` extra is missing.

    Without it epath, tensorboardX and orbax each fail differently (and tensorboardX prints a
    traceback from a destructor), so every entry point asks here first.
    """
    if not is_remote(workdir):
        return
    if not workdir.startswith("gs://"):
        raise WorkdirError(f"--workdir={workdir}: only local directories and gs:// URLs are "
                           "supported")
    missing = [m for m in ("gcsfs", "google.cloud.storage") if not _installed(m)]
    if missing:
        raise WorkdirError(f"--workdir={workdir}: a gs:// workdir needs {' and '.join(missing)}, "
                           f"which the gcs extra installs: {GCS_EXTRA}")


def prepare(workdir: str) -> None:
    """Creates the workdir if needed; refuses a path that is a file or cannot be written.

    In a bucket, mkdir succeeds even when the bucket does not exist: only the probe write shows
    a missing bucket (FileNotFoundError) or missing permission.
    """
    if not workdir:
        raise WorkdirError("--workdir is empty; pass a directory, e.g. --workdir=runs/")
    if workdir.startswith("~"):  # A shell expands ~ only where a word starts: not after "=".
        raise WorkdirError(f"--workdir={workdir}: starts with '~', which the shell did not expand "
                           f"(it does not after '='); write --workdir {workdir} (with a space) or "
                           f"--workdir=$HOME{workdir[1:]}")
    emulator = os.environ.get("STORAGE_EMULATOR_HOST")
    if is_remote(workdir) and emulator and not os.environ.get("TENSORSTORE_GCS_HTTP_URL"):
        # Every client but tensorstore (orbax's arrays) would use the emulator; its saves would
        # go to the real GCS and wait out its retries.
        raise WorkdirError(f"STORAGE_EMULATOR_HOST={emulator} is set but TENSORSTORE_GCS_HTTP_URL "
                           "is not, so checkpoints would not go to the emulator; export "
                           f"TENSORSTORE_GCS_HTTP_URL={emulator} (python tests/gcs_emulator.py "
                           "prints every variable to export)")
    root = path(workdir)
    try:
        # is_file, not "exists and not is_dir": on a pod every host runs this at once, and in a
        # bucket a prefix holding only another host's probe exists, then is gone by is_dir.
        if root.is_file():
            raise WorkdirError(f"--workdir={workdir}: exists and is not a directory; pick another "
                               "path")
        if not is_remote(workdir):
            if os.path.islink(root) and not os.path.exists(root):
                raise WorkdirError(f"--workdir={workdir}: a symbolic link to "
                                   f"{os.readlink(root)}, which does not exist (or loops); point "
                                   "it at a directory, or remove it")
            _refuse_a_part_of_a_run(workdir)  # Before mkdir: nothing is made inside that run.
        root.mkdir(parents=True, exist_ok=True)
        # Random: every host of a pod probes the same bucket, and their pids may coincide.
        probe = root / f".write_test.{os.getpid()}.{secrets.token_hex(4)}"
        probe.write_text("")
        probe.unlink()
        if not is_remote(workdir):
            check_layout(root)
    except OSError as e:
        if is_remote(workdir):
            bucket = workdir[len("gs://"):].split("/")[0]
            if is_storage_error(e):
                raise WorkdirError(storage_unreachable_line(workdir, e)) from None
            if forbidden(e):
                raise WorkdirError(f"--workdir={workdir}: cannot write there ("
                                   f"{forbidden_reason(e, bucket)}") from None
            reason = (f"bucket {bucket} does not exist" if isinstance(e, FileNotFoundError)
                      else error_line(e))
            raise WorkdirError(f"--workdir={workdir}: cannot write there ({reason}); create the "
                               "bucket (gcloud storage buckets create gs://BUCKET) or pick one "
                               "this machine's service account can write") from None
        raise WorkdirError(f"--workdir={workdir}: cannot write there ({e.strerror or e}); "
                           "pick a writable directory") from None


# What a run keeps in its workdir: name -> (a directory?, what it is), for `check_layout`.
LAYOUT = {LOCK_FILE: (False, "lock"), checkpoints.CONFIG_FILE: (False, "config"),
          checkpoints.CHECKPOINT_DIR: (True, "checkpoints"), "train": (True, "train events"),
          "test": (True, "test events")}


def check_layout(root: epath.Path) -> None:
    """One line, before anything is written, for a local workdir whose own entries are in the
    way: a file where the run keeps a directory, or the reverse, or a file it cannot rewrite."""
    for name, (directory, what) in LAYOUT.items():
        entry = root / name
        wrong = entry.is_file() if directory else entry.is_dir()
        if wrong or (not directory and entry.exists() and not os.access(entry, os.W_OK)):
            kind = ("a file" if directory else "a directory") if wrong else "not writable"
            raise WorkdirError(f"{entry}: is {kind}, where the run keeps its {what}; move it "
                               "aside (or fix its permissions), or use another --workdir")


def on_every_process(ok: bool) -> bool:
    """True if `ok` holds on every process (a collective: all processes must call it)."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


def check_shared(workdir: str) -> None:
    """With several processes, stops unless all of them see the same workdir (a collective).

    Process 0 writes a random token; after a barrier every process reads it back. Hosts of a pod
    slice share no disk, so a local workdir would give each host its own checkpoints (and process
    0's lock would guard only its own): the fix is a bucket. A gs:// workdir is shared already.
    """
    if jax.process_count() == 1 or is_remote(workdir):
        return
    from jax.experimental import multihost_utils

    probe = path(workdir) / SHARED_CHECK_FILE
    if jax.process_index() == 0:
        probe.parent.mkdir(parents=True, exist_ok=True)
        probe.write_text(str(secrets.randbits(31)))
    multihost_utils.sync_global_devices("mnist_flax.workdir.check_shared: written")
    try:
        token = int(probe.read_text())
    except (OSError, ValueError):
        token = -1
    tokens = np.asarray(multihost_utils.process_allgather(np.int32(token))).ravel()
    blind = [i for i, t in enumerate(tokens) if t != tokens[0]]
    if jax.process_index() == 0:
        probe.unlink(missing_ok=True)
    if blind:
        raise WorkdirError(
            f"--workdir={workdir} is not shared by the {len(tokens)} processes: process(es) "
            f"{', '.join(map(str, blind))} cannot see what process 0 writes there, so they would "
            "not see its checkpoints; use a bucket all hosts reach, e.g. "
            "--workdir=gs://BUCKET/runs/NAME")



def enclosing_run(workdir: str) -> str | None:
    """The nearest directory above `workdir` that holds a run (config.json and checkpoints/), or
    None; relative if `workdir` is. So a user who passed a directory inside a run (its
    checkpoints/, train/) is pointed at the run, not told to train a run inside it."""
    text = os.fspath(workdir)
    relative = not is_remote(text) and not os.path.isabs(text)
    for parent in path(text).parents:
        if is_remote(text) and not str(parent).partition("://")[2]:
            break  # Above the bucket.
        try:
            is_run = ((parent / checkpoints.CONFIG_FILE).is_file()
                      and (parent / checkpoints.CHECKPOINT_DIR).is_dir())
        except OSError:  # An ancestor we may not read holds no run we could use.
            continue
        if is_run:
            return os.path.relpath(parent) if relative else str(parent)
    return None


def _refuse_a_part_of_a_run(workdir: str) -> None:
    """WorkdirError for a workdir inside another run (orbax prunes and cleans its checkpoints/,
    and TensorBoard on that run would show this one in it) or above one (the reverse, as a sweep
    in a finished run's workdir did): a run's directory holds that run only."""
    root, run = path(workdir), enclosing_run(workdir)
    if run is None and not (root / checkpoints.CONFIG_FILE).exists():  # Not a run itself.
        run = next((str(c.parent) for pattern in ("*/", "*/*/")
                    for c in sorted(root.glob(pattern + checkpoints.CONFIG_FILE))
                    if (c.parent / checkpoints.CHECKPOINT_DIR).is_dir()), None)
        where = f"above the run {run}"
    else:
        part = os.path.relpath(root, path(run)).split(os.sep)[0] if run else ""
        where = f"inside the run {run}" + (f" (its {part}/)" if LAYOUT.get(part, (0,))[0] else "")
    if run is not None:
        raise WorkdirError(f"--workdir={workdir} is {where}; a run there would mix with that one: "
                           "use another --workdir")


def config_path(workdir: str) -> epath.Path:
    return path(workdir) / checkpoints.CONFIG_FILE


def read_config(workdir: str) -> ml_collections.ConfigDict:
    """workdir/config.json, held to the config's schema and value checks (config_checks) as a
    config file is; WorkdirError naming the file, the field and the fix when it cannot be used.

    A field the file lacks (a run trained before the field existed) gets the default's value:
    fields are added with defaults that keep the earlier behaviour.
    """
    source = config_path(workdir)
    try:
        fields = json.loads(source.read_text())
    except FileNotFoundError:
        raise WorkdirError(f"{source}: not found; is {workdir} a training workdir?") from None
    except IsADirectoryError:
        raise WorkdirError(f"{source}: is a directory, not the run's config; move it "
                           "aside") from None
    except (OSError, ValueError) as e:  # ValueError: not JSON, or not even UTF-8 (damaged).
        raise WorkdirError(f"{source}: unreadable ({error_line(e)})") from None
    if not isinstance(fields, dict) or not fields:
        raise WorkdirError(f"{source}: holds {type(fields).__name__} {str(fields)[:40]!r}, not a "
                           "run's config (a JSON object of its fields); move it aside")
    return _checked_config(source, fields)


def _json_value(value, limit: int = 60) -> str:
    text = json.dumps(value)
    return text if len(text) <= limit else f"{text[:limit]}..."


def _checked_config(source: epath.Path, fields: dict) -> ml_collections.ConfigDict:
    """`fields` as a config, missing ones from the default; one line for any that cannot work."""
    fix = f"fix {source.name} or train a new workdir"
    reference = configs.load()
    config = ml_collections.ConfigDict(fields)
    for name in sorted(set(reference) - set(fields)):
        config[name] = reference[name]
    try:
        config_checks.validate(config)
    except config_checks.UnknownFieldError as e:
        hint = (f'did you mean "{e.close}"?' if e.close
                else "written by another version of mnist_flax?")
        raise WorkdirError(f"{source}: sets {e.field!r}, which is not a field of the config "
                           f"({hint}); {fix}") from None
    except config_checks.FieldError as e:
        value = _json_value(fields[e.field]) if e.field in fields else repr(e.value)
        raise WorkdirError(f"{source}: {e.field} is {value}, {e.rule}; {fix}") from None
    except configs.ConfigError as e:
        raise WorkdirError(f"{source}: {e}; {fix}") from None
    return config


def config_changes(workdir: str, config: ml_collections.ConfigDict) -> list[str]:
    """'name: old -> new' for every field that differs from the config stored in the workdir."""
    if not config_path(workdir).exists():
        return []
    old = read_config(workdir).to_dict()
    new = json.loads(config.to_json())
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
            if old.get(k) != new.get(k)]


