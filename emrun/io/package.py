"""The model package: one file that carries a trained network to another machine.

``NAME.emrun`` is a zip archive (members stored, not compressed: weights do not compress)::

    manifest.json   format and version, emrun and torch versions, the tasks with their
                    channels and affinity offsets, the input's voxel size, intensity scale and
                    patch, the plugin packages the recipe's names need, provenance, and
                    the SHA-256 of every other member
    recipe.yaml     the resolved recipe the network was trained with
    weights.pt      ``{"iteration": N, "model": state_dict}`` (torch.save, loaded weights-only)

One file, not a folder, because it travels as one thing (copied, uploaded, attached), is
written atomically by one rename, and its checksums cover all of it; ``unzip -l`` still
shows what is inside. Reading checks every member's SHA-256 against the manifest before
anything is used: a changed byte is one line naming the member (exit 2).

A bioimage.io model exported by emrun (``emrun export --format bioimageio``) attaches its
``.emrun`` package, so it reads back here too, after its spec version is checked.
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from ..atomic import write_bytes
from ..paths import not_a_file
from .checkpoint import CheckpointError, load

__all__ = ["FORMAT", "FORMAT_VERSION", "ModelPackage", "PackageError", "checkpoint_network",
           "is_package", "load_network", "network_weights", "read_package", "write_package"]

FORMAT = "emrun-model"
FORMAT_VERSION = 1
MANIFEST, RECIPE, WEIGHTS = "manifest.json", "recipe.yaml", "weights.pt"
BIOIMAGEIO_DESCRIPTIONS = ("rdf.yaml", "bioimageio.yaml")
BIOIMAGEIO_SPECS = ("0.5.",)
"""bioimage.io model spec versions whose emrun attachment this reader understands."""


class PackageError(CheckpointError):
    """A model package that is missing, corrupt, tampered with or of an unknown version."""


@dataclass(frozen=True)
class ModelPackage:
    """What a package holds, checked: its manifest, recipe text and weights."""

    manifest: dict[str, Any]
    recipe: str
    weights: dict[str, torch.Tensor]

    def as_checkpoint(self) -> dict[str, Any]:
        """The package as a training checkpoint's dict (what infer and train read)."""
        return {"iteration": int(self.manifest["provenance"]["iteration"]),
                "model": self.weights, "recipe": self.recipe,
                "plugins": self.manifest.get("plugins", [])}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------- writing


def package_bytes(manifest: dict[str, Any], recipe: str, weights: dict[str, torch.Tensor],
                  iteration: int) -> bytes:
    """The package as bytes: the manifest gets the format, version and member checksums."""
    buffer = io.BytesIO()
    torch.save({"iteration": int(iteration), "model": dict(weights)}, buffer)
    members = {RECIPE: recipe.encode("utf-8"), WEIGHTS: buffer.getvalue()}
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, **manifest,
                "members": {name: sha256(data) for name, data in members.items()}}
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_STORED) as zf:
        zf.writestr(MANIFEST, json.dumps(manifest, indent=2) + "\n")
        for name, data in members.items():
            zf.writestr(name, data)
    return archive.getvalue()


def write_package(path: Path, manifest: dict[str, Any], recipe: str,
                  weights: dict[str, torch.Tensor], iteration: int,
                  shown: Path | None = None) -> Path:
    """Write the package to ``path`` atomically (temp file beside it, fsync, rename); a
    failure names ``shown`` (the file the user asked for, when ``path`` stages it)."""
    write_atomic(Path(path), package_bytes(manifest, recipe, weights, iteration), shown)
    return Path(path)


def write_atomic(path: Path, data: bytes, shown: Path | None = None) -> None:
    """``data`` to ``path`` whole or not at all; a failure is one line naming ``shown``
    (default ``path``)."""
    try:
        write_bytes(path, data)
    except OSError as exc:
        raise PackageError(f"{shown or path}: cannot write ({exc.strerror or exc}); nothing "
                           "was written") from exc


# --------------------------------------------------------------------------- reading


