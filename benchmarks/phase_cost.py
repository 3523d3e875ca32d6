"""Per-phase time and peak memory of full-size edits on a random-weight SD1.5-architecture model.

No real weights can be fetched here, so the model is Stable Diffusion 1.5's exact architecture
(UNet 860M, VAE, CLIP ViT-L text encoder) with random weights; costs depend on the architecture,
not the weights. Targets are made unreachable and early stop is off, so every edit does the full
work of its preset (GoodDrag: 70 drags / 210 gradient steps).

    python benchmarks/phase_cost.py --device cuda --dtypes fp32,fp16,bf16 --out bench.json
    python benchmarks/phase_cost.py --device cpu --sample --out cpu.json   # per-unit cost x counts

The fp32 run is the faithful baseline; other precisions are reported as ratios to it, all in one
process on one machine.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
FULL_COST = {"gooddrag": ["schedule.reach_distance=0", "schedule.patience=0"],
             "dragdiffusion": ["schedule.reach_distance=0"]}
SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
SD_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
              block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
              up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.18215)


def random_sd15(device: str, dtype: str):
    """The SD1.5 architecture with random weights, wrapped in the engine's backbone."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from gooddrag.core.devices import DTYPES
    from gooddrag.plugins.backbones.stable_diffusion import StableDiffusionBackbone
    from gooddrag.plugins.backbones.tiny_pipeline import sd_ddim_scheduler, tiny_pipeline_dir

    tok = CLIPTokenizer.from_pretrained(tiny_pipeline_dir() / "tokenizer")
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(**SD15_UNET)
        vae = AutoencoderKL(**SD_VAE)
        text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=768, intermediate_size=3072,
                                            num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
                                            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                            pad_token_id=tok.pad_token_id))
    sched = sd_ddim_scheduler()
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.to(dtype=DTYPES[dtype])
    return StableDiffusionBackbone._finish(pipe, torch.device(device), DTYPES[dtype], "sdpa", "random-sd15")


def image512() -> Image.Image:
    return Image.open(ROOT / "examples" / "chelsea.png").convert("RGB").resize((512, 512))


PAIRS = [((262 * 512 // 451, 240 * 512 // 300), (262 * 512 // 451, 272 * 512 // 300))]


def full_runs(args) -> list[dict]:
    from gooddrag.core.editor import Editor

    rows = []
    for dtype in args.dtypes.split(","):
        backbone = random_sd15(args.device, dtype)
        editor = Editor(backbone)
        for preset in args.presets.split(","):
            # GoodDrag twice: LoRA trained, then cached (with --fuse-compare: cached and not fused)
            variants = ([], ["lora.fuse=false"] if args.fuse_compare else []) if preset == "gooddrag" else ([],)
            for variant in variants:
                t0 = time.perf_counter()
                r = editor.edit(image512(), PAIRS, preset=preset, lora="auto",
                                overrides=FULL_COST[preset] + args.extra + variant)
                rep = r.report
                rows.append({"dtype": dtype, "preset": preset, "lora": rep["lora"].split(" ")[0],
                             "lora_fused": rep["config"]["lora_params"]["fuse"],
                             "device_name": rep["device_name"], "timings_s": rep["timings_s"],
                             "total_s": round(time.perf_counter() - t0, 2), "peak_memory_mb": rep["peak_memory_mb"],
                             "gradient_steps": rep["gradient_steps"], "drags": rep["drags"]})
                print(json.dumps(rows[-1]), flush=True)
                Path(args.out).write_text(json.dumps({"runs": rows}, indent=2))  # survives a timeout
        backbone.unet.up_blocks[backbone.params.feature_block]._forward_hooks.clear()  # hook -> backbone cycle
        del editor, backbone, r
        gc.collect()  # free this precision's model before the next one is measured
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    return rows


def sampled_costs(args) -> dict:
    """CPU: time each unit of work once (after a warm-up) and multiply by the preset's counts."""
    b = random_sd15(args.device, "fp32")
    b.set_prompt("")
    b.sampler(50)
    img = torch.rand(1, 3, 512, 512) * 2 - 1

    def timed(fn, reps=1):
        fn()  # warm-up
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - t0) / reps

    z = b.encode(img)
    unit = {}
    with torch.no_grad():
        unit["encode"] = timed(lambda: b.encode(img))
        unit["forward"] = timed(lambda: b.eps_and_features(z, 741))
        unit["forward_mutual_b2"] = timed(lambda: b.eps_mutual(z, z, 741))
        unit["decode"] = timed(lambda: b.decode(z))

    def drag_step():
        zz = z.clone().requires_grad_(True)
        eps, feats = b.eps_and_features(zz, 741)
        (feats[:, :, :9, :9].abs().mean() + eps.abs().mean()).backward()

    unit["forward_backward"] = timed(drag_step)
    from gooddrag.core.lora import LoraParams

    lp = LoraParams(steps=1)
    unit["lora_step_b4"] = timed(lambda: (b.lora.drop(), b.lora.train(img, lp)))
    counts = {"lora": {"lora_step_b4": 70}, "inversion": {"encode": 1, "forward": 38},
              "reference": {"forward": 7},
              "drag": {"forward_backward": 210, "forward": 7 + 7},  # + initial track and DDIM step per timestep
              "finish": {"forward_mutual_b2": 31}, "decode": {"decode": 1}}
    phases = {ph: round(sum(unit[u] * n for u, n in c.items()), 1) for ph, c in counts.items()}
    return {"device": "cpu", "threads": torch.get_num_threads(), "unit_s": {k: round(v, 3) for k, v in unit.items()},
            "extrapolated_phase_s": phases, "extrapolated_total_s": round(sum(phases.values()), 1),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1), "counts": counts}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtypes", default="fp32,fp16")
    ap.add_argument("--presets", default="gooddrag,dragdiffusion")
    ap.add_argument("--sample", action="store_true", help="CPU: per-unit timing x counts")
    ap.add_argument("--extra", action="append", default=[], help="more -p style overrides")
    ap.add_argument("--fuse-compare", action="store_true", help="second GoodDrag edit with lora.fuse=false")
    ap.add_argument("--out", default="bench.json")
    args = ap.parse_args()
    os.environ.setdefault("GOODDRAG_CACHE", tempfile.mkdtemp(prefix="gooddrag-bench-"))
    result = sampled_costs(args) if args.sample else {"runs": full_runs(args)}
    if not args.sample and result["runs"]:
        key = lambda r: (r["preset"], r["lora"], r["lora_fused"])  # noqa: E731
        base = {key(r): r for r in result["runs"] if r["dtype"] == "fp32"}
        for r in result["runs"]:
            b = base.get(key(r))
            if b:
                r["speedup_vs_fp32"] = round(b["total_s"] / r["total_s"], 2)
                r["memory_ratio_vs_fp32"] = round(r["peak_memory_mb"] / b["peak_memory_mb"], 2)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
