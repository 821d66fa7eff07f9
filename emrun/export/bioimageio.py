"""``emrun export --format bioimageio``: a bioimage.io model (spec 0.5) for ilastik,
deepImageJ, BiaPy and bioimage.io's own tools.

The zip holds (``bioimageio.spec`` builds, checks and packs it):

- weights as TorchScript (self-contained: what the consumers run) and as a
  ``pytorch_state_dict`` whose architecture is `network.ExportedNetwork` with the recipe as
  its argument (for Python consumers that have emrun installed);
- one input ``raw`` (batch, channel, z, y, x) with the voxel size in nm, any size of
  ``patch + k * divisor``, and the intensity scale as preprocessing (scale_linear, then
  clip to [0, 1], as emrun scales); one output per task, each channel named, the same size
  as the input;
- test tensors: a synthetic EM patch and what the exported network itself predicts from it;
- a README (documentation) and the ``.emrun`` package as an attachment, so emrun reads the
  zip back (``infer --model``, ``train --init-from``). Spec 0.5 requires no cover image.
"""

from __future__ import annotations

import io
import string
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib.metadata import packages_distributions
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import UserError, host_out_of_memory
from ..io.package import package_bytes
from ..registry import ALL as registries
from ..synth import synthesize
from .manifest import manifest, notes
from .network import ExportedNetwork, exported_network, output_names, renamed
from .source import Trained
from .staging import publish, staging_folder

LICENSE = "CC-BY-4.0"
"""The license bioimage.io recommends for models; the README says to change it if needed."""
TAGS = ["3d", "electron-microscopy", "segmentation", "pytorch", "emrun"]
JIT_DEPRECATED = r"`torch\.jit\.\w+` is (deprecated|not supported)"
"""What torch (2.10 on) warns at each `torch.jit` call. bioimage.io's weight formats have
no successor to TorchScript (none for `torch.export`'s programs), so emrun still writes it
and keeps torch's advice to move away from the user, who cannot act on it."""


def export_bioimageio(trained: Trained, output: Path) -> list[str]:
    """Write ``trained`` as a bioimage.io model zip at ``output`` (atomically)."""
    spec, save_package = _bioimageio()
    with staging_folder(output) as folder:
        facts = manifest(trained)
        files = _write_files(trained, facts, folder)
        description = _description(spec, trained, facts, files)
        if not isinstance(description, spec.ModelDescr):
            raise RuntimeError(f"bioimage.io refused the description: {description}")
        staged = folder / output.name
        save_package(description, output_path=staged)
        publish(staged, output)
    return [f"wrote {output}: bioimage.io model (spec {description.format_version}) of "
            f"{trained.path} at iteration {trained.iteration}; weights: torchscript, "
            f"pytorch_state_dict; license {LICENSE} (edit rdf.yaml to change it)",
            *renamed(list(facts["tasks"])), *notes(facts)]


def _bioimageio() -> tuple[Any, Any]:
    """``bioimageio.spec``'s model 0.5 classes and its packer, or a line saying what to
    install."""
    try:
        from bioimageio.spec import save_bioimageio_package
        from bioimageio.spec.model import v0_5
    except ImportError:
        raise UserError("exporting to bioimage.io needs the extra: pip install "
                        "'emrun[bioimageio]'") from None
    return v0_5, save_bioimageio_package


