"""Augmentation pipeline with spec propagation.

Before a sample is read, each augmentation, in reverse order, draws its random parameters
for the requested output and says how large an input it needs (``prepare`` returns a
``Step`` with ``in_shape``). The sampler reads that enlarged patch once; the steps then run
forward, each cropping back to its output shape, so the last one yields exactly the patch.
Implementations register builders with ``emrun.registry.augmentations``.
"""

from . import combine, geometric, photometric  # noqa: F401  (importing registers them)
from .base import Augmentation, Context, Pipeline, Sample, Step, identity

__all__ = ["Augmentation", "Context", "Pipeline", "Sample", "Step", "identity"]
