"""Copies between the host and a GPU that do not stall it.

The device finishes a block and should start the next at once; the block's quantised values
travel back to a pinned host buffer on a copy stream of their own (so the next block's
kernels do not queue behind the copy) and the writer thread that compresses them waits for
that copy alone (``HostArray.numpy``). The input goes the other way through pinned memory
too (``pinned``, called in reader threads). ``DeviceQueue`` lets the host run one block ahead
of the device. On a CPU all of these are plain tensors and no-ops.
"""

from __future__ import annotations

import functools
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


@functools.cache
def _copy_stream(device: torch.device) -> torch.cuda.Stream:
    return torch.cuda.Stream(device)


def to_host(tensor: torch.Tensor) -> HostArray:
    """Start copying ``tensor`` to (pinned) host memory once the work queued so far on its
    device is done; returns at once on a GPU."""
    if tensor.device.type != "cuda":
        return HostArray(tensor.cpu())
    stream = _copy_stream(tensor.device)
    stream.wait_stream(torch.cuda.current_stream(tensor.device))
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    with torch.cuda.stream(stream):
        host.copy_(tensor, non_blocking=True)
    tensor.record_stream(stream)  # its memory is not reused before the copy has read it
    ready = torch.cuda.Event()
    ready.record(stream)
    return HostArray(host, ready)


def to_device(array: HostArray, device: torch.device) -> torch.Tensor:
    """``array`` back on ``device``: copied on the copy stream (after its copy to the host,
    queued there before), so the copy runs while the device still works on the block
    queued before (the host runs a block ahead: `DeviceQueue`); the device's own stream
    waits for it before the work queued after this call.
    The pinned buffer is not reused before the copy has read it (torch's pinned-memory
    cache waits for copies queued from it). On a CPU: as it is."""
    if device.type != "cuda":
        return array.tensor
    stream = _copy_stream(device)
    current = torch.cuda.current_stream(device)
    with torch.cuda.stream(stream):
        if array.ready is not None:
            stream.wait_event(array.ready)
        tensor = array.tensor.to(device, non_blocking=True)
    copied = torch.cuda.Event()
    copied.record(stream)
    current.wait_event(copied)
    tensor.record_stream(current)  # allocated for the copy stream, used and freed on this one
    return tensor


def pinned(array: np.ndarray, device: torch.device) -> np.ndarray | torch.Tensor:
    """``array`` in page-locked memory when it is bound for a GPU (the copy can then run
    asynchronously); as it is otherwise."""
    if device.type != "cuda":
        return array
    return torch.from_numpy(np.ascontiguousarray(array)).pin_memory()


class DeviceQueue:
    """Keeps the host at most one block ahead of the device: ``step()`` after launching a
    block's work waits for the previous block's, so the device always has the next block
    queued while host memory for blocks in flight stays bounded (no-op on a CPU, where the
    work is done when its call returns)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._previous: torch.cuda.Event | None = None

    def step(self) -> None:
        if self.device.type != "cuda":
            return
        launched = torch.cuda.Event()
        launched.record(torch.cuda.current_stream(self.device))
        if self._previous is not None:
            self._previous.synchronize()
        self._previous = launched
