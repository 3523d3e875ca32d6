"""What an edit reports about itself: wall time per phase, peak memory, library versions."""

from __future__ import annotations

import contextlib
import resource
import time
from typing import Any

import torch


class PhaseTimer:
    """Wall time per phase (CUDA-synchronised at the edges only) and phase events."""

    def __init__(self, device: torch.device, events: Any, counter: Any = None):
        self.device, self.events, self.times = device, events, {}
        self.counter = counter  # the backbone's UNet pass counter (engine.UNetPasses), or None
        self._passes: dict[str, dict[str, int]] = {}
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

    @contextlib.contextmanager
    def __call__(self, name: str):
        self.events.phase(name, "start")
        before = self.counter.snapshot() if self.counter is not None else None
        t0 = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.times[name] = round(time.perf_counter() - t0, 4)
        if before is not None:  # plain Python ints: no host sync
            fwd, bwd = (now - then for now, then in zip(self.counter.snapshot(), before))
            self._passes[name] = {"forward": fwd, "backward": bwd}
        self.events.phase(name, "end")

    @property
    def passes(self) -> dict[str, dict[str, int]]:
        """UNet passes per phase, ``{"lora": {"forward": n, "backward": m}, ..., "total": {...}}``; {}
        when the backbone does not count them."""
        if not self._passes:
            return {}
        total = {k: sum(p[k] for p in self._passes.values()) for k in ("forward", "backward")}
        return {**self._passes, "total": total}


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
