"""rayganx: distributed GAN and CNN training jobs on Ray."""

__version__ = "0.1.0"
