"""``--gif``: drag.gif, one decoded frame per drag (an event-hook plugin on ``gooddrag_preview``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PIL import Image

from gooddrag.core.hookspecs import hookimpl
from gooddrag.plugins.outputs.files import to_pil


class GifWriter:
    """Collects a decoded frame after every drag, for drag.gif (decoding costs time: only with --gif)."""

    def __init__(self, backbone: Any, size: tuple[int, int], every: int = 1):
        self.backbone, self.size, self.every, self.frames, self.n = backbone, size, every, [], 0

    @hookimpl
    def gooddrag_preview(self, timestep, drag, latent):
        self.n += 1
        if (self.n - 1) % self.every == 0:
            self.frames.append(to_pil(self.backbone.decode(latent)).resize(self.size))

    def save(self, path: Path, final: Image.Image) -> None:
        frames = self.frames + [final] * 5
        frames[0].save(path, save_all=True, append_images=frames[1:], duration=80, loop=0)
