"""The mechanisms that keep bad input and faults to one line (issue categories 1-7, 11):
the config schema, the error boundary of each entry point, the workdir's layout check, the lock
on the workdir directory, readers that do not cry wolf, and misdiagnoses fixed at their cause.
docs/reliability.md lists which test pins which category."""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator

import pytest
from conftest import REPO, one_line, run_module, snapshot, tiny_main_flags, train_as_main

from mnist_flax import checkpoints, configs
from mnist_flax.run import boundary, integrity, startup
from mnist_flax.run import lock as lock_lib
from mnist_flax.run import workdir as workdir_lib


def main(*args: str, env: dict | None = None, timeout: int = 300):
    return run_module("main", *args, env={"JAX_PLATFORMS": "cpu", **(env or {})},
                      timeout=timeout)


# ---------------------------------------------------------------------------------------------
# 1, 2. Config files that misbehave, and values of the right field but the wrong shape.

CONFIG_FILES = {
    "get_config raises": ("def get_config():\n    return undefined_name\n", "undefined_name"),
    "raises at import": ("raise RuntimeError('broken at import')\n", "broken at import"),
    "returns None": ("def get_config():\n    return None\n", "returned NoneType"),
    "returns a dict": ("def get_config():\n    return {'learning_rate': 1.0}\n",
                       "returned dict"),
    "misses fields": ("import ml_collections\n"
                      "def get_config():\n"
                      "    c = ml_collections.ConfigDict()\n    c.learning_rate = 0.1\n"
                      "    return c\n", "has no field"),
    "a typo'd field": ("from mnist_flax.configs import default\n"
                       "def get_config():\n    c = default.get_config()\n"
                       "    c.learning_rat = 0.1\n    return c\n",
                       "sets 'learning_rat', which is not a field of the config; did you mean "
                       '"learning_rate"?'),
    # A new field belongs in default.py (config files only override), not in the user's file:
    # the nearest field alone ("did you mean dense_features?") left them nowhere to go.
    "a new field": ("from mnist_flax.configs import default\n"
                    "def get_config():\n    c = default.get_config()\n"
                    "    c.dense_layers = 2\n    return c\n",
                    "sets 'dense_layers', which is not a field of the config; did you mean "
                    f'"dense_features"? To add it, declare it with its default in {configs.DEFAULT}'
                    " (config files only override fields) and read it where it is used, e.g. "
                    "models.create_model"),
    "a value of the wrong type": ("from mnist_flax.configs import default\n"
                                  "def get_config():\n    c = default.get_config()\n"
                                  "    c.batch_size = '128'\n    return c\n",
                                  "Could not override field 'batch_size'"),
}


@pytest.mark.parametrize("case", CONFIG_FILES)
def test_a_misbehaving_config_file_is_one_line(tmp_path, case):
    text, expected = CONFIG_FILES[case]
    path = tmp_path / "config.py"
    path.write_text(text)
    result = main(f"--workdir={tmp_path / 'run'}", f"--config={path}")
    assert expected in one_line(result)
    assert not (tmp_path / "run").exists()  # Nothing written.


@pytest.mark.parametrize("flag, expected", [
    ("--config.dropout_rates=(0.25,'a')", "--config.dropout_rates=(0.25, 'a'): must be a tuple "
     "of float like the default's (0.25, 0.5), not a tuple of float, str"),
    ("--config.seed=99999999999999999999", "--config.seed=99999999999999999999: must be an "
     "integer in [0, 2**63)"),
])
def test_a_value_of_the_wrong_shape_is_one_line_in_main_and_sweep(tmp_path, flag, expected):
    assert expected in one_line(main(f"--workdir={tmp_path / 'run'}", flag))
    sweep = run_module("sweep", f"--workdir={tmp_path / 'sweep'}", "--sweep=learning_rate=1e-3",
                       flag)
    assert expected in one_line(sweep)


