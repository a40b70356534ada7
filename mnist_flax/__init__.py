"""mnist_flax: the Keras-tutorial MNIST CNN in JAX/Flax Linen, on CPU, GPU and TPU.

Importing it (or any module in it) changes nothing process-wide; the entry points (main, sweep,
predict, the benchmarks) set up what their process needs first thing.
"""
