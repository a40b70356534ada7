"""Seconds XLA takes to compile the parameters' initialisation with its default options and with
`fast.INIT_OPTIONS` (LLVM -O1), and whether both give the same parameters.

    python benchmarks/compile_time.py [--repeats=5]

Each compile runs in a new process with the compilation cache off, for the tutorial's model and
a tiny one, the two options alternating so that a slower minute costs both alike; the
table shows medians, and how long one call takes once compiled. A run compiles the
initialisation once per new model shape (afterwards the cache has it). The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

MODELS = {"tutorial": {}, "tiny": {"conv_features": (4, 8), "dense_features": 16}}
OPTIONS = ("default", "init_options")


def _worker(model: str, options: str) -> None:
    import functools
    import hashlib

    import jax
    import jax.numpy as jnp
    import numpy as np

    from mnist_flax import configs, fast, models

    jax.config.update("jax_enable_compilation_cache", False)
    config = configs.load()
    config.update(MODELS[model])
    init = jax.jit(functools.partial(models.create_model(config).init, train=False),
                   compiler_options=fast.INIT_OPTIONS if options == "init_options" else None)
    args = (jax.random.key(0), jnp.zeros((1, 28, 28, 1), jnp.float32))
    start = time.perf_counter()
    compiled = init.lower(*args).compile()
    compile_s = time.perf_counter() - start
    jax.block_until_ready(compiled(*args))
    start = time.perf_counter()
    params = jax.block_until_ready(compiled(*args))
    call_ms = (time.perf_counter() - start) * 1e3
    digest = hashlib.sha256(b"".join(np.asarray(leaf).tobytes()
                                     for leaf in jax.tree.leaves(params))).hexdigest()
    print(json.dumps({"compile_s": compile_s, "call_ms": call_ms, "digest": digest}))


def _measure(model: str, options: str) -> dict:
    out = subprocess.run([sys.executable, __file__, f"--worker={model},{options}"],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return _worker(*args.worker.split(","))
    runs = {(m, o): [] for m in MODELS for o in OPTIONS}
    for _ in range(args.repeats):
        for key in runs:
            runs[key].append(_measure(*key))
    result = {}
    print("| model | options | compile (s) | one call (ms) |\n| --- | --- | --- | --- |")
    for (model, options), found in runs.items():
        compile_s = statistics.median(r["compile_s"] for r in found)
        call_ms = statistics.median(r["call_ms"] for r in found)
        result[f"{model}_{options}_compile_s"] = round(compile_s, 3)
        result[f"{model}_{options}_call_ms"] = round(call_ms, 2)
        print(f"| {model} | {options} | {compile_s:.2f} | {call_ms:.1f} |")
    for model in MODELS:
        digests = {r["digest"] for o in OPTIONS for r in runs[model, o]}
        result[f"{model}_same_parameters"] = len(digests) == 1
    print(json.dumps(result))
    if not all(result[f"{m}_same_parameters"] for m in MODELS):
        sys.exit("the two options gave different parameters")


if __name__ == "__main__":
    main()