def test_a_flag_and_its_value_quoted_into_one_argument_is_one_line(tmp_path):
    """It blamed the config file: ml_collections read a --config.x override named 'x 3'."""
    last = one_line(main(f"--workdir={tmp_path / 'run'}", "--config.num_epochs 3"))
    assert last == ("error: '--config.num_epochs 3' is one argument with a space in it, a flag "
                    "and its value quoted together; write --config.num_epochs=3")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("arg, expected", [
    ("--sweep learning_rate=1,2", "a flag and its value quoted together; write "
     "--sweep=learning_rate=1,2"),
    ("--workdir\t/tmp/a b", "a flag and its value quoted together; write --workdir=/tmp/a b"),
    ("--config.num_epochs=3 --config.batch_size=4", "one argument holding several flags"),
    ("--config.data_dir=/my data", None),  # A space in a value is a value's.
    ("my digit.png", None),
    (" --workdir x", None),  # Not a flag to absl either: an argument.
])
def test_quoted_flags_are_named_and_values_with_spaces_are_not(arg, expected):
    error = startup.quoted_flags_error(["prog", arg])
    assert error == expected if expected is None else expected in error
    assert startup.quoted_flags_error(["prog", "--", arg]) is None  # After --: arguments.


# ---------------------------------------------------------------------------------------------
# 3. The workdir's own files in the way.

@pytest.mark.parametrize("name, make", [
    (".lock", "dir"), ("config.json", "dir"), ("train", "file"), ("checkpoints", "file")])
def test_the_workdirs_own_entries_in_the_way_are_one_line_and_nothing_is_written(
        tmp_path, idx_dir, name, make):
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / name).mkdir() if make == "dir" else (workdir / name).write_text("x")
    before = snapshot(workdir)
    last = one_line(main(*tiny_main_flags(idx_dir, workdir)))
    assert f"{workdir / name}: is a {'directory' if make == 'dir' else 'file'}" in last
    assert "move it aside" in last
    assert snapshot(workdir) == before  # No config.json.tmp.PID, no event file.


@pytest.mark.parametrize("part", ["checkpoints", "checkpoints/31", "train", "test/deeper"])
def test_a_workdir_inside_another_runs_own_directories_is_refused_and_nothing_made(tmp_path,
                                                                                  part):
    """orbax prunes and cleans RUN/checkpoints (a run inside would go with it), and RUN/train and
    RUN/test are RUN's TensorBoard runs. Beside RUN, a directory of its own is fine."""
    run = tmp_path / "run"
    (run / "checkpoints" / "31").mkdir(parents=True)
    (run / "train").mkdir(), (run / "test").mkdir()
    (run / "config.json").write_text("{}")
    before = snapshot(run)
    with pytest.raises(workdir_lib.WorkdirError) as refused:
        workdir_lib.prepare(str(run / part))
    assert str(refused.value) == (f"--workdir={run / part} is inside the run {run} (its "
                                  f"{part.split('/')[0]}/); a run there would mix with that one: "
                                  "use another --workdir")
    assert snapshot(run) == before
    workdir_lib.prepare(str(tmp_path / "beside"))


