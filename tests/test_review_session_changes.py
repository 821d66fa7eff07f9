"""Review of the session's changes since 0a623a9: lock holders judged by boot and pid
namespace, the augmentation check walked as arrays, the resume of moved affinities and the
inference resume's value checks.

The array walk of the augmentation check must give exactly what the tuple walk (the code
before it) gives: compared here on seeded random chains, with the tuple walk forced
(`augment.ARRAY_FROM` past any set) as the reference.
"""

from __future__ import annotations

import errno
import os
import random
import socket
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from pydantic import TypeAdapter

from emrun import locks
from emrun.errors import UserError
from emrun.infer.job import _check_same_values
from emrun.io import open_volume, write_volume
from emrun.recipe import augment, load_recipe, shape_sets
from emrun.recipe.recipe import AugmentSpec
from emrun.segment.scale import command
from emrun.segment.scale.job import ScaleJob

HERE = socket.gethostname()
RECIPES = Path(__file__).parent.parent / "recipes"


# --- locks: what a refusal says of a holder it cannot judge ---------------------------------


@pytest.fixture
def no_locks(monkeypatch: pytest.MonkeyPatch) -> None:
    """flock fails as on an NFS mount without its lock service."""

    def refuse(fd: int, operation: int) -> None:
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(locks.fcntl, "flock", refuse)
    monkeypatch.setattr(locks, "_told_no_locks", True)


def _here() -> tuple[str, int, int]:
    process = locks._process_of(os.getpid())
    if process is None:
        pytest.skip("no /proc: lock lines name pid and host alone")
    return process


def test_another_namespace_s_holder_is_not_said_to_run(tmp_path: Path, no_locks: None) -> None:
    """A container restarted (Kubernetes after the out-of-memory killer) keeps its host name
    and gets a new pid namespace: its own killed run's file was refused with 'its process
    runs in another container', which sent the user looking for a run that is gone."""
    boot, namespace, _ = _here()
    folder = tmp_path / "out.zarr"
    folder.mkdir()
    line = (f"pid 1 on {HERE} since 2026-01-01 00:00:00 (boot {boot}, pid namespace "
            f"{namespace + 1}, started 5)\n")
    (folder / locks.LOCK_NAME).write_text(line)
    with pytest.raises(UserError) as caught:
        locks.hold(folder, "give another output")
    message = " ".join(str(caught.value).split())
    assert "runs in another container" not in message
    assert "in this one before it restarted" in message
    assert f"remove {folder / locks.LOCK_NAME}" in message
    assert (folder / locks.LOCK_NAME).read_text() == line


