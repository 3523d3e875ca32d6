"""Device and precision names shared by the backbones, metrics and the Editor (torch only)."""

from __future__ import annotations

import torch

from gooddrag.core.errors import RequirementError

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def resolve_device(device: str) -> torch.device:
    """auto -> cuda when available, else cpu; cuda[:i] must exist."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RequirementError(f"--device {device} asked for, but torch sees no CUDA device; use --device cpu")
    return torch.device(device)