@pytest.mark.parametrize("nested", ["seed=0", "lr=1/seed=0"])
def test_a_workdir_inside_or_above_another_run_is_refused_and_nothing_made(tmp_path, nested):
    """A sweep in a finished run's workdir nested its seed=0/ inside it, and TensorBoard on
    either mixed the two: a run's directory holds that run only, whichever side comes second."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.json").write_text("{}")
    with pytest.raises(workdir_lib.WorkdirError) as refused:
        workdir_lib.prepare(str(run / nested))
    assert str(refused.value) == (f"--workdir={run / nested} is inside the run {run}; a run "
                                  "there would mix with that one: use another --workdir")
    assert not (run / nested.split("/")[0]).exists()
    parent = tmp_path / "parent"
    (parent / nested).parent.mkdir(parents=True)
    run.rename(parent / nested)
    with pytest.raises(workdir_lib.WorkdirError) as refused:
        workdir_lib.prepare(str(parent))
    assert str(refused.value) == (f"--workdir={parent} is above the run {parent / nested}; a run "
                                  "there would mix with that one: use another --workdir")
    assert sorted(os.listdir(parent)) == [nested.split("/")[0]]
    workdir_lib.prepare(str(parent / nested))  # The run itself resumes.


@pytest.mark.parametrize("target", ["missing", "loop"])
def test_a_workdir_that_is_a_broken_symlink_is_named_as_one(tmp_path, target):
    """It said 'cannot write there (File exists)'."""
    link = tmp_path / "run"
    link.symlink_to(tmp_path / target)
    if target == "loop":
        (tmp_path / "loop").symlink_to(link)
    with pytest.raises(workdir_lib.WorkdirError) as refused:
        workdir_lib.prepare(str(link))
    assert str(refused.value) == (f"--workdir={link}: a symbolic link to {tmp_path / target}, "
                                  "which does not exist (or loops); point it at a directory, or "
                                  "remove it")


@pytest.mark.parametrize("content", ["[]", "{}", "null", '"text"'])
def test_a_config_json_that_is_not_an_object_is_one_line_for_predict(tmp_path, content):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "config.json").write_text(content)
    with pytest.raises(workdir_lib.WorkdirError, match="not a run's config"):
        workdir_lib.read_config(str(tmp_path))


# ---------------------------------------------------------------------------------------------
# 5. Readers racing a writer; a deleted .lock.

def test_a_deleted_lock_file_does_not_let_a_second_run_in(tmp_path):
    with lock_lib.lock(str(tmp_path)):
        (tmp_path / ".lock").unlink()  # "Stale", a user thinks.
        with pytest.raises(workdir_lib.WorkdirError, match="another run"):
            with lock_lib.lock(str(tmp_path)):
                pass
        assert lock_lib.holder(str(tmp_path)) is not None
    assert lock_lib.holder(str(tmp_path)) is None


@contextlib.contextmanager
def _locked_by_another_process(workdir) -> Iterator[subprocess.Popen]:
    """Another process holding `workdir`'s lock, as a live run does, while the block runs."""
    script = "import sys, time\nfrom mnist_flax.run import lock\nwith lock.lock(sys.argv[1]):\n" \
             "    print('locked', flush=True)\n    time.sleep(300)\n"
    holder = subprocess.Popen([sys.executable, "-c", script, str(workdir)], cwd=REPO,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        yield holder
    finally:
        holder.kill()
        holder.wait()


def test_a_reader_of_a_workdir_a_live_run_holds_is_told_to_retry_not_to_move_it(tmp_path, idx_dir):
    config = _tiny_config(idx_dir)
    train_as_main(config, tmp_path)
    for step_dir in (tmp_path / "checkpoints").glob("[0-9]*"):  # What a save in flight looks like
        for f in step_dir.rglob("*"):                           # to a reader: nothing reads.
            if f.is_file() and f.stat().st_size > 1000:
                f.write_bytes(b"")
    with _locked_by_another_process(tmp_path) as holder, pytest.raises(
            checkpoints.CheckpointError) as error:
        integrity.restore_params(str(tmp_path), _expected_params(config))
    assert f"a run (pid {holder.pid}) is writing it" in str(error.value)
    assert "move" not in str(error.value)
    with pytest.raises(checkpoints.CheckpointError, match="move that directory aside"):
        integrity.restore_params(str(tmp_path), _expected_params(config))  # Nothing writes now.


def test_predict_on_a_workdir_a_live_run_has_not_saved_in_yet_says_wait_not_train(tmp_path):
    """Told to train there first, the user would be refused: another run is using it."""
    from mnist_flax import predict

    with _locked_by_another_process(tmp_path) as holder, pytest.raises(
            predict.PredictError) as error:
        predict.load(str(tmp_path))
    assert str(error.value) == (
        f"{tmp_path}/checkpoints: no checkpoint yet; a run (pid {holder.pid}) is training there: "
        "try again once it has saved one (at the end of its first epoch, or every "
        "--config.checkpoint_every_steps)")


def test_words_that_are_not_flags_are_one_line_not_the_help(tmp_path):
    last = one_line(main(f"--workdir={tmp_path / 'run'}", "extra"))
    assert last == ("error: unexpected arguments: extra; every option is a flag (--name=value), "
                    "and --help lists them")
    assert not (tmp_path / "run").exists()


def _tiny_config(idx_dir):
    from conftest import tiny_config

    return tiny_config(data_dir=str(idx_dir), num_epochs=1, batch_size=32,
                       verify_checksums=False)


def _expected_params(config):
    import jax
    import numpy as np

    from mnist_flax import models

    model = models.create_model(config)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), np.zeros((1, 28, 28, 1)),
                                             train=False))["params"]


