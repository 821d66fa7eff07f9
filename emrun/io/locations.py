"""What a volume path names before anything is opened: a URL, a precomputed volume.

Kept free of tensorstore, so `open_volume` can tell which backend a path needs (and say
which extra is missing) without importing it.
"""

from __future__ import annotations

import json
import os

REMOTE_SCHEMES = ("http://", "https://", "gs://", "s3://")
PRECOMPUTED_PREFIX = "precomputed://"
MAX_INFO_BYTES = 16 << 20  # a precomputed info is small; a larger file named info is not one


def is_url(path: str) -> bool:
    return path.lower().startswith(REMOTE_SCHEMES)


def strip_precomputed(path: str) -> str:
    """The location inside neuroglancer's "precomputed://LOCATION" (or `path` itself)."""
    return path[len(PRECOMPUTED_PREFIX):] if path.lower().startswith(PRECOMPUTED_PREFIX) \
        else path


def local_precomputed(path: str) -> tuple[str, str | None] | None:
    """(root, scale key) when `path` is a local precomputed volume (a folder whose `info`
    lists scales) or one of its scales (`root/KEY`, a key the info lists, or a missing one:
    the opener then lists the scales there are); else None."""
    path = strip_precomputed(path).rstrip("/") or path
    if precomputed_scale_keys(path) is not None:
        return path, None
    parent, key = os.path.split(path)
    keys = precomputed_scale_keys(parent or ".") if key and not os.path.isfile(path) else None
    if keys is None or (key not in keys and os.path.exists(path)):
        return None
    return parent or ".", key


def precomputed_scale_keys(folder: str) -> list[str] | None:
    """The scale keys of the precomputed info in a local folder; None if it has none."""
    info = os.path.join(folder, "info")
    try:
        if not os.path.isfile(info) or os.path.getsize(info) > MAX_INFO_BYTES:
            return None
        with open(info, encoding="utf-8") as f:
            scales = json.load(f).get("scales")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(scales, list):
        return None
    return [str(s.get("key", "")).strip("/") for s in scales if isinstance(s, dict)]
