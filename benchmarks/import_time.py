"""Seconds a fresh process takes to import `mnist_flax.main` (every run, test and host pays them).

    python benchmarks/import_time.py [--repeats=7] [--compare=DIR]

Median wall seconds, each in a new process, of `import mnist_flax.main`; of that and the
TensorBoard writer a run imports next (`tbx.tensorboardx()`); and of `import numpy,
ml_dtypes` alone, with the installed ml_dtypes (and torch, where installed: tensorboardX's writer
would import it). `--compare=DIR` runs the same with DIR first on PYTHONPATH, alternating with
the installed one in the same run: another ml_dtypes from
`pip install --no-deps --target=DIR ml_dtypes==0.7.0`, or another mnist_flax from
`git worktree add DIR COMMIT`. The last line is JSON.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time

# A --compare checkout from before mnist_flax/tbx.py imports tensorboardX plainly.
WRITER = """import mnist_flax.main
try:
    from mnist_flax.tbx import tensorboardx
except ImportError:
    def tensorboardx():
        return __import__("tensorboardX")
tensorboardx()
"""
PROBES = {"main": "import mnist_flax.main", "main_and_writer": WRITER,
          "numpy_ml_dtypes": "import numpy, ml_dtypes"}


def _seconds(code: str, pythonpath: str | None) -> float:
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, (pythonpath, env.get("PYTHONPATH"))))
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], env=env, check=True, cwd=os.sep)  # Not this tree.
    return time.perf_counter() - start


def _version(pythonpath: str | None) -> str:
    env = {**os.environ, **({"PYTHONPATH": pythonpath} if pythonpath else {})}
    return subprocess.run([sys.executable, "-c", "import ml_dtypes; print(ml_dtypes.__version__)"],
                          env=env, check=True, capture_output=True, text=True,
                          cwd=os.sep).stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--compare", help="a directory put first on PYTHONPATH for the comparison")
    args = parser.parse_args()
    setups = {"installed": None, **({"compare": args.compare} if args.compare else {})}
    times = {(setup, probe): [] for setup in setups for probe in PROBES}
    for _ in range(args.repeats):  # Alternating, so that a slower minute costs both alike.
        for setup, path in setups.items():
            for probe, code in PROBES.items():
                times[setup, probe].append(_seconds(code, path))
    result = {"torch_installed": importlib.util.find_spec("torch") is not None}
    for setup, path in setups.items():
        result[f"{setup}_ml_dtypes"] = _version(path)
        for probe in PROBES:
            median = statistics.median(times[setup, probe])
            result[f"{setup}_{probe}_s"] = round(median, 3)
            print(f"{setup} (ml_dtypes {result[f'{setup}_ml_dtypes']}): import {probe}: "
                  f"{median:.3f} s (median of {args.repeats})")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
