#!/usr/bin/env bash
# The floors check: in a venv of its own, installs mnist_flax with the lowest version of each
# direct dependency that setup.cfg allows (uv's --resolution lowest-direct; what those pull in
# resolves as usual), then runs .ci/smoke.sh there. A floor in setup.cfg that does not work fails
# here, so raise it to the lowest version that does. Also checks that the test extra's floors
# install beside the runtime's, that the GCS emulator wrapper of the tests imports at its floor,
# and that experiments/plot.py draws with the plots extra's floor.
#
#     bash .ci/floors.sh                      # a fresh venv in a temporary directory
#     FLOORS_VENV=/work/floors-venv bash .ci/floors.sh   # (re)uses that venv
#
# Uses the python3 on PATH: the lowest Python that setup.cfg allows (python_requires) is the one
# to test with. Needs only PyPI; uv comes from PyPI too, installed with pip into the venv.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
start=$SECONDS

if [[ -n ${FLOORS_VENV:-} ]]; then
    venv=$FLOORS_VENV
else
    venv=$(mktemp -d "${TMPDIR:-/tmp}/mnist_flax_floors.XXXXXX")
    trap 'rm -rf "$venv"' EXIT
fi
python3 -m venv "$venv"
py=$venv/bin/python
"$py" -m pip install --quiet --upgrade pip uv
echo "floors: $("$py" --version), $("$venv/bin/uv" --version)"

"$venv/bin/uv" pip install --quiet --python "$py" --resolution lowest-direct \
    -e "$repo[test,plots]"
echo "floors: installed (lowest-direct):"
"$venv/bin/uv" pip list --python "$py" 2>/dev/null | grep -iE \
    '^(jax|jaxlib|flax|optax|orbax-checkpoint|ml-collections|absl-py|etils|numpy|ml-dtypes|tensorflow-datasets|tensorboardx|tensorboard|pillow|protobuf|matplotlib|gcp-storage-emulator) ' \
    | awk '{printf "  %s==%s\n", $1, $2}'
"$venv/bin/uv" pip check --python "$py"

PYTHON=$py bash "$repo/.ci/smoke.sh"

(cd "$repo/tests" && "$py" -c "import gcs_emulator_server") \
    || { echo "floors: FAILED: tests/gcs_emulator_server.py does not import" >&2; exit 1; }
plot_out=$(mktemp -d "${TMPDIR:-/tmp}/mnist_flax_plot.XXXXXX")
"$py" "$repo/experiments/plot.py" --out="$plot_out/test_accuracy.png" \
    || { rm -rf "$plot_out"; echo "floors: FAILED: experiments/plot.py" >&2; exit 1; }
rm -rf "$plot_out"
echo "floors: OK in $((SECONDS - start)) s"
