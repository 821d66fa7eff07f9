"""Reference probe of writes killed part-way (SIGKILL, as the out-of-memory killer does) and
what the next command makes of them: `data convert`, `data synth`, `segment` (in memory,
block by block, and at scale) and `emrun.atomic`.

Each test kills a real `python -m emrun ...` child at one moment (a tiny wrapper counts the
calls of one of emrun's functions and kills its own process after, or before, the N-th),
then checks what the README's "Failures and interruptions" promises against the obvious
references: the same command run to completion in another folder (every voxel of every
level, the OME metadata), and checksums of every file a store held before the kill."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import zarr

TIMEOUT = 120

KILLER = textwrap.dedent("""
    import importlib, os, signal, sys
    module, name, n, when = sys.argv[1:5]
    target = importlib.import_module(module)
    real, calls = getattr(target, name), [0]
    def wrapped(*args, **kwargs):
        calls[0] += 1
        if when == "before" and calls[0] == int(n):
            os.kill(os.getpid(), signal.SIGKILL)
        out = real(*args, **kwargs)
        if when == "after" and calls[0] == int(n):
            os.kill(os.getpid(), signal.SIGKILL)
        return out
    setattr(target, name, wrapped)
    sys.argv = ["emrun", *sys.argv[5:]]
    from emrun.cli import main
    main()
""")


class Done:
    """A command's exit status and what it said (stdout and stderr together)."""

    def __init__(self, returncode: int, stderr: str) -> None:
        self.returncode, self.stderr = returncode, stderr


def emrun(*args: object) -> Done:
    """`emrun ARGS` in this process (the runs nothing kills: a child costs its imports)."""
    from typer.testing import CliRunner

    from emrun.cli import app

    result = CliRunner().invoke(app, [str(a) for a in args])
    return Done(result.exit_code, result.output)


