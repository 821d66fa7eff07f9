"""Scoring against the truth's connected pieces (`--connected-truth`), in memory and streamed."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from emrun.cli import app
from emrun.evaluate import count_pairs, score, score_volumes
from emrun.evaluate.contingency import TableAccumulator
from emrun.evaluate.pieces import PieceLabeller, connected_pieces
from emrun.evaluate.volumes import slabs
from emrun.io import open_volume, write_volume

runner = CliRunner()

# Object 1 appears twice, cut apart by object 2 (as when a neurite leaves a crop and comes
# back); the segmentation gives each visible piece its own id.
TRUTH = np.array([[[1, 1, 2, 2, 1, 1]]] * 2, np.uint32)
PIECES = np.array([[[5, 5, 6, 6, 7, 7]]] * 2, np.uint32)


def test_pieces_of_one_id_become_separate_objects():
    assert score(PIECES, TRUTH).arand > 0.2  # as labelled: object 1 looks split
    connected = score(PIECES, TRUTH, connected_truth=True)
    assert connected.arand == 0.0 and connected.voi_split == 0.0
    assert connected.truth_objects == 3
    # a segmentation joining the two pieces now merges two objects
    joined = np.where(PIECES == 7, 5, PIECES)
    assert score(joined, TRUTH).arand == 0.0
    assert score(joined, TRUTH, connected_truth=True).voi_merge > 0


def test_pieces_are_face_connected_and_zero_stays_unlabelled():
    truth = np.zeros((1, 3, 3), np.uint16)
    truth[0, 0, 0] = truth[0, 1, 1] = 4  # diagonal neighbours: two pieces
    truth[0, 2, 2] = 9
    pieces = connected_pieces(truth)
    assert pieces.dtype == np.uint64
    assert pieces[0, 0, 0] != pieces[0, 1, 1] and (pieces[truth == 0] == 0).all()
    assert len(np.unique(pieces[truth != 0])) == 3


def _u_shape() -> np.ndarray:
    """Two pillars of id 3 along z joined only in the last section, beside id 8."""
    truth = np.full((6, 5, 7), 8, np.uint32)
    truth[:, 1, 1] = truth[:, 1, 5] = 3
    truth[-1, 1, 1:6] = 3
    truth[:, 3, :] = 0
    return truth


@pytest.mark.parametrize("slab_voxels", [1, 7, 40, 10**9])
def test_streamed_pieces_equal_in_memory_for_any_slab(tmp_path, slab_voxels):
    rng = np.random.default_rng(3)
    coarse = rng.integers(0, 6, (3, 6, 5))  # few ids in many blocks: many disconnected pieces
    truth = coarse.repeat(3, 0).repeat(4, 1).repeat(4, 2).astype(np.uint32)
    truth[:6, :5, :7] = _u_shape()
    seg = rng.integers(1, 9, truth.shape).astype(np.uint64)
    seg[connected_pieces(truth) % 2 == 0] = 20  # correlated with the pieces
    mask = (rng.random(truth.shape) < 0.9).astype(np.uint8)
    write_volume(tmp_path / "v.zarr", "truth", truth, chunks=(2, 5, 8))
    write_volume(tmp_path / "v.zarr", "seg", seg, chunks=(3, 4, 8))
    np.save(tmp_path / "mask.npy", mask)
    streamed = score_volumes(open_volume(tmp_path / "v.zarr/seg"),
                             open_volume(tmp_path / "v.zarr/truth"),
                             open_volume(tmp_path / "mask.npy"), min_overlap=2,
                             slab_voxels=slab_voxels, connected_truth=True)
    expected = score(seg, truth, mask, min_overlap=2, connected_truth=True)
    assert streamed == expected  # pieces numbered by first voxel: the same table, exactly
    assert expected.truth_objects > len(np.unique(truth[truth > 0]))
    assert expected != score(seg, truth, mask, min_overlap=2)


def test_joined_pieces_are_numbered_by_first_voxel_like_the_whole_volume(tmp_path):
    rng = np.random.default_rng(4)
    truth = rng.integers(0, 4, (6, 9, 8)).repeat(2, 1).astype(np.uint16)
    pieces = connected_pieces(truth).ravel()
    firsts = [np.flatnonzero(pieces == k)[0] for k in range(1, int(pieces.max()) + 1)]
    assert firsts == sorted(firsts)  # cc3d's numbering, which the joined table follows
    write_volume(tmp_path / "v.zarr", "truth", truth, chunks=(2, 3, 8))
    volumes = [open_volume(tmp_path / "v.zarr/truth")]
    labeller = PieceLabeller()
    table = TableAccumulator()
    for roi in slabs(volumes, 50):
        slab = volumes[0].read(roi)
        table.add(count_pairs(slab, labeller.label(roi, slab)))
    joined = labeller.join(table.result())
    whole = count_pairs(truth, connected_pieces(truth))
    for field in ("seg", "truth", "counts"):
        np.testing.assert_array_equal(getattr(joined, field), getattr(whole, field))


def test_u_shape_joined_in_its_last_section_is_one_piece_when_streamed(tmp_path):
    truth = _u_shape()
    seg = np.where(truth == 3, 1, 2).astype(np.uint32)
    write_volume(tmp_path / "v.zarr", "truth", truth, chunks=(1, 2, 7))
    write_volume(tmp_path / "v.zarr", "seg", seg, chunks=(1, 2, 7))
    scores = score_volumes(open_volume(tmp_path / "v.zarr/seg"),
                           open_volume(tmp_path / "v.zarr/truth"), slab_voxels=1,
                           connected_truth=True)
    assert scores.truth_objects == 3  # the U, and id 8 on either side of the 0 row
    assert scores.voi_split == 0.0


def test_cli_connected_truth(tmp_path):
    write_volume(tmp_path / "v.zarr", "truth", TRUTH)
    write_volume(tmp_path / "v.zarr", "seg", PIECES)
    args = ["evaluate", str(tmp_path / "v.zarr/seg"), str(tmp_path / "v.zarr/truth"), "--json"]
    plain = json.loads(runner.invoke(app, args).stdout.strip().splitlines()[-1])
    result = runner.invoke(app, [*args, "--connected-truth"])
    assert result.exit_code == 0, result.output
    line = json.loads(result.stdout.strip().splitlines()[-1])
    assert plain["arand"] > 0.2 and not plain["connected_truth"]
    assert line["arand"] == 0.0 and line["connected_truth"] and line["truth_objects"] == 3
    assert "connected pieces" in result.stderr
    binary = runner.invoke(app, [*args, "--connected-truth", "--binary"])
    assert binary.exit_code == 2 and "drop it with --binary" in binary.output
