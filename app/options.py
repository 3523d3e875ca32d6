"""Options shared by `gooddrag edit` and `gooddrag bench` (one definition, one help text), and the
quiet start-up both use."""

from __future__ import annotations

from typing import List, Optional

import typer

from gooddrag.core.config import DEFAULT_MODEL

MODEL = typer.Option(DEFAULT_MODEL, "--model", help="Hub id, diffusers folder, .safetensors/.ckpt file, or tiny-random.")
VAE = typer.Option("auto", "--vae", help="auto (ft-MSE for SD1.x), model (keep own), hub id, folder or file.")
PRESET = typer.Option("gooddrag", "--preset", help="gooddrag, gooddrag-bench, dragdiffusion, dragdiffusion-star, instant, instant-refine (see gooddrag plugins).")
SCHEDULE = typer.Option(None, "--schedule", help="Drag schedule (default: the preset's).")
LOSS = typer.Option(None, "--loss", help="Motion-supervision loss (default: the preset's).")
TRACKER = typer.Option(None, "--tracker", help="Point tracker (default: the preset's).")
PARAM = typer.Option([], "-p", "--param", help="Set a parameter as kind.field=value, kind one of schedule, loss, tracker, "
                     "lora, backbone (see 'gooddrag plugins --params'); repeatable.")
LORA = typer.Option("auto", "--lora", help="auto (train once per image, cached), off, or a LoRA path.")
DEVICE = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:<i>.")
DTYPE = typer.Option("fp32", "--dtype", help="fp32, fp16 or bf16.")
ATTENTION = typer.Option("auto", "--attention", help="auto, sdpa or xformers (CUDA + the xformers extra).")
SEED = typer.Option(0, "--seed", help="Random seed.")
FAITHFUL = typer.Option(False, "--faithful", help="Reference code path: no fast paths, no TF32 (slower; "
                                                   "for checking that the fast paths change nothing).")
PRECISION = typer.Option("auto", "--precision", help="Compute precision of the LoRA, reference and drag passes: "
                         "auto (bf16 autocast where the device has native bf16, else fp32), fp32, bf16 or fp16. "
                         "Weights, latent and losses stay fp32.")
LOW_MEMORY = typer.Option(False, "--low-memory", help="Keep the VAE and text encoder in host memory except during "
                          "their calls (same results; for GPUs with about 6 GB).")
COMPILE = typer.Option(False, "--compile", help="torch.compile the UNet's transformer blocks (the first edit "
                       "of each size compiles, later ones run faster; a compile error falls back to eager).")
WIDTH = typer.Option(512, "--width", help="Working width in pixels (the method: 512; height follows the aspect).")
OUT = typer.Option(None, "--out", help="Output folder.")


def silence_libraries() -> None:
    """Library chatter (deprecations, hub notices, progress bars) is not ours to show."""
    import warnings

    from gooddrag.plugins.backbones.quiet import quiet_libraries

    warnings.filterwarnings("ignore", category=FutureWarning)
    quiet_libraries()


__all__ = ["MODEL", "VAE", "PRESET", "SCHEDULE", "LOSS", "TRACKER", "PARAM", "LORA", "DEVICE", "DTYPE", "ATTENTION",
           "SEED", "FAITHFUL", "WIDTH", "OUT", "List", "Optional"]