def is_package(path: Path) -> bool:
    """True when ``path`` is a zip holding an emrun manifest or a bioimage.io description
    (a torch checkpoint is a zip too, but its members sit in one folder). Only a regular
    file is opened: a named pipe would block, a device never end."""
    path = Path(path)
    if not path.is_file() or not_a_file(path) is not None:
        return False
    try:
        with zipfile.ZipFile(path) as zf:
            names = set(zf.namelist())
    except (OSError, zipfile.BadZipFile):
        return False
    return MANIFEST in names or any(name in names for name in BIOIMAGEIO_DESCRIPTIONS)


def read_package(path: Path) -> ModelPackage:
    """The package at ``path``, every member's checksum verified (`PackageError` if not)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise PackageError(f"{path}: no such model package") from None
    except IsADirectoryError:
        raise PackageError(f"{path} is a directory, not a model package") from None
    except OSError as exc:
        raise PackageError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    return _read(str(path), data)


def _read(where: str, data: bytes) -> ModelPackage:
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile:
        raise PackageError(f"{where} is not a model package (not a zip archive)") from None
    with archive:
        names = set(archive.namelist())
        if MANIFEST not in names:
            description = next((n for n in BIOIMAGEIO_DESCRIPTIONS if n in names), None)
            if description is None:
                raise PackageError(f"{where} is not a model package (it has no {MANIFEST})")
            return _read_bioimageio(where, archive, description)
        manifest = _manifest(where, _member(where, archive, MANIFEST))
        members = manifest.get("members")
        if not isinstance(members, dict) or set(members) != {RECIPE, WEIGHTS}:
            raise PackageError(f"{where}: its {MANIFEST} does not list the members "
                               f"{RECIPE} and {WEIGHTS} with their checksums")
        contents = {}
        for name, expected in members.items():
            contents[name] = _member(where, archive, name)
            if sha256(contents[name]) != expected:
                raise PackageError(f"{where}: member {name} does not match its checksum in "
                                   f"{MANIFEST} (changed or damaged); export the package again")
    recipe = contents[RECIPE].decode("utf-8", errors="replace")
    return ModelPackage(manifest, recipe, _weights(where, contents[WEIGHTS]))


def _member(where: str, archive: zipfile.ZipFile, name: str) -> bytes:
    try:
        return archive.read(name)
    except KeyError:
        raise PackageError(f"{where}: member {name} is missing") from None
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, zlib.error):
        raise PackageError(f"{where}: member {name} does not match its checksum (changed or "
                           "damaged); export the package again") from None


def _manifest(where: str, data: bytes) -> dict[str, Any]:
    try:
        manifest = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PackageError(f"{where}: member {MANIFEST} is not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise PackageError(f"{where}: member {MANIFEST} is not an emrun model manifest")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise PackageError(f"{where}: package format version {version!r} is not supported "
                           f"(this emrun reads version {FORMAT_VERSION}); export it again with "
                           "this emrun, or use the emrun that wrote it")
    provenance = manifest.get("provenance")
    iteration = provenance.get("iteration") if isinstance(provenance, dict) else None
    if type(iteration) is not int or iteration < 0:  # bool is an int; a hand edit
        raise PackageError(f"{where}: member {MANIFEST} states no training iteration "
                           "(provenance.iteration; edited by hand?); export the package again")
    return manifest


def _weights(where: str, data: bytes) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, KeyError, ValueError) as exc:
        raise PackageError(f"{where}: member {WEIGHTS} is not loadable weights "
                           f"({type(exc).__name__})") from None
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        raise PackageError(f"{where}: member {WEIGHTS} holds no model state")
    return state["model"]


def _read_bioimageio(where: str, archive: zipfile.ZipFile, description: str) -> ModelPackage:
    """The emrun package a bioimage.io model exported by emrun attaches, once its spec
    version is one this reader knows."""
    try:
        rdf = yaml.safe_load(_member(where, archive, description))
    except yaml.YAMLError:
        raise PackageError(f"{where}: its {description} is not valid YAML") from None
    version = str(rdf.get("format_version", "")) if isinstance(rdf, dict) else ""
    if not version.startswith(BIOIMAGEIO_SPECS):
        raise PackageError(f"{where}: bioimage.io spec version {version or '(none)'} is not "
                           f"supported (emrun reads model spec "
                           f"{', '.join(s + 'x' for s in BIOIMAGEIO_SPECS)})")
    members = [n for n in archive.namelist() if n.endswith(".emrun")]
    if not members:
        raise PackageError(f"{where}: a bioimage.io model without an emrun package attached "
                           "(not exported by `emrun export`); emrun cannot rebuild its network")
    entries = rdf.get("attachments", [])  # a hand edit may have made it anything
    if not isinstance(entries, list):
        raise PackageError(f"{where}: the attachments in its {description} are not a list "
                           "(edited by hand?), so its emrun package cannot be checked; export "
                           "the model again")
    sources = {str(a.get("source", "")).rsplit("/", 1)[-1]: a.get("sha256")
               for a in entries if isinstance(a, dict)}
    # the package rdf.yaml attaches, not just the first *.emrun in the zip
    attached = next((n for n in members if n in sources), members[0])
    data = _member(where, archive, attached)
    expected = sources.get(attached)
    if expected is not None and sha256(data) != expected:  # another network's package
        raise PackageError(f"{where}: its attachment {attached} does not match its sha256 "
                           f"in {description} (replaced or damaged); export the model again")
    return _read(f"{where}:{attached}", data)


# --------------------------------------------------------------------------- either kind


def load_network(path: Path) -> dict[str, Any]:
    """A training checkpoint or a model package, as a checkpoint's dict (``iteration``,
    ``model``, ``recipe``): what inference and fine-tuning need from either. ``model`` holds
    `network_weights`: a run's EMA weights when it kept an EMA."""
    path = Path(path)
    if is_package(path):
        return read_package(path).as_checkpoint()
    if (why := _no_package(path)) is not None:
        raise CheckpointError(why)
    return checkpoint_network(path, load(path))


