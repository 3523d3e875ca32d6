"""The Python API as a user meets it: one import, quiet, errors without CLI flags, public writers,
backbone parameters settable per edit."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from gooddrag.core.errors import GoodDragError


def test_api_use_prints_nothing_but_our_warnings(tmp_path):
    """A fresh process: import, load the tiny model, edit. No library log lines, progress bars or hub
    messages; the only stderr line is our own note about the missing mask."""
    script = textwrap.dedent("""
        import warnings
        from gooddrag import Editor
        from gooddrag.testing import random_image
        editor = Editor.from_pretrained("tiny-random", device="cpu")
        r = editor.edit(random_image(48, 32), [((8, 8), (30, 20))], lora="off", width=32,
                        schedule_num_inference_steps=10, schedule_drag_timesteps=1, schedule_drags_per_timestep=1)
        print("edited", r.points)
    """)
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "GOODDRAG_CACHE": str(tmp_path),
           "OMP_NUM_THREADS": "1", "HOME": str(tmp_path)}
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("edited")
    lines = [l for l in p.stderr.splitlines() if l.strip()]
    assert all("GoodDragWarning" in l or l.startswith(" ") for l in lines), lines  # warning + its source line
    assert any("no mask given" in l for l in lines)


def test_api_errors_do_not_name_cli_flags():
    from gooddrag.core.config import resolve_config
    from gooddrag.core.config import LoadOptions
    from gooddrag.core.inputs import prepare_input
    from gooddrag.core.registry import default_registry
    from gooddrag.testing import random_image

    reg = default_registry()
    cases = [lambda: resolve_config(reg, load=LoadOptions(dtype="fp8")),
             lambda: resolve_config(reg, load=LoadOptions(device="tpu")),
             lambda: resolve_config(reg, width=100), lambda: resolve_config(reg, lora="/nonexistent"),
             lambda: resolve_config(reg, overrides=["lam=1"]), lambda: prepare_input(random_image(), []),
             lambda: prepare_input(random_image(), [((1, 1), (2, 2))], width=12)]
    for make in cases:
        with pytest.raises(GoodDragError) as exc:
            make()
        assert "--" not in str(exc.value) and "-p " not in str(exc.value), str(exc.value)


def test_writers_are_public_and_documented():
    import gooddrag
    from gooddrag.app import outputs

    for obj in (gooddrag.Editor, gooddrag.EditResult, gooddrag.prepare_input, outputs.GifWriter, outputs.TraceWriter,
                outputs.ProgressDisplay):
        assert (obj.__doc__ or "").strip(), obj
    assert "GifWriter" in (Path(__file__).resolve().parents[1] / "docs" / "api.md").read_text()


def test_backbone_parameters_apply_per_edit():
    from gooddrag import Editor
    from gooddrag.testing import random_image

    editor = Editor.from_pretrained("tiny-random", device="cpu")
    b = editor.backbone
    fast = dict(lora="off", width=32, schedule_num_inference_steps=10, schedule_drag_timesteps=1,
                schedule_drags_per_timestep=1)
    with pytest.warns(Warning):
        r = editor.edit(random_image(48, 32), [((8, 8), (30, 20))], backbone_feature_block=1, **fast)
    assert r.report["config"]["backbone_params"]["feature_block"] == 1 and b.params.feature_block == 1
    assert b.unet.up_blocks[1]._forward_hooks and not b.unet.up_blocks[2]._forward_hooks
    with pytest.raises(GoodDragError, match="feature_block=9: this UNet has"):
        editor.edit(random_image(48, 32), [((8, 8), (30, 20))], backbone_feature_block=9, **fast)
