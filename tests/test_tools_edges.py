"""The small tools at their edges: `data synth` refusing a store it would overwrite, `bench
segment` leaving no folder it made, `view` of a time series whose t axis is translated or
scaled, `view` of N5 at a URL, and what a new user's bad arguments get."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import zarr
from test_remote_volumes import served
from typer.testing import CliRunner

from emrun.bench import segment
from emrun.cli import app
from emrun.errors import UserError
from emrun.io import VolumeError, write_volume
from emrun.io.write import check_new_volume

runner = CliRunner()
CLIENT = "https://neuroglancer.example.org/"
IMAGE = np.random.default_rng(3).integers(0, 255, (8, 16, 16), dtype=np.uint8)


def error_lines(result) -> list[str]:
    return [line for line in result.stderr.strip().splitlines() if line.strip()]


# ============================================ 1. a taken volume: only the command's options


def test_synth_into_a_store_it_wrote_names_no_option_synth_lacks(tmp_path: Path) -> None:
    """`data synth` has no --name; it was told to 'give another --name'."""
    out = str(tmp_path / "s.zarr")
    first = runner.invoke(app, ["data", "synth", out, "--shape", "4", "16", "16"])
    assert first.exit_code == 0, first.output
    again = runner.invoke(app, ["data", "synth", out, "--shape", "4", "16", "16"])
    assert again.exit_code == 2, again.output
    (line,) = error_lines(again)
    assert "already exists" in line and "--name" not in line
    assert "give another output store, or --overwrite" in line


def test_convert_over_a_taken_name_names_its_own_options(tmp_path: Path) -> None:
    """`data convert` offers --name and --overwrite, and says so."""
    source, out = tmp_path / "in.zarr", str(tmp_path / "out.zarr")
    write_volume(source, "image", IMAGE)
    for expected in (0, 2):
        result = runner.invoke(app, ["data", "convert", f"{source}/image", out])
        assert result.exit_code == expected, result.output
    (line,) = error_lines(result)
    assert "give another --name or output store, or --overwrite to replace it" in line


def test_a_taken_volume_is_refused_with_the_caller_s_advice(tmp_path: Path) -> None:
    store = tmp_path / "v.zarr"
    write_volume(store, "image", IMAGE)
    with pytest.raises(VolumeError, match=r"exists; not replaced: give another output store$"):
        check_new_volume(store, "image", label=False)
    with pytest.raises(VolumeError, match=r"not replaced: use --overwrite$"):
        check_new_volume(store, "image", label=False, taken="use --overwrite")
    with pytest.raises(VolumeError, match=r"not replaced: pick --name$"):
        write_volume(store, "image", IMAGE, taken="pick --name")


@pytest.mark.parametrize("taken_by", ["image", "file"])
def test_synth_over_a_name_it_cannot_replace_names_no_option_it_lacks(
        tmp_path: Path, taken_by: str) -> None:
    """A store holding an image named 'mito' (synth's labels name), or a file named 'image':
    synth, which takes no --name, was told to 'choose another name'."""
    out = tmp_path / "s.zarr"
    if taken_by == "image":
        write_volume(out, "mito", IMAGE, label=False)
    else:
        write_volume(out, "other", IMAGE)
        (out / "image").write_text("notes")
    result = runner.invoke(app, ["data", "synth", str(out), "--shape", "4", "16", "16",
                                 "--overwrite"])
    assert result.exit_code == 2, result.output
    (line,) = error_lines(result)
    assert line.endswith("give another output store")
    assert "another name" not in line and "--name" not in line


# ============================================ 2. bench segment: no folder left behind


def _bench(folder: Path) -> object:
    return runner.invoke(app, ["bench", "segment", "--shape", "4", "4", "4", "--block", "2",
                               "2", "2", "--workers", "1", "--folder", str(folder)])


def test_bench_segment_removes_the_folders_it_made_when_it_finishes(tmp_path: Path) -> None:
    result = _bench(tmp_path / "a" / "b")
    assert result.exit_code == 0, result.output
    assert list(tmp_path.iterdir()) == []  # a/ and a/b/ were made by the run: gone
    (tmp_path / "mine").mkdir()
    result = _bench(tmp_path / "mine" / "b")
    assert result.exit_code == 0, result.output
    assert [p.name for p in tmp_path.iterdir()] == ["mine"]  # the user's stays, b goes
    assert list((tmp_path / "mine").iterdir()) == []


def test_bench_segment_keeps_what_others_put_in_a_folder_it_made(tmp_path: Path,
                                                                  monkeypatch) -> None:
    """Removal after a finished run is of empty folders only: a file put there stays."""
    real = segment.make_affinities

    def and_a_note(folder: Path, *args: object) -> str:
        (folder.parent / "note.txt").write_text("kept")
        return real(folder, *args)

    monkeypatch.setattr(segment, "make_affinities", and_a_note)
    result = _bench(tmp_path / "a" / "b")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "a" / "b" / "note.txt").read_text() == "kept"


def test_bench_segment_removes_the_folders_it_made_when_it_fails(tmp_path: Path,
                                                                 monkeypatch) -> None:
    def broken(folder: Path, *args: object) -> str:
        raise RuntimeError("broken")

    monkeypatch.setattr(segment, "make_affinities", broken)
    result = _bench(tmp_path / "a" / "b")
    assert result.exit_code == 1 and "broken" in result.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("where", "says"), [
    ("file", "cannot make a folder there ("),
    ("file/sub", "cannot make a folder there ("),
    ("v.zarr/image/0", "lies inside the volume"),
])
def test_bench_segment_names_a_folder_it_cannot_use_before_making_anything(
        tmp_path: Path, monkeypatch, where: str, says: str) -> None:
    """A folder inside a volume was refused as the run's own temporary store in it
    ('v.zarr/image/0/emrun-bench-segment-x1y2/affs.zarr: lies inside ...')."""
    monkeypatch.setattr(segment, "make_affinities",
                        lambda *a, **k: pytest.fail("affinities generated"))
    (tmp_path / "file").write_text("")
    write_volume(tmp_path / "v.zarr", "image", IMAGE)
    before = sorted(p.name for p in (tmp_path / "v.zarr" / "image" / "0").iterdir())
    result = _bench(tmp_path / where)
    assert result.exit_code == 2, result.output
    (line,) = error_lines(result)
    assert f"--folder {tmp_path / where}: {says}" in line and "emrun-bench" not in line
    assert sorted(p.name for p in (tmp_path / "v.zarr" / "image" / "0").iterdir()) == before


@pytest.mark.parametrize(("shape", "cores", "started"), [
    ((4, 4, 4), 4, 4),  # 8 blocks, 4 cores
    ((2, 2, 4), 4, 2),  # 2 blocks
    ((4, 4, 4), 1, 0),  # one core: in this process
])
def test_the_affinities_are_generated_by_no_more_workers_than_blocks_and_cores(
        tmp_path: Path, monkeypatch, shape: tuple, cores: int, started: int) -> None:
    """`--workers 1000` on 8 blocks spawned 1000 processes to generate them (minutes on two
    cores, for a step that is not even timed)."""
    asked: list[int] = []

    class Pool:
        def __init__(self, workers: int, mp_context: object = None) -> None:
            asked.append(workers)

        def __enter__(self) -> Pool:
            return self

        def __exit__(self, *exc: object) -> None:
            pass

        def map(self, fn, *args):
            return map(fn, *args)

    monkeypatch.setattr(segment, "ProcessPoolExecutor", Pool)
    monkeypatch.setattr(segment, "cpu_cores", lambda: cores)
    path = segment.make_affinities(tmp_path, shape, (2, 2, 2), 1000)
    assert asked == ([started] if started else [])
    assert zarr.open_array(f"{path}/0").shape == (3, *shape)


# ============================================ 3. view: a time series' t translation and scale


SPACE = [{"name": a, "type": "space", "unit": "nanometer"} for a in "zyx"]


def _series(tmp_path: Path, t_scale: float, t_shift: float, unit: str = "second",
            outer: list | None = None) -> str:
    """An OME-Zarr 0.4 image of 4 time points of 4 x 8 x 8 voxels, its t axis of
    ``t_scale`` and ``t_shift`` (and the multiscale's own transforms ``outer``)."""
    group = zarr.open_group(tmp_path / "t.zarr", mode="w", zarr_format=2)
    group.create_array("0", data=np.zeros((4, 4, 8, 8), np.uint8), chunks=(1, 4, 8, 8))
    multiscale = {"version": "0.4", "axes": [{"name": "t", "type": "time", "unit": unit},
                                             *SPACE],
                  "datasets": [{"path": "0", "coordinateTransformations": [
                      {"type": "scale", "scale": [t_scale, 30.0, 6.0, 6.0]},
                      {"type": "translation", "translation": [t_shift, 0.0, 0.0, 0.0]}]}]}
    if outer is not None:
        multiscale["coordinateTransformations"] = outer
    group.attrs["multiscales"] = [multiscale]
    return str(tmp_path / "t.zarr")


def _state(path: str) -> dict:
    from emrun.view import layer_for, neuroglancer_state

    layer = layer_for(path, set())
    return neuroglancer_state([layer], {layer.name: "http://x/0"})


@pytest.mark.parametrize(("t_scale", "t_shift", "expected"), [
    (1.0, 0.0, 0.0),  # neuroglancer centres an OME voxel on its translation, t's too
    (1.0, 120.0, 120.0),  # t starts at 120 s: its first point is at 120 s, not at 0
    (2.0, 10.0, 5.0),  # 2 s apart from 10 s: point 0 is centred on step 5 of 2 s
    (0.5, 0.25, 0.5),  # starting half a step in: point 0 covers steps 0 to 1
])
def test_view_opens_a_time_series_at_its_first_point_where_its_t_axis_places_it(
        tmp_path: Path, t_scale: float, t_shift: float, expected: float) -> None:
    state = _state(_series(tmp_path, t_scale, t_shift))
    assert state["dimensions"]["t"] == [pytest.approx(t_scale), "s"]
    assert state["position"][3] == pytest.approx(expected)


def test_view_takes_the_multiscale_s_own_t_transforms_and_the_unit(tmp_path: Path) -> None:
    """t in ms: dataset scale 10, shift 20; then the multiscale's scale 2 and shift 100: point
    0 at (20 x 2 + 100) ms = 140 ms, steps of 20 ms: centred on step 7."""
    outer = [{"type": "scale", "scale": [2.0, 1.0, 1.0, 1.0]},
             {"type": "translation", "translation": [100.0, 0.0, 0.0, 0.0]}]
    state = _state(_series(tmp_path, 10.0, 20.0, unit="millisecond", outer=outer))
    assert state["dimensions"]["t"] == [pytest.approx(0.02), "s"]
    assert state["position"][3] == pytest.approx(7.0)


def test_neuroglancer_takes_the_translated_time_position(tmp_path: Path) -> None:
    neuroglancer = pytest.importorskip("neuroglancer")
    state = neuroglancer.ViewerState(_state(_series(tmp_path, 2.0, 10.0)))
    assert list(state.dimensions.names) == ["x", "y", "z", "t"]
    assert state.position[3] == pytest.approx(5.0)


# ============================================ 4. view: N5 at a URL, read by neuroglancer


def _pyramid(tmp_path: Path, scales: bool) -> Path:
    from n5_writing import n5_attrs, n5_dataset

    group = tmp_path / "vol.n5" / "em"
    n5_dataset(group / "s0", IMAGE)
    n5_dataset(group / "s1", IMAGE[:, ::2, ::2].copy())
    n5_attrs(group, resolution=[4.0, 4.0, 30.0],
             **({"scales": [[1, 1, 1], [2, 2, 1]]} if scales else
                {"downsamplingFactors": None}))
    return group


def test_view_shows_a_remote_n5_dataset_from_its_url(tmp_path: Path) -> None:
    """It was refused ('serves local N5 containers') though emrun reads it and neuroglancer
    reads n5:// over HTTP: the layer points at the URL, nothing is served from here."""
    from n5_writing import n5_dataset

    from emrun.view import view

    n5_dataset(tmp_path / "vol.n5" / "raw", IMAGE, resolution=[4.0, 4.0, 30.0],
               offset=[8.0, 4.0, 60.0])
    with served(tmp_path) as url:
        shown = view([f"{url}/vol.n5/raw"], client=CLIENT)
        try:
            (layer,) = shown.state["layers"]
            assert layer["name"] == "raw" and layer["type"] == "image"
            assert layer["source"]["url"] == f"n5://{url}/vol.n5/raw"
            dims = layer["source"]["transform"]["outputDimensions"]
            assert dims["z"] == [pytest.approx(30e-9), "m"]
            assert layer["source"]["transform"]["matrix"][2][-1] == 1.5  # z offset - 0.5
            assert shown.server.prefixes == {}
            assert str(shown.layers[0].store) == f"{url}/vol.n5"
        finally:
            shown.close()


@pytest.mark.parametrize(("scales", "inner"), [(True, "em"), (False, "em/s0")])
def test_a_remote_n5_pyramid_is_its_group_when_neuroglancer_finds_the_levels(
        tmp_path: Path, scales: bool, inner: str) -> None:
    """neuroglancer finds a group's levels from its `scales` (it lists the folder else, which
    a web server does not answer): without them the layer is level 0 alone."""
    from emrun.view import view

    _pyramid(tmp_path, scales)
    with served(tmp_path) as url:
        shown = view([f"{url}/vol.n5/em/s1"], client=CLIENT)
        try:
            (layer,) = shown.state["layers"]
            assert layer["source"]["url"] == f"n5://{url}/vol.n5/{inner}"
            dims = layer["source"]["transform"]["outputDimensions"]
            assert dims["x"] == [pytest.approx(4e-9), "m"]  # level 0's, as neuroglancer's
        finally:
            shown.close()


def test_remote_int64_n5_is_refused_in_one_line(tmp_path: Path) -> None:
    """A local container's int64 is served as uint64; a remote one neuroglancer reads as is,
    which it cannot."""
    from n5_writing import n5_dataset

    from emrun.view import view

    n5_dataset(tmp_path / "seg.n5" / "ids", IMAGE.astype(np.int64))
    with served(tmp_path) as url, pytest.raises(UserError, match="int64") as caught:
        view([f"{url}/seg.n5/ids"], client=CLIENT)
    assert "\n" not in str(caught.value)


def test_view_of_a_remote_zarr_says_what_it_shows(tmp_path: Path) -> None:
    """A remote OME-Zarr was told to 'convert it first' as if it were another format."""
    from emrun.view import view

    write_volume(tmp_path / "v.zarr", "image", IMAGE, voxel_size=(30, 4, 4))
    with served(tmp_path) as url, pytest.raises(UserError, match="zarr://URL"):
        view([f"{url}/v.zarr/image"], client=CLIENT)


def test_the_command_prints_a_remote_layer_s_url(tmp_path: Path, monkeypatch) -> None:
    """`emrun view --json` on remote N5: its layer's URL, and the link, then it serves (here
    stopped at once: a Ctrl-C as soon as it catches signals)."""
    import contextlib

    from n5_writing import n5_dataset

    from emrun import subprocesses

    @contextlib.contextmanager
    def stopped_at_once(call, **_):  # type: ignore[no-untyped-def]
        call("SIGINT")
        yield ["SIGINT"]

    n5_dataset(tmp_path / "vol.n5" / "raw", IMAGE)
    with served(tmp_path) as url, monkeypatch.context() as patch:
        patch.setattr(subprocesses, "catching_signals", stopped_at_once)
        result = runner.invoke(app, ["view", f"{url}/vol.n5/raw", "--client", CLIENT,
                                     "--json"])
    assert result.exit_code == 0, result.output
    assert f"raw: image layer from {url}/vol.n5/raw" in result.stderr  # --json: text there
    state = json.loads(result.stdout.strip().splitlines()[-1])["state"]
    assert state["layers"][0]["source"]["url"] == f"n5://{url}/vol.n5/raw"
