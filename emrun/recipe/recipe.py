"""The whole recipe: the section models composed into one frozen pydantic model.

The section modules (data, augment, model, tasks, run) define the registered specs; this
module builds the discriminated unions over *all* registered specs: asking the registries for
them loads the plugins first, so their specs join (see ``emrun.registry``).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from ..geometry import zyx
from ..registry import (
    Spec,
    augmentations,
    blends,
    losses,
    models,
    segmenters,
    sources,
    suggest,
    targets,
)
from . import data, model, tasks, unets  # noqa: F401  (importing registers the built-in specs)
from .augment import PRESETS, Compose, OneOf
from .errors import KeyedValueError
from .run import Bump, MutexWatershed, Precision, Train
from .tasks import BCELoss
from .types import Flag, Name, NonNegative, Seed, Size, Zyx, items_schema

DEFAULT_SOURCE_TYPE = "volume"
"""What a source without `type:` is."""

Source = sources.spec_union(default=DEFAULT_SOURCE_TYPE)


class Data(Spec):
    """Training sources (a weighted mixture) and validation sources, each by name."""

    sources: dict[Name, Source] = Field(  # type: ignore[valid-type]
        min_length=1, description="Training sources by name; at least one."
    )
    validation: dict[Name, Source] = Field(  # type: ignore[valid-type]
        default_factory=dict, description="Validation sources by name (may be empty)."
    )

AugmentSpec = augmentations.spec_union()
OneOf.model_rebuild(_types_namespace={"AugmentSpec": AugmentSpec})
Compose.model_rebuild(_types_namespace={"AugmentSpec": AugmentSpec})


ModelSpec = models.spec_union()

Target = targets.spec_union()
Loss = losses.spec_union()


def _target_optional(schema: dict[str, Any]) -> None:
    """In the JSON Schema, a task may omit `target` (see `task_defaults`)."""
    schema["required"] = [k for k in schema.get("required", []) if k != "target"]
    if not schema["required"]:
        del schema["required"]


class Task(Spec):
    """One output of the network: its target, loss, weight in the total loss, activation.

    A task named after a target type (e.g. `lsd`) may omit `target`; a task that omits
    `loss` gets its target's (bce, or mse for the regression targets lsd and distance), and
    one that omits `activation` its loss's (sigmoid for bce, dice, dice_bce and malis, none
    for mse, which trains the raw output); see `task_defaults`."""

    model_config = ConfigDict(**Spec.model_config, json_schema_extra=_target_optional)

    target: Target = Field(description="What to predict (`type:` affinity, boundary, ...); "  # type: ignore[valid-type]
                           "default: the target type the task is named after.")
    loss: Loss = Field(  # type: ignore[valid-type]
        default_factory=lambda: BCELoss(), description="How to score it (`type:` bce or mse)."
    )
    weight: NonNegative = Field(1.0, le=1e6, description="Weight of this task's loss.")
    activation: Literal["sigmoid", "none", "tanh"] = Field(
        "sigmoid", description="Output activation at inference (the loss works on logits)."
    )

    def channels(self) -> int:
        return self.target.channels()  # type: ignore[no-any-return]


def task_defaults(name: str, task: Any) -> Any:
    """Fill what a task may leave out, before validation: its target, when the task is named
    after a target type (`lsd: {weight: 0.5}`), its target's loss, and the activation that
    loss trains for.
    Anything not a mapping is left to the validator to refuse."""
    if task is None:
        task = {}
    if not isinstance(task, dict):
        return task
    task = dict(task)
    if "target" not in task and name in targets:
        task["target"] = {"type": name}
    target = task.get("target")
    kind = target.get("type") if isinstance(target, dict) else getattr(target, "type", None)
    loss = task.get("loss")
    named = loss.get("type") if isinstance(loss, dict) else getattr(loss, "type", None)
    trained_for = getattr(losses.entry(named).spec, "activation", None) \
        if isinstance(named, str) and named in losses else None
    if trained_for is not None:  # mse trains the raw output: an affinity task scored with
        task.setdefault("activation", trained_for)  # it through a sigmoid lay in [0.5, 0.73]
    if isinstance(kind, str) and kind in targets:
        spec = targets.entry(kind).spec
        task.setdefault("loss", {"type": spec.default_loss})  # type: ignore[attr-defined]
        task.setdefault("activation", spec.default_activation)  # type: ignore[attr-defined]
    return task

Blend = blends.spec_union()


class Infer(Spec):
    """How to predict a volume: patch lattice, blending, TTA, precision, output layout."""

    patch: Zyx | None = Field(None, description="Patch size, z, y, x; default: train.patch.")
    stride: Zyx | None = Field(None, description="Patch step, z, y, x (excludes `overlap`).")
    overlap: tuple[float, float, float] | None = Field(
        None, json_schema_extra=items_schema(minimum=0, exclusiveMaximum=1),
        description="Overlap as a fraction of the patch per axis, each in [0, 1); "
        "default (0.25, 0.25, 0.25) when no stride is given.",
    )
    blend: Blend = Field(  # type: ignore[valid-type]
        default_factory=lambda: Bump(), description="Blending window: bump or gaussian."
    )
    tta: Literal[1, 2, 4, 8, 16] = Field(1, description="Flip/transpose variants averaged.")
    tta_reduce: dict[str, Literal["mean", "min"]] = Field(
        default_factory=dict, description="Per task TTA reduction (default mean)."
    )
    batch_size: Size = Field(4, le=1024, description="Patches per forward pass.")
    precision: Precision = Field("bf16", description="fp32, or bf16/fp16 autocast.")
    dtype: Literal["uint8", "float16", "float32"] = Field(
        "uint8", description="Output dtype; uint8 stores round(255 p)."
    )
    chunks: Zyx | None = Field(None, description="Output chunk size; default: tiles the block.")
    block: Zyx | None = Field(None, description="Write-block size; default: chosen by the engine.")
    compile: Flag = Field(False, description="Compile the model with torch.compile.")
    compile_mode: Literal["default", "max-autotune", "reduce-overhead"] = Field(
        "default", description="torch.compile's mode when `compile` is true: max-autotune "
        "searches kernels (slow to start), reduce-overhead replays CUDA graphs (the engine's "
        "batches have one fixed shape on a GPU). `emrun bench infer --configs` measures them.")
    channels_last: Flag = Field(
        True, description="Use channels_last_3d memory format (faster on GPUs and on CPUs).")

    @model_validator(mode="after")
    def _check(self) -> Infer:
        if self.stride is not None and self.overlap is not None:
            raise KeyedValueError("overlap", "give either stride or overlap, not both")
        if self.overlap is not None and not all(0 <= o < 1 for o in self.overlap):
            raise KeyedValueError("overlap", f"overlap must be in [0, 1) per axis (got "
                                             f"{list(self.overlap)})")
        return self

    def resolved_stride(self, patch: tuple[int, int, int]) -> tuple[int, int, int]:
        """The lattice step for ``patch``: the stride, or the patch less the overlap."""
        if self.stride is not None:
            return self.stride
        overlap = self.overlap or (0.25, 0.25, 0.25)
        return zyx(max(1, round(p * (1 - o))) for p, o in zip(patch, overlap, strict=True))



Segmenter = segmenters.spec_union()


def _schema_allows_presets(schema: dict[str, Any]) -> None:
    """In the JSON Schema, `augment` is a list of specs or a preset name."""
    as_list = {k: v for k, v in schema.items() if k not in ("description", "title")}
    for key in as_list:
        del schema[key]
    schema["anyOf"] = [as_list, {"type": "string", "enum": list(PRESETS)}]


class UnknownPreset(ValueError):
    """`augment:` names a preset that does not exist."""


class Recipe(Spec):
    """An emrun experiment: data mixture, augmentations, model, tasks, training, inference."""

    name: Name = Field(description="Run name; the default run directory is runs/<name>.")
    description: str = Field("", max_length=10_000, description="What this recipe is for.")
    seed: Seed = Field(0, description="The one seed all randomness derives from.")
    extends: str | list[str] | None = Field(
        None,
        description="Recipe file(s) this one deep-merges onto, relative to this file. "
        "Resolved at load time; the resolved recipe no longer has it.",
    )
    data: Data = Field(description="Training and validation sources.")
    augment: list[AugmentSpec] = Field(  # type: ignore[valid-type]
        default_factory=list,
        description="Augmentations in order, or the name of a preset (e.g. `deepem`, `none`).",
        json_schema_extra=_schema_allows_presets,
    )
    model: ModelSpec = Field(description="Network (`type:` rsunet, updown, resenc or mednext).")  # type: ignore[valid-type]
    tasks: dict[Name, Task] = Field(
        min_length=1, description="Named outputs; the model gets one head per task."
    )
    train: Train = Field(description="Training settings.")
    infer: Infer = Field(default_factory=lambda: Infer(), description="Inference settings.")
    segment: Segmenter = Field(  # type: ignore[valid-type]
        default_factory=lambda: MutexWatershed(),
        description="Affinities -> segments (`type:` mws, waterz or cc).",
    )

    @field_validator("tasks", mode="before")
    @classmethod
    def _task_defaults(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            return value
        return {name: task_defaults(name, task) for name, task in value.items()}

    @field_validator("augment", mode="before")
    @classmethod
    def _expand_preset(cls, value: Any) -> Any:
        if isinstance(value, str):
            if value not in PRESETS:
                hint = suggest(value, list(PRESETS))[:1]
                did = f"; did you mean {hint[0]!r}?" if hint else ""
                raise UnknownPreset(
                    f"unknown augmentation preset {value!r}{did} (presets: {', '.join(PRESETS)})"
                )
            return PRESETS[value]
        return value

    def head_channels(self) -> dict[str, int]:
        """Output channels per task, in recipe order."""
        return {name: task.channels() for name, task in self.tasks.items()}

    def given_intensity(self) -> tuple[float, float] | None:
        """The intensity scale (low, high) the training sources give (the first that gives
        one), or None: each volume is then scaled by its dtype's default."""
        for source in self.data.sources.values():
            if isinstance(source, data.VolumeSource) and source.intensity is not None:
                return source.intensity.low, source.intensity.high
        return None

    def infer_patch(self) -> tuple[int, int, int]:
        return self.infer.patch or self.train.patch

    def resolved(self) -> dict[str, Any]:
        """The fully resolved recipe as plain data (defaults filled, presets expanded)."""
        return self.model_dump(mode="json", exclude={"extends"})