def killed(at: str, *args: object, when: str = "after") -> None:
    """`emrun ARGS` killed with SIGKILL at ``at`` ("module:function:N"): after (or before)
    the N-th call of that function."""
    module, name, n = at.split(":")
    done = subprocess.run([sys.executable, "-c", KILLER, module, name, n, when,
                           *map(str, args)], capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == -signal.SIGKILL, (done.returncode, done.stderr[-2000:])


def digest(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (relative path: sha256)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def volume_folder(store: Path, name: str) -> Path:
    """Where volume ``name`` lies in an emrun store (an image, else a label)."""
    image = store / name
    if (image / "zarr.json").is_file() and "multiscales" in group_attrs(image).get("ome", {}):
        return image
    return store / "labels" / name


def group_attrs(folder: Path) -> dict:
    attrs = json.loads((folder / "zarr.json").read_text())["attributes"]
    attrs.pop("emrun-pyramid", None)  # its stamps hold file modification times
    return attrs


def assert_same_volume(store: Path, reference: Path, name: str) -> None:
    """Volume ``name`` of ``store`` is the reference's: every level, every voxel, and the
    image group's OME metadata."""
    mine, theirs = volume_folder(store, name), volume_folder(reference, name)
    levels = sorted(p.name for p in theirs.iterdir() if p.name.isdigit())
    assert levels and sorted(p.name for p in mine.iterdir() if p.name.isdigit()) == levels
    for level in levels:
        a = zarr.open_array(str(mine / level), mode="r")
        b = zarr.open_array(str(theirs / level), mode="r")
        assert (a.shape, a.dtype, a.chunks) == (b.shape, b.dtype, b.chunks), (name, level)
        np.testing.assert_array_equal(a[...], b[...], err_msg=f"{name}/{level}")
    assert group_attrs(mine)["ome"] == group_attrs(theirs)["ome"]


def leftovers(store: Path) -> list[str]:
    """What a killed write may leave that is no user's content: volumes being written
    (`NAME.partial`), records of volumes being added, temporaries."""
    return sorted(str(p.relative_to(store)) for p in store.rglob("*")
                  if p.name.endswith(".partial") or "adding" in p.name or p.name.endswith(".tmp"))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp_path = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(7)
    found = {"image": tmp_path / "image.npy", "image2": tmp_path / "image2.npy",
             "ids": tmp_path / "ids.npy"}
    np.save(found["image"], rng.integers(0, 256, (20, 40, 40), dtype=np.uint8))
    np.save(found["image2"], rng.integers(0, 256, (20, 40, 40), dtype=np.uint8))
    np.save(found["ids"], rng.integers(0, 6, (20, 40, 40)).astype(np.uint32))
    return found


CONVERT = ("--chunks", "4", "16", "16", "--levels", "2")


# --- data convert ---------------------------------------------------------------------


@pytest.mark.parametrize("at", ["emrun.io.convert:write_by_chunk:1",
                                "emrun.io.convert:write_by_chunk:3",
                                "emrun.io.write:write_level:1"])
def test_convert_killed_is_refused_by_readers_and_the_rerun_equals_a_straight_run(
        tmp_path, inputs, at):
    """Killed in its slabs or in its pyramid: no volume under the name (a reader is refused
    in one line, exit 2), and the same command finishes it as if it had never been cut."""
    out, ref = tmp_path / "k.zarr", tmp_path / "ref.zarr"
    assert emrun("data", "convert", inputs["image"], ref, *CONVERT).returncode == 0
    killed(at, "data", "convert", inputs["image"], out, *CONVERT)
    assert not (out / "image").exists()
    read = emrun("data", "convert", out / "image", tmp_path / "copy.zarr")
    assert read.returncode == 2 and "Traceback" not in read.stderr, read.stderr
    assert "image" in read.stderr and not (tmp_path / "copy.zarr" / "image").exists()
    again = emrun("data", "convert", inputs["image"], out, *CONVERT)
    assert again.returncode == 0, again.stderr
    assert_same_volume(out, ref, "image")
    assert group_attrs(out) == group_attrs(ref)  # the root names the image as a straight run's
    assert leftovers(out) == []


def test_convert_killed_into_a_store_keeps_its_volumes_byte_for_byte(tmp_path, inputs):
    """Adding a segmentation to a store holding an image: the image's files are untouched by
    the kill and by the rerun, which ends as a straight run into a copy of the store."""
    out, ref = tmp_path / "s.zarr", tmp_path / "ref.zarr"
    for store in (out, ref):
        assert emrun("data", "convert", inputs["image"], store, *CONVERT).returncode == 0
    before = digest(out / "image")
    assert emrun("data", "convert", inputs["ids"], ref, *CONVERT).returncode == 0
    killed("emrun.io.convert:write_by_chunk:2", "data", "convert", inputs["ids"], out, *CONVERT)
    assert digest(out / "image") == before
    assert emrun("data", "convert", inputs["ids"], out, *CONVERT).returncode == 0
    assert digest(out / "image") == before
    assert_same_volume(out, ref, "labels")
    assert group_attrs(out) == group_attrs(ref)
    assert group_attrs(out / "labels") == group_attrs(ref / "labels")


@pytest.mark.parametrize("at", ["emrun.io.convert:write_by_chunk:2",
                                "emrun.io.write:write_level:1"])
def test_convert_overwrite_killed_keeps_the_old_volume_whole(tmp_path, inputs, at):
    """--overwrite killed before its new volume is complete: the old one reads as before,
    byte for byte; the rerun replaces it with exactly the new data."""
    out, ref = tmp_path / "s.zarr", tmp_path / "ref.zarr"
    assert emrun("data", "convert", inputs["image"], out, *CONVERT).returncode == 0
    assert emrun("data", "convert", inputs["image2"], ref, *CONVERT).returncode == 0
    before = digest(out / "image")
    killed(at, "data", "convert", inputs["image2"], out, *CONVERT, "--overwrite")
    assert digest(out / "image") == before
    from emrun.io import open_volume

    np.testing.assert_array_equal(open_volume(out / "image").read(), np.load(inputs["image"]))
    again = emrun("data", "convert", inputs["image2"], out, *CONVERT, "--overwrite")
    assert again.returncode == 0, again.stderr
    assert_same_volume(out, ref, "image")
    assert leftovers(out) == []


@pytest.mark.parametrize("command", ["convert", "synth"])
def test_the_next_writer_of_a_store_leaves_nothing_of_a_killed_write(tmp_path, inputs,
                                                                      command):
    """A convert killed in its slabs, or a synth killed in its second volume (labels), then
    another volume converted into the store: the store holds what it held plus the new
    volume, as adding.undo_killed promises ('the store is as it was'); it kept the killed
    write's half volume (its level 0 written: as large as the data) for good."""
    out = tmp_path / "s.zarr"
    assert emrun("data", "convert", inputs["image"], out, "--name", "raw", *CONVERT
                 ).returncode == 0
    if command == "convert":
        killed("emrun.io.convert:write_by_chunk:3", "data", "convert", inputs["ids"], out,
               *CONVERT)
    else:
        killed("emrun.io.write:build_pyramid:2", "data", "synth", out, "--shape", "8", "64",
               "64", "--levels", "2")  # labels' pyramid: level 0 is all in labels.partial
    assert emrun("data", "convert", inputs["image2"], out, "--name", "other", *CONVERT
                 ).returncode == 0
    assert leftovers(out) == []


def test_convert_killed_after_its_rename_is_whole_and_its_rerun_is_one_line(tmp_path,
                                                                           inputs):
    """Killed between renaming the finished volume into place and rewriting the root's OME
    metadata: the volume is complete under its name (every voxel, every level), and the
    rerun is refused in one line, exit 2."""
    out, ref = tmp_path / "k.zarr", tmp_path / "ref.zarr"
    assert emrun("data", "convert", inputs["image"], ref, *CONVERT).returncode == 0
    killed("emrun.io.write:_commit:1", "data", "convert", inputs["image"], out, *CONVERT)
    assert_same_volume(out, ref, "image")
    again = emrun("data", "convert", inputs["image"], out, *CONVERT)
    assert again.returncode == 2 and "already exists" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1
    assert_same_volume(out, ref, "image")


def test_a_root_left_stale_by_a_kill_is_repaired_by_the_next_command(tmp_path, inputs):
    out, ref = tmp_path / "k.zarr", tmp_path / "ref.zarr"
    assert emrun("data", "convert", inputs["image"], ref, *CONVERT).returncode == 0
    killed("emrun.io.write:_commit:1", "data", "convert", inputs["image"], out, *CONVERT)
    emrun("data", "convert", inputs["image"], out, *CONVERT)  # refused: 'already exists'
    assert group_attrs(out) == group_attrs(ref)  # stayed {}: no OME image at the root


# --- data synth: adding volumes to a store that holds others -----------------------------


SYNTH = ("--shape", "8", "64", "64", "--levels", "2")
SYNTH_NAMES = ("image", "labels", "mito", "synapse")


@pytest.mark.parametrize("at", ["emrun.io.write:write_volume:1",
                                "emrun.io.write:write_volume:3",
                                "emrun.io.write:build_pyramid:2",
                                "emrun.io.write:write_volume:4"])
def test_synth_killed_while_adding_keeps_the_stores_volumes_and_reruns_exactly(
        tmp_path, inputs, at):
    """`data synth` into a store holding the user's image and segmentation, killed after
    1, 3 or all 4 of its volumes or inside its second: the user's files are byte for byte
    as before (also after the rerun), the same command finishes (its killed volumes
    undone), and every voxel of every level equals a straight run's."""
    out, ref = tmp_path / "s.zarr", tmp_path / "ref.zarr"
    for name, source in (("raw", inputs["image"]), ("seg", inputs["ids"])):
        assert emrun("data", "convert", source, out, "--name", name, *CONVERT).returncode == 0
    users = {name: digest(volume_folder(out, name)) for name in ("raw", "seg")}
    assert emrun("data", "synth", ref, *SYNTH).returncode == 0
    killed(at, "data", "synth", out, *SYNTH)
    assert {name: digest(volume_folder(out, name)) for name in users} == users
    again = emrun("data", "synth", out, *SYNTH)
    assert again.returncode == 0, again.stderr
    assert {name: digest(volume_folder(out, name)) for name in users} == users
    for name in SYNTH_NAMES:
        assert_same_volume(out, ref, name)
    assert not [p for p in out.rglob("*") if "adding" in p.name]


def test_a_killed_synths_volumes_are_undone_by_another_command_not_the_users(tmp_path,
                                                                            inputs):
    """The record names only what the killed write added: `data convert` of another volume
    into the store removes what the killed synth left (its image, staged), and nothing of
    the user's (their files byte for byte)."""
    out = tmp_path / "s.zarr"
    assert emrun("data", "convert", inputs["image"], out, "--name", "raw", *CONVERT
                 ).returncode == 0
    raw = digest(out / "raw")
    killed("emrun.io.write:write_volume:2", "data", "synth", out, *SYNTH)
    assert (out / "image.partial" / "zarr.json").is_file()  # complete, not in place yet
    assert not (out / "image").exists()  # the synth's volumes go into place together
    assert emrun("data", "convert", inputs["ids"], out, "--name", "seg", *CONVERT
                 ).returncode == 0
    assert digest(out / "raw") == raw
    assert not (out / "image").exists() and not (out / "labels" / "labels").exists()
    from emrun.io import open_volume

    np.testing.assert_array_equal(open_volume(out / "seg").read(), np.load(inputs["ids"]))
    assert json.loads((out / "zarr.json").read_text())["attributes"]["ome"][
        "multiscales"][0]["datasets"][0]["path"] == "raw/0"


# --- segment -------------------------------------------------------------------------


OFFSETS = [[-1, 0, 0], [0, -1, 0], [0, 0, -1]]


@pytest.fixture
def affinities(tmp_path: Path) -> Path:
    from emrun.io.write import write_volume

    rng = np.random.default_rng(3)
    cells = rng.integers(1, 9, (2, 3, 3)).repeat(8, 0).repeat(16, 1).repeat(16, 2)
    affs = np.stack([np.concatenate([np.ones_like(cells[:1]),
                                     cells[1:] == cells[:-1]], axis)
                     if axis == 0 else
                     np.concatenate([np.ones_like(cells[:, :1]) if axis == 1
                                     else np.ones_like(cells[:, :, :1]),
                                     np.diff(cells, axis=axis) == 0], axis)
                     for axis in range(3)]).astype(np.float32)
    affs = np.clip(affs * 0.8 + rng.random(affs.shape) * 0.2, 0, 1)
    store = tmp_path / "a.zarr"
    write_volume(store, "affinity", (affs * 255).astype(np.uint8), channel_axis=True,
                 attrs={"offsets": OFFSETS}, levels=1)
    return store / "affinity"


def test_the_reference_affinities_have_cells(affinities):
    """The fixture is what the segment tests need: edges below 0.3 and above 0.9."""
    from emrun.io import open_volume

    affs = open_volume(affinities).read()
    assert affs.shape == (3, 16, 48, 48)
    assert (affs < 0.3 * 255).mean() > 0.01 and (affs > 0.9 * 255).mean() > 0.4


SEGMENT = ("--method", "cc", "--threshold", "0.3,0.5,0.9", "--levels", "2")


@pytest.mark.parametrize("mode", [(), ("--block", "8", "24", "24")])
def test_segment_of_several_values_killed_after_the_first_is_finished_by_the_same_command(
        tmp_path, affinities, mode):
    """As `data synth` was: the first volume complete, the others absent; the same command
    run again must finish (or undo) the killed write, as write_volumes does for synth."""
    out, ref = tmp_path / "seg.zarr", tmp_path / "ref.zarr"
    assert emrun("segment", affinities, ref, *SEGMENT, *mode).returncode == 0
    at = "emrun.segment.job:_write:1" if not mode else "emrun.segment.job:_blockwise:1"
    killed(at, "segment", affinities, out, *SEGMENT, *mode)
    again = emrun("segment", affinities, out, *SEGMENT, *mode)
    assert again.returncode == 0, again.stderr
    for value in ("0.3", "0.5", "0.9"):
        assert_same_volume(out, ref, f"segmentation_{value}")


def test_segment_of_several_values_killed_after_the_first_leaves_it_whole(tmp_path,
                                                                         affinities):
    """The first value's volume equals a straight run's, the rest are absent, and the
    store's next writer of another name removes it (the write was all or none)."""
    out, ref = tmp_path / "seg.zarr", tmp_path / "ref.zarr"
    assert emrun("segment", affinities, ref, *SEGMENT).returncode == 0
    killed("emrun.segment.job:_write:1", "segment", affinities, out, *SEGMENT)
    assert_same_volume(out, ref, "segmentation_0.3")
    assert not (out / "labels" / "segmentation_0.5").exists()
    other = emrun("segment", affinities, out, "--method", "cc", "--name", "other")
    assert other.returncode == 0, other.stderr
    assert sorted(p.name for p in (out / "labels").iterdir() if p.is_dir()) == ["other"]


def test_segment_into_the_affinities_store_killed_keeps_them_byte_for_byte(tmp_path,
                                                                          affinities):
    """Killed while writing its segmentation into the inference store: the affinities are
    untouched, and the rerun's segmentation equals one written to a store of its own."""
    store, ref = affinities.parent, tmp_path / "ref.zarr"
    before = digest(affinities)
    args = ("--method", "cc", "--threshold", "0.5", "--levels", "2")
    assert emrun("segment", affinities, ref, *args).returncode == 0
    killed("emrun.io.write:build_pyramid:1", "segment", affinities, store, *args)
    assert digest(affinities) == before
    assert emrun("segment", affinities, store, *args).returncode == 0
    assert digest(affinities) == before
    assert_same_volume(store, ref, "segmentation")
    assert leftovers(store) == []


def test_segment_at_scale_killed_before_its_mark_is_refused_then_resumed(tmp_path,
                                                                        affinities):
    """`segment --scheduler local` killed with its segmentation written but not marked
    finished: `data convert` and `evaluate` refuse it (exit 2) saying to --resume; the
    --resume makes it equal an uninterrupted run's."""
    out, ref = tmp_path / "seg.zarr", tmp_path / "ref.zarr"
    args = ("--scheduler", "local", "--workers", "1", "--block", "8", "24", "24",
            "--threshold", "0.5", "--levels", "2")
    assert emrun("segment", affinities, ref, *args).returncode == 0
    killed("emrun.segment.scale.command:mark_finished:2", "segment", affinities, out, *args,
           when="before")
    for command in (("data", "convert", out / "segmentation", tmp_path / "c.zarr"),
                    ("evaluate", out / "segmentation", ref / "segmentation")):
        said = emrun(*command)
        assert said.returncode == 2 and "unfinished" in said.stderr, said.stderr
        assert "--resume" in said.stderr and "Traceback" not in said.stderr
    assert emrun("segment", affinities, out, *args, "--resume").returncode == 0
    assert_same_volume(out, ref, "segmentation")
    assert emrun("evaluate", out / "segmentation", ref / "segmentation").returncode == 0


# --- emrun.atomic and checkpoints -----------------------------------------------------


ATOMIC_KILLED = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from emrun import atomic
    path, where = Path(sys.argv[1]), sys.argv[2]
    if where == "replace":
        os.replace = lambda *a: os.kill(os.getpid(), signal.SIGKILL)
        atomic.write_text(path, "new " * 1000)
    elif where == "writing":
        with atomic.atomic_output(path) as tmp:
            with open(tmp, "w") as f:
                f.write("half")
                f.flush()
                os.kill(os.getpid(), signal.SIGKILL)
    else:
        import torch
        from emrun.io.checkpoint import save_atomic
        real = torch.save
        def half(obj, f, *a, **k):
            f.write(b"PK" + b"x" * 100)
            os.kill(os.getpid(), signal.SIGKILL)
        torch.save = half
        save_atomic(path, {"iteration": 2})
""")


@pytest.mark.parametrize("where", ["writing", "replace", "checkpoint"])
def test_an_atomic_write_killed_leaves_the_old_file_and_the_next_write_succeeds(tmp_path,
                                                                               where):
    import torch

    from emrun import atomic
    from emrun.io.checkpoint import save_atomic

    path = tmp_path / "sub" / ("last.pt" if where == "checkpoint" else "metrics.json")
    if where == "checkpoint":
        save_atomic(path, {"iteration": 1})
    else:
        atomic.write_text(path, '{"old": 1}')
    before = path.read_bytes()
    done = subprocess.run([sys.executable, "-c", ATOMIC_KILLED, str(path), where],
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert path.read_bytes() == before
    if where == "checkpoint":
        assert torch.load(path, weights_only=False)["iteration"] == 1
        save_atomic(path, {"iteration": 3})
        assert torch.load(path, weights_only=False)["iteration"] == 3
    else:
        assert json.loads(path.read_text()) == {"old": 1}
        atomic.write_text(path, '{"new": 2}')
        assert json.loads(path.read_text()) == {"new": 2}
    visible = [p.name for p in path.parent.iterdir() if not p.name.startswith(".")]
    assert visible == [path.name]  # a kill's temporary is hidden, never under the name


def test_an_adding_record_killed_while_written_names_nothing(tmp_path):
    """A kill while `adding.start` wrote its record leaves only the hidden temporary; the
    next holder's undo removes it and nothing else."""
    from emrun.io import adding
    from emrun.io.write import write_volume

    store = tmp_path / "s.zarr"
    write_volume(store, "raw", np.arange(4 * 8 * 8, dtype=np.uint8).reshape(4, 8, 8),
                 levels=1)
    raw = digest(store / "raw")
    (store / f".{adding.RECORD}.12345.tmp").write_text('{"volumes": [{"name": "raw", "la')
    assert adding.is_record(store / f".{adding.RECORD}.12345.tmp")
    assert adding.undo_killed(store) is False
    assert digest(store / "raw") == raw
    assert not [p for p in store.iterdir() if "adding" in p.name]
    (store / adding.RECORD).write_text('{"volumes": [{"name": "../raw", "label": false}, '
                                       '{"name": ".", "label": false}], "new_store": false}')
    adding.undo_killed(store)  # an edited record names nothing outside a volume
    assert digest(store / "raw") == raw


@pytest.mark.parametrize("label", [False, True])
def test_a_volume_whose_write_was_cut_short_says_so_when_opened(tmp_path, label):
    """A convert killed mid-write leaves NAME.partial: opening NAME said "no array 'NAME';
    arrays: (none)", nothing of the cut-short write or what to do."""
    from emrun.errors import UserError
    from emrun.io import open_volume
    from emrun.io.write import write_volume

    store = tmp_path / "k.zarr"
    write_volume(store, "raw", np.zeros((4, 8, 8), np.uint8), levels=1)
    partial = (store / "labels" / "ids.partial") if label else (store / "ids.partial")
    partial.mkdir(parents=True)
    (partial / "zarr.json").write_text(json.dumps({"zarr_format": 3, "node_type": "group"}))
    with pytest.raises(UserError) as caught:
        open_volume(store / "ids")
    said = str(caught.value)
    assert "its write was cut short" in said and str(partial) in said, said
    assert "run the command that writes it again" in said
