"""The `train`, `infer` and `segment` sections: how to train (optimizers, learning-rate
schedules, the loop's settings), predict (blend windows, batches, precision, TTA) and segment
(the registered segmenter specs, each declaring the value a sweep varies)."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, model_validator

from ..registry import Spec, blends, segmenters
from .errors import KeyedValueError
from .types import Count, Flag, NonNegative, Positive, PositiveCount, Size, Zyx, items_schema

Precision = Literal["fp32", "bf16", "fp16"]


class Adam(Spec):
    """Adam (AdamW with `weight_decay` decoupled)."""

    type: Literal["adam", "adamw"] = "adam"
    lr: Positive = Field(1e-3, le=10, description="Base learning rate.")
    betas: tuple[float, float] = Field((0.9, 0.999), description="Adam betas, each in [0, 1).",
                                       json_schema_extra=items_schema(minimum=0,
                                                                      exclusiveMaximum=1))
    eps: Positive = Field(1e-8, le=1, description="Numerical epsilon.")
    weight_decay: NonNegative = Field(0.0, le=1, description="Weight decay.")

    @model_validator(mode="after")
    def _check(self) -> Adam:
        if not all(0 <= b < 1 for b in self.betas):
            raise KeyedValueError("betas", f"betas must be in [0, 1) (got {list(self.betas)})")
        return self


class SGD(Spec):
    """Stochastic gradient descent with momentum."""

    type: Literal["sgd"] = "sgd"
    lr: Positive = Field(1e-2, le=10, description="Base learning rate.")
    momentum: float = Field(0.9, ge=0, lt=1, description="Momentum.")
    nesterov: Flag = Field(False, description="Nesterov momentum.")
    weight_decay: NonNegative = Field(0.0, le=1, description="Weight decay.")


WARMUP = "Iterations of linear warm-up: step t of W uses (t + 1) / (W + 1) of the rate."


class Constant(Spec):
    """The base learning rate throughout (after an optional warm-up)."""

    type: Literal["constant"] = "constant"
    warmup: Count = Field(0, description=WARMUP)


class Step(Spec):
    """Multiply the learning rate by `gamma` at each milestone."""

    type: Literal["step"] = "step"
    warmup: Count = Field(0, description=WARMUP)
    milestones: list[PositiveCount] = Field(min_length=1, description="Iterations to decay at.")
    gamma: float = Field(0.1, gt=0, le=1, description="Decay factor.")


class Cosine(Spec):
    """Cosine decay towards `min_factor` x the base rate, which the step after the last
    would take (the last update's rate is just above it)."""

    type: Literal["cosine"] = "cosine"
    warmup: Count = Field(0, description=WARMUP)
    min_factor: float = Field(0.0, ge=0, le=1,
                              description="Rate the decay ends at, as a fraction of base.")


class Poly(Spec):
    """Polynomial decay (1 - t/T)^power, as in nnU-Net."""

    type: Literal["poly"] = "poly"
    warmup: Count = Field(0, description=WARMUP)
    power: Positive = Field(0.9, le=10, description="Exponent.")


class Train(Spec):
    """How to train: patch, batch, iterations, optimiser, schedule, precision, bookkeeping."""

    patch: Zyx = Field(description="Network input size in voxels, z, y, x.")
    batch_size: Size = Field(1, le=1024, description="Samples per step (per GPU).")
    iterations: PositiveCount = Field(description="Optimiser steps in the whole run.")
    optimizer: Adam | SGD = Field(
        default_factory=lambda: Adam(), discriminator="type", description="adam, adamw or sgd."
    )
    schedule: Constant | Step | Cosine | Poly = Field(
        default_factory=lambda: Constant(),
        discriminator="type",
        description="Learning-rate schedule: constant, step, cosine or poly.",
    )
    precision: Precision = Field("fp32", description="fp32, or bf16/fp16 autocast.")
    compile: Flag = Field(False, description="Compile the model with torch.compile.")
    channels_last: Flag = Field(
        True, description="Use channels_last_3d memory format (faster on GPUs and on CPUs).")
    deterministic: Flag = Field(
        False, description="Deterministic kernels and data order: bitwise-reproducible runs."
    )
    grad_clip: Positive | None = Field(None, description="Clip the gradient norm to this.")
    accumulate: Size = Field(1, le=1024, description="Batches per optimiser step.")
    ema: float | None = Field(
        None, gt=0, lt=1, description="Decay of an exponential moving average of the weights "
        "(ramped up as min(decay, (1 + n) / (10 + n)) over the first n updates)."
    )
    checkpoint_every: PositiveCount = Field(1000, description="Iterations between checkpoints.")
    keep_checkpoints: Size = Field(3, le=10_000, description="Numbered checkpoints kept.")
    validate_every: Count = Field(1000, description="Iterations between validations; 0: never.")
    validate_segmentation: Flag = Field(
        True, description="Validation also predicts each labelled validation box (at most "
        "4 M voxels of it, centred in y and x), segments it (the recipe's segmenter, a few "
        "parameter values) and scores adapted Rand error and VOI; best.pt is then chosen by "
        "adapted Rand error instead of the loss.")
    validate_connected_truth: Flag = Field(
        True, description="Score validation segmentations against each truth object's "
        "connected pieces inside the validated box: a box cut from a larger annotation shows "
        "pieces of one object that join only outside it, which no segmentation of the box "
        "can join (as `emrun evaluate --connected-truth`); false: the labels as they are.")
    validate_in_background: Flag | None = Field(
        None, description="Segment and score validations in a helper process while training "
        "goes on (the validation boxes are still predicted in the trainer); null: on a GPU "
        "(on a CPU the helper would take the cores training uses).")
    log_every: PositiveCount = Field(50, description="Iterations between log lines.")
    image_every: Count = Field(1000, description="Iterations between TensorBoard images; 0: never.")
    workers: int = Field(2, ge=0, le=256, strict=True,
                         description="Data-loader worker processes; 0: none.")


@blends.register("bump")
class Bump(Spec):
    """DeepEM's bump window: smooth, zero at the patch border."""

    type: Literal["bump"] = "bump"


@blends.register("gaussian")
class Gaussian(Spec):
    """A Gaussian window, sigma = `sigma` x patch size per axis."""

    type: Literal["gaussian"] = "gaussian"
    sigma: float = Field(0.125, gt=0, le=1, description="Sigma as a fraction of the patch size.")


SWEEP_VALUES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
"""What `emrun segment --sweep` tries when no values are given, for every segmenter so far."""


MinSize = Annotated[Count, Field(description="Merge segments smaller than this into "
                                             "neighbours.")]
"""Every segmenter's ``min_size`` (declared last in each spec, so recipes list it last)."""


class SegmenterBase(Spec):
    """What every segmenter spec declares, so that the command, the sweep and the trainer's
    validation treat all alike: the one value a sweep varies (``value_field``; one value of
    it is called ``value_name``, which is also the command's flag: ``--bias``,
    ``--threshold``), the values tried, and a ``min_size: MinSize`` field (the segment
    driver merges smaller segments for every method)."""

    value_field: ClassVar[str]
    value_name: ClassVar[str]
    sweep_values: ClassVar[tuple[float, ...]] = SWEEP_VALUES
    validation_values: ClassVar[tuple[float, ...]] = SWEEP_VALUES
    """The few values the trainer's validation (and the SNEMI3D benchmark) tries each time."""

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        missing = [name for name in ("value_field", "value_name") if not hasattr(cls, name)]
        if "min_size" not in cls.model_fields:
            missing.append("a min_size field")
        elif cls.value_field not in cls.model_fields:
            missing.append(f"the field {cls.value_field!r} that value_field names")
        if missing:
            raise TypeError(f"segmenter spec {cls.__name__} lacks {', '.join(missing)}")

    def value(self) -> float:
        """The current value of the swept parameter (the first, for a list of them)."""
        value = getattr(self, self.value_field)
        return float(value[0] if isinstance(value, list) else value)

    def value_update(self, value: float) -> dict[str, Any]:
        """The field changes that set the swept parameter to ``value``."""
        current = getattr(self, self.value_field)
        return {self.value_field: [float(value)] if isinstance(current, list) else float(value)}


segmenters.require(SegmenterBase)


@segmenters.register("mws")
class MutexWatershed(SegmenterBase):
    """Mutex watershed: long-range channels repulsive, nearest neighbours attractive."""

    type: Literal["mws"] = "mws"
    value_field: ClassVar[str] = "bias"
    value_name: ClassVar[str] = "bias"
    validation_values: ClassVar[tuple[float, ...]] = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
    """Long-range edges repel below the bias (SNEMI3D's best: 0.3)."""

    bias: float = Field(0.5, ge=0, le=1, description=(
        "Long-range edges weigh affinity minus bias: repulsive below it (higher: more splits)."))
    min_size: MinSize = 0


@segmenters.register("waterz")
class Waterz(SegmenterBase):
    """Watershed plus agglomeration by mean or 85th-percentile affinity (extra `waterz`)."""

    type: Literal["waterz"] = "waterz"
    value_field: ClassVar[str] = "thresholds"
    value_name: ClassVar[str] = "threshold"
    validation_values: ClassVar[tuple[float, ...]] = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9)
    """Merge while 1 - affinity is below the threshold (SNEMI3D's best: 0.85)."""

    thresholds: list[Annotated[float, Field(ge=0, le=1)]] = Field(
        [0.5], min_length=1, description="Merge thresholds, each in [0, 1].")
    scoring: Literal["mean", "p85"] = Field("mean", description="Edge score.")
    min_size: MinSize = 0


@segmenters.register("cc")
class ConnectedComponents(SegmenterBase):
    """Connected components of thresholded nearest-neighbour affinities (baseline)."""

    type: Literal["cc"] = "cc"
    value_field: ClassVar[str] = "threshold"
    value_name: ClassVar[str] = "threshold"
    validation_values: ClassVar[tuple[float, ...]] = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
    """Voxels join where the affinity is above the threshold."""

    threshold: float = Field(0.5, gt=0, lt=1, description="Affinity above which voxels join.")
    min_size: MinSize = 0
