"""cnnlab: learn, train, inspect and ship convolutional neural networks that classify images."""

__version__ = "0.1.0"
