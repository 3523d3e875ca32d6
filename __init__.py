"""gooddrag: point-based drag editing with diffusion models (GoodDrag, DragDiffusion)."""

__version__ = "0.1.0"