def test_the_longest_lock_line_is_read_whole(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A holder's line is read up to 200 bytes; one cut before its process part is judged by
    its pid alone, as an older emrun's, and another container's live holder may then be
    taken for dead. The longest a Linux host writes (a 64-character host name, the largest
    pid, namespace and start time) must fit."""
    monkeypatch.setattr(locks.socket, "gethostname", lambda: "h" * 64)
    monkeypatch.setattr(locks.os, "getpid", lambda: 4_194_304)
    monkeypatch.setattr(locks, "_process_of",
                        lambda pid: ("f" * 8 + "-ffff" * 3 + "-" + "f" * 12, 2 ** 32 - 1,
                                     10 ** 11))
    fd = os.open(tmp_path / "lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        locks._stamp(fd, durable=False)
        text = locks._holder_text(fd)
    finally:
        os.close(fd)
    found = locks.PROCESS.search(text)
    assert locks.HOLDER.match(text) and found is not None
    assert found.groups() == ("f" * 8 + "-ffff" * 3 + "-" + "f" * 12, str(2 ** 32 - 1),
                              str(10 ** 11))


# --- augment: the array walk gives what the tuple walk gives ------------------------------


def _geometric(r: random.Random) -> dict[str, Any]:
    return r.choice([
        {"type": "warp", "p": r.choice([0.5, 1.0]), "rot_max": r.choice([0, 10, 45, 90, 180]),
         "shear_max": r.choice([0, 0.2, 1]), "scale": [0.8, r.choice([1.0, 1.2])],
         "twist_max": r.choice([0, 20])},
        {"type": "flip_rotate", "isotropic": r.random() < 0.5, "p": r.choice([0.5, 1.0])},
        {"type": "lost_section", "p": r.choice([0.5, 1.0])},
        {"type": "grayscale", "p": 0.5},
        {"type": "missing_section", "max_sections": r.randint(1, 12)},
        {"type": "misalign", "displacement": [0, r.randint(0, 30)]},
    ])


def _chain(r: random.Random) -> list[dict[str, Any]]:
    """A box (whose check bounds nothing: the sets grow) before many geometric steps."""
    low = r.randint(1, 4)
    box = {"type": "box", "density": r.choice([0.3, 0.9, 0.95]), "size": [low, low + 3],
           "z_size": [1, r.randint(1, 3)], "p": r.choice([1.0, 0.5])}
    tail = [_geometric(r) for _ in range(r.randint(4, 16))]
    if r.random() < 0.3:
        tail.insert(r.randrange(len(tail)), {"type": "compose", "of": [box, _geometric(r)]})
    return [box, *tail]


def test_the_array_walk_finds_what_the_tuple_walk_finds(monkeypatch: pytest.MonkeyPatch
                                                        ) -> None:
    """Arrays on every set (``ARRAY_FROM`` 1), on large ones (as shipped), and never (the
    tuple walk, as before): the same problems, in the same order, with the same shapes."""
    specs = TypeAdapter(list[AugmentSpec])
    walked = {"arrays": 0}
    real = shape_sets.warp_reads

    def counted(*args: Any) -> np.ndarray | None:
        walked["arrays"] += 1
        return real(*args)

    monkeypatch.setattr(shape_sets, "warp_reads", counted)
    found = []
    for seed in range(120):
        r = random.Random(seed)
        chain = specs.validate_python(_chain(r))
        patch = (r.randint(1, 24), r.randint(1, 200), r.randint(1, 200))
        voxel = r.choice([None, (40.0, 8.0, 8.0)])
        verdicts = []
        for array_from in (1, augment.ARRAY_FROM, 10 ** 12):
            with monkeypatch.context() as walk:
                walk.setattr(augment, "ARRAY_FROM", array_from)
                verdicts.append(augment.augment_problems(chain, patch, voxel))
        assert verdicts[0] == verdicts[1] == verdicts[2], seed
        found.append(bool(verdicts[0]))
    assert walked["arrays"] > 100 and any(found) and not all(found)


def _smallest_by_pairs(shapes: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    distinct = list(dict.fromkeys(shapes))
    return [s for s in distinct
            if not any(o != s and all(a <= b for a, b in zip(o, s, strict=True))
                       for o in distinct)]


@pytest.mark.parametrize("cells", [(2_000_000, 2048, 4_000_000), (50, 2048, 100), (50, 40, 1)],
                         ids=["table", "small-chunks", "sweep"])
def test_smallest_array_is_the_pairwise_smallest(monkeypatch: pytest.MonkeyPatch,
                                                 cells: tuple[int, int, int]) -> None:
    """Every path of `shape_sets.dominated` (prefix table, chunk pairs, one-point sweep) and
    both sort keys (sides under 2^20 and over), with repeats and long antichains."""
    table, longest, pairs = cells
    monkeypatch.setattr(shape_sets, "TABLE_CELLS", table)
    monkeypatch.setattr(shape_sets, "LONGEST_CHUNK", longest)
    monkeypatch.setattr(shape_sets, "PAIR_CELLS", pairs)
    for seed in range(25):
        r = random.Random(seed)
        top = r.choice([2, 50, 2 ** 20 - 1, 2 ** 20, 2 ** 40])
        shapes = [(r.randint(0, top), r.randint(0, top), r.randint(0, top))
                  for _ in range(r.randint(1, 300))]
        shapes += [r.choice(shapes) for _ in range(30)]
        n = r.randint(1, 200)
        shapes += [(r.randint(0, 3), i, n - i) for i in range(n)]
        got = shape_sets.as_list(shape_sets.smallest_array(shape_sets.as_array(shapes)))
        assert got == _smallest_by_pairs(shapes), seed


def test_each_step_s_array_reads_are_its_tuple_reads() -> None:
    for seed in range(200):
        r = random.Random(seed)
        warp = augment.Warp(rot_max=r.choice([0, 45, 90, 180, r.uniform(0, 180)]),
                            shear_max=r.choice([0, 1, r.uniform(0, 1)]),
                            scale=sorted([r.uniform(0.2, 3), r.uniform(0.2, 3)]),
                            twist_max=r.choice([0, r.uniform(0, 180)]))
        top = r.choice([5, 5000, 2 ** 40])
        outs = [(r.randint(1, 50), r.randint(1, top), r.randint(1, top)) for _ in range(20)]
        for step in (warp, augment.FlipRotate(isotropic=r.random() < 0.5),
                     augment.LostSection()):
            reads = step.array_inputs(shape_sets.as_array(outs))
            assert reads is not None, seed
            assert shape_sets.as_list(reads) == [s for o in outs
                                                 for s in step.input_shapes(o, None)], seed
        box = augment.Box(density=r.choice([0.1, 0.95, 0.99]), size=[1, r.randint(1, 8)],
                          z_size=[1, r.randint(1, 3)])
        first = next((i for i, o in enumerate(outs) if box.patch_problems(o)), None)
        assert box.array_refused(shape_sets.as_array(outs)) == first, seed


# --- segment at scale: affinities taken as moved --------------------------------------------


def _job(output: Path, affinities: Path, mask: str | None = None, **more: Any) -> ScaleJob:
    return ScaleJob(affinities=str(affinities), offsets=((-1, 0, 0), (0, -1, 0), (0, 0, -1)),
                    output=str(output), shape=(4, 8, 8), block=(4, 8, 8),
                    fragments="watershed", thresholds=(0.5,), scoring="mean", min_size=0,
                    db=f"sqlite:///{output}/.emrun-segment/graph.sqlite", mask=mask, **more)


def _affinities(path: Path, seed: int) -> Path:
    data = np.random.default_rng(seed).integers(0, 255, (3, 4, 8, 8), dtype=np.uint8)
    write_volume(path, "affinity", data, channel_axis=True,
                 attrs={"offsets": [[-1, 0, 0], [0, -1, 0], [0, 0, -1]]})
    return path / "affinity"


@pytest.mark.parametrize("other", ["affinities", "mask"])
def test_a_job_moved_once_refuses_other_inputs_after(tmp_path: Path, other: str) -> None:
    first = tmp_path / "lab/pred.zarr/affinity"  # where the job started, since moved away
    moved = _affinities(tmp_path / "fast/pred.zarr", 1)
    another = _affinities(tmp_path / "another.zarr", 2)
    output = tmp_path / "seg.zarr"
    mask = str(tmp_path / "mask.zarr/mask")
    _job(output, moved, mask, started=(str(first), mask)).save()
    given = _job(output, another, mask) if other == "affinities" else \
        _job(output, moved, str(tmp_path / "other-mask.zarr/mask"))
    with pytest.raises(UserError, match="another"):
        command._check_resume(given, True, open_volume(str(given.affinities)))


# --- infer: resume refusals of other values -------------------------------------------------


def _infer_job(recipe: Any, tta: int | None) -> Any:
    """What `_check_same_values` reads of a job."""
    return SimpleNamespace(recipe=recipe, scale=(0.0, 255.0), tta=tta)


def test_tta_reduce_is_not_compared_where_no_variants_are_made(tmp_path: Path) -> None:
    """With tta 1 nothing is reduced: a resume whose recipe reduces otherwise writes the
    same values, but it was refused as 'its blocks would mix the two'."""
    recipe = load_recipe(RECIPES / "demo.yaml").recipe
    saved = recipe.resolved()
    saved["infer"]["tta_reduce"] = {"affinity": "min"}
    record = {"recipe": saved, "scale": [0.0, 255.0]}
    _check_same_values(tmp_path, record, _infer_job(recipe, None))
    with pytest.raises(UserError, match=r"infer\.tta_reduce"):
        _check_same_values(tmp_path, record, _infer_job(recipe, 4))
    saved["infer"]["dtype"] = "float32"  # still refused, tta or not
    with pytest.raises(UserError, match=r"infer\.dtype"):
        _check_same_values(tmp_path, record, _infer_job(recipe, None))
