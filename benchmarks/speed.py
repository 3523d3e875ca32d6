"""Faithful path against the optimised default, in one run on one machine, per phase, with peak memory.

Each variant runs in its own child process (so its peak memory is its own), one after the other,
on the same input; the parent prints per-phase times, peak memory, ratios to the faithful path, and
how far the results are from it (final handles, PSNR of the result image).

    python benchmarks/speed.py --device cuda --out gpu.json        # GPU: full edits (LoRA trained, 210 steps)
    python benchmarks/speed.py --device cpu --quick --out cpu.json # CPU, < 10 min: a short drag at 512 px
    python benchmarks/speed.py --tiny --out tiny.json              # the tiny random model (the test runs this)

``--repeat N`` runs N interleaved rounds of all variants and reports medians: on a shared machine
the load drifts by tens of percent within minutes, and interleaving spreads it over every variant.

Models: ``--device cuda/cpu`` use Stable Diffusion 1.5's exact architecture with random weights
(``phase_cost.random_sd15``): no weights can be downloaded here, and cost depends on the
architecture, not the weights. Targets are unreachable and early stop is off, so every variant
does the same number of steps.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: variant -> Editor options
VARIANTS = {
    "faithful": {"faithful": True},
    "default": {"faithful": False},  # precision auto: bf16 autocast where the device has native bf16
    "default-fp32": {"faithful": False, "precision": "fp32"},  # the exact fast paths alone
    "default-bf16": {"faithful": False, "dtype": "bf16"},  # bf16 weights
    "default-compile": {"faithful": False, "compile": True},  # timed after a warm-up edit that compiles
    "low-memory": {"faithful": False, "low_memory": True},  # VAE and text encoder parked off the device
    "autocast-bf16": {"faithful": False, "precision": "bf16"},  # forced (auto keeps tiny models in fp32)
}
FULL = ["schedule.reach_distance=0", "schedule.patience=0"]
#: a short GoodDrag at full resolution for the CPU: 4-step sampler (3 inversion steps), one drag timestep,
#: 2 drags x 3 steps, 2 finishing steps
QUICK = FULL + ["schedule.num_inference_steps=4", "schedule.drag_timesteps=1", "schedule.drags_per_timestep=2"]


def child(args: argparse.Namespace) -> None:
    """One variant: load, edit, write a JSON line (and the result image) to args.result."""
    import torch
    from PIL import Image

    from gooddrag.core.editor import Editor

    opts = VARIANTS[args.variant]
    load = dict(faithful=opts["faithful"], precision=opts.get("precision", "auto"),
                low_memory=opts.get("low_memory", False), compile=opts.get("compile", False))
    torch.set_num_threads(args.threads or torch.get_num_threads())
    t0 = time.perf_counter()
    if args.tiny:
        editor = Editor.from_pretrained("tiny-random", device=args.device, dtype=opts.get("dtype", "fp32"), **load)
        image = Image.open(ROOT / "examples" / "chelsea.png").convert("RGB")
        pairs = [((262, 240), (300, 262))]
        edit = dict(width=args.width, lora=args.lora, overrides=QUICK + ["lora.steps=2"])
    else:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from phase_cost import PAIRS, image512, random_sd15

        backbone = random_sd15(args.device, opts.get("dtype", "fp32"))
        if not opts["faithful"]:
            backbone.optimize()
        editor = Editor(backbone, **load)
        image, pairs = image512(), PAIRS
        edit = dict(lora=args.lora, overrides=QUICK if args.quick else FULL)
    load_s = time.perf_counter() - t0
    if args.preset != "gooddrag":
        edit["overrides"] = ["schedule.reach_distance=0"]
    warmup_s = None
    if load["compile"]:  # the first edit compiles; time the second, with a LoRA trained again
        t1 = time.perf_counter()
        editor.edit(image, pairs, mask=_mask(image, pairs), preset=args.preset, **edit)
        warmup_s = round(time.perf_counter() - t1, 2)
        os.environ["GOODDRAG_CACHE"] += "-timed"
    result = editor.edit(image, pairs, mask=_mask(image, pairs), preset=args.preset, **edit)
    rep = result.report
    result.image.save(args.result + ".png")
    row = {"variant": args.variant, "preset": args.preset, "device_name": rep["device_name"], "load_s": round(load_s, 2),
           "timings_s": rep["timings_s"], "total_s": round(sum(rep["timings_s"].values()), 3),
           "gradient_steps": rep["gradient_steps"], "drags": rep["drags"],
           "drag_step_s": round(rep["timings_s"]["drag"] / max(1, rep["gradient_steps"]), 4),
           "final_handles": rep["final_handles_xy"], "lora": rep["lora"].split(" ")[0],
           "peak_memory_mb": rep["peak_memory_mb"] if args.device.startswith("cuda") else None,
           "compute": rep["compute"], "warmup_s": warmup_s, "compiled": getattr(editor.backbone, "compiled", False)}
    Path(args.result + ".json").write_text(json.dumps(row))


def _mask(image, pairs):
    """The editable region: a box around the handles and targets with a margin of a quarter of the
    image (so the mask term and eps are in play, and the points are inside it)."""
    from PIL import Image, ImageDraw

    w, h = image.size
    xs = [p[0] for pair in pairs for p in pair]
    ys = [p[1] for pair in pairs for p in pair]
    m = Image.new("L", (w, h), 0)
    ImageDraw.Draw(m).rectangle([max(0, min(xs) - w // 4), max(0, min(ys) - h // 4),
                                 min(w - 1, max(xs) + w // 4), min(h - 1, max(ys) + h // 4)], fill=255)
    return m


def run_child(args: argparse.Namespace, variant: str, preset: str, tmp: Path, round_: int = 0) -> dict:
    """Start one variant in a child process; its peak RSS comes from the kernel (os.wait4)."""
    out = str(tmp / f"{variant}-{preset}-{round_}")
    cmd = [sys.executable, __file__, "--child", "--variant", variant, "--preset", preset, "--device", args.device,
           "--result", out, "--lora", args.lora, "--width", str(args.width), "--threads", str(args.threads)]
    cmd += ["--tiny"] if args.tiny else []
    cmd += ["--quick"] if args.quick else []
    env = dict(os.environ, GOODDRAG_CACHE=str(tmp / f"cache-{variant}-{round_}"))  # every run trains its own LoRA
    proc = subprocess.Popen(cmd, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise SystemExit(f"variant {variant} ({preset}) failed with status {status}")
    row = json.loads(Path(out + ".json").read_text())
    row["peak_rss_mb"] = round(usage.ru_maxrss / 1024, 1)
    row["result_png"] = out + ".png"
    return row


def psnr(a: str, b: str) -> float:
    import numpy as np
    from PIL import Image

    x = np.asarray(Image.open(a), dtype=np.float64)
    y = np.asarray(Image.open(b), dtype=np.float64)
    mse = float(((x - y) ** 2).mean())
    return math.inf if mse == 0 else round(10 * math.log10(255.0 ** 2 / mse), 2)


def compare(rows: list[dict]) -> list[dict]:
    """Ratios and result differences of every row against the faithful row of its preset."""
    base = {r["preset"]: r for r in rows if r["variant"] == "faithful"}
    for r in rows:
        b = base[r["preset"]]
        mem = "peak_memory_mb" if r.get("peak_memory_mb") else "peak_rss_mb"
        r["vs_faithful"] = {
            "total_speedup": round(b["total_s"] / r["total_s"], 2),
            "drag_step_speedup": round(b["drag_step_s"] / r["drag_step_s"], 2),
            "phase_speedup": {k: round(b["timings_s"][k] / v, 2) for k, v in r["timings_s"].items() if v > 0},
            "memory_ratio": round(r[mem] / b[mem], 2),
            "same_final_handles": r["final_handles"] == b["final_handles"],
            "result_psnr_db": psnr(r["result_png"], b["result_png"]),
        }
    return rows


def median_rows(rows: list[dict]) -> list[dict]:
    """One row per (preset, variant): the median of its rounds' times, the largest peak memory, and
    every round's drag step (the spread shows how much the machine's load moved the figures)."""
    import statistics

    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["preset"], r["variant"]), []).append(r)
    out = []
    for runs in groups.values():
        row = dict(runs[0])
        row["rounds"] = len(runs)
        row["drag_step_rounds_s"] = [r["drag_step_s"] for r in runs]
        for key in ("drag_step_s", "total_s", "load_s"):
            row[key] = round(statistics.median(r[key] for r in runs), 4)
        row["timings_s"] = {k: round(statistics.median(r["timings_s"][k] for r in runs), 4) for k in row["timings_s"]}
        for key in ("peak_rss_mb", "peak_memory_mb"):
            if row.get(key) is not None:
                row[key] = max(r[key] for r in runs)
        if any(r["final_handles"] != row["final_handles"] for r in runs):
            row["final_handles_differ_between_rounds"] = True
        out.append(row)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="the tiny random model (CPU, seconds)")
    ap.add_argument("--quick", action="store_true", help="a short drag at 512 px (for the CPU)")
    ap.add_argument("--variants", default="faithful,default", help=f"from {', '.join(VARIANTS)}")
    ap.add_argument("--presets", default="gooddrag")
    ap.add_argument("--lora", default=None, help="auto (trained in every variant) or off; default: off with "
                                                 "--quick (70 training steps at 512 px take ~2 h on 2 cores), else auto")
    ap.add_argument("--width", type=int, default=64, help="working width for --tiny")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=1, help="rounds of all variants, interleaved; rows report "
                                                          "medians (a shared machine's load drifts)")
    ap.add_argument("--out", default="speed.json")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    ap.add_argument("--preset", default="gooddrag", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    if args.tiny:
        args.device = "cpu"
    args.lora = args.lora or ("off" if args.quick else "auto")
    rows = []
    with tempfile.TemporaryDirectory(prefix="gooddrag-speed-") as tmp:
        for preset in args.presets.split(","):
            for round_ in range(args.repeat):
                for variant in args.variants.split(","):
                    rows.append(run_child(args, variant, preset, Path(tmp), round_))
                    print(json.dumps({k: v for k, v in rows[-1].items() if k != "result_png"}), flush=True)
        rows = compare(median_rows(rows))
        for r in rows:
            r.pop("result_png")
    result = {"device": args.device, "tiny": args.tiny, "quick": args.quick, "runs": rows}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    for r in rows:
        v = r["vs_faithful"]
        print(f"{r['preset']:>14} {r['variant']:>13}: total {r['total_s']:8.2f} s ({v['total_speedup']}x), "
              f"drag step {r['drag_step_s']:.3f} s ({v['drag_step_speedup']}x), memory x{v['memory_ratio']}, "
              f"same handles {v['same_final_handles']}, PSNR vs faithful {v['result_psnr_db']} dB")


if __name__ == "__main__":
    main()
