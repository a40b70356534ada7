"""Screenshots of TensorBoard as a user sees a run, for the README: docs/tensorboard_*.png.

    apt-get install -y chromium      # Debian's package; any Chromium or Chrome works (--chromium)
    python docs/screenshots.py [--workdir=runs/screenshots/sample12] [--epochs=12]

Trains on the packaged sample first unless `--workdir` already holds a run (12 epochs, a few
minutes on a laptop CPU), serves its parent directory with `tensorboard` on loopback, as the
README's `tensorboard --logdir=runs/` (TensorBoard's HParams finds a run's metrics in its train/
and test/ only under a parent: served as the logdir itself, the run is "." and the lookup of
"./test" fails), and saves headless-Chromium
screenshots of the first screen (Time Series), the end-of-run pictures, and the HParams table.
`?forceSVG=true` makes TensorBoard draw charts as SVG, which headless Chromium renders without a
GPU. Not run in CI: tests/test_summaries.py checks what the same server serves over HTTP.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator

from PIL import Image

DOCS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(DOCS)
PAGES = {  # file name -> (what TensorBoard shows at that address, window width,height).
    "tensorboard_first_screen.png": ("?forceSVG=true#timeseries", "1400,900"),
    # The Images dashboard: headless Chromium does not wait for Time Series' lazy image cards.
    "tensorboard_pictures.png": ("?forceSVG=true#images", "1400,900"),
    "tensorboard_hparams.png": ("?forceSVG=true#hparams", "1900,500"),  # Wide: metric columns.
}


def train(workdir: str, epochs: int) -> None:
    subprocess.run([sys.executable, "-m", "mnist_flax.main", f"--workdir={workdir}",
                    "--config.data_source=sample", f"--config.num_epochs={epochs}"],
                   cwd=REPO, check=True)


@contextlib.contextmanager
def tensorboard(logdir: str) -> Iterator[str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "tensorboard.main", f"--logdir={logdir}",
                               "--host=127.0.0.1", f"--port={port}", "--load_fast=false"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"{url}/data/runs", timeout=5) as response:
                    if b"test" in response.read():
                        break
            time.sleep(0.5)
        else:
            raise RuntimeError(f"tensorboard did not come up on {url}")
        yield url
    finally:
        server.terminate()
        server.wait(timeout=10)


def screenshot(chromium: str, url: str, path: str, size: str) -> None:
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu",
                        "--disable-background-networking", "--disable-component-update",
                        "--disable-sync", "--no-first-run", "--hide-scrollbars",
                        f"--user-data-dir={profile}", f"--window-size={size}",
                        "--virtual-time-budget=30000", f"--screenshot={path}", url],
                       check=True, capture_output=True, timeout=180)
    # A 256-colour palette keeps a screenshot of flat UI colours small for the repository.
    Image.open(path).convert("RGB").quantize(256, dither=Image.Dither.NONE).save(
        path, optimize=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default=os.path.join(REPO, "runs", "screenshots", "sample12"))
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--chromium", default=shutil.which("chromium")
                        or shutil.which("chromium-browser") or shutil.which("google-chrome"))
    args = parser.parse_args()
    if not args.chromium:
        sys.exit("error: no chromium found; apt-get install -y chromium, or pass --chromium")
    if not os.path.isdir(os.path.join(args.workdir, "test")):
        train(args.workdir, args.epochs)
    with tensorboard(os.path.dirname(os.path.abspath(args.workdir))) as url:
        for name, (page, size) in PAGES.items():
            path = os.path.join(DOCS, name)
            screenshot(args.chromium, f"{url}/{page}", path, size)
            print(f"{path}: {os.path.getsize(path) // 1024} KB  ({url}/{page})")


if __name__ == "__main__":
    main()
