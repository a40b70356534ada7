"""Speed, chosen once per backend: which kernels the model runs and how many steps a dispatch runs.

On CPU: `fast.ops`' convolution and pooling (Linen's function, gradients XLA:CPU compiles well)
and one step a dispatch; on GPU/TPU: XLA's own, and 16 steps a dispatch (`fast.dispatch`), which
divides the host's overhead per step by 16. docs/speed.md has the measurements.
"""

import importlib.metadata
from typing import Any

import jax
import ml_collections

# Per-jit XLA option of the training step: YNNPACK takes dots and reductions only, convolutions go
# to XLA:CPU's Eigen kernels (faster here); REDUCE must stay, or the bias-gradient sums become slow
# reduce-windows. jaxlib < 0.10 has no such option; GPU and TPU compilers ignore it.
YNN_OPTION = "xla_cpu_experimental_ynn_fusion_type"
CPU_OPTIONS = {YNN_OPTION: "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"}
JAXLIB_VERSION = tuple(int(part) for part in importlib.metadata.version("jaxlib").split(".")[:2])
COMPILER_OPTIONS = dict(CPU_OPTIONS) if JAXLIB_VERSION >= (0, 10) else {}
# Initialisation runs once: LLVM's -O1 (XLA's default: -O3) compiles it faster, to the same bits.
INIT_OPTIONS = {"xla_backend_optimization_level": 1}
ACCELERATOR_STEPS_PER_DISPATCH = 16


def on_cpu() -> bool:
    return jax.default_backend() == "cpu"


def model_layers(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The CNN's `conv` and `pool` for this backend: `fast.ops`' on CPU when `config.fast_ops`,
    else none (the model's defaults, XLA's own `nn.Conv` and `nn.max_pool`)."""
    if not (config.fast_ops and on_cpu()):
        return {}
    from mnist_flax.fast import ops  # Only where it is used: CPU processes.

    return {"conv": ops.Conv3x3, "pool": ops.max_pool}


def steps_per_dispatch(config: ml_collections.ConfigDict) -> int:
    """The config's steps per dispatch; 0 picks per backend: 1 on CPU (XLA:CPU runs the step
    inside a loop far slower), 16 on GPU/TPU."""
    if config.steps_per_dispatch:
        return config.steps_per_dispatch
    return 1 if on_cpu() else ACCELERATOR_STEPS_PER_DISPATCH
