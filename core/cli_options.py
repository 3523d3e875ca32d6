"""Options shared by `gooddrag edit` and `gooddrag bench`: one definition, one help text."""

from __future__ import annotations

from typing import List, Optional

import typer

from gooddrag.core.backbone import SD15_MODEL

MODEL = typer.Option(SD15_MODEL, "--model", help="Hub id, diffusers folder, .safetensors/.ckpt file, or tiny-random.")
VAE = typer.Option("auto", "--vae", help="auto (ft-MSE for SD1.x), model (keep own), hub id, folder or file.")
PRESET = typer.Option("gooddrag", "--preset", help="gooddrag, gooddrag-bench, dragdiffusion, dragdiffusion-star.")
SCHEDULE = typer.Option(None, "--schedule", help="Drag schedule (default: the preset's).")
LOSS = typer.Option(None, "--loss", help="Motion-supervision loss (default: the preset's).")
TRACKER = typer.Option(None, "--tracker", help="Point tracker (default: the preset's).")
PARAM = typer.Option([], "-p", "--param", help="Override kind.field=value (schedule/loss/tracker/lora), repeatable.")
LORA = typer.Option("auto", "--lora", help="auto (train once per image, cached), off, or a LoRA path.")
DEVICE = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:<i>.")
DTYPE = typer.Option("fp32", "--dtype", help="fp32, fp16 or bf16.")
ATTENTION = typer.Option("auto", "--attention", help="auto, sdpa or xformers (CUDA + the xformers extra).")
SEED = typer.Option(0, "--seed", help="Random seed.")
WIDTH = typer.Option(512, "--width", help="Working width in pixels (the method: 512; height follows the aspect).")
OUT = typer.Option(None, "--out", help="Output folder.")

__all__ = ["MODEL", "VAE", "PRESET", "SCHEDULE", "LOSS", "TRACKER", "PARAM", "LORA", "DEVICE", "DTYPE", "ATTENTION",
           "SEED", "WIDTH", "OUT", "List", "Optional"]
