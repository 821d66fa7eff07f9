"""Review of this session's recipe checks, augmentation, trainer and segmentation changes:
each test pins a bug found and fixed (it failed before the fix). Tiny synthetic data."""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path
from typing import Any

from rich.console import Console
from test_train_noticed import VALIDATED as NOTICED_VALIDATED

# test_train_noticed's tiny validated recipe, validating (in this process) at iteration 2
VALIDATED = (NOTICED_VALIDATED.replace("name: noticed", "name: review")
             .replace("iterations: 4", "iterations: 2")
             .replace("validate_every: 0", "validate_every: 2\n  validate_in_background: false"))


def _fit_with_nan(tmp_path: Path, monkeypatch: Any, recipe_text: str) -> str:
    """Train the tiny recipe with a validation prediction that reports NaN; the console."""
    import emrun.train.trainer as trainer_module
    from emrun.recipe import load_recipe

    path = tmp_path / "r.yaml"
    path.write_text(recipe_text)
    real = trainer_module.predict_validation

    def with_nan(*args: Any) -> Any:
        return [dataclasses.replace(i, nonfinite=5) for i in real(*args)]

    monkeypatch.setattr(trainer_module, "predict_validation", with_nan)
    buffer = io.StringIO()
    trainer_module.Trainer(load_recipe(path), tmp_path / "run",
                           console=Console(file=buffer, width=400)).fit()
    return buffer.getvalue()


def test_the_validation_nan_warning_names_the_precision_validation_predicts_at(
        tmp_path, monkeypatch):
    """Validation predicts at infer.precision (the Engine's default), so an fp16 overflow
    there is cured by infer.precision; the warning sent the user to train.precision, which
    changes nothing of it."""
    text = _fit_with_nan(tmp_path, monkeypatch,
                         VALIDATED + "infer: {patch: [4, 16, 16], precision: fp16}\n")
    assert "the network output 5 NaN or infinite values" in text
    assert "infer.precision fp16" in text
    assert "train.precision" not in text


# ----------------------------------------- misalignment at a voxel size only metadata gives

VOLUME_RECIPE = """\
name: review
data:
  sources:
    a: {{image: {store}/image, labels: {store}/labels{extra}}}
model: {{type: rsunet, widths: [4, 8]}}
tasks:
  aff: {{target: {{type: affinity}}}}
augment:
  - {{type: misalign, displacement: [5, 40], voxel_reference: 8.0}}
train: {{patch: [8, 32, 32], iterations: 1, batch_size: 1, workers: 0}}
"""


