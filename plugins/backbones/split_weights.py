"""fp32 weights split into a bf16 half to compute with and an int16 half to restore them exactly.

bf16 is the upper 16 bits of fp32. Autocast with fp32 weights makes a bf16 copy of every weight at
every pass and keeps it for the backward pass: 1.7 GB more for SD1.5's UNet, the opposite of what
mixed precision is for. Here each fp32 weight is replaced, for the duration, by

    hi: bf16   the weight rounded to nearest (what convolutions and matmuls read)
    lo: int16  the low 16 bits of the fp32 pattern

4 bytes per weight, as before, and no copies while computing. ``join`` rebuilds the exact fp32
bits: the weights after an edit are bit for bit the weights before it.

Rounding: to nearest, ties toward zero magnitude (``lo == 0x8000`` rounds down). Plain
round-half-to-even would leave a tie and its neighbour with the same ``hi`` and ``lo``, so the
fp32 value could not be recovered; ties are 1 in 65536 weights and either choice is 0.5 ulp away.
"""

from __future__ import annotations

import ctypes
import sys
from typing import Any

import torch

assert sys.byteorder == "little", "the fp32 bit split assumes little-endian memory"


def split(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 ``x`` -> (hi bf16, lo int16), same shape; ``join(hi, lo)`` is bitwise ``x``.
    Works on int16 views of the fp32 bytes: the only temporary is a one-byte mask per weight."""
    halves = x.contiguous().view(-1).view(torch.int16).view(-1, 2)  # (n, 2): [low 16 bits, high 16 bits]
    lo = halves[:, 0].clone()
    hi = halves[:, 1].clone()
    hi += _rounds_up(lo)  # round the magnitude to nearest (the pattern is sign-magnitude)
    return hi.view(torch.bfloat16).view(x.shape), lo.view(x.shape)


def join(hi: torch.Tensor, lo: torch.Tensor) -> torch.Tensor:
    """The exact fp32 tensor that :func:`split` took apart."""
    out = torch.empty(hi.shape, dtype=torch.float32, device=hi.device)
    halves = out.view(-1).view(torch.int16).view(-1, 2)
    halves[:, 0] = lo.reshape(-1)
    halves[:, 1] = hi.reshape(-1).view(torch.int16)
    halves[:, 1] -= _rounds_up(halves[:, 0])
    return out


def _rounds_up(lo: torch.Tensor) -> torch.Tensor:
    """Whether the low half, read unsigned, is above 0x8000: in int16, -32767..-1. (int16 mask)"""
    return ((lo < 0) & (lo != -32768)).to(torch.int16)


#: layers whose parameters autocast casts to the lower precision at every call
AUTOCAST_LAYERS = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.ConvTranspose2d)


class SplitWeights:
    """While held, every fp32 linear/conv parameter of ``module`` is its bf16 ``hi``; ``join()`` restores fp32.

    The weights are split in groups of about ``CHUNK`` elements, each as one flat tensor: a few
    kernels per group instead of a few per weight (SD1.5's UNet has ~700 weights), and never more
    than one group's worth of extra memory. Each weight becomes a view into its group's flat halves
    (and, after ``join``, into its group's flat fp32 tensor)."""

    CHUNK = 64 << 20  # elements per group: 256 MB of fp32

    def __init__(self, module: Any, frozen_only: bool = False):
        """Only the weights and biases of linear and convolution layers are split: autocast reads
        those in bf16 anyway (the same rounding), while normalisation layers run in fp32 with their
        fp32 parameters, which stay as they are. ``frozen_only``: leave the parameters that require
        grad in fp32 (LoRA training: the LoRA weights train in fp32, the frozen base is read in bf16)."""
        self._held: list[tuple[list[torch.nn.Parameter], torch.Tensor, torch.Tensor]] = []
        params, seen = [], set()
        for layer in module.modules():
            if not isinstance(layer, AUTOCAST_LAYERS):
                continue
            for q in layer.parameters(recurse=False):
                if q.dtype == torch.float32 and id(q) not in seen and not (frozen_only and q.requires_grad):
                    seen.add(id(q))
                    params.append(q)
        with torch.no_grad():
            for group in _groups(params, self.CHUNK):
                flat = torch.cat([q.data.reshape(-1) for q in group])  # (n,) fp32
                hi, lo = split(flat)
                del flat
                _point(group, hi)
                self._held.append((group, hi, lo))

    def join(self) -> None:
        with torch.no_grad():
            while self._held:  # each group's halves are freed as soon as its weights are whole again
                group, hi, lo = self._held.pop()
                _point(group, join(hi, lo))
                del hi, lo
        _return_freed_memory()


def _groups(params: list[torch.nn.Parameter], size: int) -> list[list[torch.nn.Parameter]]:
    """``params`` in order, cut into groups of at most ``size`` elements (or one larger weight)."""
    out: list[list[torch.nn.Parameter]] = []
    n = size
    for q in params:
        if n + q.numel() > size:
            out.append([])
            n = 0
        out[-1].append(q)
        n += q.numel()
    return out


def _point(group: list[torch.nn.Parameter], flat: torch.Tensor) -> None:
    """Each weight of ``group`` becomes its slice of ``flat`` (in order), in its own shape."""
    for q, part in zip(group, flat.split([q.numel() for q in group])):
        q.data = part.view(q.shape)


def _return_freed_memory() -> None:
    """Hand the freed halves back to the OS. glibc keeps freed blocks under 32 MB in its heap, so
    without this the process would keep ~1.7 GB it no longer uses (no-op elsewhere)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
