"""gooddrag: point-based drag editing with diffusion models (GoodDrag, DragDiffusion).

``from gooddrag import Editor, EditResult`` is the Python entry point. It is imported on first use,
so the command line (``gooddrag --version``) starts without loading torch.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["Editor", "EditResult", "__version__"]


def __getattr__(name: str) -> Any:
    if name in ("Editor", "EditResult"):
        from gooddrag.core import editor

        return getattr(editor, name)
    raise AttributeError(f"module 'gooddrag' has no attribute {name!r}")
