"""The Keras tutorial recipe (keras/examples/mnist_cnn.py with Adam), ported faithfully.

      python -m mnist_flax.main --workdir=runs/default   # this file is the default --config

Conv 32 3x3 relu -> Conv 64 3x3 relu -> MaxPool 2x2 -> Dropout 0.25 -> Flatten -> Dense 128 relu
-> Dropout 0.5 -> Dense 10 (1,199,882 parameters); Adam, batch 128, 12 epochs; the test set is
evaluated after every epoch, as the tutorial's `validation_data` does.

Keras's defaults are part of the recipe and differ from Flax's and optax's, so they are spelled out:
glorot-uniform kernels (Flax: lecun-normal), zero biases, Adam learning rate 1e-3 and epsilon 1e-7
(optax: 1e-8). The optimizer is optax.adam, which adds epsilon to the square root of the
bias-corrected second moment; Keras adds it to the square root of the raw one, so the same 1e-7
weighs more in Keras early in training. `adam_eps_placement = 'keras'` follows Keras's rule exactly
(experiments/keras_adam.py; tests/test_keras_parity.py checks it step for step against Keras 3).
Do not tune this file toward a number: improvements belong in other configs.

Variants import this file and change a few fields (experiments/best.py, experiments/fast.py);
measured results are in experiments/README.md.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    """The tutorial's hyperparameters; every other config starts from these."""
    config = ml_collections.ConfigDict()

    # Data.
    # 'auto' tries: data_dir (or $MNIST_DATA_DIR) -> a prepared TFDS copy -> a TFDS download
    # when the network answers -> 5,000 real digits packaged with mnist_flax (with a loud warning).
    config.data_source = 'auto'  # One of: auto, idx, tfds, sample.
    config.data_dir = ''  # Directory of the four MNIST IDX files (.gz or not); '' = env var
    # $MNIST_DATA_DIR.
    config.tfds_data_dir = ''  # TFDS data dir; '' = $TFDS_DATA_DIR or ~/tensorflow_datasets.
    config.verify_checksums = True  # Check canonical IDX files against the known MNIST md5 sums.

    # Model (models.CNN).
    config.conv_features = (32, 64)  # Channels of the 3x3 convolutions (1 to 6 of them).
    config.dense_features = 128  # Width of the hidden dense layer.
    config.dropout_rates = (0.25, 0.5)  # After the pool, and after the hidden dense layer.
    config.num_classes = 10
    config.kernel_init = 'glorot_uniform'  # Keras's default (Flax's is lecun_normal).

    # Optimisation.
    config.learning_rate = 1e-3  # Adam step size (Keras's default).
    config.adam_eps = 1e-7  # Keras's default value; optax's is 1e-8.
    config.adam_eps_placement = 'optax'  # Where adam_eps goes: 'optax' (optax.adam: after sqrt
    # of the bias-corrected second moment) or 'keras' (Keras 3: after sqrt of the raw one).
    config.batch_size = 128  # Global batch, split over all devices.
    config.num_epochs = 12
    config.seed = 0  # Initialisation, dropout and shuffling all derive from it.
    config.lr_schedule = 'constant'  # One of: constant, cosine (warmup, then cosine to 0),
    # one_cycle (optax.cosine_onecycle_schedule); learning_rate is the peak.
    config.warmup_epochs = 0.0  # Epochs (may be fractional) of warmup; unused by 'constant'.
    config.label_smoothing = 0.0  # Weight moved from the true class to uniform, in [0, 1).

    # Augmentation (mnist_flax.augment): a random affine warp per training image, on the device.
    # All zero (the tutorial) turns it off.
    config.augment_max_shift = 0.0  # Pixels, uniform in [-x, x] along each axis.
    config.augment_max_rotation = 0.0  # Degrees, uniform in [-x, x].
    config.augment_max_scale = 0.0  # Zoom uniform in [1 - x, 1 + x].

    # Speed. fast_ops and steps_per_dispatch compute the same function (tests pin it; docs/speed.md
    # says where XLA rounds a scan of steps differently in the last bits); compute_dtype does not.
    config.fast_ops = True  # CPU-friendly convolution gradients and pooling (mnist_flax.ops).
    config.compute_dtype = 'float32'  # 'bfloat16' runs the convolutions and matmuls in bf16.
    config.steps_per_dispatch = 0  # Training steps per jitted call (a lax.scan over them); 0 =
    # per backend: 1 on CPU (XLA:CPU runs the step inside a loop far slower), 16 on GPU/TPU. A
    # dispatch never crosses an epoch end, a log line or a checkpoint.
    config.compilation_cache_dir = 'auto'  # JAX's persistent compilation cache, so a second run
    # of a config loads the compiled step instead of compiling it: a directory or gs:// URL
    # (shared by all runs, so not under the workdir); 'auto' = $JAX_COMPILATION_CACHE_DIR, else
    # ~/.cache/mnist_flax/jax; '' = off.

    # Logging and evaluation.
    config.log_every_steps = 100  # Progress line (loss, images/s, ETA) every this many steps.
    config.profile_steps = 0  # Trace this many steps (after 5) for TensorBoard's profile tab,
    # into workdir/plugins/profile/ (`mnist_flax.profiling`; the `profile` extra); 0 = none.
    config.eval_batch_size = 1000  # Test images per evaluation batch; all batches run in one
    # dispatch (lax.map), so this sets only the memory (223 MiB at 1,000 for the tutorial CNN).

    # Checkpoints (workdir/checkpoints/): always at the end of every epoch and on SIGTERM.
    config.checkpoint_every_steps = 0  # Steps; also save every this many steps (0 = epochs only).
    config.checkpoint_keep = 3  # How many of the newest checkpoints to keep (>= 1).
    # A resume on data other than the checkpoint's (its fingerprint differs) is refused unless
    # this is True.
    config.resume_on_other_data = False

    return config
