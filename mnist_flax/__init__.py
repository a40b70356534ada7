"""mnist_flax: the Keras-tutorial MNIST CNN in JAX/Flax Linen, on CPU, GPU and TPU."""
