"""mnist_flax: the Keras-tutorial MNIST CNN in JAX/Flax Linen, on CPU, GPU and TPU.

Importing the package tunes glibc's malloc for XLA:CPU (see ops.tune_host_allocator): it only
works before JAX's first computation, and this is the earliest point every entry point shares.
"""

from mnist_flax import ops

ops.tune_host_allocator()
