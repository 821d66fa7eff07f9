"""emrun: declarative, recipe-driven training and chunked inference for 3D EM segmentation."""

__version__ = "0.1.0"
