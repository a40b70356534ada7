"""What a sweep measured: each run's results read back from its TensorBoard events
(`event_reader`), their mean ± std over the seeds of each group, the table the sweep
prints, and the JSON file it writes after every run (`--results`), checked before any training.
A run that diverged is kept in both, marked `"status": "diverged"` with its error line, and left
out of the means.
"""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
from typing import Any

import jax
import ml_collections
from absl import logging

from mnist_flax import checkpoints, event_reader, paths
from mnist_flax.configs import ConfigError
from mnist_flax.run import storage_errors, workdir

_DATA_SIZES = re.compile(r"([\d,]+) train / ([\d,]+) test images")


def read_data_sizes(logdir: str) -> tuple[int, int] | None:
    """(train images, test images) a run trained and tested on, from its `data` text."""
    match = _DATA_SIZES.search(event_reader.read_text(logdir, "data") or "")
    return (int(match[1].replace(",", "")), int(match[2].replace(",", ""))) if match else None


def machine() -> dict[str, Any]:
    """What the wall times were measured on."""
    info = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return {
        "cpu": info.get("model name") or platform.processor(), "cpu_count": os.cpu_count(),
        "avx512": "avx512f" in info.get("flags", "").split(),
        "jax": jax.__version__, "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
    }


def process_seconds() -> float | None:
    """Seconds since this process started (Linux), so imports and compilation are counted."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return uptime - start_ticks / os.sysconf("SC_CLK_TCK")


def run_result(run: dict[str, Any], config: ml_collections.ConfigDict, logdir: str,
               seconds: float, metrics: dict[str, float] | None,
               error: str | None = None) -> dict[str, Any]:
    """`run` (its name, group and overrides) with what it measured, as the table and the JSON
    give it; `metrics` is None for a run that diverged, whose `error` line is kept instead."""
    return {
        **run,
        "status": "diverged" if metrics is None else "trained",
        "error": error,
        "test_accuracy": None if metrics is None else metrics["test/accuracy"],
        "test_loss": None if metrics is None else metrics["test/loss"],
        "epochs": config.num_epochs,
        "run_seconds": seconds,  # Data loading and compilation included.
        "test_accuracy_per_epoch": [
            v for _, v in event_reader.read_scalars(f"{logdir}/test", "accuracy")],
        "train_images": (read_data_sizes(logdir) or (None,))[0],
        "logdir": logdir,
    }


def _stats(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy mean and sample std over the runs that trained (None if none did)."""
    accuracies = [r["test_accuracy"] for r in results if r["status"] == "trained"]
    return {
        "runs": len(accuracies),
        "diverged": len(results) - len(accuracies),
        "test_accuracy_mean": statistics.fmean(accuracies) if accuracies else None,
        "test_accuracy_std": (statistics.stdev(accuracies) if len(accuracies) > 1
                              else 0.0 if accuracies else None),
        "run_seconds_mean": statistics.fmean(r["run_seconds"] for r in results),
    }


