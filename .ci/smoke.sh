#!/usr/bin/env bash
# Smoke test of an installed mnist_flax, with the python of the venv it is installed in (.ci/run
# runs it in the venv of the lowest versions setup.cfg allows, see .ci/floors.sh):
#   1. every entry point imports (the training core first);
#   2. the TFDS source loads under tfds.testing.mock_data (tensorflow-datasets is only imported
#      when that source is chosen, so the training runs below do not exercise it);
#   3. one epoch on the packaged sample through main, run from a directory outside the repo;
#   4. the same workdir with num_epochs=2: resumes from epoch 1's checkpoint;
#   5. the two runs' test accuracy read back with TensorBoard's reader as sweep does (one value
#      per epoch), and predict on a sample digit saved as a PNG.
# Each step must exit 0; 3 and 4 must print "Test accuracy".
#
#     PYTHON=/path/to/venv/bin/python bash .ci/smoke.sh
set -euo pipefail
PYTHON=${PYTHON:-python}
work=$(mktemp -d "${TMPDIR:-/tmp}/mnist_flax_smoke.XXXXXX")
trap 'rm -rf "$work"' EXIT
cd "$work"  # Not the repo: the installed package, its packaged config and sample.
export JAX_PLATFORMS=cpu MNIST_DATA_DIR=

fail() { echo "smoke: FAILED: $*" >&2; exit 1; }

"$PYTHON" -c "import mnist_flax.train, mnist_flax.main, mnist_flax.predict, mnist_flax.sweep" \
    || fail "import"
"$PYTHON" -c "import mnist_flax; print('smoke: mnist_flax', mnist_flax.__version__)"

TFDS_DIR="$work/tfds" "$PYTHON" - <<'EOF' || fail "the tfds source under tfds.testing.mock_data"
import os
import pathlib

import tensorflow_datasets as tfds

from mnist_flax import input_pipeline
from mnist_flax.configs import default

config = default.get_config()
config.data_source = "tfds"
# A copy's metadata is there (mnist_tfds looks for it before asking TFDS), and TFDS reads mock
# data for it, as tests/core/test_input_pipeline.py::test_tfds_prepared_copy_under_mock_data does.
config.tfds_data_dir = os.environ["TFDS_DIR"]
info = pathlib.Path(config.tfds_data_dir, "mnist", "3.0.1", "dataset_info.json")
info.parent.mkdir(parents=True)
info.write_text("{}")
with tfds.testing.mock_data(num_examples=40):
    dataset = input_pipeline.load_dataset(config)
assert dataset.train_images.shape == (40, 28, 28, 1), dataset.train_images.shape
print("smoke: tfds source:", dataset.source)
EOF

train() {  # train EPOCHS: trains workdir run/ through main, up to EPOCHS epochs in all.
    local out rc=0
    out=$("$PYTHON" -m mnist_flax.main --workdir="$work/run" --config.data_source=sample \
        --config.num_epochs="$1" --config.compilation_cache_dir= 2>"$work/stderr") || rc=$?
    if [[ $rc -ne 0 ]]; then
        tail -n 40 "$work/stderr" >&2
        fail "main with num_epochs=$1 exited $rc"
    fi
    if ! grep -q "^Test accuracy" <<<"$out"; then
        tail -n 40 "$work/stderr" >&2
        fail "main with num_epochs=$1 printed no 'Test accuracy'"
    fi
    echo "smoke: num_epochs=$1: $(grep '^Test accuracy' <<<"$out" | tail -n 1)"
}
train 1
train 2  # Resumes: restores epoch 1's checkpoint, trains epoch 2.

"$PYTHON" - "$work" <<'EOF' || fail "reading the runs back, or predict"
import subprocess
import sys

import numpy as np
from PIL import Image

from mnist_flax import event_reader, input_pipeline

work = sys.argv[1]
accuracy = event_reader.read_scalars(f"{work}/run/test", "accuracy")
assert [step for step, _ in accuracy] == sorted({step for step, _ in accuracy}), accuracy
assert len(accuracy) == 2, f"expected one test accuracy per epoch, got {accuracy}"
print("smoke: test accuracy per epoch:", [round(v, 4) for _, v in accuracy])

sample = input_pipeline.load_packaged_sample()
Image.fromarray(np.asarray(sample.test_images[0]).squeeze()).save(f"{work}/digit.png")
subprocess.run([sys.executable, "-m", "mnist_flax.predict", f"--workdir={work}/run",
                f"{work}/digit.png"], check=True, timeout=300)
EOF
echo "smoke: OK"
