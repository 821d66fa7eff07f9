"""A third-party plugin adds a model and a segmenter, and every command takes them as a user
would run them: a spec, an implementation and the schema are all a new kind needs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest

from emrun.io import write_volume

PLUGIN = '''
"""A toy emrun plugin: a one-convolution model and a threshold segmenter."""

from dataclasses import dataclass
from typing import ClassVar, Literal

import cc3d
import numpy as np
from pydantic import Field
from torch import nn

from emrun.errors import UserError
from emrun.recipe.model import ModelBase
from emrun.recipe.run import MinSize, SegmenterBase
from emrun.registry import models, segmenters
from emrun.segment.base import Segmenter


@models.register("toy_conv")
class ToyConvSpec(ModelBase):
    """One 3D convolution per task; says nothing about its receptive field."""

    type: Literal["toy_conv"] = "toy_conv"
    kernel: int = Field(3, ge=1, le=7)


class ToyConv(nn.Module):
    def __init__(self, spec, head_channels):
        super().__init__()
        self.heads = nn.ModuleDict({name: nn.Conv3d(1, channels, spec.kernel, padding="same")
                                    for name, channels in head_channels.items()})

    def forward(self, x):
        return {name: head(x) for name, head in self.heads.items()}


@models.implement("toy_conv")
def build_toy_conv(spec, *, head_channels, **context):
    return ToyConv(spec, head_channels)


@segmenters.register("toy_threshold")
class ToyThresholdSpec(SegmenterBase):
    """Components of voxels whose mean nearest-neighbour affinity is above a threshold."""

    type: Literal["toy_threshold"] = "toy_threshold"
    value_field: ClassVar[str] = "level"
    value_name: ClassVar[str] = "threshold"
    validation_values: ClassVar[tuple[float, ...]] = (0.4, 0.6)
    level: float = Field(0.5, gt=0, lt=1, description="Affinity above which voxels join.")
    min_size: MinSize = 0


@segmenters.implement("toy_threshold")
@dataclass(frozen=True)
class ToyThreshold(Segmenter):
    blockwise: ClassVar[bool] = False

    def fragments(self, affs, offsets, mask):
        inside = affs[:3].mean(axis=0) > self.spec.level
        if mask is not None:
            inside &= mask
        return cc3d.connected_components(inside, connectivity=6).astype(np.uint64)

    def face_edges(self, u, v, p, offset):
        raise UserError("toy_threshold segments in memory only")

    def stitch(self, edges, count):
        raise UserError("toy_threshold segments in memory only")
'''

RECIPE = """\
name: toy
data:
  sources:
    a: {type: synthetic, shape: [8, 32, 32], seed: 1}
model: {type: toy_conv}
tasks:
  affinity:
    target: {type: affinity}
train:
  patch: [4, 16, 16]
  iterations: 2
  workers: 0
  validate_every: 0
  checkpoint_every: 2
  log_every: 1
  image_every: 0
segment: {type: toy_threshold}
"""


@pytest.fixture
def plugin_env(tmp_path: Path) -> dict[str, str]:
    """An environment whose Python finds the toy plugin through its `emrun.plugins` entry
    point, as after `pip install`."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "toy_emrun_plugin.py").write_text(PLUGIN)
    info = site / "toy_emrun_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-emrun-plugin\n"
                                   "Version: 0.1\n")
    (info / "entry_points.txt").write_text("[emrun.plugins]\ntoy = toy_emrun_plugin\n")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), *sys.path])}


def emrun(env: dict[str, str], cwd: Path, *args: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "emrun", *args], capture_output=True,
                          text=True, env=env, cwd=cwd, timeout=600)
    assert done.returncode == 0, f"emrun {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
    return done


CHAIN = """
import json, sys
from typer.testing import CliRunner
from emrun.cli import app
done = []
for args in json.loads(sys.argv[1]):
    result = CliRunner().invoke(app, args)
    done.append([result.exit_code, result.stdout, result.stderr])
    if result.exit_code:
        break
print(json.dumps(done))
"""


