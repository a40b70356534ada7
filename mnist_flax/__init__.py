"""mnist_flax: the Keras-tutorial MNIST CNN in JAX/Flax Linen, on CPU, GPU and TPU. Importing it
changes nothing process-wide; the entry points set up what their process needs, first thing."""

from importlib import metadata as _metadata

try:  # The installed distribution's version (setup.cfg's), so the two never disagree.
    __version__ = _metadata.version("mnist_flax")
except _metadata.PackageNotFoundError:  # A source tree that was never installed.
    __version__ = "0+unknown"
