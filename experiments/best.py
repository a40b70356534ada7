"""The most accurate recipe measured here, no extra data: a tutorial-style CNN, augmented.

      python -m mnist_flax.main --config=experiments/best.py --workdir=runs/best

Same optimizer as default.py; one more convolution. What changes, and why:
- random shifts (+-2 px), rotations (+-10 deg) and zooms (+-10%) of each training digit, drawn on
  the device just before each train step (mnist_flax.augment): the test set's writers slant and
  place digits differently, and the tutorial model overfits its 60,000 images within a few epochs;
- a one-cycle learning rate (warm up to 3x the tutorial's 1e-3, anneal to ~0): a higher step size
  early, and a small one at the end, where a constant 1e-3 keeps bouncing around the minimum;
- label smoothing 0.1, and 15 epochs, which augmentation makes useful;
- a third 3x3 convolution, Conv 32 -> Conv 32 -> Conv 64 (1,020,714 parameters; an epoch takes
  ~53 s here against ~41 s for two): with augmentation the two-conv model plateaus just under
  99.6% (its 3 seeds over 15 epochs: 99.61, 99.56, 99.55%); 30 epochs or lighter dropout did not
  help (one seed each, experiments/README.md).
Measured (experiments/README.md, experiments/results/best.json): 99.61 +- 0.03% over seeds 0-2
(99.63, 99.57, 99.62), 845-858 s per run on the 2-core AVX-512 CPU, no accelerator.
"""

import ml_collections

from mnist_flax.configs import default


def get_config() -> ml_collections.ConfigDict:
    """default.py plus augmentation, a one-cycle schedule, label smoothing and one more conv."""
    config = default.get_config()
    config.num_epochs = 15
    config.conv_features = (32, 32, 64)
    config.lr_schedule = 'one_cycle'
    config.learning_rate = 3e-3  # The peak.
    config.warmup_epochs = 2.0
    config.label_smoothing = 0.1
    config.augment_max_shift = 2.0
    config.augment_max_rotation = 10.0
    config.augment_max_scale = 0.1
    return config
