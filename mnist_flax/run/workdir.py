"""The workdir as a place: its path (local or gs://, through `etils.epath`, orbax's path layer),
whether it can be used, its config.json. A run writes only what is its own: `prepare` probes
every place it will write and refuses a workdir inside or above another run, or a foreign entry
(a link, a file for a directory) where the run keeps its own, all before the first step.
"""

from __future__ import annotations

import errno
import importlib.util
import json
import os
import secrets

import ml_collections
from etils import epath

from mnist_flax import checkpoints, configs
from mnist_flax.checkpoints import error_line
from mnist_flax.paths import is_remote  # noqa: F401 (also this module's API)
from mnist_flax.run import config_checks, storage_errors
from mnist_flax.run import lease as lease_lib

LOCK_FILE = ".lock"  # Held by the run using the workdir; holds that run's pid (or its lease).
# How long a gs:// workdir stays locked after its run dies unreleased (kill -9, a lost VM).
LEASE_TTL_S = lease_lib.DEFAULT_TTL_S
GCS_EXTRA = "pip install 'mnist_flax[gcs]'"
WRITE_DEPTH = 200  # Bytes below the workdir the run writes, at most: an orbax chunk, an event file.


class WorkdirError(configs.UserError):
    """A workdir that cannot be used (a file, not writable, busy, unreadable config); one line."""


def path(workdir: str | os.PathLike) -> epath.Path:
    """The workdir as an epath: absolute when local, unchanged when a URL such as gs://."""
    check_client(os.fspath(workdir))
    return checkpoints.path(os.fspath(workdir))


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:  # A parent package (google.cloud) is missing.
        return False


def check_client(workdir: str, flag: str = "--workdir") -> None:
    """One line, naming `flag`, if `workdir` is a gs:// URL and the `gcs` extra is missing (without
    it epath, tensorboardX and orbax each fail differently); `paths.parse` refused other schemes."""
    if not is_remote(workdir):
        return
    missing = [m for m in ("gcsfs", "google.cloud.storage") if not _installed(m)]
    if missing:
        raise WorkdirError(f"{flag}={workdir}: a gs:// workdir needs {' and '.join(missing)}, "
                           f"which the gcs extra installs: {GCS_EXTRA}")


def prepare(workdir: str) -> None:
    """Creates the workdir if needed; refuses, before anything else is written, a path that is a
    file, a part of another run, or where the run could not write all it will (`_probe`; in a
    bucket, mkdir succeeds even when the bucket does not exist: only a write shows it)."""
    if not workdir:
        raise WorkdirError("--workdir is empty; pass a directory, e.g. --workdir=runs/")
    emulator = os.environ.get("STORAGE_EMULATOR_HOST")
    if is_remote(workdir) and emulator and not os.environ.get("TENSORSTORE_GCS_HTTP_URL"):
        # Every client but tensorstore (orbax's arrays) would use the emulator; its saves would
        # go to the real GCS and wait out its retries.
        raise WorkdirError(f"STORAGE_EMULATOR_HOST={emulator} is set but TENSORSTORE_GCS_HTTP_URL "
                           "is not, so checkpoints would not go to the emulator; export "
                           f"TENSORSTORE_GCS_HTTP_URL={emulator} (python tests/gcs_emulator.py "
                           "prints every variable to export)")
    root, local = path(workdir), not is_remote(workdir)
    if local and any("\udc80" <= c <= "\udcff" for c in workdir):  # Bytes that are not UTF-8.
        raise WorkdirError(f"--workdir={os.fsencode(workdir).decode(errors='backslashreplace')}: "
                           "not UTF-8, which orbax (tensorstore) cannot write under; rename it")
    place = root
    try:
        # is_file, not "exists and not is_dir": on a pod every host runs this at once, and in a
        # bucket a prefix holding only another host's probe exists, then is gone by is_dir.
        if root.is_file():
            raise WorkdirError(f"--workdir={workdir}: exists and is not a directory; pick another "
                               "path")
        if local:
            if os.path.islink(root) and not os.path.exists(root):
                raise WorkdirError(f"--workdir={workdir}: a symbolic link to "
                                   f"{os.readlink(root)}, which does not exist (or loops); point "
                                   "it at a directory, or remove it")
            _refuse_a_part_of_a_run(workdir)  # Before mkdir: nothing is made inside that run.
        root.mkdir(parents=True, exist_ok=True)
        if local:
            check_layout(root)
        # A place not there yet is made in root, which the first probe covers; made and removed
        # here, it raced with the other processes probing a shared disk (one's rmdir, one's write).
        for place in [root, *(root / n for n, (sub, _) in LAYOUT.items()
                              if sub and local and (root / n).is_dir())]:
            _probe(root, place)
    except OSError as e:
        if local:
            fix = (f"use a shorter --workdir (the run writes up to {WRITE_DEPTH} bytes below it)"
                   if e.errno == errno.ENAMETOOLONG else "make it writable, or use another one")
            raise WorkdirError(f"{f'--workdir={workdir}' if place == root else place}: cannot "
                               f"write there ({e.strerror or e}); {fix}") from None
        bucket = workdir[len("gs://"):].split("/")[0]
        if storage_errors.is_storage_error(e):
            raise WorkdirError(storage_errors.storage_unreachable_line(workdir, e)) from None
        if forbidden := storage_errors.forbidden_reason(e, bucket):
            raise WorkdirError(f"--workdir={workdir}: cannot write there ({forbidden}") from None
        reason = (f"bucket {bucket} does not exist" if isinstance(e, FileNotFoundError)
                  else error_line(e))
        raise WorkdirError(f"--workdir={workdir}: cannot write there ({reason}); create the "
                           "bucket (gcloud storage buckets create gs://BUCKET) or pick one "
                           "this machine's service account can write") from None


