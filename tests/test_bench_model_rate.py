"""The model-alone rate `emrun bench infer` divides the engine's rate by is taken the way
the engine runs its passes: on a CPU one pass per thread, side by side. Timing one pass
spread over every thread measured another rate, so the efficiency compared two setups."""

from __future__ import annotations

import threading

import numpy as np
import torch
from test_infer_speed_same import Exact, make_recipe
from test_review_session_scaling import WANTED, threads_set

from emrun.bench.model_rate import WARMUP_ROUNDS, model_times
from emrun.infer.engine import Engine


class Recording(Exact):
    """`Exact`, noting each pass's thread and that thread's torch count."""

    def __init__(self, channels: dict[str, int]) -> None:
        super().__init__(channels)
        self.seen: list[tuple[int, int]] = []
        self.lock = threading.Lock()

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        with self.lock:
            self.seen.append((threading.get_ident(), torch.get_num_threads()))
        return super().forward(x)


def test_cpu_model_alone_runs_one_pass_per_thread_side_by_side() -> None:
    recipe = make_recipe()
    model = Recording(recipe.head_channels()).eval()
    engine = Engine(recipe, model, torch.device("cpu"))
    image = (np.random.default_rng(0).random((8, 40, 40)) * 255).astype(np.uint8)
    with threads_set(WANTED):
        times = model_times(engine, image, repeats=3)
        after = torch.get_num_threads()
    assert len(times) == 3 and all(t > 0 for t in times)
    assert len(model.seen) == (WARMUP_ROUNDS + 3) * WANTED  # every thread busy each round
    assert {count for _, count in model.seen} == {1}  # each pass on one thread
    assert len({thread for thread, _ in model.seen}) == WANTED
    assert threading.get_ident() not in {thread for thread, _ in model.seen}
    assert after == WANTED  # the caller's count is back


def test_one_thread_times_one_pass_at_a_time() -> None:
    recipe = make_recipe()
    model = Recording(recipe.head_channels()).eval()
    engine = Engine(recipe, model, torch.device("cpu"))
    image = (np.random.default_rng(1).random((8, 40, 40)) * 255).astype(np.uint8)
    with threads_set(1):
        times = model_times(engine, image, repeats=2)
    assert len(times) == 2
    assert len(model.seen) == WARMUP_ROUNDS + 2
    assert {thread for thread, _ in model.seen} == {threading.get_ident()}
