"""What an edit asks of the backend, counted on the CPU: op dispatches below autograd (each a kernel
launch on a GPU, views aside), host syncs, and graph breaks of the captured steps.

    python benchmarks/counts.py --out counts.json             # SD1.5 architecture at 512 px + tiny model
    python benchmarks/counts.py --skip-sd15 --out tiny.json   # the tiny model only (seconds)

Counts are deterministic: they depend on the architecture and the code path, not on the weights or
the machine's speed. For each of ``faithful`` and ``default``:

- **SD1.5 architecture** (random weights, ``phase_cost.random_sd15``) at ``--width`` px: one short
  edit (4-step sampler, one drag of 2 gradient steps, LoRA trained for 2 steps on ``--lora-crop`` px
  crops). A *gradient step* is everything between the first and second Adam steps of the drag
  (forward, loss, backward, Adam); a *LoRA step* likewise between AdamW steps. Per-phase dispatches
  and host syncs come with it.
- **tiny model**: the full default edit (LoRA trained 70 steps, 210 gradient steps, unreachable
  targets): dispatches and host syncs per phase and per edit, and syncs per drag in the drag phase.
- **graph breaks** (``torch._dynamo.explain``) of the captured drag step and LoRA step on the tiny model.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

UNREACHABLE = ["schedule.reach_distance=0", "schedule.patience=0"]
ONE_DRAG = UNREACHABLE + ["schedule.num_inference_steps=4", "schedule.drag_timesteps=1",
                          "schedule.drags_per_timestep=1", "schedule.steps_per_drag=2"]


class PhaseCounts:
    """Event plugin: dispatches and host syncs per phase, per optimiser step and per drag."""

    def __init__(self, counter: Any):
        from gooddrag.core.hookspecs import hookimpl

        self.counter = counter
        self.phases: dict[str, dict] = {}
        self.drags = 0
        self._start: dict[str, tuple[int, int, int]] = {}
        # (optimizer class, snapshot after its step, dispatches by op name so far)
        self.steps: list[tuple[str, tuple[int, int, int], collections.Counter]] = []
        self.phase = ""
        outer = self

        class Hooks:
            @hookimpl
            def gooddrag_phase(self, name: str, status: str) -> None:
                outer.counter.paused = True
                snap = outer.counter.snapshot()
                if status == "start":
                    outer._start[name], outer.phase = snap, name
                else:
                    a = outer._start[name]
                    outer.phases[name] = {"ops": snap[0] - a[0], "launching_ops": snap[1] - a[1],
                                          "host_syncs": snap[2] - a[2]}
                outer.counter.paused = False

            @hookimpl
            def gooddrag_drag_stopped(self, timestep: int, reason: str) -> None:
                pass

        self.hooks = Hooks()
        from torch.optim.optimizer import register_optimizer_step_post_hook

        def after_step(opt: Any, args: Any, kwargs: Any) -> None:
            paused, self.counter.paused = self.counter.paused, True
            self.steps.append((type(opt).__name__, self.counter.snapshot(), collections.Counter(self.counter.ops)))
            self.counter.paused = paused

        self._handle = register_optimizer_step_post_hook(after_step)
        # the fast path's steps do not go through torch.optim: mark the end of each of their calls too
        from gooddrag.core.capture import GradientStep
        from gooddrag.plugins.backbones.lora import LoraTrainer

        self._patched = []
        for cls, name, label in ((GradientStep, "__call__", "GradientStep"), (LoraTrainer, "step", "LoraTrainer")):
            orig = getattr(cls, name)

            def marked(*a, _orig=orig, _label=label, **k):
                out = _orig(*a, **k)
                paused, self.counter.paused = self.counter.paused, True
                self.steps.append((_label, self.counter.snapshot(), collections.Counter(outer.counter.ops)))
                self.counter.paused = paused
                return out

            setattr(cls, name, marked)
            self._patched.append((cls, name, orig))

    def close(self) -> None:
        self._handle.remove()
        for cls, name, orig in self._patched:
            setattr(cls, name, orig)

    def per_step(self, optimizer: str) -> dict | None:
        """Dispatches between the first and second steps of ``optimizer`` (one steady-state step), with
        the launching ones by op name (where two paths differ, this says in which ops)."""
        from gooddrag.testing.counting import VIEW_OPS

        snaps = [(s, ops) for name, s, ops in self.steps if name == optimizer]
        if len(snaps) < 2:
            return None
        (a, ops_a), (b, ops_b) = snaps[0], snaps[1]
        by_op = {k: n for k, n in sorted((ops_b - ops_a).items(), key=lambda kv: -kv[1]) if k not in VIEW_OPS}
        return {"ops": b[0] - a[0], "launching_ops": b[1] - a[1], "host_syncs": b[2] - a[2], "launching_by_op": by_op}


def count_edit(editor: Any, image: Any, pairs: Any, mask: Any, overrides: list[str], lora: str) -> dict:
    from gooddrag.testing.counting import counting

    with counting() as c:
        probe = PhaseCounts(c)
        try:
            t0 = time.perf_counter()
            r = editor.edit(image, pairs, mask=mask, lora=lora, overrides=overrides, plugins=[probe.hooks])
            wall = time.perf_counter() - t0
        finally:
            probe.close()
    rep = r.report
    drags = max(1, rep["drags"])
    drag = probe.phases.get("drag", {})
    return {"gradient_step": probe.per_step("GradientStep") or probe.per_step("Adam"),
            "lora_step": probe.per_step("LoraTrainer") or probe.per_step("AdamW"),
            "phases": probe.phases, "edit_ops": c.total, "edit_launching_ops": c.launching, "edit_host_syncs": c.syncs,
            "drags": rep["drags"], "gradient_steps": rep["gradient_steps"],
            "drag_phase_syncs_per_drag": round(drag.get("host_syncs", 0) / drags, 3),
            "final_handles": rep["final_handles_xy"], "wall_s": round(wall, 1), "_image": r.image}


def sd15(args: argparse.Namespace) -> dict:
    from phase_cost import PAIRS, image512, random_sd15
    from speed import _mask

    from gooddrag.core.editor import Editor

    backbone = random_sd15("cpu", "fp32")
    image = image512().resize((args.width, args.width))
    scale = args.width / 512
    pairs = [tuple((round(x * scale), round(y * scale)) for x, y in pair) for pair in PAIRS]
    out = {}
    for variant in args.variants.split(","):
        faithful = variant == "faithful"
        editor = Editor(backbone, faithful=faithful)
        over = ONE_DRAG + ["lora.steps=2", f"lora.crop={args.lora_crop}"]
        row = count_edit(editor, image, pairs, _mask(image, pairs), over, "auto")
        out[variant] = row
        print(variant, json.dumps({k: v for k, v in row.items() if not k.startswith("_")}), flush=True)
    return out


def tiny(args: argparse.Namespace) -> dict:
    from PIL import Image
    from speed import _mask

    from gooddrag.core.editor import Editor

    image = Image.open(ROOT / "examples" / "chelsea.png").convert("RGB")
    pairs = [((262, 240), (300, 262))]
    out = {}
    for variant in args.variants.split(","):
        editor = Editor.from_pretrained("tiny-random", device="cpu", faithful=variant == "faithful")
        row = count_edit(editor, image, pairs, _mask(image, pairs), UNREACHABLE, "auto")
        out[variant] = row
        print("tiny", variant, json.dumps({k: v for k, v in row.items() if not k.startswith("_")}), flush=True)
    return out


def step_difference(rows: dict) -> dict:
    """Launching ops of one gradient step and one LoRA step, default minus faithful, by op name."""
    out = {}
    for step in ("gradient_step", "lora_step"):
        d, f = (rows.get(v, {}).get(step) for v in ("default", "faithful"))
        if d and f:
            diff = collections.Counter(d["launching_by_op"])
            diff.subtract(f["launching_by_op"])
            out[step] = {k: n for k, n in sorted(diff.items(), key=lambda kv: -abs(kv[1])) if n}
    return out


def graph_breaks() -> dict:
    """torch._dynamo.explain of the captured drag step and LoRA step on the tiny model."""
    from gooddrag.testing.capture import explain_steps

    return explain_steps()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=512, help="SD1.5 working width (op counts do not depend on it)")
    ap.add_argument("--lora-crop", type=int, default=64, help="LoRA crop px for the SD1.5 run (counts do not depend on it)")
    ap.add_argument("--variants", default="faithful,default")
    ap.add_argument("--skip-sd15", action="store_true")
    ap.add_argument("--skip-tiny", action="store_true")
    ap.add_argument("--skip-explain", action="store_true")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", default="counts.json")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("GOODDRAG_CACHE", tempfile.mkdtemp(prefix="gooddrag-counts-"))
    if args.threads:
        torch.set_num_threads(args.threads)
    result: dict[str, Any] = {"torch": torch.__version__}
    if not args.skip_sd15:
        result["sd15"] = sd15(args)
        result["sd15_step_difference"] = step_difference(result["sd15"])
    if not args.skip_tiny:
        result["tiny"] = tiny(args)
    if not args.skip_explain:
        result["graph_breaks"] = graph_breaks()
    images = {}
    for part in ("sd15", "tiny"):
        for variant, row in result.get(part, {}).items():
            images[f"{part}-{variant}"] = row.pop("_image")
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    if args.out.endswith(".json"):
        for name, img in images.items():
            img.save(args.out[:-5] + f"-{name}.png")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
