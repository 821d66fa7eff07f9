"""Segmentation at connectome scale: affinities on disk -> neurons, in steps that each run
block by block on many workers (local processes or daisy) and resume after any kill.

1. fragments (``fragments``): a watershed of each block (seeded by the maxima of the
   distance to the boundary; mutex watershed as an option), ids unique across blocks by
   construction, written to ``OUT.zarr/fragments``;
2. graph (``rag``, ``graphdb``): per block, the fragments (size, centre) and the affinity
   statistics of every pair of touching fragments (sum, count, histogram; across the block's
   faces too), written to a graph database: SQLite next to the output, or PostgreSQL;
3. agglomeration (``agglomerate``): hierarchical merging by mean or quantile affinity, as
   waterz does on voxels, of the whole graph in one process (``global``), or ``blockwise``:
   each block merges the graph around it to the end and stores when the ends of its edges
   were joined, and one process joins the edges below each threshold; either way one pass
   gives the lookup table fragment -> segment of every threshold;
4. relabel: each block of the fragments through a threshold's table into its segmentation.

``job`` holds what every worker needs and the done-markers; ``steps`` is a worker's work on
one block; ``schedulers`` hands blocks to workers; ``command`` is `emrun segment
--scheduler`'s entry.
"""