def _no_package(path: Path) -> str | None:
    """What a file named as a package (``*.emrun``, ``*.zip``) that is none is: torch's
    reading of it as a checkpoint called a truncated package 'not an emrun checkpoint', and
    a zip of other files failed with a C++ assertion ('enforce fail at
    inline_container.cc')."""
    if path.suffix.lower() not in (".emrun", ".zip") or not path.is_file() or \
            not_a_file(path) is not None:
        return None
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (OSError, zipfile.BadZipFile) as exc:
        return (f"{path} is not a model package (an emrun package or a bioimage.io model): "
                f"not a whole zip archive ({exc}); truncated or corrupt? Copy it again")
    if any(name.endswith("/data.pkl") for name in names):  # a checkpoint, named .zip
        return None
    return (f"{path} is a zip archive but no model package: it holds no {MANIFEST} (an "
            f"emrun package) and no {' or '.join(BIOIMAGEIO_DESCRIPTIONS)} (a bioimage.io "
            "model)")


def checkpoint_network(path: Path, state: dict[str, Any]) -> dict[str, Any]:
    """A loaded training checkpoint's ``state`` with ``model`` replaced by
    `network_weights`; one without a dictionary of weights is refused in one line naming
    ``path`` (infer, export and fine-tuning each failed on it in their own way, exit 1)."""
    weights = state.get("model")
    if not isinstance(weights, dict):
        found = "missing" if weights is None else f"a {type(weights).__name__}"
        raise CheckpointError(f"{path}: it holds no network weights (its 'model' is {found}, "
                              "not a dictionary of tensors); not written by `emrun train`?")
    return {**state, "model": network_weights(state)}


def network_weights(state: dict[str, Any]) -> Any:
    """The weights to predict with from a training checkpoint's ``state``: with
    ``train.ema``, the averaged parameters and buffers (validation scored them, so best.pt
    is the best by them; the raw weights are only the optimizer's), else ``state["model"]``.
    Anything malformed is left for the caller's checks of ``model``."""
    model, ema = state.get("model"), state.get("ema")
    if not isinstance(model, dict) or not isinstance(ema, dict):
        return model
    params, buffers = ema.get("params"), ema.get("buffers")
    if not isinstance(params, dict) or not isinstance(buffers, dict):
        return model
    return {**model, **params, **buffers}