def _write_files(trained: Trained, facts: dict[str, Any], folder: Path) -> dict[str, Any]:
    """Weights, test tensors, README and the emrun package, as files in ``folder``."""
    network = exported_network(trained.recipe, trained.weights)
    low, high = facts["input"]["intensity"]["low"], facts["input"]["intensity"]["high"]
    raw = _test_input(trained, low, high)
    gain, offset = _scale(low, high)
    scaled = np.clip(raw * np.float32(gain) + np.float32(offset), 0, 1).astype(np.float32)
    traced, outputs = _traced(network, torch.from_numpy(scaled))
    files: dict[str, Any] = {"gain": gain, "offset": offset,
                             "ids": dict(zip(network.tasks, output_names(network.tasks),
                                             strict=True))}
    # through memory: torch's zip writer aborts the process (SIGABRT) on a full disk
    files["torchscript"] = folder / "weights_torchscript.pt"
    with _torchscript_quiet():
        files["torchscript"].write_bytes(_saved(lambda buffer: torch.jit.save(traced,
                                                                             buffer)))
    files["state_dict"] = folder / "weights_state_dict.pt"
    files["state_dict"].write_bytes(_saved(lambda buffer: torch.save(network.state_dict(),
                                                                     buffer)))
    files["input"] = folder / "test_input_raw.npy"
    np.save(files["input"], raw)
    files["outputs"] = {}
    files["tolerances"] = {name: _tolerance(name, array)
                           for name, array in zip(network.tasks, outputs, strict=True)}
    for name, array in zip(network.tasks, outputs, strict=True):
        files["outputs"][name] = folder / f"test_output_{files['ids'][name]}.npy"
        np.save(files["outputs"][name], array)
    files["package"] = folder / f"{trained.recipe.name}.emrun"
    files["package"].write_bytes(package_bytes(facts, trained.recipe_text, trained.weights,
                                               trained.iteration))
    files["readme"] = folder / "README.md"
    files["readme"].write_text(_readme(trained, facts), encoding="utf-8")
    return files


def _traced(network: ExportedNetwork, example: torch.Tensor) -> tuple[Any, list[np.ndarray]]:
    """The TorchScript trace of ``network`` and its outputs on ``example``; a network that
    cannot be traced (a plugin's model with Python-side control flow or outputs TorchScript
    does not take) is one line, as `emrun export --format onnx` says it, not emrun's bug."""
    try:
        with torch.no_grad(), _torchscript_quiet():
            traced = torch.jit.trace(network, example, check_trace=False)
            return traced, [o.numpy() for o in traced(example)]
    except (RuntimeError, TypeError, ValueError, AttributeError, NotImplementedError) as exc:
        if host_out_of_memory(exc) is not None:  # the machine's limit, said as such
            raise
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"this model cannot be exported to bioimage.io: TorchScript cannot "
                        f"trace it ({first[:200]}); export it as .emrun or .onnx instead"
                        ) from None


@contextmanager
def _torchscript_quiet() -> Iterator[None]:
    """Around emrun's own `torch.jit` calls: torch's deprecation of them (`JIT_DEPRECATED`)
    and the tracer's notes that sizes vary (they do, on purpose) are not the user's to see;
    every other warning still is."""
    with warnings.catch_warnings():
        for category in (DeprecationWarning, FutureWarning):
            warnings.filterwarnings("ignore", message=JIT_DEPRECATED, category=category)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        yield


def _saved(save: Callable[[io.BytesIO], None]) -> bytes:
    """What ``save`` writes, as bytes (Python then writes them: a full disk is an OSError)."""
    buffer = io.BytesIO()
    save(buffer)
    return buffer.getvalue()


def _scale(low: float, high: float) -> tuple[float, float]:
    """scale_linear's gain and offset for (x - low) / (high - low)."""
    return 1.0 / (high - low), -low / (high - low)


def _test_input(trained: Trained, low: float, high: float) -> np.ndarray:
    """A synthetic EM patch of the inference patch size (b, c, z, y, x), its uint8 range
    stretched onto the training intensity range [low, high]."""
    image = synthesize(trained.recipe.infer_patch(), seed=0).image.astype(np.float32) / 255
    raw = np.float32(low) + image * np.float32(high - low)
    channels = trained.recipe.model.input_channels()
    return np.repeat(raw[None, None], channels, axis=1).astype(np.float32)


