"""worldswitch's version: a leaf, so that any part may name it without importing the package's face."""

__version__ = "0.1.0"
