"""The most accurate recipe measured here (no extra data): the tutorial CNN, augmented, annealed.

      python -m mnist_flax.main --config=experiments/best.py --workdir=runs/best

Same model and optimizer as default.py. What changes, and why:
- random shifts (+-2 px), rotations (+-10 deg) and zooms (+-10%) of each training digit, drawn on
  the device inside the train step (mnist_flax.augment): the test set's writers slant and place
  digits differently, and the tutorial model overfits its 60,000 images within a few epochs;
- a one-cycle learning rate (warm up to 3x the tutorial's 1e-3, anneal to ~0): a higher step size
  early, and a small one at the end, where a constant 1e-3 keeps bouncing around the minimum;
- label smoothing 0.1, and 30 epochs, which augmentation makes useful: the same recipe over 15
  epochs gave 99.61, 99.56 and 99.55% (seeds 0-2, mean 99.57%), just short of 99.6%.
Measured: see experiments/README.md and experiments/results/best.json.
"""

import pathlib
import runpy

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    """default.py plus augmentation, a one-cycle schedule, label smoothing and more epochs."""
    config = runpy.run_path(str(pathlib.Path(__file__).with_name("default.py")))["get_config"]()
    config.num_epochs = 30
    config.lr_schedule = 'one_cycle'
    config.learning_rate = 3e-3  # The peak.
    config.warmup_epochs = 2.0
    config.label_smoothing = 0.1
    config.augment_max_shift = 2.0
    config.augment_max_rotation = 10.0
    config.augment_max_scale = 0.1
    return config
