"""Device and precision names shared by the backbones, metrics and the Editor (torch only)."""

from __future__ import annotations

import os

import torch

from gooddrag.core.errors import RequirementError

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def resolve_device(device: str) -> torch.device:
    """auto -> cuda when available, else cpu; cuda[:i] must exist."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RequirementError(f"device {device!r} asked for, but torch sees no CUDA device; use device cpu or auto")
    index = device.partition(":")[2]
    if index.isdigit() and int(index) >= torch.cuda.device_count():
        raise RequirementError(f"device {device!r} asked for, but torch sees {torch.cuda.device_count()} CUDA "
                               f"device(s); use cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
    return torch.device(device)


def describe_device(device: torch.device | str) -> str:
    """``cpu``, or ``cuda:0 (GPU 3, <name>)``: the physical index too, since CUDA_VISIBLE_DEVICES (set by
    Ray for each actor) renumbers the GPUs a process sees, so ``cuda:0`` alone says nothing."""
    device = torch.device(device)
    if device.type != "cuda":
        return str(device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    physical = visible[index] if index < len(visible) else str(index)
    return f"cuda:{index} (GPU {physical}, {torch.cuda.get_device_name(index)})"
