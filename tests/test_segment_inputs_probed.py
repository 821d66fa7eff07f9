"""Mistakes in segment's inputs found by probing: each is one clear line, never a secret."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from emrun.errors import UserError
from emrun.segment.affinities import parse_offsets
from emrun.segment.job import open_affinities
from emrun.segment.scale.graphdb import GraphStore


@pytest.mark.parametrize("url", ["postgresql://alice:s3cretPW@[::1/x",
                                 "postgresql://alice:s3cretPW@localhost:abc/x"])
def test_a_database_url_too_malformed_to_parse_keeps_its_password_hidden(url):
    """A URL that parses hid its password; one that did not was echoed whole."""
    with pytest.raises(UserError) as caught:
        GraphStore(url)
    said = str(caught.value)
    assert "s3cretPW" not in said and "alice:***@" in said and "not a database URL" in said


def test_a_driver_emrun_does_not_bring_is_named_with_what_it_does_bring():
    """`postgresql+psycopg2://`: installing emrun[postgres], as the message said, changed
    nothing (it brings psycopg 3)."""
    pytest.importorskip("sqlalchemy")
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("psycopg2 is installed here")
    with pytest.raises(UserError, match=r"the driver psycopg2 is not installed; "
                                        r"emrun\[postgres\] brings psycopg \(3\)"):
        GraphStore("postgresql+psycopg2://alice@localhost:1/x")


def test_offsets_meant_as_json_are_said_to_be_bad_json():
    with pytest.raises(UserError, match=r"^--offsets: .* is not valid JSON \(Expecting"):
        parse_offsets("[[-1,0,0],[0,-1,0],[0,0,-1]", "--offsets")
    assert parse_offsets("-1,0,0 0,-1,0", "--offsets") == ((-1, 0, 0), (0, -1, 0))


def test_empty_affinities_are_refused_not_segmented(tmp_path):
    """Affinities with no sections were 'segmented' into an empty volume (exit 0), where
    evaluate refuses the same volume."""
    store = zarr.open_group(str(tmp_path / "a.zarr"), mode="w")
    store.create_array("affinity", shape=(3, 0, 8, 8), dtype=np.uint8)
    with pytest.raises(UserError, match=r"is empty \(shape \[3, 0, 8, 8\]\): nothing to "
                                        r"segment"):
        open_affinities(str(tmp_path / "a.zarr/affinity"), "-1,0,0 0,-1,0 0,0,-1")


def test_a_sqlite_file_given_as_a_folder_or_in_no_folder_is_said_so(tmp_path):
    """SQLite's own words for both were 'unable to open database file'."""
    with pytest.raises(UserError, match=rf"{tmp_path} is a folder; give a file in it"):
        GraphStore(f"sqlite:///{tmp_path}").create("digest")
    with pytest.raises(UserError, match=rf"the folder {tmp_path / 'none'} does not exist"):
        GraphStore(f"sqlite:///{tmp_path / 'none' / 'graph.db'}").create("digest")
    GraphStore(f"sqlite:///{tmp_path / 'graph.db'}").create("digest")  # a file, a folder


def test_affinities_naming_one_offset_twice_are_refused(tmp_path):
    """Offsets metadata listing [0, 0, -1] twice segmented (exit 0), in memory and in blocks
    differently (adapted Rand error 0.5 apart): two channels cannot be one edge."""
    offsets = "-1,0,0 0,-1,0 0,0,-1 -2,0,0 0,-4,0 0,0,-1"
    store = zarr.open_group(str(tmp_path / "a.zarr"), mode="w")
    store.create_array("affinity", shape=(6, 4, 8, 8), dtype=np.uint8)
    with pytest.raises(UserError, match=r"a\.zarr/affinity: offsets .* name \[0, 0, -1\] more "
                                        r"than once"):
        open_affinities(str(tmp_path / "a.zarr/affinity"), offsets)


