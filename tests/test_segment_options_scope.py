"""`emrun segment` options that mean something on one path only are refused on the other
(one line, exit 2, nothing written): an explicit --fragments watershed or --agglomeration
global without --scheduler was ignored without a word. A --resume without --mask or
--offsets takes the job's (a job started with them was refused, 'made with another mask'),
says so, and still refuses given other ones; a job's mask that no longer opens is named."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from test_segment import affinities, cells, noisy
from typer.testing import CliRunner

from emrun.cli import app
from emrun.errors import UserError
from emrun.io import open_volume, write_volume
from emrun.segment.request import SegmentRequest
from emrun.segment.scale.command import resumed_inputs
from emrun.segment.scale.graphdb import default_url
from emrun.segment.scale.job import FOLDER, ScaleJob

runner = CliRunner()
NEAREST = ((-1, 0, 0), (0, -1, 0), (0, 0, -1))
OFFSETS_TEXT = "-1,0,0 0,-1,0 0,0,-1"
SHAPE = (8, 48, 48)
SCALE = ("--scheduler", "local", "--workers", "1", "--levels", "1", "--threshold", "0.5",
         "--block", "4", "24", "24")


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """Affinities with no `offsets` attribute (--offsets says them), a mask of the cells but
    one, and another mask."""
    tmp = tmp_path_factory.mktemp("scope")
    truth = cells(SHAPE, n=12, seed=3)
    affs = noisy(affinities(truth, NEAREST), 0.15, seed=1)
    write_volume(tmp / "in.zarr", "affinity", np.round(affs * 255).astype(np.uint8),
                 channel_axis=True)
    write_volume(tmp / "in.zarr", "mask", (truth != 1).astype(np.uint8))
    write_volume(tmp / "in.zarr", "other", (truth != 2).astype(np.uint8))
    return tmp


def _segment(store: Path, out: Path, *extra: str) -> object:
    return runner.invoke(app, ["segment", str(store / "in.zarr/affinity"), str(out), *extra])


# ------------------------------------------------- options of one path given on the other

@pytest.mark.parametrize(("extra", "message"), [
    (["--fragments", "watershed"], "--fragments: only with --scheduler local or daisy"),
    (["--agglomeration", "global"], "--agglomeration: only with --scheduler local or daisy"),
    (["--fragments", "mws", "--db", "sqlite:///x.db"],
     "--db, --fragments: only with --scheduler local or daisy"),
    (["--launch", "srun"], "--launch starts daisy workers; add --scheduler daisy"),
])
def test_pipeline_options_without_scheduler_are_one_line_and_exit_2(store, tmp_path, extra,
                                                                    message):
    out = tmp_path / "one.zarr"
    result = _segment(store, out, "--offsets", OFFSETS_TEXT, "--method", "cc", *extra)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert not out.exists(), "refused before anything is written"


@pytest.mark.parametrize(("extra", "message"), [
    (["--method", "mws"], "not mws; use --method waterz"),
    (["--bias", "0.5"], "--bias is for mws"),
    (["--sweep", "--truth", "in.zarr/mask"], "--sweep runs in memory; drop --scheduler"),
    (["--connected-truth"], "--connected-truth is for --sweep"),
])
def test_one_machine_options_with_scheduler_are_one_line_and_exit_2(store, tmp_path, extra,
                                                                     message):
    """What the graph pipeline does not use is refused with --scheduler, not dropped."""
    out = tmp_path / "scaled.zarr"
    result = _segment(store, out, "--offsets", OFFSETS_TEXT, *SCALE[:4], *extra)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not out.exists(), "refused before anything is written"


def test_an_api_request_without_given_still_refuses_pipeline_values(tmp_path):
    with pytest.raises(UserError, match="--fragments: only with --scheduler"):
        SegmentRequest(affinities="a.zarr/affinity", output=tmp_path / "o.zarr",
                       fragments="mws")
    with pytest.raises(UserError, match="--agglomeration: only with --scheduler"):
        SegmentRequest(affinities="a.zarr/affinity", output=tmp_path / "o.zarr",
                       given=frozenset({"agglomeration"}))


# ------------------------------------------------------------ a resume's mask and offsets

def test_a_resume_without_mask_or_offsets_takes_the_jobs(store, tmp_path):
    """Started with --mask and --offsets (the affinities store none), a plain --resume was
    refused: no offsets (the attribute is missing), then 'made with another mask'."""
    out = tmp_path / "masked.zarr"
    mask = str(store / "in.zarr/mask")
    result = _segment(store, out, *SCALE, "--mask", mask, "--offsets", OFFSETS_TEXT)
    assert result.exit_code == 0, result.output
    first = open_volume(str(out / "segmentation")).read()
    assert not first[open_volume(mask).read() == 0].any()  # the mask was used
    result = _segment(store, out, *SCALE, "--resume")
    assert result.exit_code == 0, result.output
    located = open_volume(mask).location()
    assert ("resuming with the job's --offsets '[[-1,0,0],[0,-1,0],[0,0,-1]]' and --mask "
            f"{located} (as it was started)") in result.output
    assert "relabel: 0 of 8 blocks to do" in result.output  # the job's own work, done
    result = _segment(store, out, *SCALE, "--resume", "--threshold", "0.3")  # not plain
    assert result.exit_code == 0, result.output
    assert "graph: 0 of 8 blocks to do" in result.output
    assert np.array_equal(open_volume(str(out / "segmentation")).read(), first)


def test_a_resume_with_another_mask_or_offsets_is_still_refused(store, tmp_path):
    out = tmp_path / "masked.zarr"
    result = _segment(store, out, *SCALE, "--mask", str(store / "in.zarr/mask"), "--offsets",
                      OFFSETS_TEXT)
    assert result.exit_code == 0, result.output
    result = _segment(store, out, *SCALE, "--resume", "--mask", str(store / "in.zarr/other"))
    assert result.exit_code == 2, result.output
    assert "its fragments were made with another mask" in result.output
    result = _segment(store, out, *SCALE, "--resume", "--offsets", "0,-1,0 -1,0,0 0,0,-1")
    assert result.exit_code == 2, result.output
    assert "its fragments were made with another offsets" in result.output


def test_a_resume_on_affinities_of_another_channel_count_names_the_jobs_input(store,
                                                                             tmp_path):
    """A plain --resume takes the job's offsets; on other affinities with another channel
    count that blamed the offsets ('give one offset per channel'), and giving them led to
    the real refusal only then. It names the input the job was started on."""
    out = tmp_path / "started.zarr"
    result = _segment(store, out, *SCALE, "--offsets", OFFSETS_TEXT)
    assert result.exit_code == 0, result.output
    six = noisy(affinities(cells(SHAPE, n=12, seed=3), (*NEAREST, (-2, 0, 0), (0, -3, 0),
                                                          (0, 0, -3))), 0.15, seed=1)
    write_volume(tmp_path / "six.zarr", "affinity", np.round(six * 255).astype(np.uint8),
                 channel_axis=True)
    result = runner.invoke(app, ["segment", str(tmp_path / "six.zarr/affinity"), str(out),
                                 *SCALE, "--resume"])
    assert result.exit_code == 2, result.output
    assert re.search(r"6 affinity channels, but the job being resumed was started on "
                     r".*in\.zarr/affinity with 3; resume with those affinities",
                     " ".join(result.output.split())), result.output


def _saved(output: Path, mask: str | None) -> ScaleJob:
    """A job saved in ``output`` (its job file is all a resume's inputs read)."""
    job = ScaleJob(affinities="in.zarr/affinity", offsets=NEAREST,
                   output=str(output.resolve()), shape=SHAPE, block=(4, 24, 24),
                   fragments="watershed", thresholds=(0.5,), scoring="mean", min_size=0,
                   db=default_url(output / FOLDER), mask=mask)
    job.save()
    return job


def _inputs(output: Path, **options: object):
    return resumed_inputs(SegmentRequest(affinities="in.zarr/affinity", output=output,
                                         scheduler="local", resume=True, **options))


def test_a_resume_takes_only_what_is_not_given_and_a_new_job_nothing(store, tmp_path):
    mask = str(store / "in.zarr/mask")
    _saved(tmp_path / "o.zarr", mask)
    taken = _inputs(tmp_path / "o.zarr")
    assert taken.mask == mask and taken.offsets == "[[-1, 0, 0], [0, -1, 0], [0, 0, -1]]"
    assert taken.offsets_of == "in.zarr/affinity"  # whose they are, for a mismatch
    given = _inputs(tmp_path / "o.zarr", mask="m.zarr/x", offsets="0,0,-1")
    assert (given.mask, given.offsets, given.offsets_of) == ("m.zarr/x", "0,0,-1", None)
    assert _inputs(tmp_path / "new.zarr") == (None, None, None)


def test_a_jobs_mask_that_no_longer_opens_is_named(tmp_path):
    write_volume(tmp_path / "m.zarr", "mask", np.ones(SHAPE, np.uint8))
    mask = open_volume(str(tmp_path / "m.zarr/mask")).location()
    _saved(tmp_path / "o.zarr", mask)
    (tmp_path / "m.zarr").rename(tmp_path / "gone.zarr")
    with pytest.raises(UserError, match=re.escape(
            f"--resume takes the job's --mask {mask}, which does not open now: ")) as caught:
        _inputs(tmp_path / "o.zarr")
    assert "put it back there, or use another output" in str(caught.value)
