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


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` multiplies bf16 in hardware: a CUDA GPU with bf16 support (Ampere or newer),
    or a CPU with AMX tiles or AVX512-BF16 (oneDNN then runs bf16 convolutions and matmuls natively)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        probes = [getattr(torch.cpu, n, None) for n in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
        return any(bool(f()) for f in probes if f is not None)
    return False


#: ``auto`` autocasts only UNets at least this large: on a 1M-parameter test model the casts cost more
#: than bf16 saves (a drag step 2.7x slower on the build CPU); SD1.5's UNet has 860M (1.6x faster)
AUTOCAST_MIN_PARAMETERS = 100_000_000


def resolve_precision(precision: str, device: torch.device, weights: torch.dtype, faithful: bool,
                      parameters: int) -> torch.dtype | None:
    """The autocast dtype of the heavy UNet passes, or None for plain passes in the weights' dtype.

    ``auto``: bf16 autocast when the weights are fp32, the device has native bf16 and the UNet has
    ``AUTOCAST_MIN_PARAMETERS`` or more, else none; ``fp32``: none (exact fp32 arithmetic);
    ``bf16``/``fp16``: autocast to that dtype. Reduced-precision weights already compute in their own
    dtype, and the faithful path is fp32: both get none. (The contradictory combinations are refused
    by the config check before anything loads.)"""
    if faithful or weights != torch.float32 or precision == "fp32":
        return None
    if precision == "auto":
        return torch.bfloat16 if native_bf16(device) and parameters >= AUTOCAST_MIN_PARAMETERS else None
    return DTYPES[precision]