def emrun_chain(env: dict[str, str], cwd: Path, *commands: list[str]
                ) -> list[subprocess.CompletedProcess]:
    """Run emrun ``commands`` one after another in one fresh interpreter (one start-up, not
    one each) that finds the plugin as an installed package does; each must succeed."""
    ran = subprocess.run([sys.executable, "-c", CHAIN, json.dumps(commands)],
                         capture_output=True, text=True, env=env, cwd=cwd, timeout=600)
    assert ran.returncode == 0, ran.stderr
    last_line = json.loads(ran.stdout.strip().splitlines()[-1])  # the chain's own report
    results = [subprocess.CompletedProcess(args, code, out, err)
               for args, (code, out, err) in zip(commands, last_line, strict=False)]
    for result in results:
        assert result.returncode == 0, f"emrun {result.args}:\n{result.stdout}\n{result.stderr}"
    assert len(results) == len(commands)
    return results


@pytest.mark.slow
def test_a_plugin_model_and_segmenter_validate_train_infer_and_sweep(tmp_path, plugin_env):
    recipe = tmp_path / "toy.yaml"
    recipe.write_text(RECIPE)
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(1, 5, dtype=np.uint32), 8).reshape(1, 1, 32)
    labels = np.broadcast_to(labels, (8, 32, 32)).copy()
    write_volume(tmp_path / "vol.zarr", "image",
                 rng.integers(0, 255, labels.shape).astype(np.uint8))
    write_volume(tmp_path / "vol.zarr", "labels", labels)

    checkpoint = tmp_path / "run" / "checkpoints" / "last.pt"
    validated, _, _, done, _ = emrun_chain(
        plugin_env, tmp_path, ["validate", str(recipe)],
        ["train", str(recipe), "--run-dir", "run", "--device", "cpu"],
        ["infer", "--checkpoint", str(checkpoint), "--input", "vol.zarr/image", "--output",
         "pred.zarr", "--device", "cpu"],
        ["segment", "pred.zarr/affinity", "seg.zarr", "--sweep", "--truth", "vol.zarr/labels"],
        ["export", "run", "toy.emrun"])
    summary = validated.stdout
    assert "model toy_conv: kernel 3;" in summary
    assert "receptive field unknown" in summary
    assert checkpoint.exists()
    assert (tmp_path / "pred.zarr").is_dir()

    assert "segmenter toy_threshold from the recipe 'toy'" in done.stderr  # as recorded
    rows = [line.split()[1] for line in done.stdout.splitlines()
            if line.startswith("  threshold ")]
    assert rows == ["0.1", "0.2", "0.3", "0.4", "0.5", "0.6", "0.7", "0.8", "0.9"]
    assert "best threshold" in done.stdout
    assert (tmp_path / "seg.zarr" / "labels" / "segmentation").is_dir()

    # a package records the plugin package its names need, and names it where it is missing
    with zipfile.ZipFile(tmp_path / "toy.emrun") as archive:
        used = json.loads(archive.read("manifest.json"))["plugins"]
    assert sorted((u["kind"], u["type"], u["package"], u["version"]) for u in used) == [
        ("model", "toy_conv", "toy-emrun-plugin", "0.1"),
        ("segmenter", "toy_threshold", "toy-emrun-plugin", "0.1")]
    infer = ["-m", "emrun", "infer", "--model", "toy.emrun", "--input", "vol.zarr/image",
             "--device", "cpu"]
    done = subprocess.run([sys.executable, *infer, "--output", "p2.zarr"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "needs the emrun plugin package toy-emrun-plugin 0.1 (for the model type " \
        "'toy_conv')" in done.stderr and "pip install 'toy-emrun-plugin==0.1'" in done.stderr
    info = Path(plugin_env["PYTHONPATH"].split(os.pathsep)[0]) / "toy_emrun_plugin-0.1.dist-info"
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-emrun-plugin\n"
                                   "Version: 0.2\n")
    done = emrun(plugin_env, tmp_path, *infer[2:], "--output", "p3.zarr")
    assert "exported with toy-emrun-plugin 0.1 (for the model type 'toy_conv'); 0.2 is " \
        "installed here" in done.stderr


def test_without_the_plugin_its_names_are_unknown(tmp_path):
    recipe = tmp_path / "toy.yaml"
    recipe.write_text(textwrap.dedent(RECIPE))
    from typer.testing import CliRunner

    from emrun.cli import app

    done = CliRunner().invoke(app, ["validate", "--no-data", str(recipe)])  # no plugin here
    assert done.exit_code == 2
    assert "unknown model type 'toy_conv'" in done.stderr
