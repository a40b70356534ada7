"""The tutorial's recipe on the real MNIST (../shared/mnist; skipped without it): slow, so not in
the core tier."""

import pytest
from conftest import load_config, write_idx_files

from mnist_flax import mnist_idx, train


@pytest.mark.slow
def test_short_real_run_on_real_mnist(shared_mnist, tmp_path):
    """The tutorial recipe for 100 steps on the first 12,800 real digits, tested on all 10,000:
    the real pipeline and model learn (a full epoch, 4.7x the steps, added nothing but time)."""
    real = mnist_idx.load_dir(str(shared_mnist))
    data_dir = write_idx_files(tmp_path / "first-12800",
                               (real.train_images[:12800], real.train_labels[:12800]),
                               (real.test_images, real.test_labels), gz=False)
    config = load_config()
    config.update(data_dir=str(data_dir), verify_checksums=False, num_epochs=1,
                  log_every_steps=200)
    _, metrics = train.train_and_evaluate(config, str(tmp_path / "run"))
    assert metrics["test/accuracy"] >= 0.94  # A point below what this seed reaches.
