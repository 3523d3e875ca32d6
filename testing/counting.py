"""Count what a piece of work asks of the backend: operator dispatches below autograd (each one a
kernel launch on a GPU, or a view that launches none) and host syncs (a device value read by the
host: ``.item()``, ``bool(t)``, ``float(t)``, ``.tolist()``, ``.cpu()``, ``.numpy()``).

On a CPU nothing waits, but the same reads are what make a GPU stall: every ``item``/``bool``
dispatches ``aten._local_scalar_dense`` (counted below autograd), and ``tolist``/``cpu``/``numpy``
are counted where Python calls them. Used by ``benchmarks/counts.py`` and the sync test.
"""

from __future__ import annotations

import collections
import contextlib
from typing import Any, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

#: ops that only make a new view of the same memory: no kernel runs for them on a GPU
VIEW_OPS = frozenset({"detach", "view", "_unsafe_view", "reshape", "expand", "transpose", "t", "permute",
                      "slice", "select", "unsqueeze", "squeeze", "as_strided", "alias", "unbind", "split",
                      "split_with_sizes", "chunk", "narrow", "view_as_real", "view_as_complex", "diagonal",
                      "unfold", "lift_fresh", "_reshape_alias", "flatten", "unflatten", "_to_copy_view"})
SYNC_OPS = frozenset({"_local_scalar_dense"})


class OpCounter(TorchDispatchMode):
    """Counts every operator call that reaches the backend while active (nests with autograd: the
    backward pass's ops are counted too, on the thread that runs it)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()
        self.syncs = 0  # host reads of device values (see module docstring)
        self.paused = False

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if not self.paused:
            name = func.overloadpacket.__name__
            self.ops[name] += 1
            if name in SYNC_OPS:
                self.syncs += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.ops.values())

    @property
    def launching(self) -> int:
        """Dispatches that run a kernel (views excluded)."""
        return sum(n for k, n in self.ops.items() if k not in VIEW_OPS)

    def snapshot(self) -> tuple[int, int, int]:
        return self.total, self.launching, self.syncs


@contextlib.contextmanager
def counting() -> Iterator[OpCounter]:
    """``with counting() as c: ...`` counts dispatches (``c.total``) and host syncs (``c.syncs``),
    including ``tolist``/``cpu``/``numpy`` calls, which dispatch nothing on a CPU tensor."""
    counter = OpCounter()
    originals = {name: getattr(torch.Tensor, name) for name in ("tolist", "cpu", "numpy")}

    def wrap(name: str, fn: Any) -> Any:
        def counted(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if not counter.paused:
                counter.syncs += 1
            return fn(self, *args, **kwargs)
        return counted

    for name, fn in originals.items():
        setattr(torch.Tensor, name, wrap(name, fn))
    try:
        with counter:
            yield counter
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)
