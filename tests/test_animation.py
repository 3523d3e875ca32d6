"""The drag animation shows what the image is becoming (the model's clean prediction x0), with the
targets, original handles and current handles drawn where they are, one frame per drag."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from gooddrag.core.editor import Editor
from gooddrag.core.hookspecs import hookimpl
from gooddrag.core.inputs import prepare_input
from gooddrag.app.outputs.files import to_pil
from gooddrag.app.outputs.draw import CURRENT, HANDLE, TARGET, marker_radius, marker_ring_radius
from gooddrag.app.outputs.gif import GifWriter, video_writer_available
from gooddrag.testing.toy import ToyBackbone

W = 128
HANDLE_XY, TARGET_XY = (40, 64), (84, 64)


def blob_on_grey() -> Image.Image:
    yy, xx = np.mgrid[0:W, 0:W]
    a = 0.5 + 0.5 * np.exp(-((xx - HANDLE_XY[0]) ** 2 + (yy - HANDLE_XY[1]) ** 2) / (2 * 10 ** 2))
    return Image.fromarray((np.stack([a, a, a], -1) * 255).astype("uint8"))


class Recorder:
    """What the preview hook handed out, to compare the frames with."""

    def __init__(self):
        self.calls = []

    @hookimpl
    def gooddrag_preview(self, timestep, drag, latent, x0, handles):
        self.calls.append((timestep, drag, latent.clone(), x0.clone(), handles.clone()))


@pytest.fixture(scope="module")
def animated():
    backbone = ToyBackbone()
    inp = prepare_input(blob_on_grey(), [(HANDLE_XY, TARGET_XY)], width=W)
    gif, rec = GifWriter(backbone, inp), Recorder()
    editor = Editor(backbone)
    cfg = editor.config(lora="off", width=W, overrides=["schedule.drag_timesteps=2", "schedule.drags_per_timestep=3",
                                                         "schedule.patience=0"])
    result = editor.run(inp, cfg, plugins=[gif, rec])
    return backbone, inp, gif, rec, result


def _px(frame: Image.Image, xy) -> tuple:
    return frame.getpixel((int(round(xy[0])), int(round(xy[1]))))


def test_gif_has_input_one_frame_per_drag_and_result(animated, tmp_path):
    backbone, inp, gif, rec, result = animated
    assert 1 <= len(rec.calls) <= 6
    gif.save_gif(tmp_path / "drag.gif", result.image, result.points)
    with Image.open(tmp_path / "drag.gif") as im:
        assert im.n_frames == len(rec.calls) + 2  # input, one per drag, result
    gif.save_frames(tmp_path / "frames", result.image, result.points)
    assert len(list((tmp_path / "frames").glob("frame_*.png"))) == len(rec.calls) + 2


def test_frames_draw_targets_original_and_current_handles_where_they_are(animated):
    backbone, inp, gif, rec, result = animated
    frames = gif.finish(result.image, result.points)
    for frame, (t, drag, _, _, handles) in zip(frames[1:], rec.calls):
        assert _px(frame, TARGET_XY) == TARGET
        assert _px(frame, HANDLE_XY) == HANDLE
        (cx, cy), = inp.to_image_px(handles)  # the engine's handles, (row, col) on the grid -> image px
        r = marker_ring_radius(marker_radius(frame.size))  # the middle of the marker's yellow ring
        assert _px(frame, (cx, cy - r)) == CURRENT  # the top of the yellow ring around the current handle
        corner = np.asarray(frame)[:8, :40]
        assert (corner == 0).all(axis=-1).any() and (corner > 200).all(axis=-1).any()  # the t/drag label
    moved = [inp.to_image_px(c[4])[0] for c in rec.calls]
    assert moved[-1] != list(HANDLE_XY)  # the handle moved during the edit, and the ring followed it
    assert _px(frames[-1], (result.points[0][0], result.points[0][1] - r)) == CURRENT


def test_a_frame_is_the_x0_prediction_not_the_noisy_latent(animated):
    backbone, inp, gif, rec, result = animated
    frames = gif.finish(result.image, result.points)
    _, _, latent, x0, _ = rec.calls[0]
    want = np.asarray(to_pil(backbone.decode(x0)).resize(gif.size), dtype=float)
    noisy = np.asarray(to_pil(backbone.decode(latent)).resize(gif.size), dtype=float)
    got = np.asarray(frames[1], dtype=float)
    clean = (slice(96, 128), slice(0, 128))  # below the points and the label: nothing drawn there
    assert np.abs(got[clean] - want[clean]).max() <= 1
    assert np.abs(got[clean] - noisy[clean]).mean() > 30  # the noisy latent is much darker on the toy
    assert abs(got[clean].mean() - 127.5) < 3  # and x0 is the grey input again


@pytest.mark.skipif(not video_writer_available(), reason="no video writer: pip install 'gooddrag[video]' (PyAV)")
def test_mp4_holds_every_frame(animated, tmp_path):
    import av

    backbone, inp, gif, rec, result = animated
    gif.save_mp4(tmp_path / "drag.mp4", result.image, result.points, fps=4)
    with av.open(str(tmp_path / "drag.mp4")) as c:
        n = sum(1 for _ in c.decode(video=0))
    assert n == 4 + len(rec.calls) + 8  # input held 1 s, the drags, result held 2 s
