"""A recipe's data swapped for synthetic volumes, to try a recipe without its data.

`emrun data preview --synthetic` and the `bench data`/`bench train` benchmarks use it; the
volumes themselves are made by ``emrun.synth`` when a source is opened.
"""

from __future__ import annotations

from ..recipe import Recipe
from ..recipe.data import SyntheticSource


def with_synthetic_sources(recipe: Recipe) -> Recipe:
    """The recipe with every source replaced by a synthetic volume large enough to sample."""
    pz, py, px = recipe.train.patch
    shape = (max(3 * pz, 64), max(2 * py, 512), max(2 * px, 512))
    sources = {f"synthetic_{i}": SyntheticSource(shape=shape, seed=i, weight=1.0)
               for i in range(len(recipe.data.sources))}
    data = recipe.data.model_copy(update={"sources": sources, "validation": {}})
    return recipe.model_copy(update={"data": data})
