"""A rough cost estimate of an edit before it starts, for CPU users of full-size models.

Cost is counted in UNet forward passes at the working size, from the config alone (worst case: no
early stop), and one pass is timed on this machine. The relative costs of the other passes are the
ones measured on the SD1.5 architecture (docs/performance.md, "CPU"): a drag step (forward and
backward) costs 1.65 forwards, a batch-2 mutual-attention pass 2.43, a LoRA training step (batch 4,
512 px crops) 11.2 forwards at its crop size. Passes are timed in the weights' dtype, so phases that
run in bf16 autocast are overestimated (about 2x on a CPU with AMX): read it as an upper bound.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from gooddrag.core.config import EditConfig, schedule_needs
from gooddrag.core.ddim import start_index

FORWARD_BACKWARD, MUTUAL_B2, LORA_STEP_B4_512 = 1.65, 2.43, 11.2
#: full-size UNets only (SD1.5 has 860M parameters; the tiny test model has far fewer)
FULL_SIZE_PARAMETERS = 100_000_000


def forward_units(cfg: EditConfig, schedule: type, work_size: tuple[int, int]) -> dict[str, float]:
    """Worst-case cost per phase of an edit with ``cfg``, in UNet forward passes at ``work_size`` (the
    LoRA's in passes at its crop size).
    The drag phase needs the schedule's ``drag_passes(start, num_steps) -> (forwards,
    forward+backwards, next_index)`` (at most); without it the drag is not counted."""
    sp = cfg.schedule_params
    n = sp.num_inference_steps
    start = start_index(n, sp.inversion_strength)
    needs = schedule_needs(schedule)
    w, h = work_size
    units = {"lora": 0.0, "inversion": float(n - start), "reference": 0.0, "drag": 0.0, "finish": 0.0}
    if "lora" in needs and cfg.lora == "auto":  # trained (a cached LoRA costs nothing here); in passes at
        lp = cfg.lora_params                    # the LoRA's crop size, not the working size
        units["lora"] = lp.steps * LORA_STEP_B4_512 * (lp.batch_size / 4)
    plan = getattr(schedule(sp), "drag_passes", None)
    next_index = start
    if plan is not None:
        fwd, fwd_bwd, next_index = plan(start, n)
        units["drag"] = fwd + FORWARD_BACKWARD * fwd_bwd
        if "reference" in needs:
            units["reference"] = float(next_index - start)
    units["finish"] = MUTUAL_B2 * (n - next_index)
    return units


def time_one_forward(backbone: Any, size: tuple[int, int]) -> float:
    """Seconds of one UNet pass at ``size`` (w, h) on this machine, in the weights' dtype: no weight
    split for mixed precision, which would cost more than the pass (so bf16 phases are overestimated,
    by about 2x on a CPU with AMX: the estimate is an upper bound)."""
    w, h = size
    z = torch.randn(1, 4, h // 8, w // 8, device=backbone.device)
    t = backbone.sampler(50).timesteps[10]
    with torch.no_grad():
        t0 = time.perf_counter()
        backbone.eps(z, t)
        return time.perf_counter() - t0


def duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def estimate_line(cfg: EditConfig, instant: EditConfig, schedule: type, warp: type, work_size: tuple[int, int],
                  pass_s: float, lora_pass_s: float | None = None) -> str:
    """One line: roughly how long ``cfg`` takes here, and how long ``instant`` would. ``pass_s``: one
    pass at the working size; ``lora_pass_s``: one at the LoRA's crop size (default the same)."""
    mine = forward_units(cfg, schedule, work_size)
    fast = forward_units(instant, warp, work_size)
    lora_s = mine["lora"] * (pass_s if lora_pass_s is None else lora_pass_s)
    total = lora_s + (sum(mine.values()) - mine["lora"]) * pass_s
    quick = sum(fast.values()) * pass_s
    what = f" (LoRA training {duration(lora_s)})" if lora_s else ""
    return (f"estimate on this CPU: preset {cfg.preset} takes up to about {duration(total)}{what}; "
            f"--preset instant answers in about {duration(quick)} ({quick / total:.0%} of it)")


def cpu_estimate(backbone: Any, registry: Any, cfg: EditConfig, work_size: tuple[int, int]) -> str | None:
    """The estimate line for an edit of a full-size model on a CPU that trains a LoRA or takes
    gradient steps (times one UNet pass); None elsewhere (GPUs, the tiny model, the instant preset)."""
    from gooddrag.core.config import resolve_config

    schedule = registry.get("schedule", cfg.schedule)
    needs = schedule_needs(schedule)
    if backbone.device.type != "cpu" or not ({"lora", "loss"} & needs):
        return None
    if not backbone.supports_mixed or backbone.unet_parameters() < FULL_SIZE_PARAMETERS:
        return None
    instant = resolve_config(registry, preset="instant", load=cfg.load, seed=cfg.seed, width=cfg.width)
    pass_s = time_one_forward(backbone, work_size)
    crop = cfg.lora_params.crop
    lora_pass_s = None
    if "lora" in needs and cfg.lora == "auto" and tuple(work_size) != (crop, crop):
        lora_pass_s = time_one_forward(backbone, (crop, crop))  # the LoRA trains on crops of its own size
    return estimate_line(cfg, instant, schedule, registry.get("schedule", instant.schedule), work_size, pass_s,
                         lora_pass_s)