def summarize(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Test accuracy mean and sample std over the seeds of each group (runs that differ only in
    `seed`), under "groups". The top-level mean and std, which experiments/plot.py and the README
    table read, are given only when all runs form one group: over learning rates they mean nothing.
    """
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        groups.setdefault(r["group"], []).append(r)
    summary: dict[str, Any] = _stats(results)
    if len(groups) > 1:
        del summary["test_accuracy_mean"], summary["test_accuracy_std"]
    summary["groups"] = [
        {"group": name, **_stats(runs),
         "overrides": {k: v for k, v in runs[0]["overrides"].items() if k != "seed"}}
        for name, runs in groups.items()]
    return summary


def _accuracy_line(group: dict[str, Any]) -> str:
    mean, std, runs = group["test_accuracy_mean"], group["test_accuracy_std"], group["runs"]
    diverged = f", {group['diverged']} diverged" if group["diverged"] else ""
    if runs == 0:
        return f"no test accuracy ({group['diverged']} diverged)"
    if runs == 1:
        return f"test accuracy {100 * mean:.2f}% (1 run{diverged})"
    return (f"test accuracy {100 * mean:.2f} ± {100 * std:.2f}% (mean ± sample std over {runs} "
            f"runs{diverged})")


def _row(r: dict[str, Any], width: int) -> str:
    measured = (f"{r['test_accuracy']:8.4f}  {r['test_loss']:9.4f}" if r["status"] == "trained"
                else f"{r['status']:>8}  {'-':>9}")
    return f"{r['name']:<{width}}  {measured}  {r['epochs']:6d}  {r['run_seconds']:7.1f}"


def format_table(results: list[dict[str, Any]]) -> str:
    """One row per run, one accuracy line per group (its seeds' mean ± std), then each diverged
    run's error line."""
    width = max([len("run")] + [len(r["name"]) for r in results])
    lines = [f"{'run':<{width}}  test acc  test loss  epochs  seconds"]
    lines.extend(_row(r, width) for r in results)
    groups = summarize(results)["groups"]
    if len(groups) == 1:
        lines.append(_accuracy_line(groups[0]))
    else:
        width = max(len(g["group"]) for g in groups) + 1
        lines.extend(f"{g['group'] + ':':<{width}} {_accuracy_line(g)}" for g in groups)
    lines.extend(f"{r['name']} {r['status']}: {r['error']}" for r in results
                 if r["status"] != "trained")
    return "\n".join(lines)


def diverged_line(results: list[dict[str, Any]]) -> str | None:
    """The sweep's last line when some runs diverged (None when none did)."""
    names = [r["name"] for r in results if r["status"] == "diverged"]
    return (f"{len(names)} of {len(results)} runs diverged ({', '.join(names)}); the table above "
            "has the others' results" if names else None)


def write_results(path: str, config: ml_collections.ConfigDict, results: list[dict[str, Any]],
                  command: str) -> None:
    payload = {
        "command": command,
        "machine": machine(),
        "process_seconds": process_seconds(),
        "summary": summarize(results),
        "runs": results,
        "config": json.loads(config.to_json()),
    }
    target = workdir.path(path)  # A local file or, like the workdir, gs://.
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(payload, indent=1) + "\n")


def check_results(path: str) -> None:
    """ConfigError, before any training, for a local --results that cannot be written: a
    directory, under a file, or a place this process may not write. Its missing directories are
    made now, as the first write would make them; an existing file is left as it is."""
    paths.parse(path, "--results")  # As every path a user gives: gs:/x or s3://x is one line.
    if workdir.is_remote(path):
        workdir.check_client(path, "--results")
        return
    target = workdir.path(path)
    if target.is_dir():
        raise ConfigError(f"--results={path}: is a directory; pass a file, e.g. "
                          f"--results={target / 'results.json'}")
    above = next(p for p in (target.parent, *target.parent.parents) if p.exists())
    if not above.is_dir():
        raise ConfigError(f"--results={path}: {above} is a file, not a directory; pass a file "
                          "in a directory")
    existed = target.exists()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with target.open("a"):  # Appends nothing: an earlier file is unchanged.
            pass
        if not existed:
            target.unlink()
    except OSError as e:
        raise ConfigError(f"--results={path}: cannot be written ({e.strerror or e}); pass a "
                          "writable file") from None


class ResultsFile:
    """Rewrites --results after every run. A write that fails is logged and the sweep goes on:
    no run is lost to the results file; `finish` says in one line that it was not written."""

    def __init__(self, path: str, config: ml_collections.ConfigDict, command: str):
        self.path, self.config, self.command = path, config, command
        self.error: BaseException | None = None

    def write(self, results: list[dict[str, Any]]) -> None:
        try:
            write_results(self.path, self.config, results, self.command)
            self.error = None
        except Exception as e:  # noqa: BLE001 (OSError, or a gs:// client's own error types)
            if not isinstance(e, OSError) and not storage_errors.is_storage_error(e):
                raise
            self.error = e
            logging.warning("--results=%s: not written (%s); the sweep goes on",
                            self.path, checkpoints.error_line(e))

    def finish(self, workdir_path: str) -> None:
        if self.error is not None:
            raise ConfigError(
                f"--results={self.path}: not written ({checkpoints.error_line(self.error)}); "
                f"every run is kept under {workdir_path} and the table above has their results; "
                "run the same command with a writable --results to write them (no run trains "
                "again)")