TENSOR_WORDS, MODEL_WORDS = 128, 512
"""The longest description bioimage.io takes for a tensor, and for a model without a
warning (1024 is its limit): a recipe's description may be 10,000 characters long, and
twelve affinity offsets are more than 128."""


def _output_words(task: str, tensor: str, facts: dict[str, Any]) -> str:
    """An output's description: target, activation and, where they fit, its offsets (the
    README and the emrun config list them all)."""
    words = f"{_task_words(task, tensor)}{facts['target']} ({facts['activation']})"
    if "offsets" not in facts:
        return _cut(words, TENSOR_WORDS)
    offsets = f"{words}; affinity offsets (z, y, x) {facts['offsets']}"
    if len(offsets) <= TENSOR_WORDS:
        return offsets
    return _cut(f"{words}; {len(facts['offsets'])} affinity offsets (z, y, x): see the README",
                TENSOR_WORDS)


def _cut(text: str, limit: int) -> str:
    """``text`` in at most ``limit`` characters ('...' where it was cut)."""
    return text if len(text) <= limit else text[: limit - 3].rstrip() + "..."


def _task_words(task: str, tensor: str) -> str:
    """'task my-task: ' where the output's id is not the task's name (`output_names`)."""
    return "" if task == tensor else f"task {task}: "


def _channel_names(task: str, channels: int) -> list[str]:
    return [f"{task}{i}" for i in range(channels)] if channels > 1 else [task]


def _description(spec: Any, trained: Trained, facts: dict[str, Any],
                 files: dict[str, Any]) -> Any:
    recipe = trained.recipe
    voxel = facts["input"]["voxel_size"] or [1.0, 1.0, 1.0]
    unit = "nanometer" if facts["input"]["voxel_size"] else None
    patch, divisor = recipe.infer_patch(), recipe.model.divisor()
    axes_zyx = "zyx"
    raw = spec.TensorId("raw")
    inputs = [spec.InputTensorDescr(
        id=raw,
        description="EM image in raw intensities (scaled to [0, 1] by the preprocessing)",
        axes=[spec.BatchAxis(),
              spec.ChannelAxis(channel_names=[spec.Identifier(n) for n in _channel_names(
                  "raw", recipe.model.input_channels())]),
              *[spec.SpaceInputAxis(id=spec.AxisId(a), unit=unit, scale=float(voxel[i]),
                                    size=spec.ParameterizedSize(min=int(patch[i]),
                                                                step=int(divisor[i])))
                for i, a in enumerate(axes_zyx)]],
        test_tensor=spec.FileDescr(source=files["input"]),
        data=spec.IntervalOrRatioDataDescr(type="float32"),
        preprocessing=[
            spec.ScaleLinearDescr(kwargs=spec.ScaleLinearKwargs(gain=files["gain"],
                                                                offset=files["offset"])),
            spec.ClipDescr(kwargs=spec.ClipKwargs(min=0.0, max=1.0)),
        ],
    )]
    outputs = []
    for name, task in facts["tasks"].items():
        tensor = files["ids"][name]
        outputs.append(spec.OutputTensorDescr(
            id=spec.TensorId(tensor),
            description=_output_words(name, tensor, task),
            axes=[spec.BatchAxis(),
                  spec.ChannelAxis(channel_names=[spec.Identifier(n) for n in _channel_names(
                      tensor, task["channels"])]),
                  *[spec.SpaceOutputAxis(id=spec.AxisId(a), unit=unit, scale=float(voxel[i]),
                                         size=spec.SizeReference(tensor_id=raw,
                                                                 axis_id=spec.AxisId(a)))
                    for i, a in enumerate(axes_zyx)]],
            test_tensor=spec.FileDescr(source=files["outputs"][name]),
            data=spec.IntervalOrRatioDataDescr(
                type="float32", range=RANGES.get(task["activation"], (None, None))),
        ))
    version = spec.Version(torch.__version__.split("+")[0])
    weights = spec.WeightsDescr(
        pytorch_state_dict=spec.PytorchStateDictWeightsDescr(
            source=files["state_dict"], pytorch_version=version,
            architecture=spec.ArchitectureFromLibraryDescr(
                callable=spec.Identifier(ExportedNetwork.__name__),
                import_from=ExportedNetwork.__module__,
                kwargs={"recipe": trained.recipe_text})),
        torchscript=spec.TorchscriptWeightsDescr(
            source=files["torchscript"], pytorch_version=version,
            parent="pytorch_state_dict"),
    )
    return spec.ModelDescr(
        name=_name(recipe.name),
        description=_cut(recipe.description or f"{_model_words(recipe.model)} for 3D "
                         f"electron microscopy, trained with emrun: {', '.join(facts['tasks'])}",
                         MODEL_WORDS),
        authors=[],
        cite=[],
        license=spec.LicenseId(LICENSE),
        documentation=spec.FileDescr(source=files["readme"]),
        inputs=inputs,
        outputs=outputs,
        weights=weights,
        attachments=[spec.FileDescr(source=files["package"])],
        tags=TAGS,
        config=spec.Config(
            bioimageio=spec.BioimageioConfig(reproducibility_tolerance=[
                spec.ReproducibilityTolerance(output_ids=[spec.TensorId(files["ids"][name])],
                                              absolute_tolerance=tolerance)
                for name, tolerance in files["tolerances"].items() if tolerance is not None]),
            emrun={"tasks": facts["tasks"], "input": facts["input"],
                   "provenance": _plain(facts["provenance"])}),
    )


