"""mnist_flax: the Keras-tutorial MNIST CNN in JAX/Flax Linen, on CPU, GPU and TPU. Importing it
changes nothing process-wide; the entry points set up what their process needs, first thing."""


def __getattr__(name: str) -> str:
    """`__version__`, from the installed distribution's metadata (setup.cfg's, so the two never
    disagree), read on first use: importing the package stays instant, so an entry point's Ctrl-C
    guard (run/startup.py) is in place a moment after the process starts."""
    if name != "__version__":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from importlib import metadata

    try:
        version = metadata.version("mnist_flax")
    except metadata.PackageNotFoundError:  # A source tree that was never installed.
        version = "0+unknown"
    globals()["__version__"] = version
    return version