# ---------------------------------------------------------------------------------------------
# 6. Misdiagnoses, fixed at their cause.

def test_num_classes_below_the_labels_is_named_not_a_nan(tmp_path, idx_dir):
    last = one_line(main(*tiny_main_flags(idx_dir, tmp_path / "run", "--config.num_classes=5")))
    assert "--config.num_classes=5 but the data has label 9" in last and "nan" not in last


def test_a_closed_stdout_is_not_a_storage_error(tmp_path, idx_dir):
    command = [sys.executable, "-m", "mnist_flax.main", *tiny_main_flags(idx_dir, tmp_path / "r")]
    result = subprocess.run(f"{shlex.join(command)} | head -c 0", shell=True, cwd=REPO, text=True,
                            capture_output=True, timeout=300,
                            env={**os.environ, "JAX_PLATFORMS": "cpu", "MNIST_DATA_DIR": ""})
    assert "storage" not in result.stderr and "Traceback" not in result.stderr, (
        result.stderr[-3000:])
    assert checkpoints.latest_step(str(tmp_path / "r")) == 8  # The run itself finished.


def test_x64_mode_reads_an_intact_checkpoint_as_intact(tmp_path, idx_dir):
    train_as_main(_tiny_config(idx_dir), tmp_path)
    script = textwrap.dedent(f"""
        import jax
        jax.config.update("jax_enable_x64", True)
        from conftest import tiny_config
        from mnist_flax import checkpoints, train
        from mnist_flax.run import integrity
        config = tiny_config(data_dir={str(idx_dir)!r}, num_epochs=1, batch_size=32,
                             verify_checksums=False)
        state = train.create_train_state(config, jax.random.key(0), 8)
        position = checkpoints.data_position(0, 8, config, 256)
        restored, damaged = integrity.restore_intact({str(tmp_path)!r}, state, position)
        assert int(restored.step) == 8 and not damaged, damaged
        print("intact")
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO / "tests", text=True,
                            capture_output=True, timeout=300,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 0 and "intact" in result.stdout, result.stderr[-3000:]


# ---------------------------------------------------------------------------------------------
# 7. Environment and signals; an unknown error is still one line, its traceback in a file.

def test_a_backend_that_is_not_there_is_one_line(tmp_path):
    last = one_line(main(f"--workdir={tmp_path}", env={"JAX_PLATFORMS": "cuda"}))
    assert "JAX_PLATFORMS=cuda" in last and "unset JAX_PLATFORMS" in last


def test_multihost_off_a_pod_says_what_to_pass(tmp_path):
    last = one_line(main(f"--workdir={tmp_path}", "--multihost"))
    assert "--coordinator_address=HOST:PORT --num_processes=N --process_id=I" in last


def test_an_unknown_error_is_one_line_naming_its_traceback_file(tmp_path, capsys):
    with pytest.raises(SystemExit) as leave, pytest.MonkeyPatch.context() as patch:
        patch.setattr(startup, "leave_quietly",
                      lambda line, code, log=None: (print(line, file=sys.stderr), sys.exit(code)))
        with boundary.one_line_errors(str(tmp_path)):
            raise ZeroDivisionError("a bug of ours")
    assert leave.value.code == 1
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("error: ZeroDivisionError: a bug of ours (full traceback in ")
    path = line.split("full traceback in ")[1].split(")")[0]
    assert path.startswith(str(tmp_path / "errors")) and "Traceback" in open(path).read()


# Ctrl-C at a few moments of start-up and of predict, as a terminal sends it. Where the moment
# must be exact, the process sends SIGINT to itself from a sitecustomize.py (which Python runs
# before the entry module): when a module starts importing, or when JAX first traces a function.
_SITECUSTOMIZE = '''
import os, signal, sys

where = os.environ.get("INTERRUPT_AT", "")


def interrupt(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGINT)


class _Finder:
    def find_spec(self, name, path=None, target=None):
        if name == where.removeprefix("import:"):
            sys.meta_path.remove(self)
            interrupt()
        return None


if where.startswith("import:"):
    sys.meta_path.insert(0, _Finder())
elif where == "trace":
    from jax import monitoring

    monitoring.register_event_duration_secs_listener(
        lambda event, *a, **k: event == "/jax/core/compile/jaxpr_trace_duration" and interrupt())
'''


@contextlib.contextmanager
def _sigint_as_in_a_terminal() -> Iterator[None]:
    """While starting a child: a background job (pytest may be one) has SIGINT ignored, which a
    child inherits; a handled one is the default after exec, as in a terminal's foreground job.
    (Not preexec_fn: a fork of a process running JAX's threads.)"""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _interrupted(tmp_path, at: str, module: str, *args: str) -> subprocess.CompletedProcess:
    """`python -m mnist_flax.<module> ARGS`, sent Ctrl-C at the moment `at` (see above)."""
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(_SITECUSTOMIZE)
    path = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))
    with _sigint_as_in_a_terminal():
        return subprocess.run([sys.executable, "-m", f"mnist_flax.{module}", *args], cwd=REPO,
                              capture_output=True, text=True, timeout=300,
                              env={**os.environ, "JAX_PLATFORMS": "cpu", "MNIST_DATA_DIR": "",
                                   "PYTHONPATH": path, "INTERRUPT_AT": at})


