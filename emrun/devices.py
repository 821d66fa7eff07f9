"""Devices named by the user (`--device`): parsed and checked once, for every command.
torch is imported only by what needs it: CPU-only workers (segmentation) ask for cores and
memory here without paying for torch's import."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from .errors import UserError

if TYPE_CHECKING:
    import torch


def parse_device(name: str) -> torch.device:
    """``name`` as a torch device; a typo is the user's to fix (exit 2), not a crash."""
    import torch

    try:
        return torch.device(name)
    except RuntimeError as exc:
        raise UserError(f"--device {name}: {exc}") from None


def require_visible(device: torch.device, name: str) -> None:
    """Refuse a CUDA device this process cannot see (no GPU, or an index past the last)."""
    import torch

    if device.type == "cuda" and (not torch.cuda.is_available() or (
            device.index is not None and device.index >= torch.cuda.device_count())):
        raise UserError(f"--device {name}: no such CUDA device is visible "
                        f"({torch.cuda.device_count()} visible to torch {torch.__version__})")


def cpu_cores() -> int:
    """The CPU cores this process may use (a SLURM or taskset allocation, not the machine's)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def available_memory() -> int:
    """Bytes of memory available to new allocations (Linux MemAvailable; else the free
    physical pages)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as info:
            for line in info:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


def daisy_package() -> Any:
    """The daisy package, which `--scheduler daisy` hands blocks to (inference, scaled
    segmentation, scoring): an optional extra, so its absence is the user's to fix."""
    try:
        import daisy
    except ImportError:
        raise UserError("--scheduler daisy needs daisy >= 2: pip install 'emrun[daisy]'") from None
    return daisy
