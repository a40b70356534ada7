"""A run writes only what is its own, and probes every place it writes before the first step
(issue 29): driven as users run it, `python -m mnist_flax.main` on a tiny model.

Each test is one mechanism, parametrised over the cases that broke it: what is not the run's is
byte-identical afterwards, or moved aside out of TensorBoard's sight and named in a warning; a
place the run cannot write is one line before anything trains.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys

import pytest
from conftest import REPO, one_line, snapshot, tiny_main_flags, unshare_works, write_idx_dir

from mnist_flax.tbx import tensorboardx


def run_main(workdir, data_dir, *extra: str, prefix: tuple[str, ...] = ()):
    """`python -m mnist_flax.main` on the CPU (after `prefix`, e.g. an `unshare` that mounts)."""
    return subprocess.run([*prefix, sys.executable, "-m", "mnist_flax.main",
                           *tiny_main_flags(data_dir, workdir, *extra)],
                          capture_output=True, text=True, timeout=600, cwd=REPO,
                          env={**os.environ, "MNIST_DATA_DIR": "", "JAX_PLATFORMS": "cpu"})


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[pathlib.Path, pathlib.Path]:
    """The data, and a run that trained its one epoch (2 steps) and saved."""
    base = tmp_path_factory.mktemp("own_files")
    data = write_idx_dir(base / "data", n_train=64, n_test=32)
    result = run_main(base / "finished", data)
    assert result.returncode == 0, result.stderr[-3000:]
    return data, base / "finished"


def files(directory: pathlib.Path) -> dict[pathlib.Path, bytes]:
    return {directory / name: (directory / name).read_bytes() for name in snapshot(directory)}


def foreign_events(tmp: pathlib.Path, finished: pathlib.Path):
    """Another tool's TensorBoard events (100 scalars) where a fresh run starts."""
    writer = tensorboardx().SummaryWriter(logdir=str(tmp / "run"))
    for step in range(100):
        writer.add_scalar("loss", 1.0 / (step + 1), step)
    writer.close()
    return tmp / "run", (), files(tmp / "run"), None


def damaged_own_events(tmp: pathlib.Path, finished: pathlib.Path):
    """The run's own event file with 4 bytes damaged, then a resume for one more epoch."""
    shutil.copytree(finished, tmp / "run")
    (events,) = (tmp / "run").glob("events.out.tfevents.*")
    data = bytearray(events.read_bytes())
    data[len(data) // 2:len(data) // 2 + 4] = b"\xde\xad\xbe\xef"
    events.write_bytes(bytes(data))
    return tmp / "run", ("--config.num_epochs=2",), {events: bytes(data)}, None


def parent_of_a_run(tmp: pathlib.Path, finished: pathlib.Path):
    """A run named `test` stopped before its first checkpoint, and a run started in its parent
    (whose test events would go into it)."""
    shutil.copytree(finished, tmp / "parent" / "test", ignore=shutil.ignore_patterns("checkpoints"))
    return tmp / "parent", (), files(tmp / "parent"), f"is above the run {tmp / 'parent' / 'test'}"


def lock_symlink(tmp: pathlib.Path, finished: pathlib.Path):
    """W/.lock a link to a file outside the workdir."""
    shutil.copytree(finished, tmp / "run")
    (tmp / "outside.txt").write_text("keep me\n")
    (tmp / "run" / ".lock").unlink()
    (tmp / "run" / ".lock").symlink_to(tmp / "outside.txt")
    return (tmp / "run", ("--config.num_epochs=2",), files(tmp),
            f"{tmp}/run/.lock: is a symbolic link")


@pytest.mark.parametrize("case", [foreign_events, damaged_own_events, parent_of_a_run,
                                  lock_symlink], ids=lambda case: case.__name__)
def test_a_run_leaves_what_is_not_its_own_identical_or_moved_aside_and_named(
        tmp_path, finished, case):
    data, run = finished
    workdir, extra, kept, refusal = case(tmp_path, run)
    result = run_main(workdir, data, *extra)
    tail = result.stderr[-3000:]
    if refusal:  # Before anything is written.
        assert refusal in one_line(result), tail
        assert "Training step" not in result.stderr, tail
    else:
        assert result.returncode == 0, tail
    for path, before in kept.items():
        if path.exists() and path.read_bytes() == before:
            continue
        aside = [p for p in tmp_path.rglob("*") if p.is_file() and p.read_bytes() == before]
        assert aside, f"{path} changed or is gone\n{tail}"
        assert "tfevents" not in aside[0].name, aside  # Out of TensorBoard's sight.
        assert str(aside[0]) in result.stderr, tail  # Named in a warning.


def read_only(place: pathlib.Path) -> tuple[str, ...]:
    """A command prefix under which `place` cannot be written, even by root: a read-only bind
    mount in a mount namespace of its own; or, without one, its permissions (not as root)."""
    if unshare_works():
        return ("unshare", "-m", "--propagation", "private", "sh", "-c",
                f'mount --bind "{place}" "{place}" && mount -o remount,ro,bind "{place}" '
                '&& exec "$@"', "sh")
    if os.geteuid() == 0:
        pytest.skip("root writes through permissions, and `unshare -m` is not allowed here")
    place.chmod(0o500)
    return ()


@pytest.mark.parametrize("case", ["checkpoints", "train", "too long", "not UTF-8"])
def test_every_place_the_run_writes_is_probed_before_the_first_step(tmp_path, finished, case):
    """A resumed run whose checkpoints/ or train/ cannot be written, or a fresh one whose path is
    too long for the file system or not UTF-8, failed at the first save, after an epoch."""
    data, run = finished
    prefix, workdir = (), tmp_path / "run"
    if case in ("checkpoints", "train"):
        shutil.copytree(run, workdir)
        prefix, place = read_only(workdir / case), workdir / case
        expected = f"error: {place}: cannot write there ("
    elif case == "too long":  # Each name fits; the path fits, but not what the run writes in it.
        while len(os.fsencode(workdir)) < 4030 - 200:
            workdir /= "d" * 200
        workdir /= "d" * (4030 - len(os.fsencode(workdir)) - 1)
        expected = f"error: --workdir={workdir}: cannot write there (File name too long); use a "
    else:
        workdir = tmp_path / "run-\udcff"
        expected = f"error: --workdir={tmp_path}/run-\\xff: not UTF-8"
    before = snapshot(workdir) if workdir.exists() else {}
    result = run_main(workdir, data, "--config.num_epochs=2", prefix=prefix)
    assert one_line(result).startswith(expected), result.stderr[-3000:]
    assert "Training step" not in result.stderr, result.stderr[-3000:]  # Before compiling.
    assert (snapshot(workdir) if workdir.exists() else {}) == before


def test_the_probes_of_processes_sharing_a_workdir_do_not_race(tmp_path):
    """Each process probed a missing checkpoints/ by making and removing it: on a shared disk one
    process's rmdir ran under another's probe (7 of 600 starts of a 2-process pod failed)."""
    script = ("import sys\nfrom mnist_flax.run import workdir\n"
              "for _ in range(150):\n    workdir.prepare(sys.argv[1])\n")
    workdir = tmp_path / "shared"
    procs = [subprocess.Popen([sys.executable, "-c", script, str(workdir)], cwd=REPO,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