def _only_line(result: subprocess.CompletedProcess, line: str) -> None:
    """Exit 130 and `line` as all of stderr: no traceback, no 'Exception ignored', no output."""
    assert result.returncode == 130 and result.stderr.strip() == line, (
        f"exit {result.returncode}\n{result.stderr[-3000:]}")
    assert result.stdout == ""


@pytest.mark.parametrize("module, at", [
    ("main", "import:jax"),  # The first of the entry module's slow imports: right after start.
    ("main", "import:orbax.checkpoint"),  # Seconds into them.
    ("sweep", "import:jax"),
])
def test_ctrl_c_while_an_entry_point_imports_is_one_line_and_130(tmp_path, idx_dir, module, at):
    args = [*tiny_main_flags(idx_dir, tmp_path / "run")]
    if module == "sweep":
        args.append("--sweep=seed=0")
    _only_line(_interrupted(tmp_path, at, module, *args), startup.INTERRUPTED_LINE)
    assert not (tmp_path / "run").exists()


def test_ctrl_c_after_the_first_log_line_is_one_line_and_130(tmp_path, idx_dir):
    """A Ctrl-C as a user presses it on seeing the run start: whether it lands in the data's
    loading, the compilation or a step, the run stops with one line and 130, and what it saved
    resumes."""
    command = [sys.executable, "-m", "mnist_flax.main", *tiny_main_flags(idx_dir, tmp_path / "r")]
    with _sigint_as_in_a_terminal():
        process = subprocess.Popen(command, cwd=REPO, stderr=subprocess.PIPE, text=True,
                                   stdout=subprocess.DEVNULL,
                                   env={**os.environ, "JAX_PLATFORMS": "cpu", "MNIST_DATA_DIR": ""})
    watchdog = threading.Timer(300, process.kill)  # A run that hangs fails, not the session.
    watchdog.start()
    try:
        lines = []
        for line in process.stderr:
            lines.append(line)
            if re.match(r"[IWE]\d{4} ", line):  # absl's first log line.
                process.send_signal(signal.SIGINT)
                break
        lines += process.stderr.readlines()
        process.wait(timeout=120)
    finally:
        watchdog.cancel()
        process.kill()
    stderr = "".join(lines)
    assert process.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr and "Exception ignored" not in stderr, stderr[-3000:]
    assert "Interrupted (Ctrl-C)" in stderr.strip().splitlines()[-1], stderr[-3000:]
    again = main(*tiny_main_flags(idx_dir, tmp_path / "r"))
    assert again.returncode == 0, again.stderr[-3000:]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished tiny run's workdir, and a digit image to predict."""
    from conftest import synthetic_digits, write_idx_dir
    from PIL import Image

    base = tmp_path_factory.mktemp("trained")
    train_as_main(_tiny_config(write_idx_dir(base / "data")), base / "run")
    image = base / "digit.png"
    Image.fromarray(synthetic_digits(1)[0][0, ..., 0]).save(image)
    return base / "run", image