def test_values_wrong_in_a_block_name_the_volume(tmp_path):
    """`segment --block` said "affinities: 1200 NaN or infinite values" where the in-memory
    and scaled paths name the volume."""
    from emrun.io import open_volume, write_volume
    from emrun.recipe.run import MutexWatershed
    from emrun.registry import segmenters
    from emrun.segment import segment_into

    affs = np.full((3, 4, 8, 8), 0.9, np.float32)
    affs[:, 1, 2:4, 2:4] = np.nan
    write_volume(tmp_path / "a.zarr", "affinity", affs, channel_axis=True, label=False)
    volume = open_volume(tmp_path / "a.zarr/affinity")
    out = np.zeros((4, 8, 8), np.uint64)
    with pytest.raises(UserError, match=rf"^{tmp_path}/a\.zarr/affinity: \d+ NaN"):
        segment_into(out, volume, ((-1, 0, 0), (0, -1, 0), (0, 0, -1)),
                     segmenters.build(MutexWatershed()), block=(2, 8, 8))


def test_a_recorded_recipes_thresholds_each_get_an_output_in_memory(tmp_path):
    """An `emrun infer` output whose recipe lists waterz thresholds [0.3, 0.6]: in memory
    only the first was run, without a word, where the graph pipeline writes one volume
    each. And --block with that recorded waterz said "--method waterz", never given."""
    pytest.importorskip("waterz")
    from typer.testing import CliRunner

    from emrun.cli import app
    from emrun.io import write_volume

    labels = np.broadcast_to(np.arange(16).reshape(1, 4, 4).repeat(8, 1).repeat(8, 2),
                             (8, 32, 32)) + 1
    offsets = [[-1, 0, 0], [0, -1, 0], [0, 0, -1]]
    affs = np.stack([np.where(labels == np.roll(labels, 1, axis=a), 0.85, 0.15)
                     for a in range(3)]).astype(np.float32)
    write_volume(tmp_path / "rec.zarr", "affinity", affs, channel_axis=True, label=False,
                 attrs={"offsets": offsets})
    group = zarr.open_group(str(tmp_path / "rec.zarr"), mode="r+")
    group.attrs["emrun"] = {**dict(group.attrs.get("emrun", {})), "recipe": {
        "name": "w", "segment": {"type": "waterz", "thresholds": [0.3, 0.6]}}}
    runner = CliRunner()
    done = runner.invoke(app, ["segment", str(tmp_path / "rec.zarr/affinity"),
                               str(tmp_path / "out.zarr"), "--levels", "1"])
    assert done.exit_code == 0, done.output
    assert sorted(p.name for p in (tmp_path / "out.zarr" / "labels").iterdir()
                  if p.is_dir()) == ["segmentation_0.3", "segmentation_0.6"]
    blocked = runner.invoke(app, ["segment", str(tmp_path / "rec.zarr/affinity"),
                                  str(tmp_path / "b.zarr"), "--block", "4", "32", "32"])
    assert blocked.exit_code == 2
    assert "error: waterz (the segmenter of the recipe 'w' recorded in " in blocked.stderr


def test_a_scaled_job_stopped_by_bad_values_says_it_is_kept(tmp_path):
    """NaN in a block stopped the job with a line about the NaN alone; the output already
    held the job, and the same command run again was refused ('use --resume'), with no word
    of it before."""
    from typer.testing import CliRunner

    from emrun.cli import app
    from emrun.io import write_volume

    affs = np.full((3, 32, 128, 128), 0.9, np.float32)
    affs[:, 5:7, 10:20, 10:20] = np.nan  # where the start's sample of the values is not
    write_volume(tmp_path / "a.zarr", "affinity", affs, channel_axis=True, label=False,
                 attrs={"offsets": [[-1, 0, 0], [0, -1, 0], [0, 0, -1]]})
    out = tmp_path / "out.zarr"
    result = CliRunner().invoke(app, ["segment", str(tmp_path / "a.zarr/affinity"), str(out),
                                      "--scheduler", "local", "--workers", "1", "--block", "16",
                                      "64", "64", "--levels", "1"])
    assert result.exit_code == 2, result.output
    line = " ".join(result.stderr.split())
    assert "NaN or infinite values" in line
    assert f"the fragments blocks finished are kept in {out}: once that is fixed, run again " \
           "with --resume" in line
    assert (out / ".emrun-segment").is_dir()
