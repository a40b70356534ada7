"""Every command README.md, docs/*.md and experiments/README.md give runs here, in a small form, so
none can break unseen (benchmarks/predict_agreement.py once crashed on predict's JSON Lines, and
nothing ran it). The commands are read from the documents: fenced ```bash/sh blocks (continuations
joined, comments dropped; `export` holds to the end of its block) and inline `python ...` spans that
are whole commands (not shapes such as `--workdir=...`, `<name>`, `PORT`).

Each runs as printed, in document order, in a scratch copy of the scripts (one per document, never
the repository; ../shared/mnist holds small synthetic IDX files), with its program's rule in SMALL
appended (absl and argparse keep a flag's last value). Where a program builds the default config
without flags (a `python -c` snippet, a benchmark's workers), `configs.load()` returns the small
form in that process (a sitecustomize). A program that runs elsewhere is checked by its --help,
which must name each flag the document gives. A command whose small form already ran (the same
command in two documents) runs once, and of a benchmark's --peers (each its own worker) only those
no small form with the same other flags and environment ran. Commands that cannot run here are
skipped by a rule in SKIP naming the test that covers them. A command that matches no rule fails:
a newly documented command needs a small form or a named skip.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import os
import pathlib
import re
import shlex
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO, TINY_FLAGS, TINY_MODEL, write_idx_dir
from PIL import Image

from mnist_flax import configs

pytestmark = pytest.mark.slow
DOCS = ["README.md", *sorted(f"docs/{p.name}" for p in (REPO / "docs").glob("*.md")),
        "experiments/README.md"]
SMALL_DEFAULT = {**TINY_MODEL, "num_epochs": 1, "data_source": "sample"}
SUBSTITUTE = [("/path/to/mnist-idx", "../shared/mnist"),  # The full MNIST: the synthetic IDX
              ("/path/to/mnist", "../shared/mnist"),      # files in the workspace's ../shared.
              ("=RUN ", "=runs/default "),                # A trained run: the README's first.
              ("/tmp/", "tmp/")]                          # Scratch paths: inside the workspace.
SKIP = [  # (pattern, why the command cannot run here and what runs it instead)
    (r"\bpip install\b", "installs packages: the tests run in that install (.ci/run makes it "
                         "fresh; tests/test_packaging.py checks the extras)"),
    (r"\b(pytest|ruff)\b", "the tests and the linter themselves: CI (.ci/run) runs them"),
    (r"\bgcloud\b|gs://", "needs Google Cloud: tests/test_tpu_vm.py runs the TPU block with a "
                          "stand-in gcloud, tests/test_gcs_workdir.py the gs:// lines on the "
                          "emulator"),
    (r"^tensorboard\b", "a server until stopped: tests/test_summaries.py serves a run over HTTP"),
    (r"^jupyter\b", "an interactive server: .ci/run executes the notebook after the README's "
                     "install in a fresh venv, tests/test_tutorial.py in the test one"),
    (r"tests/gcs_emulator\.py", "a server until Ctrl-C: tests/test_gcs_emulator.py runs it"),
]
TEMPLATE = re.compile(r"\.\.\.|<\w+>|\b[A-Z][A-Z0-9_]*\b(?!=)")
PEER_PACKAGES = {"pytorch": "torch", "keras_jax": "keras"}


@dataclasses.dataclass(frozen=True)
class Small:
    add: tuple[str, ...]  # Appended to the command's arguments.
    why: str  # Why the small form still runs what the command runs (or where it runs).
    small_default: bool = False  # configs.load() returns the small form.
    code: int = 0  # The exit status it must end with.


HELP = ("--help",)  # It runs elsewhere: its help must name every flag the document gives.
SMALL = {
    "mnist_flax.main": Small(TINY_FLAGS + ("--config.num_epochs=1",), "its flags and workdir; "
                             "one epoch of a tiny model, on the sample where no data is named; "
                             "a warmup longer than the epoch (best.py's 2) takes half of it"),
    "mnist_flax.sweep": Small(TINY_FLAGS + ("--config.num_epochs=1",), "as main, each --sweep's "
                              "first value (tests/test_sweep.py sweeps several)"),
    "mnist_flax.predict": Small((), "as printed; the images it names are made as digit images"),
    "-c": Small((), "a snippet takes no flags: configs.load() is the small form", True),
    "experiments/plot.py": Small((), "as printed, on the workspace's results/"),
    "docs/screenshots.py": Small(HELP, "needs Chromium and a TensorBoard server, and retakes "
                                 "docs/'s images"),
    "benchmarks/predict_agreement.py": Small(("--num=4",), "4 digits go the way 200 go"),
    "benchmarks/photo_pages.py": Small(("--digits=2", "--epochs=1"), "2 digits on every kind of "
                                       "page, after 1 epoch of a tiny model", True),
    "benchmarks/train_throughput.py": Small(
        ("--repeats=1", "--steps=2", "--warmup=1", "--no-epoch", "--e2e_epochs=1"),
        "each installed peer (the others are dropped) for 2 steps, mnist_flax with a tiny model; "
        "not the whole-epoch timing (468 steps, which no flag shrinks)", True),
    "benchmarks/dispatch_rounding.py": Small(("--steps=2", "--widths=1"), "a scan of 2 steps "
                                            "against 2 single steps, the smallest width (every "
                                            "width runs the same code: 12 s, not 76 s idle)"),
    "benchmarks/accelerator.py": Small(HELP, "tests/test_benchmarks.py runs it small (absl's "
                                       "--help exits 1)", code=1),
    "benchmarks/loop_overhead.py": Small(HELP, "tests/test_benchmarks.py runs it small"),
    "benchmarks/profile_step.py": Small(("--rounds=1",), "every piece timed once"),
    "benchmarks/speed_leads.py": Small(HELP, "times forms the package does not use, a minute "
                                       "even at --rounds=1; tests/test_benchmarks.py checks its "
                                       "Winograd convolution against the direct one"),
    "benchmarks/gcs_workdir.py": Small(("--saves=1", "--epochs=1"), "one save each way and one "
                                       "epoch of main, local and on the emulator"),
    "benchmarks/pod_stop_agreement.py": Small(("--rounds=1", "--epochs=1"), "each agreement for "
                                              "one epoch of the 2-process pod"),
    "benchmarks/compile_time.py": Small(("--repeats=1",), "each compile once"),
    "benchmarks/import_time.py": Small(("--repeats=1",), "once; the --compare directory (a "
                                       "checkout or a pip --target) is empty"),
}


def documented(doc: str) -> list[tuple[int, str, int]]:
    """(line, command, its fenced block's first line or 0) for each command `doc` gives, once."""
    text, found = (REPO / doc).read_text(), {}
    for block in re.finditer(r"^```(bash|sh|shell)?\n(.*?)^```", text, re.S | re.M):
        first = start = text.count("\n", 0, block.start(2)) + 1
        logical = ""
        for number, line in enumerate(block.group(2).split("\n"), first):
            start, logical = (start if logical else number), logical + line.rstrip("\\")
            if not line.endswith("\\"):
                command = " ".join(re.sub(r"(^|\s)#.*", "", logical).split())
                if command:
                    found.setdefault(command, (start, first))
                logical = ""
    prose = re.sub(r"^```.*?^```", lambda m: "\n" * m.group().count("\n"), text, flags=re.S | re.M)
    for span in re.finditer(r"(?<!`)`([^`]+)`(?!`)", prose):
        command = " ".join(span.group(1).split())
        if (re.match(r"(\w+=\S+ )*(until )?python ", command)
                and not TEMPLATE.search(substitute(command))
                and not re.fullmatch(r"python -m [\w.]+", command)):  # A program named in prose.
            found.setdefault(command, (prose.count("\n", 0, span.start()) + 1, 0))
    return sorted((line, command, block) for command, (line, block) in found.items())


def substitute(command: str) -> str:
    command = re.sub(r"\s\[[^\]]*\]", "", command + " ")  # A synopsis' optional parts.
    for old, new in SUBSTITUTE:
        command = command.replace(old, new)
    return command.strip()


def simple_commands(command: str) -> list[list[str]]:
    """The words of each simple command of a line, and the operators (; && || |) between."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    words = list(lexer)
    return [list(group) for _, group in itertools.groupby(words, lambda w: set(w) <= set(";&|"))]


def small_form(doc: str, command: str, env: dict, cwd: pathlib.Path) -> tuple[str, Small]:
    """The line to run, and the rule of its (last) program."""
    parts, rule = [], Small((), "")
    for words in simple_commands(substitute(command)):
        lead = list(itertools.takewhile(lambda w: w in ("until", "while", "do", "done")
                                        or re.match(r"[A-Z_]+=|[;&|]+$", w), words))
        words = words[len(lead):]
        lead = [w for w in lead if not (w.startswith("LD_PRELOAD=")  # An allocator not here.
                                        and not os.path.exists(w.split("=", 1)[1]))]
        if words[:1] not in ([], ["sleep"]):
            program = (words[2] if words[1] == "-m" else words[1]) if words[0] == "python" else None
            rule = SMALL.get(program)
            assert rule, (f"{doc}: `{command}` has no small form: give {program or words[0]} a "
                          "rule in SMALL (flags that make it small, and why it stays faithful) "
                          "or in SKIP (why it cannot run here, and which test runs it instead)")
            local = {**env, **dict(w.split("=", 1) for w in lead if "=" in w)}
            words = last_wins(prepare(program, words, local, cwd) + list(rule.add))
        parts += [w if re.fullmatch(r"[;&|]+", w) else shlex.quote(w) for w in lead + words]
    return " ".join(parts), rule


def last_wins(args: list[str]) -> list[str]:
    """`args` without the flags a later one overrides (absl and argparse; --sweep adds up), so
    that two commands whose small forms run alike are seen to be one."""
    flags = [arg.split("=", 1)[0] if arg.startswith("--") else None for arg in args]
    return [arg for i, (arg, flag) in enumerate(zip(args, flags, strict=True))
            if flag in (None, "--sweep") or flag not in flags[i + 1:]]


def prepare(program: str, words: list[str], env: dict, cwd: pathlib.Path) -> list[str]:
    """The part of a program's small form that depends on the command's own words."""
    if program in ("mnist_flax.main", "mnist_flax.sweep"):
        words = words + ([] if env.get("MNIST_DATA_DIR") else ["--config.data_source=sample"])
        config = next((w.split("=", 1)[1] for w in words if w.startswith("--config=")), None)
        if config and configs.load(str(cwd / config)).warmup_epochs >= 1:
            words.append("--config.warmup_epochs=0.5")
        words = [re.sub(r"^(--sweep=[^=]+=[^,]+),.*", r"\1", w) for w in words]
    if program == "benchmarks/train_throughput.py":
        peers = next((w.split("=", 1)[1] for w in words if w.startswith("--peers=")),
                     "mnist_flax,mnist_flax_bf16,pytorch,keras_jax").split(",")
        words = words + ["--peers=" + ",".join(
            p for p in peers if importlib.util.find_spec(PEER_PACKAGES.get(p, "mnist_flax")))]
    for word in words:
        if program == "mnist_flax.predict" and re.search(r"\.(png|jpe?g)$", word):
            digit = np.full((84, 84), 255, np.uint8)
            digit[15:70, 36:48] = 0  # A 1, black ink on white paper.
            Image.fromarray(digit).save(cwd / word)
        if word.startswith("--compare="):
            (cwd / word.split("=", 1)[1]).mkdir(parents=True, exist_ok=True)
    return words


SITECUSTOMIZE = f"""
from mnist_flax import configs
_load = configs.load
def load(*args, **kwargs):
    config = _load(*args, **kwargs)
    config.update({SMALL_DEFAULT!r})
    return config
configs.load = load
"""


@pytest.fixture(scope="module")
def workspaces(tmp_path_factory):
    """Per document: a root with shared/mnist (synthetic IDX), work/ (the scripts, copied: they
    find their repository by their own path) and site/ (the sitecustomize)."""
    made, state = {}, {"ran": {}, "exports": {}, "peers": {}}

    def get(doc: str) -> pathlib.Path:
        if doc not in made:
            made[doc] = root = tmp_path_factory.mktemp(doc.replace("/", "_"))
            write_idx_dir(root / "shared" / "mnist", n_train=1024, n_test=128)  # 8 steps.
            ignore = shutil.ignore_patterns("__pycache__")
            for name in ("benchmarks", "experiments"):
                shutil.copytree(REPO / name, root / "work" / name, ignore=ignore)
            shutil.copytree(REPO / "docs", root / "work" / "docs", ignore=ignore)
            shutil.copytree(REPO / "tests", root / "work" / "tests", ignore=shutil.ignore_patterns(
                "__pycache__", "test_*", "conftest.py", "core"))  # What benchmarks import.
            (root / "site").mkdir()
            (root / "site" / "sitecustomize.py").write_text(SITECUSTOMIZE)
        return made[doc]
    return get, state


@pytest.mark.parametrize("doc,command,block", [
    pytest.param(doc, command, block, id=f"{doc}:{line} {command}")
    for doc in DOCS for line, command, block in documented(doc)])
def test_documented_command_runs_in_a_small_form(doc, command, block, workspaces):
    get, state = workspaces
    root = get(doc)
    for pattern, why in SKIP:
        if re.search(pattern, command):
            pytest.skip(why)
    env = {"MNIST_DATA_DIR": "", **state["exports"].get((doc, block), {})}
    exported = re.fullmatch(r"export (\w+)=(\S+)", substitute(command))
    if exported:  # For the rest of its block.
        state["exports"].setdefault((doc, block), {})[exported[1]] = exported[2]
        return
    line, rule = small_form(doc, command, env, root / "work")
    key = (line, rule.small_default, tuple(sorted(env.items())))
    if key in state["ran"]:
        pytest.skip(f"its small form ran for {state['ran'][key]}: `{line}`")
    state["ran"][key] = f"{doc}'s `{command}`"
    if peers := re.search(r"--peers=(\S+)", line):  # A benchmark's peers each run alone.
        others = (line.replace(peers[0], ""), *key[1:])
        ran = state["peers"].setdefault(others, set())
        new = [p for p in peers[1].split(",") if p not in ran]
        if not new:
            pytest.skip(f"each of its peers ran in a small form with the same flags: `{line}`")
        ran.update(new)
        line = line.replace(peers[0], f"--peers={','.join(new)}")
    env = {**os.environ, **env,
           "PATH": os.pathsep.join([os.path.dirname(sys.executable), os.environ["PATH"]])}
    if rule.small_default:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root / "site"),
                                                          os.environ.get("PYTHONPATH")]))
    process = subprocess.Popen(["bash", "-c", line], cwd=root / "work", env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
    tail = "\n".join(stderr.strip().splitlines()[-15:])
    assert process.returncode == rule.code and "Traceback" not in stderr, (
        f"{doc}: `{command}`\nran as `{line}` in {root / 'work'} (small form: {rule.why}): exit "
        f"{process.returncode}, not {rule.code}; the last lines of its stderr:\n{tail}")
    if rule.add == HELP:
        for flag in re.findall(r"\s--(?:no-?)?([\w-]+)", substitute(command)):
            assert flag in stdout, f"{doc}: `{command}`: --{flag} is not in its --help:\n{stdout}"
