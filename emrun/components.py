"""Connected components of label ids (cc3d), for every integer id.

cc3d raises ``OverflowError`` ("Python int too large") on uint64 ids of 2**63 and above in
arrays with a run along one axis only (a patch or a face one voxel wide). Seen as int64 the
same ids work: equal ids stay equal and 0 stays 0, without a copy.
"""

from __future__ import annotations

import numpy as np


def cc3d_ids(labels: np.ndarray) -> np.ndarray:
    """``labels`` in a form cc3d takes for any id: uint64 viewed as int64 (no copy), the
    rest as they are."""
    return labels.view(np.int64) if labels.dtype == np.uint64 else labels


def components(labels: np.ndarray, connectivity: int, **options) -> np.ndarray:
    """cc3d's connected components of equal non-zero ids (``options``: cc3d's own, e.g.
    ``return_N``, ``out_dtype``), numbered 1..K in the order of their first voxels."""
    import cc3d

    return cc3d.connected_components(cc3d_ids(labels), connectivity=connectivity, **options)
