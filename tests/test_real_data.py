"""`emrun validate` against the real SNEMI3D volumes (skipped where ../shared/data is absent)."""

from __future__ import annotations

import pytest
from conftest import ROOT
from typer.testing import CliRunner

from emrun.cli import app

SNEMI = ROOT.parent / "shared" / "data" / "snemi3d"
pytestmark = pytest.mark.skipif(not (SNEMI / "train-input.tif").exists(),
                                reason="../shared/data/snemi3d is absent")


def _overrides(image: str, labels: str) -> list[str]:
    args = []
    for group, name in (("sources", "snemi3d"), ("validation", "snemi3d_val")):
        args += ["-o", f"data.{group}.{name}.image={image}",
                 "-o", f"data.{group}.{name}.labels={labels}"]
    return args


def test_snemi3d_recipe_validates_against_the_real_tiffs():
    result = CliRunner().invoke(app, ["validate", str(ROOT / "recipes" / "snemi3d_aff.yaml"),
                                      *_overrides(str(SNEMI / "train-input.tif"),
                                                  str(SNEMI / "train-labels.tif"))])
    assert result.exit_code == 0, result.output
    assert "70 x 1024 x 1024" in result.output
    assert "uint8" in result.output


def test_mismatched_real_volumes_are_reported():
    fib = ROOT.parent / "shared" / "data" / "fib_medulla" / "labels.tif"
    if not fib.exists():
        pytest.skip("fib_medulla is absent")
    result = CliRunner().invoke(app, ["validate", str(ROOT / "recipes" / "snemi3d_aff.yaml"),
                                      *_overrides(str(SNEMI / "train-input.tif"), str(fib))])
    assert result.exit_code == 2
    assert "has shape [250, 250, 250] but the image" in result.stderr


def test_snemi3d_validation_labels_hold_pieces_joined_only_outside_the_crop():
    """The floor the README quotes: sections 60-69's own connected pieces, a perfect
    segmentation of those sections, against the labels as given."""
    import numpy as np

    from emrun.evaluate import score
    from emrun.evaluate.pieces import connected_pieces
    from emrun.geometry import Roi
    from emrun.io import open_volume

    labels = open_volume(str(SNEMI / "train-labels.tif")).read(Roi((60, 0, 0), (10, 1024, 1024)))
    pieces = connected_pieces(labels)
    assert len(np.unique(labels[labels > 0])) == 223 and int(pieces.max()) == 273
    assert score(pieces, labels).arand == pytest.approx(0.1067, abs=1e-4)
    assert score(pieces, labels, connected_truth=True).arand == 0.0
