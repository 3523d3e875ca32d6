"""A first-time ``instant`` edit against a first-time default GoodDrag edit, full-size model, one run.

The model is Stable Diffusion 1.5's architecture with random weights (``phase_cost.random_sd15``; no
weights can be downloaded here, and cost depends on the architecture). Each preset runs in its own
process, so peak memory is its own; the LoRA cache is a fresh folder, so GoodDrag trains its LoRA
("first-time"). Presets keep their default values (early stop on). Every phase boundary is written to
the output as it happens, so an edit that does not finish still leaves its finished phases.

    python benchmarks/instant.py --device cpu --width 256 --out benchmarks/results/cpu-2core-instant.json

``--cache DIR`` reuses a cache folder (one an earlier run left: pass the printed one) instead of an
empty one, so every preset finds the LoRA trained already: the cost of each preset when re-editing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class PhaseLog:
    """Event-hook plugin: appends each finished phase's wall time to a JSON-lines file."""

    from gooddrag.core.hookspecs import hookimpl

    def __init__(self, path: Path, t0: float):
        self.path, self.t0, self.started = path, t0, {}

    @hookimpl
    def gooddrag_phase(self, name: str, status: str) -> None:
        now = time.perf_counter()
        if status == "start":
            self.started[name] = now
            return
        with self.path.open("a") as f:
            f.write(json.dumps({"phase": name, "s": round(now - self.started[name], 2),
                                "since_edit_start_s": round(now - self.t0, 2)}) + "\n")


def sample_passes(passes, path: Path, t0: float, every_s: float = 60.0) -> None:
    """Every minute, the UNet passes done so far (the backbone's counter; Python ints, no sync) and the
    machine's 1-minute load average (other work on the cores slows this edit: the ratio is only as
    clean as the load shows)."""
    while True:
        time.sleep(every_s)
        with path.open("a") as f:
            f.write(json.dumps({"since_edit_start_s": round(time.perf_counter() - t0, 1),
                                "unet_forward": passes.forward, "unet_backward": passes.backward,
                                "load1": round(os.getloadavg()[0], 2)}) + "\n")


def child(args: argparse.Namespace) -> None:
    import resource

    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from phase_cost import PAIRS, image512, random_sd15

    from gooddrag.core.editor import Editor

    t_load = time.perf_counter()
    backbone = random_sd15(args.device, "fp32")
    backbone.optimize()
    editor = Editor(backbone)
    load_s = time.perf_counter() - t_load
    rss_after_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    image = image512().resize((args.width, args.width))
    s = args.width / 512
    pairs = [((round(hx * s), round(hy * s)), (round(tx * s), round(ty * s))) for (hx, hy), (tx, ty) in PAIRS]
    log = Path(args.result).with_suffix(".phases.jsonl")
    t0 = time.perf_counter()
    plugin = PhaseLog(log, t0)
    watch = threading.Thread(target=sample_passes, args=(backbone.passes, log, t0), daemon=True)
    watch.start()  # an edit that cannot finish still shows how fast its passes ran
    r = editor.edit(image, pairs, preset=args.child, lora="auto", width=args.width, plugins=[plugin])
    wall = time.perf_counter() - t0
    rep = r.report
    row = {"preset": args.child, "device_name": rep["device_name"], "threads": torch.get_num_threads(),
           "width": args.width, "load_s": round(load_s, 1), "edit_wall_s": round(wall, 2),
           "timings_s": rep["timings_s"], "unet_passes": rep["unet_passes"], "lora": rep["lora"].split(" ")[0],
           "compute": rep["compute"], "stop_reason": rep["stop_reason"], "gradient_steps": rep["gradient_steps"],
           "peak_memory_mb": rep["peak_memory_mb"], "rss_after_load_mb": round(rss_after_load, 1)}
    Path(args.result).write_text(json.dumps(row))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--presets", default="instant,gooddrag")
    ap.add_argument("--out", default="instant.json")
    ap.add_argument("--cache", help="a cache folder to reuse (LoRA cached); default: a new, empty one")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    tmp = Path(tempfile.mkdtemp(prefix="gooddrag-instant-"))
    cache = args.cache or str(tmp / "cache")  # new and empty: the LoRA is trained
    print(f"cache: {cache}", flush=True)
    env = {**os.environ, "GOODDRAG_CACHE": cache}
    out = {"command": " ".join(sys.argv), "lora_cache": "reused" if args.cache else "empty", "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "runs": []}
    for preset in args.presets.split(","):
        result = tmp / f"{preset}.json"
        code = subprocess.call([sys.executable, __file__, "--child", preset, "--result", str(result),
                                "--device", args.device, "--width", str(args.width)], env=env)
        phases = result.with_suffix(".phases.jsonl")
        row = json.loads(result.read_text()) if code == 0 and result.exists() else {"preset": preset, "failed": code}
        row["progress"] = [json.loads(x) for x in phases.read_text().splitlines()] if phases.exists() else []
        out["runs"].append(row)
        Path(args.out).write_text(json.dumps(out, indent=2))
        print(json.dumps(row), flush=True)
    runs = {r["preset"]: r for r in out["runs"] if "edit_wall_s" in r}
    if "instant" in runs and "gooddrag" in runs:
        i, g = runs["instant"], runs["gooddrag"]
        out["gooddrag_over_instant"] = {"wall": round(g["edit_wall_s"] / i["edit_wall_s"], 1),
                                        "peak_memory": round(g["peak_memory_mb"] / i["peak_memory_mb"], 2)}
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(json.dumps(out.get("gooddrag_over_instant", {})))


if __name__ == "__main__":
    main()
