"""What an edit reports about itself: wall time per phase, peak memory, library versions."""

from __future__ import annotations

import contextlib
import resource
import time
from typing import Any

import torch


class PhaseTimer:
    """Wall time per phase (CUDA-synchronised at the edges only) and phase events."""

    def __init__(self, device: torch.device, events: Any):
        self.device, self.events, self.times = device, events, {}
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

    @contextlib.contextmanager
    def __call__(self, name: str):
        self.events.phase(name, "start")
        t0 = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.times[name] = round(time.perf_counter() - t0, 4)
        self.events.phase(name, "end")


def peak_mb(device: torch.device) -> float:
    """Peak device memory since the edit started (CUDA), else the process's peak RSS."""
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # process peak RSS (Linux: KiB)


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("gooddrag", "torch", "diffusers", "transformers", "peft", "accelerate", "xformers"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out
