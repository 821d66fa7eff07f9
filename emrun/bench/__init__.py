"""Benchmarks behind `emrun bench ...`: each returns a dict the CLI prints (and as JSON)."""

from __future__ import annotations

import torch

from ..devices import parse_device, require_visible


def bench_device(name: str | None) -> torch.device:
    """The device a benchmark runs on: ``name`` checked as `emrun infer` checks it (a typo or a
    GPU that is not there is the user's error, exit 2, not a crash midway), or a GPU if any."""
    name = name or ("cuda" if torch.cuda.is_available() else "cpu")
    device = parse_device(name)
    require_visible(device, name)
    return device
