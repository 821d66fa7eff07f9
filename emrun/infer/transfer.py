"""Copies between the host and a GPU that do not stall it.

The device finishes a block and should start the next at once; the block's quantised values
travel back to a pinned host buffer asynchronously and the writer thread that compresses
them waits for that copy alone (``HostArray.numpy``). The input goes the other way through
pinned memory too (``pinned``, called in reader threads). On a CPU both are plain tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class HostArray:
    """A tensor on its way to host memory; ``numpy()`` waits for it."""

    tensor: torch.Tensor
    ready: torch.cuda.Event | None = None

    def numpy(self) -> np.ndarray:
        if self.ready is not None:
            self.ready.synchronize()
        return self.tensor.numpy()


def to_host(tensor: torch.Tensor) -> HostArray:
    """Start copying ``tensor`` to (pinned) host memory; returns at once on a GPU."""
    if tensor.device.type != "cuda":
        return HostArray(tensor.cpu())
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor, non_blocking=True)
    ready = torch.cuda.Event()
    ready.record(torch.cuda.current_stream(tensor.device))
    return HostArray(host, ready)


def pinned(array: np.ndarray, device: torch.device) -> np.ndarray | torch.Tensor:
    """``array`` in page-locked memory when it is bound for a GPU (the copy can then run
    asynchronously); as it is otherwise."""
    if device.type != "cuda":
        return array
    return torch.from_numpy(np.ascontiguousarray(array)).pin_memory()
