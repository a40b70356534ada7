#!/bin/bash
# One host of a TPU VM: make it ready, then start (or resume) training there, detached from the
# ssh session. The README's `gcloud compute tpus tpu-vm ssh ... --worker=all --command=...` runs
# it on every host of the slice, from the copy of the repository in ~/mnist_flax.
#
#   bash tpu/run.sh gs://BUCKET/runs/NAME [MAIN_FLAGS...]   start, or resume from the bucket
#   bash tpu/run.sh --stop                                  SIGTERM: main saves a checkpoint and
#                                                           exits 143; waits for that
#
# Ready (idempotent: a second run changes nothing): a venv in .venv beside this folder with
# Python 3.12 from uv (the image's Python, 3.10 on tpu-ubuntu2204-base, is older than the >= 3.11
# that setup.cfg needs; uv downloads it, so the VM needs network), and `pip install -e .[tpu]`,
# done again only when setup.cfg or pyproject.toml changes (their checksum is stamped in the venv).
# The run: `python -m mnist_flax.main --multihost --workdir=... MAIN_FLAGS` under setsid and
# nohup, so a dropped ssh (SIGHUP) does not end it; its output, between a start line and an
# `exited with N` line, is appended to train.log beside this folder, its pid is in train.pid.
#
# Environment (the tests set these; leave them unset on a TPU VM):
#   MNIST_FLAX_PYTHON  a Python >= 3.11 to make the venv with, instead of uv's 3.12
#   MNIST_FLAX_EXTRA   the package extra to install (default: tpu)
#   MNIST_FLAX_FLAGS   more flags for main, after MAIN_FLAGS (split on spaces)
#   JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID: passed on as main's
#     --coordinator_address, --num_processes, --process_id; on a TPU VM JAX reads them from the
#     TPU metadata.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=$repo/.venv
log=$repo/train.log
pidfile=$repo/train.pid
usage="tpu/run.sh gs://BUCKET/runs/NAME [MAIN_FLAGS...], or tpu/run.sh --stop"

die() { echo "error: $*" >&2; exit 1; }
say() { echo "tpu/run.sh ($(hostname)): $*"; }

# The pid of this host's run if one is going (a pid file left by a lost run does not count).
running_pid() {
  local pid
  pid=$(cat "$pidfile" 2>/dev/null) || return 1
  [[ $pid =~ ^[0-9]+$ ]] && grep -qs mnist_flax.main "/proc/$pid/cmdline" && echo "$pid"
}

if [[ ${1:-} == --stop ]]; then
  pid=$(running_pid) || { say "no run is going on this host"; exit 0; }
  say "SIGTERM to pid $pid: it finishes its step, saves a checkpoint and exits 143"
  kill -TERM "$pid"
  while kill -0 "$pid" 2>/dev/null; do sleep 1; done
  # The wrapper below logs the exit status, then removes the pid file.
  for _ in $(seq 50); do [[ -e $pidfile ]] || break; sleep 0.1; done
  say "$(tail -n 1 "$log")"
  exit 0
fi

workdir=${1:-}
[[ -n $workdir ]] || die "the workdir is missing: $usage"
[[ $workdir == gs://?* ]] || die "the workdir must be a bucket, gs://BUCKET/runs/NAME (the hosts \
share no disk, and a VM's disk goes with the VM), not $workdir"
shift
if pid=$(running_pid); then
  die "a run is already going on this host (pid $pid, log $log); stop it first: tpu/run.sh --stop"
fi
rm -f "$pidfile"  # A lost run's.

# The venv: Python >= 3.11, made once.
if ! "$venv/bin/python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  rm -rf "$venv"
  if [[ -n ${MNIST_FLAX_PYTHON:-} ]]; then
    "$MNIST_FLAX_PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
      || die "MNIST_FLAX_PYTHON=$MNIST_FLAX_PYTHON is not a Python >= 3.11"
    say "making $venv with $MNIST_FLAX_PYTHON"
    "$MNIST_FLAX_PYTHON" -m venv "$venv"
  else
    uv=$(command -v uv || echo "$HOME/.local/bin/uv")
    if [[ ! -x $uv ]]; then
      say "installing uv (pip install --user uv)"
      python3 -m pip install --quiet --user uv || die "pip install --user uv failed (above)"
    fi
    say "making $venv with Python 3.12 (uv venv --python 3.12)"
    "$uv" venv --quiet --seed --python 3.12 "$venv"  # --seed: with pip, as python -m venv does.
  fi
fi

# The package, editable, with its extra; again only when its requirements change.
extra=${MNIST_FLAX_EXTRA:-tpu}
stamp="$extra $(cd "$repo" && cat setup.cfg pyproject.toml | sha256sum)"
if [[ $(cat "$venv/mnist_flax-installed" 2>/dev/null) != "$stamp" ]]; then
  say "installing the package (pip install -e '.[$extra]')"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -e "$repo[$extra]" \
    || die "pip install -e '$repo[$extra]' failed (above)"
  echo "$stamp" > "$venv/mnist_flax-installed"
fi

# The run, detached: setsid (a session of its own, out of ssh's) and nohup (SIGHUP ignored).
read -ra more <<< "${MNIST_FLAX_FLAGS:-}"
args=(--multihost "--workdir=$workdir" "$@" "${more[@]}")
if [[ -n ${JAX_COORDINATOR_ADDRESS:-} ]]; then
  [[ -n ${JAX_NUM_PROCESSES:-} && -n ${JAX_PROCESS_ID:-} ]] \
    || die "JAX_COORDINATOR_ADDRESS is set: set JAX_NUM_PROCESSES and JAX_PROCESS_ID too"
  args+=("--coordinator_address=$JAX_COORDINATOR_ADDRESS" "--num_processes=$JAX_NUM_PROCESSES"
         "--process_id=$JAX_PROCESS_ID")
fi
cd "$repo"
# shellcheck disable=SC2016  # The wrapper expands its own $1, $! and $?.
setsid nohup bash -c '
  pidfile=$1; shift
  echo "== $(date -u +"%F %T") UTC, $(hostname): $*"
  "$@" & echo $! > "$pidfile"
  wait $!; status=$?
  echo "== $(date -u +"%F %T") UTC, $(hostname): exited with $status"
  rm -f "$pidfile"' bash "$pidfile" "$venv/bin/python" -m mnist_flax.main "${args[@]}" \
  >> "$log" 2>&1 < /dev/null &
for _ in $(seq 100); do [[ -s $pidfile ]] && break; sleep 0.1; done
say "started python -m mnist_flax.main ${args[*]} (pid $(cat "$pidfile" 2>/dev/null)); its log: $log"