RANGES: dict[str, tuple[float, float]] = {"sigmoid": (0.0, 1.0), "tanh": (-1.0, 1.0)}
"""The values each output activation gives."""
ABSOLUTE_TOLERANCE = 1e-3
"""bioimage.io's default absolute tolerance for reproducing a test output."""


SMALLEST = 1e-4
"""bioimage.io refuses a test output whose values all lie within this of 0."""


def _tolerance(name: str, output: np.ndarray) -> float | None:
    """The absolute tolerance for reproducing a test output: bioimage.io's default, or less
    where its rule wants less. The rule caps it at 1 % of the test output's maximum (a
    mostly empty semantic output, a synapse task on the synthetic patch, peaks far below
    0.1, and the default was refused). A maximum of 0 or below (a tanh or linear output
    negative over the whole patch) leaves no tolerance the rule accepts, though its own
    documentation speaks of the maximum *absolute* value: such an output gets no entry, and
    bioimage.io's tools use their default tolerance for it. An output within `SMALLEST` of
    0 everywhere (a head that predicts nothing on the synthetic patch) cannot be tested by
    bioimage.io at all: refused, in one line."""
    top = float(np.max(output))
    if float(np.min(output)) > -SMALLEST and top < SMALLEST:
        raise UserError(f"output {name!r} is within {SMALLEST:g} of 0 over the whole test "
                        f"patch (at most {float(np.abs(output).max()):.2g}), and bioimage.io "
                        "refuses test outputs that small; export this network as .emrun or "
                        ".onnx instead")
    if not top > 0:
        return None
    return min(ABSOLUTE_TOLERANCE, float(np.nextafter(np.float32(0.01 * top), 0)))


NAME_CHARACTERS = frozenset(string.ascii_letters + string.digits + "_+- ()")
"""What bioimage.io allows in a model's name (5 to 64 of them, 128 at most with a warning)."""


def _name(name: str) -> str:
    """The recipe's name as bioimage.io accepts it: its characters only (others become '-'),
    at least 5 of them ('demo' becomes 'emrun demo'), at most 64."""
    text = "".join(c if c in NAME_CHARACTERS else "-" for c in name.replace("_", " ")).strip()
    if len(text) < 5:
        text = f"emrun {text}".strip()
    return text[:64]


