"""The whole recipe: one frozen pydantic model, sections as in DESIGN.md."""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator

from ..registry import Spec, suggest
from .augment import PRESETS, AugmentSpec
from .data import Data
from .model import ModelSpec
from .run import Infer, MutexWatershed, Segmenter, Train
from .tasks import Task
from .types import Name, Seed


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
    model: ModelSpec = Field(description="Network (`type:` rsunet or updown).")  # type: ignore[valid-type]
    tasks: dict[Name, Task] = Field(
        min_length=1, description="Named outputs; the model gets one head per task."
    )
    train: Train = Field(description="Training settings.")
    infer: Infer = Field(default_factory=lambda: Infer(), description="Inference settings.")
    segment: Segmenter = Field(  # type: ignore[valid-type]
        default_factory=lambda: MutexWatershed(),
        description="Affinities -> segments (`type:` mws, waterz or cc).",
    )

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

    def parameter_count(self) -> int:
        return self.model.parameter_count(list(self.head_channels().values()))  # type: ignore[no-any-return]

    def infer_patch(self) -> tuple[int, int, int]:
        return self.infer.patch or self.train.patch

    def resolved(self) -> dict[str, Any]:
        """The fully resolved recipe as plain data (defaults filled, presets expanded)."""
        return self.model_dump(mode="json", exclude={"extends"})
