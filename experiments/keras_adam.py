"""default.py with Keras 3's Adam update rule: epsilon added to sqrt of the raw second moment.

      python -m mnist_flax.main --config=experiments/keras_adam.py --workdir=runs/keras_adam

default.py runs optax.adam with Keras's values (learning rate 1e-3, epsilon 1e-7); optax adds
epsilon to the square root of the bias-corrected second moment, Keras to that of the raw one. This
config trains with Keras's rule (train.scale_by_keras_adam, checked step for step against Keras 3
in tests/test_keras_parity.py), to measure whether the difference shows in test accuracy;
everything else is default.py's. Results: experiments/README.md.
"""

import ml_collections

from mnist_flax.configs import default


def get_config() -> ml_collections.ConfigDict:
    """default.py with adam_eps_placement = 'keras'."""
    config = default.get_config()
    config.adam_eps_placement = 'keras'
    return config
