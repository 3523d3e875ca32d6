"""gooddrag: point-based drag editing with diffusion models (GoodDrag, DragDiffusion).

``from gooddrag import Editor, EditResult`` is the Python entry point (``prepare_input`` validates an
edit request without a model, ``resolve_config`` and ``LoadOptions`` build its config). They are imported on first use, so the command line
(``gooddrag --version``) starts without loading torch. See docs/api.md.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["Editor", "EditResult", "LoadOptions", "prepare_input", "resolve_config", "__version__"]


def __getattr__(name: str) -> Any:
    if name in ("Editor", "EditResult"):
        from gooddrag.core import editor

        return getattr(editor, name)
    if name == "prepare_input":
        from gooddrag.core.inputs import prepare_input

        return prepare_input
    if name in ("LoadOptions", "resolve_config"):
        from gooddrag.core import config

        return getattr(config, name)
    raise AttributeError(f"module 'gooddrag' has no attribute {name!r}")
