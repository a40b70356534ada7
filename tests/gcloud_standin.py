"""A stand-in `gcloud` with just the commands the README's TPU block runs, for tests/test_tpu_vm.py:

    gcloud storage buckets create gs://NAME [--location=L]
    gcloud compute tpus tpu-vm create NAME --zone=Z --accelerator-type=T --version=V
    gcloud compute tpus tpu-vm scp [--recurse] SRC... NAME:DEST --zone=Z --worker=all|N
    gcloud compute tpus tpu-vm ssh NAME --zone=Z --worker=all|N --command=CMD
    gcloud compute tpus tpu-vm delete NAME --zone=Z [--quiet]

A bucket is created on the GCS emulator at $STORAGE_EMULATOR_HOST. A TPU VM is WORKERS local
hosts under $GCLOUD_STANDIN_DIR/tpus/NAME/worker-N, each with its own home and /tmp. `ssh` runs
CMD with `bash -c` on each host at once, each in a mount namespace of its own (`unshare -m`, as
tests/test_pod.py runs hosts) where its home and tmp are mounted on $GCLOUD_STANDIN_DIR/home and
$GCLOUD_STANDIN_DIR/tmp (HOME, TMPDIR): the same paths on every host, different files, as on a pod.
Each host's environment is this process's, with HOME and TMPDIR and what the TPU metadata gives
JAX: JAX_COORDINATOR_ADDRESS (host 0, a free port per ssh), JAX_NUM_PROCESSES, JAX_PROCESS_ID.
When CMD ends, or this process gets SIGTERM or SIGINT (the connection dropped), whatever is left
in its session gets SIGHUP, as sshd's session ending sends it. `scp` copies into each host's
home. Every call is appended to $GCLOUD_STANDIN_DIR/calls.jsonl.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import urllib.request

WORKERS = 2  # A v4-16: 8 chips, 2 hosts of 4.
STATE = pathlib.Path(os.environ["GCLOUD_STANDIN_DIR"])
HOME, TMP = STATE / "home", STATE / "tmp"  # Where each host sees its own home and tmp.


def fail(message: str) -> None:
    print(f"ERROR: (gcloud) {message}", file=sys.stderr)
    sys.exit(1)


def parse(args: list[str]) -> tuple[list[str], dict[str, str]]:
    """Positional arguments, and --flag=value / --flag (value '') options."""
    positional, options = [], {}
    for arg in args:
        if arg.startswith("--"):
            name, _, value = arg[2:].partition("=")
            options[name] = value
        else:
            positional.append(arg)
    return positional, options


def tpu_dir(name: str) -> pathlib.Path:
    path = STATE / "tpus" / name
    if not path.is_dir() or (path / "deleted").exists():
        fail(f"NOT_FOUND: TPU node {name} was not found")
    return path


def workers(tpu: pathlib.Path, worker: str) -> list[int]:
    if worker == "all":
        return list(range(WORKERS))
    if not worker.isdigit() or int(worker) >= WORKERS:
        fail(f"--worker={worker}: all, or 0 to {WORKERS - 1}")
    return [int(worker)]


def create_bucket(url: str) -> None:
    name = url.removeprefix("gs://").rstrip("/")
    request = urllib.request.Request(
        f"{os.environ['STORAGE_EMULATOR_HOST']}/storage/v1/b?project=standin",
        data=json.dumps({"name": name}).encode(), headers={"Content-Type": "application/json"})
    urllib.request.urlopen(request, timeout=30).close()
    print(f"Creating gs://{name}/...")


def create(name: str) -> None:
    tpu = STATE / "tpus" / name
    if tpu.is_dir() and not (tpu / "deleted").exists():
        fail(f"ALREADY_EXISTS: TPU node {name} already exists")
    for i in range(WORKERS):
        for sub in ("home", "tmp"):
            (tpu / f"worker-{i}" / sub).mkdir(parents=True, exist_ok=True)
    (tpu / "deleted").unlink(missing_ok=True)


def scp(sources: list[str], target: str, worker: str, recurse: bool) -> None:
    name, sep, dest = target.partition(":")
    if not sep:
        fail(f"{target}: the destination must be NAME:PATH")
    tpu = tpu_dir(name)
    for i in workers(tpu, worker):
        home = tpu / f"worker-{i}" / "home"
        to = home / dest
        if len(sources) > 1 and not to.is_dir():
            fail(f"scp: {dest}: not a directory")
        for source in sources:
            src = pathlib.Path(source)
            there = to / src.name if to.is_dir() else to
            if src.is_dir():
                if not recurse:
                    fail(f"scp: {source}: not a regular file (use --recurse)")
                shutil.copytree(src, there, dirs_exist_ok=True, symlinks=True)
            else:
                shutil.copy2(src, there)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ssh(name: str, worker: str, command: str) -> int:
    tpu = tpu_dir(name)
    HOME.mkdir(exist_ok=True)
    TMP.mkdir(exist_ok=True)
    coordinator = f"127.0.0.1:{free_port()}"
    mount = ('mount --bind "$1" "$HOME" && mount --bind "$2" "$TMPDIR" && cd "$HOME" && '
             'exec bash -c "$3"')
    # sshd starts a session with SIGHUP at its default, whatever the client's: a stand-in started
    # under nohup would otherwise hand its hosts an ignored SIGHUP, and a hang-up kill nothing.
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
    hosts = []
    for i in workers(tpu, worker):
        env = {**os.environ, "HOME": str(HOME), "TMPDIR": str(TMP),
               "JAX_COORDINATOR_ADDRESS": coordinator, "JAX_NUM_PROCESSES": str(WORKERS),
               "JAX_PROCESS_ID": str(i)}
        hosts.append(subprocess.Popen(
            ["unshare", "-m", "--propagation", "private", "sh", "-c", mount, "sh",
             str(tpu / f"worker-{i}" / "home"), str(tpu / f"worker-{i}" / "tmp"), command],
            env=env, start_new_session=True))

    def hang_up(*_) -> None:
        for host in hosts:
            try:
                os.killpg(host.pid, signal.SIGHUP)
            except ProcessLookupError:
                pass

    def dropped(*_) -> None:
        hang_up()
        sys.exit(255)  # ssh's status for a lost connection.

    signal.signal(signal.SIGTERM, dropped)
    signal.signal(signal.SIGINT, dropped)
    codes = [host.wait() for host in hosts]
    hang_up()
    return next((code for code in codes if code), 0)


def main(argv: list[str]) -> int:
    STATE.mkdir(parents=True, exist_ok=True)
    with open(STATE / "calls.jsonl", "a") as calls:
        calls.write(json.dumps(argv) + "\n")
    positional, options = parse(argv)
    if positional[:3] == ["storage", "buckets", "create"] and len(positional) == 4:
        create_bucket(positional[3])
        return 0
    if positional[:3] != ["compute", "tpus", "tpu-vm"] or len(positional) < 5:
        fail(f"the stand-in does not implement: gcloud {' '.join(argv)}")
    verb, rest = positional[3], positional[4:]
    if verb == "create" and len(rest) == 1:
        create(rest[0])
    elif verb == "delete" and len(rest) == 1:
        (tpu_dir(rest[0]) / "deleted").touch()
    elif verb == "scp" and len(rest) >= 2:
        scp(rest[:-1], rest[-1], options.get("worker", "0"), "recurse" in options)
    elif verb == "ssh" and len(rest) == 1 and "command" in options:
        return ssh(rest[0], options.get("worker", "0"), options["command"])
    else:
        fail(f"the stand-in does not implement: gcloud {' '.join(argv)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