def _probe(root: epath.Path, place: epath.Path) -> None:
    """Writes a file in `place` (then removes it) as deep below `root` as the run writes
    (WRITE_DEPTH), so a place it cannot write, or a path too long, fails now, not at the first
    save or event after an epoch. Random: a pod's hosts probe one bucket at once."""
    name = f".write_test.{os.getpid()}.{secrets.token_hex(4)}."
    probe = place / name.ljust(len(str(root)) + WRITE_DEPTH - len(str(place)) - 1, "_")
    probe.write_text("probe")
    probe.unlink()


# What a run keeps in its workdir: name -> (a directory?, what it is), for `check_layout`.
LAYOUT = {LOCK_FILE: (False, "lock"), checkpoints.CONFIG_FILE: (False, "config"),
          checkpoints.CHECKPOINT_DIR: (True, "checkpoints"), "train": (True, "train events"),
          "test": (True, "test events")}


def check_layout(root: epath.Path) -> None:
    """One line, before anything is written, for a local workdir whose own entries are in the
    way: a file where the run keeps a directory, or the reverse, a file it cannot rewrite, or a
    link (the run never writes through one: it may lead out of the workdir)."""
    for name, (directory, what) in LAYOUT.items():
        entry = root / name
        kind = ("a file" if entry.is_file() else None) if directory else (
            "a symbolic link" if os.path.islink(entry) else "a directory" if entry.is_dir()
            else "not writable" if entry.exists() and not os.access(entry, os.W_OK) else None)
        if kind:
            raise WorkdirError(f"{entry}: is {kind}, where the run keeps its {what}; move it "
                               "aside (or fix its permissions), or use another --workdir")


def enclosing_run(workdir: str) -> str | None:
    """The nearest directory above `workdir` that holds a run (config.json and checkpoints/), or
    None; relative if `workdir` is: a user who passed a part of a run is pointed at the run."""
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
    and TensorBoard on that run would show this one in it) or above one, saved or not (its test/
    may be that run; a sweep nested in a finished run): a run's directory holds that run only."""
    root, run = path(workdir), enclosing_run(workdir)
    if run is None and not (root / checkpoints.CONFIG_FILE).exists():  # Not a run itself.
        run = next((str(c.parent) for pattern in ("*/", "*/*/")
                    for c in sorted(root.glob(pattern + checkpoints.CONFIG_FILE))), None)
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
    """workdir/config.json, held to the config's checks (config_checks) as a config file is;
    WorkdirError naming the file, the field and the fix when it cannot be used. A field the file
    lacks (a run from before the field) gets the default, which keeps the earlier behaviour."""
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
    fix = f"fix {source.name} or train a new workdir"
    config = ml_collections.ConfigDict({**configs.load().to_dict(), **fields})
    try:
        config_checks.validate(config)
    except config_checks.UnknownFieldError as e:
        hint = (f'did you mean "{e.close}"?' if e.close
                else "written by another version of mnist_flax?")
        raise WorkdirError(f"{source}: sets {e.field!r}, which is not a field of the config "
                           f"({hint}); {fix}") from None
    except config_checks.FieldError as e:
        value = json.dumps(fields[e.field]) if e.field in fields else repr(e.value)
        value = value if len(value) <= 60 else f"{value[:60]}..."
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


