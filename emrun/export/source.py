"""What is exported: a run directory, a checkpoint file or a model package, read once.

A run directory exports its best checkpoint by validation (``checkpoints/best.pt``) when it
has one, else its newest (``checkpoints/last.pt``): the network one would ship
(`emrun.io.checkpoint.checkpoint_of`, which ``train --init-from RUN_DIR`` shares). A file is
exported as it is. A model package keeps the provenance it was made with.
"""

from __future__ import annotations

import contextlib
import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from ..errors import UserError
from ..infer.checkpoint_recipe import recipe_for
from ..io.checkpoint import checkpoint_of, load
from ..io.package import checkpoint_network, is_package, load_network, network_weights, read_package
from ..models import build_model, weights_mismatch
from ..recipe import Recipe
from ..train.run_dir import recipe_text


@dataclass(frozen=True)
class Trained:
    """A trained network: its resolved recipe, weights and where it came from."""

    path: Path
    recipe: Recipe
    weights: dict[str, torch.Tensor]
    iteration: int
    provenance: dict[str, Any] = field(default_factory=dict)
    stated: dict[str, Any] = field(default_factory=dict)
    """What a model package's manifest already states about the input (voxel size,
    intensity scale): found where the training data was, so a package exported again on
    a machine without that data keeps them."""

    @property
    def recipe_text(self) -> str:
        return recipe_text(self.recipe)

    def model(self) -> nn.Module:
        """The network with these weights, in eval mode on the CPU."""
        model = build_model(self.recipe)
        model.load_state_dict(self.weights)
        return model.eval()


def load_trained(source: Path) -> Trained:
    """Read what ``source`` names; refuses one that carries no recipe or broken weights. A
    run directory whose best.pt is refused says that its last.pt can be exported instead."""
    path = checkpoint_of(Path(source))
    if path.suffix.lower() == ".onnx" and not is_package(path):  # "not a PyTorch file"
        raise UserError(f"{path} is an ONNX export: emrun exports from a run directory, a "
                        "checkpoint or an .emrun package (the one it was exported from, say)")
    try:
        return _load_trained(path)
    except UserError as exc:
        other = path.parent / "last.pt"
        if Path(source).is_dir() and path.name == "best.pt" and other.is_file():
            raise UserError(f"{exc}; to export the run's newest checkpoint instead: emrun "
                            f"export {shlex.quote(str(other))} OUTPUT") from None
        raise


def _load_trained(path: Path) -> Trained:
    """`load_trained` of one checkpoint file or model package."""
    recipe = _carried_recipe(path)
    if is_package(path):
        package = read_package(path)
        provenance = dict(package.manifest["provenance"])
        stated = package.manifest.get("input")
        trained = Trained(path, recipe, package.weights, int(provenance["iteration"]),
                          provenance, stated if isinstance(stated, dict) else {})
    else:
        state = load(path)
        trained = Trained(path, recipe, checkpoint_network(path, state)["model"],
                          int(state["iteration"]), _provenance(path, state))
    _check_weights(trained)
    return trained


def _carried_recipe(path: Path) -> Recipe:
    """The recipe ``path`` carries. One it lacks, or carries damaged, is refused here:
    `recipe_for` then says to give ``--recipe``, which `emrun export` does not take (the
    package must carry the recipe the weights were trained with)."""
    text = load_network(path).get("recipe")
    try:
        parsed = yaml.safe_load(text) if isinstance(text, str) else None
    except yaml.YAMLError:
        parsed = None
    if not isinstance(parsed, dict):
        quoted = shlex.quote(str(path))
        raise UserError(f"{path} carries no recipe, or a damaged one (not written by `emrun "
                        "train`?), and an export must carry the one its weights were trained "
                        f"with; `emrun infer --checkpoint {quoted} --recipe RECIPE` predicts "
                        "with it")
    return recipe_for(path, None, []).recipe


def _check_weights(trained: Trained) -> None:
    """Refuse weights that do not fit the recipe's model, or that hold NaN or infinite
    values: `emrun infer` refuses those (a run that diverged), so their export would only
    travel to be refused, or compute NaN in another tool."""
    path = trained.path
    if (why := weights_mismatch(build_model(trained.recipe), trained.weights)) is not None:
        raise UserError(f"{path}: its weights do not match its recipe's model (tensors: {why})")
    broken = [name for name, tensor in trained.weights.items()
              if isinstance(tensor, torch.Tensor) and tensor.is_floating_point()
              and not torch.isfinite(tensor).all()]
    if broken:
        more = f" and {len(broken) - 1} more" if len(broken) > 1 else ""
        raise UserError(f"{path}: its weights hold NaN or infinite values ({broken[0]}{more}); "
                        "a run that diverged? Export an earlier checkpoint")
    try:
        trained.model()
    except (RuntimeError, KeyError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise UserError(f"{path}: its weights do not match its recipe's model ({first})"
                        ) from None


def _provenance(path: Path, state: dict[str, Any]) -> dict[str, Any]:
    """Where a checkpoint came from: its run, iteration, training time, devices, and the
    run's own provenance.json (emrun version, git revision, host, command) when present."""
    run = path.parent.parent if path.parent.name == "checkpoints" else None
    found: dict[str, Any] = {
        "run": str(run.resolve()) if run is not None else None,
        "checkpoint": path.name,
        "iteration": int(state["iteration"]),
        "train_seconds": state.get("train_seconds"),
        "devices": state.get("devices"),
        "weights": _which_weights(state),
    }
    if run is not None and (run / "provenance.json").is_file():
        with contextlib.suppress(OSError, UnicodeDecodeError, json.JSONDecodeError):
            found["training_run"] = json.loads((run / "provenance.json").read_text("utf-8"))
    return found


def _which_weights(state: dict[str, Any]) -> str:
    """Which of a checkpoint's weights are exported (`network_weights`): the EMA of the
    weights, with its decay, or the weights the optimizer stepped."""
    if network_weights(state) is state.get("model"):
        return "model"
    decay = state["ema"].get("decay")
    return f"ema (decay {decay})" if isinstance(decay, int | float) else "ema"
