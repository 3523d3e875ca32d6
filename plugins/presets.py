"""Built-in presets (docs/method.md, "Presets"): the UI defaults, the benchmark script's values, and the baseline."""

from __future__ import annotations

from gooddrag.core.config import Preset
from gooddrag.core.hookspecs import hookimpl

GOODDRAG = Preset(
    name="gooddrag", doc="GoodDrag with the public UI's values: AlDD 7x10x3, lr 0.02, lambda 0.2, patience 10",
    schedule="aldd", loss="info-preserving", tracker="nearest")
GOODDRAG_BENCH = Preset(
    name="gooddrag-bench", doc="GoodDrag with the public benchmark script's values: lambda 0.1, patience 5",
    schedule="aldd", loss="info-preserving", tracker="nearest",
    params={"loss": {"lam": 0.1}, "schedule": {"patience": 5}})
DRAGDIFFUSION = Preset(
    name="dragdiffusion", doc="DragDiffusion: one drag timestep (t=681), 80 steps at lr 0.01, 3x3 patches, 7x7 tracking",
    schedule="single-step", loss="patch-following", tracker="nearest",
    params={"tracker": {"radius": 3}})
DRAGDIFFUSION_STAR = Preset(
    name="dragdiffusion-star", doc="DragDiffusion* of the GoodDrag paper: the baseline with the same 210 steps",
    schedule="single-step", loss="patch-following", tracker="nearest",
    params={"tracker": {"radius": 3}, "schedule": {"steps": 210}})

INSTANT = Preset(
    name="instant", doc="Instant drag: one closed-form warp of the inverted latent and a 14-step mutual-attention "
                        "finish (20-step sampler); no LoRA, no gradient steps",
    schedule="warp")

INSTANT_REFINE = Preset(
    name="instant-refine", doc="The instant warp as the start of GoodDrag's AlDD with fewer drags (3 timesteps x 5 "
                               "drags x 3 steps): the warp makes the coarse move, supervision and tracking the rest",
    schedule="aldd", loss="info-preserving", tracker="nearest",
    params={"schedule": {"warp_start": True, "drag_timesteps": 3, "drags_per_timestep": 5}})


@hookimpl
def gooddrag_register_presets():
    return [GOODDRAG, GOODDRAG_BENCH, DRAGDIFFUSION, DRAGDIFFUSION_STAR, INSTANT, INSTANT_REFINE]
