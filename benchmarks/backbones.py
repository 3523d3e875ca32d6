"""Step time and peak memory of each backbone architecture on this machine (docs/backbones.md).

For SD1.5, SD2.1 and SDXL the UNet is built from the published config (topology, heads, cross-
attention width, SDXL's ``text_time`` conditioning) with random weights: cost depends on the
architecture, not on the weights, and no weights can be downloaded here. ``--scale`` multiplies
every block's channel count (0.5: a quarter of the parameters), so that all three fit a small
machine: the full SDXL UNet alone is 10 GB in fp32. The full-size parameter counts are counted on
the meta device (no memory).

Per architecture, in its own child process (so the peak memory is its own): one UNet forward
without gradients (an inversion or reference pass) and one drag step (forward with a gradient on
the latent, the loss on the feature block's output plus the prediction, backward), each timed as
the median of ``--repeat`` after a warm-up, at ``--width`` px (square).

    python benchmarks/backbones.py --width 256 --scale 0.5 --out benchmarks/results/cpu-backbones.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

ARCHS = {
    "sd15": dict(sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, attention_head_dim=8,
                 cross_attention_dim=768),
    "sd21": dict(sample_size=96, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, attention_head_dim=(5, 10, 20, 20),
                 cross_attention_dim=1024, use_linear_projection=True, upcast_attention=True),
    "sdxl": dict(sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
                 use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816),
}
FEATURE_BLOCK = {"sd15": 2, "sd21": 2, "sdxl": 1}  # the backbones' default feature layer


def config(arch: str, scale: float) -> dict:
    cfg = dict(ARCHS[arch])
    cfg["block_out_channels"] = tuple(int(c * scale) for c in cfg["block_out_channels"])
    return cfg


def child(arch: str, width: int, scale: float, repeat: int) -> dict:
    import torch
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        full = sum(p.numel() for p in UNet2DConditionModel(**ARCHS[arch]).parameters())
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**config(arch, scale)).eval().requires_grad_(False)
    feats = {}
    unet.up_blocks[FEATURE_BLOCK[arch]].register_forward_hook(lambda m, a, out: feats.__setitem__("f", out))
    h = width // 8
    kw = {"encoder_hidden_states": torch.randn(1, 77, unet.config.cross_attention_dim)}
    if arch == "sdxl":
        kw["added_cond_kwargs"] = {"text_embeds": torch.randn(1, 1280),
                                   "time_ids": torch.tensor([[width, width, 0, 0, width, width]], dtype=torch.float32)}
    t = torch.tensor(741)

    def forward():
        with torch.no_grad():
            unet(torch.randn(1, 4, h, h), t, **kw)

    def drag_step():
        z = torch.randn(1, 4, h, h, requires_grad=True)
        eps = unet(z, t, **kw).sample
        (feats["f"].float().abs().mean() + eps.abs().mean()).backward()

    out = {"arch": arch, "unet_parameters_full": full, "unet_parameters_measured": sum(p.numel() for p in unet.parameters()),
           "feature_block": FEATURE_BLOCK[arch], "feature_shape": None}
    for name, fn in (("forward_s", forward), ("drag_step_s", drag_step)):
        fn()  # warm-up
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        out[name] = round(statistics.median(times), 3)
    out["feature_shape"] = list(feats["f"].shape)
    out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--scale", type=float, default=0.5)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--archs", default="sd15,sd21,sdxl")
    ap.add_argument("--out")
    ap.add_argument("--child")
    a = ap.parse_args()
    if a.child:
        import torch

        torch.set_num_threads(a.threads)
        print(json.dumps(child(a.child, a.width, a.scale, a.repeat)))
        return
    rows = []
    for arch in a.archs.split(","):
        cmd = [sys.executable, __file__, "--child", arch, "--width", str(a.width), "--scale", str(a.scale),
               "--repeat", str(a.repeat), "--threads", str(a.threads)]
        res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        if res.returncode:
            sys.exit(f"{arch} failed:\n{res.stderr[-2000:]}")
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    import platform

    import torch

    report = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared)",
              "torch": torch.__version__, "width_px": a.width, "channel_scale": a.scale, "threads": a.threads,
              "repeat": a.repeat, "rows": rows}
    if a.out:
        with open(a.out, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
