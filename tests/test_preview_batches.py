"""`data preview` with ``train.batch_size`` > 1: every sample of each batch, in the order
training draws them, each row labelled with its batch and place (it drew only the first
sample of each batch)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from matplotlib.axes import Axes
from typer.testing import CliRunner

from emrun.cli import app
from emrun.data.loader import to_tensors, unpack
from emrun.data.samples import SampleMaker
from emrun.preview import _title, training_samples
from emrun.recipe import load_recipe

RECIPE = """\
name: batched
seed: 5
data:
  sources:
    a: {type: synthetic, shape: [8, 32, 32], seed: 1}
augment:
  - {type: grayscale, p: 0.7}
  - {type: flip_rotate}
model: {type: rsunet, widths: [4, 8]}
tasks:
  affinity:
    target: {type: affinity}
train:
  patch: [4, 16, 16]
  batch_size: 3
  iterations: 2
  workers: 0
"""

runner = CliRunner()


@pytest.fixture
def recipe(tmp_path: Path) -> Path:
    path = tmp_path / "batched.yaml"
    path.write_text(RECIPE, encoding="utf-8")
    return path


def test_the_previewed_samples_are_every_sample_of_training_s_batches(recipe):
    """Rows 0-2 are batch 0's three samples, rows 3-4 batch 1's first two: what
    `SampleMaker.batch` (the loader's) hands the trainer, image and targets."""
    loaded = load_recipe(recipe, []).recipe
    shown = list(training_samples(loaded, 5))
    assert [(s.batch, s.position) for s in shown] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]
    maker = SampleMaker(loaded)
    trained = [unpack(to_tensors(maker.batch(loaded.seed, 0, index))) for index in (0, 1)]
    for row in shown:
        used = trained[row.batch]
        image = row.sample["image"].astype(np.float16).astype(np.float32)  # as it travels
        assert np.array_equal(used["image"][row.position].numpy(), image), row
        assert np.array_equal(used["target"]["affinity"][row.position].numpy(),
                              row.sample["target"]["affinity"]), row
    assert not np.array_equal(shown[1].sample["image"], shown[3].sample["image"])


def test_each_row_is_labelled_with_its_batch_and_sample(recipe, tmp_path, monkeypatch):
    labels: list[str] = []
    real = Axes.set_ylabel

    def record(self: Axes, text: str, *args: object, **kwargs: object) -> object:
        labels.append(text)
        return real(self, text, *args, **kwargs)

    monkeypatch.setattr(Axes, "set_ylabel", record)
    out = tmp_path / "preview.png"
    done = runner.invoke(app, ["data", "preview", str(recipe), "--n", "4", "--out", str(out)])
    assert done.exit_code == 0, done.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert labels == ["batch 0\nsample 0", "batch 0\nsample 1", "batch 0\nsample 2",
                      "batch 1\nsample 0"]


def test_the_title_says_how_many_batches_are_shown(recipe):
    loaded = load_recipe(recipe, []).recipe
    assert "(batch_size 3: 1 whole batch and 1 of the 3 samples of batch 1)" in \
        _title(loaded, 4)
    assert "(batch_size 3: 2 whole batches)" in _title(loaded, 6)
    assert "(batch_size 3: 2 of the 3 samples of batch 0)" in _title(loaded, 2)
    single = load_recipe(recipe, ["train.batch_size=1"]).recipe
    assert "batch_size" not in _title(single, 4)
