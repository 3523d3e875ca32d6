"""The drag animation (``--gif``, ``--frames``, ``--mp4``): an event-hook plugin on ``gooddrag_preview``.

Each frame shows what the image is becoming after a drag, not the noisy latent: the clean image the
model predicts from the latent at that timestep (x0, decoded). The points are drawn on it: targets
(blue), original handles (red), current handles (yellow/black marker), an arrow from each current handle to
its target, and ``t=<timestep> drag <n>`` in the top-left corner. The first frame is the input, the
last the finished result with the final handles.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from PIL import Image

from gooddrag.app.outputs.draw import draw_points
from gooddrag.app.outputs.files import to_pil
from gooddrag.core.errors import RequirementError
from gooddrag.core.hookspecs import hookimpl

VIDEO_HINT = "install a video writer with pip install 'gooddrag[video]' (PyAV)"


def video_writer_available() -> bool:
    """True when PyAV (the ``video`` extra) can be imported: MP4 output needs it."""
    try:
        import av  # noqa: F401
    except ImportError:
        return False
    return True


class GifWriter:
    """Collects one frame per drag for the drag animation and writes it as GIF, PNG frames or MP4.

    Use it as an edit plugin: ``w = GifWriter(editor.backbone, inp)`` with ``inp`` from
    ``gooddrag.core.inputs.prepare_input``; ``editor.edit(..., inp, plugins=[w])``; then
    ``w.save_gif(path, result.image, result.points)``. Decoding x0 costs a VAE pass per drag (and the
    engine one UNet pass), so only attach it when an animation is wanted. Frames are at the input's
    size, scaled down so the longer side is at most ``max_side``.
    """

    def __init__(self, backbone: Any, inp: Any, every: int = 1, max_side: int = 768):
        self.backbone, self.inp, self.every = backbone, inp, every
        w, h = inp.size
        self.scale = min(1.0, max_side / max(w, h))
        self.size = (max(1, round(w * self.scale)), max(1, round(h * self.scale)))
        self.handles = [self._px(h) for h, _ in inp.pairs]
        self.targets = [self._px(t) for _, t in inp.pairs]
        self.frames: list[Image.Image] = [draw_points(inp.image.resize(self.size), self.handles, self.targets,
                                                      label="input")]
        self.n = 0

    def _px(self, xy: Sequence[float]) -> list[float]:
        return [xy[0] * self.scale, xy[1] * self.scale]

    @hookimpl
    def gooddrag_preview(self, timestep, drag, latent, x0, handles):
        self.n += 1
        if not (self.n - 1) % self.every:
            self.add_frame(timestep, drag, x0, handles)

    def add_frame(self, timestep: int, drag: int, x0: Any, handles: Any) -> Image.Image:
        """Decode the predicted clean latent x0 (1, 4, h, w) and draw the current handles (N, 2) (row,
        col on the feature grid) on it; the frame is kept and returned."""
        import torch

        with torch.no_grad():
            image = to_pil(self.backbone.decode(x0)).resize(self.size, Image.BILINEAR)
        current = [self._px(p) for p in self.inp.to_image_px(handles)]
        self.frames.append(draw_points(image, self.handles, self.targets, current=current,
                                       label=f"t={timestep} drag {drag}"))
        return self.frames[-1]

    def finish(self, final: Image.Image, final_handles: Sequence | None = None) -> list[Image.Image]:
        """All frames: input, one per drag, and the result with its final handles (image px)."""
        current = [self._px(p) for p in final_handles] if final_handles is not None else None
        return self.frames + [draw_points(final.resize(self.size), self.handles, self.targets, current=current,
                                          label="result")]

    def save_gif(self, path: Path, final: Image.Image, final_handles: Sequence | None = None,
                 ms: int = 120) -> None:
        """drag.gif: input and result frames are held longer than the drag frames."""
        frames = self.finish(final, final_handles)
        durations = [ms * 6] + [ms] * (len(frames) - 2) + [ms * 12]
        frames[0].save(path, save_all=True, append_images=frames[1:], duration=durations, loop=0)

    def save_frames(self, folder: Path, final: Image.Image, final_handles: Sequence | None = None) -> None:
        """frame_000.png, frame_001.png, ... (full colour: no GIF palette banding)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for i, frame in enumerate(self.finish(final, final_handles)):
            frame.save(folder / f"frame_{i:03d}.png")

    def save_mp4(self, path: Path, final: Image.Image, final_handles: Sequence | None = None, fps: int = 8) -> None:
        """drag.mp4 (H.264 via PyAV, the ``video`` extra); input and result are held for a second."""
        try:
            import av
        except ImportError:
            raise RequirementError(f"MP4 output needs a video writer; {VIDEO_HINT}") from None
        frames = self.finish(final, final_handles)
        frames = [frames[0]] * fps + frames[1:-1] + [frames[-1]] * (2 * fps)
        w, h = (s + s % 2 for s in self.size)  # yuv420p needs even sides
        with av.open(str(path), mode="w") as container:
            stream = container.add_stream("libx264", rate=fps)
            stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
            for frame in frames:
                if frame.size != (w, h):
                    frame = frame.resize((w, h))
                for packet in stream.encode(av.VideoFrame.from_image(frame)):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