def _plain(value: Any) -> Any:
    """JSON-like data without None (bioimage.io's YAML values)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items() if v is not None}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _model_words(model: Any) -> str:
    """The model in words: its title and its parameters (a model without fields says only
    its name, not 'no parameters')."""
    fields = model.model_dump(exclude={"type"})
    return f"{model.title()} ({model.summary()})" if fields else str(model.title())


def plugin_packages(recipe: Any) -> list[str]:
    """The installed packages whose plugins implement a name the recipe uses: the
    pytorch_state_dict weights rebuild the network from the recipe, which needs them."""
    names: set[str] = set()

    def collect(value: Any) -> None:
        if isinstance(value, dict):
            if isinstance(value.get("type"), str):
                names.add(value["type"])
            for item in value.values():
                collect(item)
        elif isinstance(value, list | tuple):
            for item in value:
                collect(item)

    collect(recipe.model_dump())
    owners = packages_distributions()
    found: set[str] = set()
    for kind in registries.values():
        for name in names & set(kind.names()):
            entry = kind.entry(name)
            if entry.third_party:
                top = entry.origin.split(".")[0]
                found.update(owners.get(top, [top]))
    return sorted(found)


def _plugin_note(recipe: Any) -> list[str]:
    packages = plugin_packages(recipe)
    if not packages:
        return []
    return ["", f"The recipe names what emrun plugins add ({', '.join(packages)}): the "
            "pytorch_state_dict weights (emrun's ExportedNetwork) need emrun and those "
            "packages installed; the torchscript weights need neither."]


def _readme(trained: Trained, facts: dict[str, Any]) -> str:
    recipe = trained.recipe
    lines = [f"# {recipe.name}", "",
             recipe.description or "A network for 3D electron microscopy, trained with emrun.",
             "", f"Model: {_model_words(recipe.model)}.", *_plugin_note(recipe), "",
             "## Input", "",
             f"- `raw`: the EM image, axes (batch, channel, z, y, x); voxel size "
             f"{facts['input']['voxel_size'] or 'unknown'} nm (z, y, x).",
             f"- Raw intensities in [{facts['input']['intensity']['low']:g}, "
             f"{facts['input']['intensity']['high']:g}] map linearly to [0, 1] "
             "(the preprocessing).",
             f"- Any size of {list(recipe.infer_patch())} plus multiples of "
             f"{list(recipe.model.divisor())} voxels (z, y, x); emrun predicts with patches "
             f"of {list(recipe.infer_patch())} and blends their overlaps.", "", "## Outputs",
             ""]
    for (name, task), tensor in zip(facts["tasks"].items(), output_names(list(facts["tasks"])),
                                    strict=True):
        offsets = f"; channel i is the affinity to the voxel at offset {task['offsets']}[i]" \
            if "offsets" in task else ""
        lines.append(f"- `{tensor}`: {_task_words(name, tensor)}{task['target']}, "
                     f"{task['channels']} channel(s), {task['activation']}{offsets}.")
    lines += ["", "## Provenance", "",
              f"Trained for {trained.iteration} iterations by emrun {facts['emrun']} on "
              f"{', '.join(facts['provenance']['training_data'].values())}; exported "
              f"{facts['provenance']['exported']} with torch {facts['provenance']['torch']}.",
              f"The attached `{recipe.name}.emrun` holds the weights and the resolved recipe: "
              "`emrun infer --model THIS.zip` predicts with it, `emrun train --init-from "
              "THIS.zip` fine-tunes it.", "", "## Validation", "",
              "The test tensors are a synthetic EM patch and what this network predicted from "
              "it at export; bioimage.io's checks reproduce them from the weights. emrun "
              "predicts volumes blockwise, blending overlapping patches "
              f"(stride {list(recipe.infer.resolved_stride(recipe.infer_patch()))}).", "",
              f"License: {LICENSE} (change it in rdf.yaml if the weights are under another).",
              ""]
    return "\n".join(lines)