@pytest.mark.parametrize("at", ["import:jax", "trace"])
def test_ctrl_c_during_predict_is_one_line_and_130(tmp_path, trained, at):
    """While predict imports, and while it builds the model and predicts (JAX's first trace)."""
    workdir, image = trained
    result = _interrupted(tmp_path, at, "predict", f"--workdir={workdir}", str(image))
    _only_line(result, startup.PREDICT_INTERRUPTED_LINE)


def _predict_into(trained, redirect: str) -> subprocess.CompletedProcess:
    """predict on the trained workdir's digit, its stdout sent where the shell's `redirect` says."""
    workdir, image = trained
    command = shlex.join([sys.executable, "-m", "mnist_flax.predict", f"--workdir={workdir}",
                          str(image)])
    return subprocess.run(f"{command} {redirect}", shell=True, cwd=REPO, text=True,
                          capture_output=True, timeout=300,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})


@pytest.mark.parametrize("redirect", ["| head -c 0", ">&-"])
def test_a_closed_stdout_in_predict_is_no_traceback(trained, redirect):
    """Piped into a reader that has left, or with stdout closed: no traceback, no error line."""
    result = _predict_into(trained, redirect)
    assert "Traceback" not in result.stderr and "Exception ignored" not in result.stderr, (
        result.stderr[-3000:])
    assert "error:" not in result.stderr, result.stderr[-3000:]


def test_predict_into_a_full_device_says_so_in_one_line(trained):
    """stdout on a full disk (`> /dev/full`): what happened and what to do, not an unknown error."""
    assert one_line(_predict_into(trained, "> /dev/full")) == (
        "error: writing the output: no space left on device (or over quota); free space and run "
        "the same command again")


@pytest.mark.parametrize("module", ["main", "sweep", "predict"])
def test_an_error_while_an_entry_point_imports_is_one_line_naming_the_variable(tmp_path, module):
    """JAX checks its JAX_* variables as it is imported, before the boundary exists: that was
    a traceback. The line names the variable whose value the error quotes."""
    result = run_module(module, f"--workdir={tmp_path / 'run'}", "x.png",
                        env={"JAX_DEFAULT_MATMUL_PRECISION": "bogus"})
    last = one_line(result)
    assert last.startswith('error: ValueError: Invalid value "bogus" for JAX flag '
                           "jax_default_matmul_precision (while starting; full traceback in "), last
    assert last.endswith("); fix or unset JAX_DEFAULT_MATMUL_PRECISION=bogus"), last
    assert not (tmp_path / "run").exists()
