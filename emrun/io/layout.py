"""Where each volume lives in an emrun store, and the store root that OME-Zarr readers open.

    OUT.zarr/                 root: an OME-Zarr image naming the primary image's levels
      affinity/               image group: levels 0, 1, ... (`OUT.zarr/affinity`)
      lsd/                    another image group
      labels/                 OME labels group: ome.labels = ["segmentation", ...]
        segmentation/         image group with `image-label` (`OUT.zarr/segmentation`)

Images live at `STORE/NAME`; segmentations and labels at `STORE/labels/NAME`, where the
OME-Zarr spec puts the labels of an image (`open_volume("STORE/NAME")` finds them there, so
the short path still works). The spec has no collection of images, so the root is made the
store's *primary* image: its multiscales name the primary image's arrays by path
(`affinity/0`, `affinity/1`, ...; no data is copied), which makes the root valid for
ome-zarr-models and lets ome-zarr-py, napari and neuroglancer open the store at its root
with the labels found under it. The primary image is the one already named, else the first
image group by name, else (a store of segmentations only) the first label, whose
`image-label` the root then carries too. The other images open by their own paths.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

LABELS = "labels"  # the OME labels group at the store's root
PARTIAL_SUFFIX = ".partial"  # a volume being written (emrun.io.write); not yet a volume


def volume_dir(store: str | os.PathLike[str], name: str, label: bool) -> Path:
    """The folder of volume `name`: `STORE/NAME`, or `STORE/labels/NAME` for a label."""
    return Path(store) / LABELS / name if label else Path(store) / name


def group_attrs(folder: Path) -> dict[str, Any] | None:
    """A zarr v3 group's attributes, None when `folder` holds no group."""
    try:
        doc = json.loads((folder / "zarr.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or doc.get("node_type") != "group":
        return None
    attrs = doc.get("attributes")
    return attrs if isinstance(attrs, dict) else {}


def _write_attrs(folder: Path, attrs: dict[str, Any]) -> None:
    """Replace a group's attributes through zarr (one metadata document, rewritten)."""
    import zarr

    group = zarr.open_group(str(folder), mode="r+")
    group.attrs.put(attrs)


def _images(folder: Path) -> list[str]:
    """Names of the finished OME-Zarr image groups directly inside `folder`, sorted."""
    if not folder.is_dir():
        return []
    found = []
    for child in sorted(folder.iterdir()):
        if child.name.endswith(PARTIAL_SUFFIX) or child.name.startswith("."):
            continue
        attrs = group_attrs(child)
        if attrs is not None and isinstance(attrs.get("ome"), dict) and \
                attrs["ome"].get("multiscales"):
            found.append(child.name)
    return found


def refresh_root(store: str | os.PathLike[str]) -> None:
    """Rewrite the store root's OME metadata and the labels group's list from what the
    store holds; other root attributes (e.g. inference's provenance) are kept. The list
    names the segmentations with as many levels as the root's image (OME-Zarr asks that
    of an image's labels, and ome-zarr-models refused the root otherwise); the others
    still open by their names (`emrun.io.zarr_volume`)."""
    root = Path(store)
    root_attrs = group_attrs(root)
    if root_attrs is None:
        return
    labels_dir = root / LABELS
    labels = _images(labels_dir)
    candidates = _images(root) + [f"{LABELS}/{n}" for n in labels]
    primary = _primary(root_attrs, candidates)
    if primary is not None:  # OME-Zarr: an image's labels have as many levels as it has
        levels = level_count(root / primary)
        labels = [n for n in labels if level_count(labels_dir / n) == levels]
    label_attrs = group_attrs(labels_dir)
    if label_attrs is not None and "multiscales" not in (label_attrs.get("ome") or {}):
        listed = {**label_attrs, "ome": {"version": "0.5", "labels": labels}}
        if listed != label_attrs:  # written only when it changes: every writer refreshes
            _write_attrs(labels_dir, listed)
    attrs = {k: v for k, v in root_attrs.items() if k != "ome"}
    if primary is not None:
        source = group_attrs(root / primary) or {}
        ome = json.loads(json.dumps(source["ome"]))
        for multiscale in ome["multiscales"]:
            for dataset in multiscale.get("datasets", ()):
                dataset["path"] = f"{primary}/{dataset['path']}"
        if "image-label" in ome:
            ome["image-label"] = {k: v for k, v in ome["image-label"].items() if k != "source"}
        attrs["ome"] = ome
    if attrs != root_attrs:
        _write_attrs(root, attrs)


def level_count(folder: Path) -> int:
    """How many levels an image group's first multiscale names."""
    try:
        return len((group_attrs(folder) or {})["ome"]["multiscales"][0]["datasets"])
    except (KeyError, IndexError, TypeError):
        return 0


def _primary(root_attrs: dict[str, Any], candidates: list[str]) -> str | None:
    """The image the root already names, if still there; else the first candidate."""
    try:
        named = root_attrs["ome"]["multiscales"][0]["datasets"][0]["path"].rpartition("/")[0]
    except (KeyError, IndexError, TypeError, AttributeError):
        named = None
    if named in candidates:
        return named
    return candidates[0] if candidates else None
