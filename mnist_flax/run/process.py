"""What an entry point's process needs before JAX runs anything: log filters, the host
allocator, JAX's persistent compilation cache, and jax.distributed's start on several hosts."""

from __future__ import annotations

import ctypes
import logging
import os
import platform
import sys
import tempfile
import threading

import jax
from absl import logging as absl_logging

from mnist_flax import checkpoints, configs, fast
from mnist_flax.run import logs


def setup_process() -> None:
    """What a training process needs before JAX runs anything: called first thing by main/sweep."""
    # JAX logs at INFO each platform plugin it probes and does not find ("Unable to initialize
    # backend 'tpu'" on every CPU run); one that is there but fails still warns or raises.
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
    tune_host_allocator()
    if not fast.COMPILER_OPTIONS:
        absl_logging.info("jaxlib %s predates the XLA:CPU option %s; convolutions use XLA's "
                          "default CPU library (slower on CPU, the same numerics)",
                          ".".join(map(str, fast.JAXLIB_VERSION)), fast.YNN_OPTION)
    logs.quiet_orbax_logging()
    logs.quiet_storage_logging()


def enable_compilation_cache(cache_dir: str) -> str:
    """Turns on JAX's persistent compilation cache in `cache_dir` (config.compilation_cache_dir):
    'auto' is $JAX_COMPILATION_CACHE_DIR, else ~/.cache/mnist_flax/jax; '' turns it off. Returns
    the directory ('' when off). Every jit is cached, however fast it compiled. A local directory
    that cannot be written is one warning and no cache: the cache only saves time, so it never
    stops a run (JAX would warn at each compilation)."""
    if cache_dir == "auto":
        cache_dir = os.environ.get("JAX_COMPILATION_CACHE_DIR") or "~/.cache/mnist_flax/jax"
    if cache_dir and not cache_dir.startswith("gs://"):
        cache_dir = os.path.expanduser(cache_dir)
        try:
            os.makedirs(cache_dir, exist_ok=True)
            tempfile.TemporaryFile(dir=cache_dir).close()
        except OSError as e:
            absl_logging.warning(
                "The compilation cache %s is unusable (%s: %s); compiling without it. Set "
                "--config.compilation_cache_dir to a writable directory, or '' to turn it off",
                cache_dir, type(e).__name__, e.strerror or e)
            cache_dir = ""
    jax.config.update("jax_compilation_cache_dir", cache_dir or None)
    jax.config.update("jax_enable_compilation_cache", bool(cache_dir))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return cache_dir


_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -2, -4, -8


def tune_host_allocator() -> bool:
    """Keeps big host allocations in glibc's heap (mallopt: no mmap, no trim, one arena), so
    XLA:CPU stops faulting each step's temporaries in afresh. Process-wide: only entry points call
    it, first thing. Whether the settings are in effect (False off Linux/glibc)."""
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
        mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    except (OSError, AttributeError):
        return False
    settings = ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1), (_M_TOP_PAD, 64 << 20),
                (_M_ARENA_MAX, 1))
    return all(mallopt(param, value) == 1 for param, value in settings)


PEERS_TIMEOUT_S = 300  # --multihost: how long a process waits for all to reach the coordinator.


def start_jax(multihost: bool = False, coordinator_address: str | None = None,
              num_processes: int | None = None, process_id: int | None = None) -> None:
    """Starts JAX's runtime (`multihost`: the distributed one first) and its backend, so that a
    platform that is not there is one line here, not a bare AssertionError from inside JAX."""
    if multihost:
        initialize_distributed(coordinator_address, num_processes, process_id)
    try:
        jax.devices()
    except Exception as e:  # noqa: BLE001 (JAX raises RuntimeError or a bare AssertionError)
        platforms = os.environ.get("JAX_PLATFORMS") or jax.config.jax_platforms
        what = f"JAX_PLATFORMS={platforms}" if platforms else "its backend"
        raise configs.ConfigError(
            f"JAX could not start {what} ("
            f"{checkpoints.error_line(e, 120) if str(e) else 'no such device here'}); "
            "unset JAX_PLATFORMS to use what this machine has, or install JAX for the device "
            "(pip install -e '.[cuda12]' for NVIDIA GPUs)") from None


def initialize_distributed(coordinator_address: str | None, num_processes: int | None,
                           process_id: int | None, timeout_s: int = PEERS_TIMEOUT_S) -> None:
    """`jax.distributed.initialize`: TPU pods and SLURM are detected by JAX itself; elsewhere all
    three settings must be given. Peers that have not all connected after `timeout_s` are one line:
    JAX would abort with a C++ stack, so it waits longer, in a thread the process leaves behind."""
    given = {"coordinator_address": coordinator_address, "num_processes": num_processes,
             "process_id": process_id}
    missing = [f"--{k}" for k, v in given.items() if v is None]
    if 0 < len(missing) < len(given):
        raise configs.ConfigError(f"--multihost: also pass {', '.join(missing)} (or none of the "
                                  "three, on a TPU pod or under SLURM)")
    coordinator = coordinator_address or "(the one JAX detects)"
    absl_logging.info("--multihost: waiting up to %d s for every process to reach the coordinator "
                      "%s", timeout_s, coordinator)
    outcome: list[Exception | None] = []

    def connect() -> None:
        try:
            outcome.append(jax.distributed.initialize(**({} if missing else given),
                                                      initialization_timeout=timeout_s + 60))
        except Exception as e:  # noqa: BLE001 (raised again in the caller's thread)
            outcome.append(e)

    thread = threading.Thread(target=connect, name="jax.distributed.initialize", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if not outcome:
        raise configs.ConfigError(
            f"--multihost: not all {num_processes or 'the'} processes reached the coordinator "
            f"{coordinator} within {timeout_s} s; start the same command on every host (process 0 "
            "on the coordinator's) and check that its port is reachable from each")
    if error := outcome[0]:  # No cluster found (not a TPU pod or SLURM), or bad settings.
        raise configs.ConfigError(
            f"--multihost: JAX did not start the cluster ({checkpoints.error_line(error, 120)}); "
            "on a TPU pod or under SLURM it needs no more flags, elsewhere pass "
            "--coordinator_address=HOST:PORT --num_processes=N --process_id=I") from None
