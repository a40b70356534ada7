"""Plots test accuracy per epoch of the recorded experiments: experiments/test_accuracy.png.

    python experiments/plot.py [--out=experiments/test_accuracy.png] [results/default.json ...]
    python experiments/plot.py --table   # the results table of experiments/README.md, as Markdown

Reads experiments/results/*.json, which `mnist_flax.sweep --results=...` fills with each run's
per-epoch test accuracy as read back from its TensorBoard event files. Each experiment is drawn as
its mean over seeds, with every seed as a thin line. Plotting needs matplotlib, which the plots
extra installs (pip install 'mnist_flax[plots]'); --table does not.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys

import numpy as np

PLOTS_EXTRA = "pip install 'mnist_flax[plots]'"

HERE = pathlib.Path(__file__).resolve().parent
PLOTTED = [HERE / "results" / f"{name}.json" for name in ("default", "best", "fast")]
# The table also keeps superseded recipes, so a reader sees what did not reach its goal.
TABULATED = [HERE / "results" / f"{name}.json"
             for name in ("default", "keras_adam", "best", "best_two_convs", "fast")]


def curves(path: pathlib.Path) -> np.ndarray:
    """(seeds, epochs) test accuracy in percent, of the runs that trained (a sweep marks a
    diverged one, with no accuracy)."""
    runs = json.loads(path.read_text())["runs"]
    return 100 * np.array([r["test_accuracy_per_epoch"] for r in runs
                           if r.get("test_accuracy") is not None])


def pyplot():
    """matplotlib.pyplot, drawing to files; without matplotlib, exits with one line saying how to
    install it (the `plots` extra), not a traceback. `--table` needs no matplotlib."""
    try:
        import matplotlib
    except ImportError:
        sys.exit(f"error: plotting needs matplotlib, which the plots extra installs: {PLOTS_EXTRA}")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot(paths: list[pathlib.Path], out: pathlib.Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for path, color in zip(paths, ("tab:blue", "tab:red", "tab:green", "tab:purple"),
                           strict=False):
        acc = curves(path)
        if not acc.size:
            continue  # Every run diverged: nothing to draw.
        epochs = np.arange(1, acc.shape[1] + 1)
        for seed in acc:
            ax.plot(epochs, seed, color=color, alpha=0.25, linewidth=0.8)
        std = acc[:, -1].std(ddof=1) if len(acc) > 1 else 0.0
        ax.plot(epochs, acc.mean(0), color=color, marker="o", markersize=3,
                label=f"{path.stem}: {acc[:, -1].mean():.2f} ± {std:.2f}% ({len(acc)} seeds)")
    for target in (99.2, 99.6):
        ax.axhline(target, color="gray", linestyle=":", linewidth=0.8)
    ax.set_ylim(98.0, 100.0)
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("MNIST test accuracy per epoch (mean over seeds; thin lines: each seed)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(out)


def table(paths: list[pathlib.Path]) -> str:
    """One Markdown row per results file: the numbers README.md shows, straight from the JSON."""
    rows = ["| experiment | test accuracy (mean ± std) | per seed | epochs | wall time per run "
            "| results |", "| --- | --- | --- | --- | --- | --- |"]
    for path in paths:
        payload = json.loads(path.read_text())
        runs, summary = payload["runs"], payload["summary"]
        seeds = ", ".join(f"{r['name']}: " + ("diverged" if r.get("test_accuracy") is None
                                               else f"{100 * r['test_accuracy']:.2f}")
                          for r in runs)
        mean, std = summary.get("test_accuracy_mean"), summary.get("test_accuracy_std") or 0.0
        accuracy = "no run trained" if mean is None else f"{100 * mean:.2f} ± {100 * std:.2f}%"
        seconds = ", ".join(f"{r['run_seconds']:.0f}" for r in runs)
        label = payload.get("label", f"`{path.stem}.py`")
        rows.append(
            f"| {label} | {accuracy} ({summary['runs']} seeds) | {seeds} | "
            f"{runs[0]['epochs']} | {seconds} s | [results/{path.name}](results/{path.name}) |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="*", type=pathlib.Path)
    parser.add_argument("--out", type=pathlib.Path, default=HERE / "test_accuracy.png")
    parser.add_argument("--table", action="store_true", help="print the Markdown table instead")
    args = parser.parse_args()
    if not args.table:
        pyplot()  # Says how to get matplotlib before anything else.
    paths = args.results or [p for p in (TABULATED if args.table else PLOTTED) if p.exists()]
    if not paths:
        raise SystemExit("error: no results JSON found; run the sweeps in experiments/README.md")
    if args.table:
        try:
            print(table(paths), flush=True)
        except BrokenPipeError:  # A reader that left (`| head`): not an error, so no traceback.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return
    plot(paths, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
