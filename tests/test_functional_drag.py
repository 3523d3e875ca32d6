"""The machinery really drags: on a backbone whose features are the latent itself, a bright blob
at the handle ends at the target and the tracked handle follows it, with either loss."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from gooddrag.core.editor import Editor
from gooddrag.testing.toy import ToyBackbone

W = 128
YY, XX = np.mgrid[0:W, 0:W]
HANDLE, TARGET = (40, 64), (84, 64)  # image px [x, y]


def blob_image(cx, cy):
    a = (np.exp(-((XX - cx) ** 2 + (YY - cy) ** 2) / (2 * 10 ** 2)) * 255).astype("uint8")
    return Image.fromarray(np.stack([a, a, a], -1))


@pytest.mark.parametrize("loss", ["info-preserving", "patch-following"])
def test_blob_is_dragged_to_the_target(loss):
    editor = Editor(ToyBackbone())
    r = editor.edit(blob_image(*HANDLE), [(HANDLE, TARGET)], loss=loss, lora="off", width=W,
                    overrides=["schedule.patience=0"])
    grid = np.array(r.report["final_handles_grid_rc"][0])
    target_grid = np.array([TARGET[1] / 2, TARGET[0] / 2])
    assert r.report["stop_reason"] == "reached"
    assert np.linalg.norm(grid - target_grid) < 2.0  # the tracked point followed, within 2 feature-grid px
    res = np.asarray(r.image, dtype=float)[..., 0] / 255
    assert res[TARGET[1], TARGET[0]] > 0.6  # the blob is at the target now ...
    assert res[HANDLE[1], HANDLE[0]] < 0.3  # ... and no longer at the handle
    assert blob_image(*HANDLE).getpixel(TARGET)[0] < 5  # (it was dark there before)


def test_without_dragging_nothing_moves():
    editor = Editor(ToyBackbone())
    r = editor.edit(blob_image(*HANDLE), [(HANDLE, TARGET)], lora="off", width=W,
                    overrides=["schedule.drags_per_timestep=1", "schedule.steps_per_drag=1", "schedule.lr=1e-9"])
    res = np.asarray(r.image, dtype=float)[..., 0] / 255
    assert res[HANDLE[1], HANDLE[0]] > 0.6 and res[TARGET[1], TARGET[0]] < 0.3


def test_python_api_keyword_overrides():
    from gooddrag.core.errors import ConfigError

    editor = Editor(ToyBackbone())
    r = editor.edit(blob_image(*HANDLE), [(HANDLE, TARGET)], lora="off", width=W, loss_lam=0.3,
                    schedule_drag_timesteps=2, schedule_patience=0, tracker_radius=6)
    cfg = r.report["config"]
    assert cfg["loss_params"]["lam"] == 0.3 and cfg["schedule_params"]["drag_timesteps"] == 2
    assert cfg["tracker_params"]["radius"] == 6 and cfg["schedule_params"]["patience"] == 0
    with pytest.raises(ConfigError, match="unknown keyword 'lam'"):
        editor.edit(blob_image(*HANDLE), [(HANDLE, TARGET)], lora="off", width=W, lam=0.3)
    with pytest.raises(ConfigError, match="loss.nope"):
        editor.edit(blob_image(*HANDLE), [(HANDLE, TARGET)], lora="off", width=W, loss_nope=1)