def _volume_recipe(tmp_path: Path, voxel_size: tuple[float, ...] | None,
                   extra: str = "") -> Path:
    """A recipe of one volume source whose metadata gives ``voxel_size`` (None: none)."""
    import numpy as np

    from emrun.io import write_volume

    folder = tmp_path / f"case{len(list(tmp_path.glob('case*')))}"
    store = folder / "v.zarr"
    shape = (16, 96, 96)
    image = np.full(shape, 128, np.uint8)
    labels = (np.arange(np.prod(shape)).reshape(shape) // 50 + 1).astype(np.uint32)
    for name, array in (("image", image), ("labels", labels)):
        write_volume(store, name, array, voxel_size=voxel_size)
    path = folder / "r.yaml"
    path.write_text(VOLUME_RECIPE.format(store=store, extra=extra))
    return path


def _augment_problems(path: Path) -> list[str]:
    from emrun.data.checks import check_data
    from emrun.recipe import load_recipe

    return [str(p) for p in check_data(load_recipe(path))[1] if ": augment." in str(p)]


def test_a_misalignment_is_judged_at_the_voxel_size_the_volume_s_metadata_gives(tmp_path):
    """40 px at 8 nm are 20 px on a 16 nm volume (as training shifts it): they fit the
    32 px patch. The recipe check judged them as 40 px, since the recipe states no voxel
    size, and refused the recipe that passed once it stated the metadata's own size."""
    path = _volume_recipe(tmp_path, (32.0, 16.0, 16.0))
    assert _augment_problems(path) == []
    stated = _volume_recipe(tmp_path, (32.0, 16.0, 16.0), ", voxel_size: [32, 16, 16]")
    assert _augment_problems(stated) == []


def test_an_unstated_voxel_size_is_still_judged_by_the_data_checks(tmp_path):
    """Left to the data checks: at 4 nm the 40 px are 80 px, and without any voxel size
    training shifts by the pixels as given (40 px), neither smaller than 32."""
    [found] = _augment_problems(_volume_recipe(tmp_path, (32.0, 4.0, 4.0)))
    assert "augment.0: misalign: displacement up to 80 px" in found
    [found] = _augment_problems(_volume_recipe(tmp_path, None))
    assert "augment.0: misalign: displacement up to 40 px" in found


def test_a_source_without_metadata_is_judged_in_its_pixels_by_validate_no_data(tmp_path):
    """What the recipe check still judges for such a source: the section count and a
    displacement without voxel_reference (pixels whatever the voxel size)."""
    from emrun.recipe import RecipeError, load_recipe

    path = _volume_recipe(tmp_path, (32.0, 16.0, 16.0))
    path.write_text(path.read_text().replace(", voxel_reference: 8.0", ""))
    try:
        load_recipe(path)
    except RecipeError as exc:
        [problem] = exc.problems
        assert "displacement up to 40 px is not smaller than the patch" in problem.message
    else:
        raise AssertionError("a 40 px displacement on a 32 px patch passed")


def test_only_a_misalignment_sees_the_unstated_voxel_size():
    """The recipe check's stand-in for a voxel size it does not know is no size in nm: any
    other step (a plugin's) is judged at None, pixels as given, as it was before."""
    from typing import Literal

    from emrun.recipe.augment import UNSTATED, AugmentBase, Misalign, augment_problems

    seen: list[Any] = []

    class Recording(AugmentBase):
        type: Literal["recording"] = "recording"

        def shape_problems(self, shape: Any, voxel_size: Any) -> list[str]:
            seen.append(voxel_size)
            return []

    far = Misalign(displacement=(0, 40), voxel_reference=8.0)
    assert augment_problems([Recording(), far], (8, 32, 32), UNSTATED) == []
    assert seen == [None]
    assert augment_problems([far], (8, 32, 32), None)  # no voxel size at all: 40 px


# --------------------------------- validation segmentation with offsets it cannot segment


def _validated_with(tmp_path: Path, offsets: str, validation_shape: str) -> Any:
    from emrun.recipe import load_recipe

    text = (VALIDATED.replace("target: {type: affinity}",
                              f"target: {{type: affinity, offsets: {offsets}}}")
            .replace("shape: [8, 32, 32], seed: 2", f"shape: {validation_shape}, seed: 2"))
    path = tmp_path / "offsets.yaml"
    path.write_text(text)
    return load_recipe(path).recipe


def test_validation_boxes_the_offsets_cannot_segment_are_refused_before_training(tmp_path):
    """2-d offsets (no z channel), valid for a one-section box, and a validation box of
    several sections: the recipe passed, the run trained to its first validation and
    stopped there on `sweep affinities: no nearest-neighbour affinity along z`."""
    from emrun.train.seg_validation import unscorable_sources

    two_d = "[[0, -1, 0], [0, 0, -1]]"
    [(name, why)] = unscorable_sources(_validated_with(tmp_path, two_d, "[4, 32, 32]"))
    assert name == "v" and "longer than one voxel along z" in why and "(-1, 0, 0)" in why
    assert unscorable_sources(_validated_with(tmp_path, two_d, "[1, 32, 32]")) == []
    far = "[[-1, 0, 0], [0, -3, 0], [0, 0, -3]]"  # long-range only in y and x
    [(_, why)] = unscorable_sources(_validated_with(tmp_path, far, "[4, 32, 32]"))
    assert "along y, x" in why and "validate_segmentation: false" in why
