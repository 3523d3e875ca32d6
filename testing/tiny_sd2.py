"""A deterministic, tiny, randomly initialised Stable-Diffusion-2.1-SHAPED pipeline (for tests).

Why: the ``md`` metric computes DIFT features with SD2.1 (``unet.up_blocks[1]`` at t=261, a
v-prediction model). Its tests need the *real* diffusers loading path and SD2.1's module topology,
offline, on CPU, in about a second. This module builds such a pipeline from ``core/tiny.py``'s
helpers (same locally trained CLIP BPE tokenizer, same tiny VAE) and swaps in:

- an SD2.1-topology UNet: 3 ``CrossAttnDownBlock2D`` + ``DownBlock2D`` / ``UpBlock2D`` + 3
  ``CrossAttnUpBlock2D``, 2 layers per block, ``use_linear_projection=True``,
  ``upcast_attention=True`` and SD2.1's per-block head counts ``attention_head_dim=(5, 10, 20, 20)``
  (diffusers' legacy name for the number of heads), with SD2.1's channels divided by 8
  (40, 80, 160, 160: head size 8 instead of 64), and cross-attention width 32 instead of 1024;
- a CLIP text encoder with SD2's ``gelu`` activation (OpenCLIP ViT-H in SD2.1), 32 wide, 2 layers;
- SD2's tokenizer padding token ``!``;
- SD2.1's scheduler config: DDIM, scaled-linear betas 0.00085..0.012, ``v_prediction``;
- a VAE that behaves like a trained one where DIFT looks: the random VAE's posterior std is ~1
  (its log-variance head outputs ~0) and its latents' std ~0.3, so a posterior sample would be
  pure noise and t=261 noise would drown the image. The log-variance half of ``quant_conv`` gets
  a bias of -20 (posterior std ~5e-5; a trained VAE's is tiny too) and ``scaling_factor`` is 3.0,
  which brings the latents to about unit std (what SD's 0.18215 does for the real VAE).

Everything is generated from a fixed seed; nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from gooddrag.plugins.backbones.tiny_pipeline import (
    MAX_LENGTH,
    TEXT_HIDDEN,
    UNET_OUT_SCALE,
    _make_components,
    cached_pipeline_dir,
    load_offline,
    _train_clip_bpe,
    _write_clip_tokenizer_files,
    _write_vocab_merges,
)

if TYPE_CHECKING:  # pragma: no cover
    from diffusers import StableDiffusionPipeline

__all__ = [
    "TINY_SD2_CACHE_SUBDIR",
    "SD21_HEADS",
    "TINY_SD2_CHANNELS",
    "build_tiny_sd2_pipeline",
    "tiny_sd2_pipeline_dir",
    "load_tiny_sd2_pipeline",
]

# Bump the suffix whenever the generated pipeline changes, so stale caches are not reused.
TINY_SD2_CACHE_SUBDIR = "tiny-random-sd21-v1"
SD21_HEADS = (5, 10, 20, 20)  # SD2.1's unet.config.attention_head_dim (= heads per block)
TINY_SD2_CHANNELS = (40, 80, 160, 160)  # SD2.1's (320, 640, 1280, 1280) / 8
SD2_PAD_TOKEN = "!"
VAE_LOGVAR_BIAS = -20.0
VAE_SCALING = 3.0


def _sd2_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8,  # 64 px by default (SD2.1: 96 -> 768 px)
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=TINY_SD2_CHANNELS,
        layers_per_block=2,
        norm_num_groups=8,
        attention_head_dim=SD21_HEADS,
        cross_attention_dim=TEXT_HIDDEN,
        use_linear_projection=True,
        upcast_attention=True,
        flip_sin_to_cos=True,
        freq_shift=0,
    )


def _sd2_text_encoder(tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=TEXT_HIDDEN,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=MAX_LENGTH,
            hidden_act="gelu",  # SD2's OpenCLIP text tower; SD1.5 uses quick_gelu
            projection_dim=TEXT_HIDDEN,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )


def _sd21_scheduler():
    from gooddrag.plugins.backbones.tiny_pipeline import sd_ddim_scheduler

    return sd_ddim_scheduler("v_prediction")


def build_tiny_sd2_pipeline(path: str | os.PathLike, seed: int = 0) -> Path:
    """Write the tiny SD2.1-shaped pipeline as a diffusers folder at ``path``; return it."""
    from diffusers import StableDiffusionPipeline

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    vocab, merges = _train_clip_bpe()
    with tempfile.TemporaryDirectory(prefix=".tiny-tok-", dir=out) as tok_tmp:
        tok_dir = _write_clip_tokenizer_files(Path(tok_tmp), vocab, merges)
        cfg_path = tok_dir / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        cfg["pad_token"] = SD2_PAD_TOKEN
        cfg_path.write_text(json.dumps(cfg, indent=2), encoding="utf-8")
        # The SD1.5 helper gives the tokenizer and the (SD1/SD2-identical) VAE; UNet, text
        # encoder and scheduler are replaced by SD2.1-shaped ones drawn from the same seed.
        comps = _make_components(tok_dir, seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        unet = _sd2_unet()
        text_encoder = _sd2_text_encoder(comps["tokenizer"])
        with torch.no_grad():
            unet.conv_out.weight.mul_(UNET_OUT_SCALE)
            unet.conv_out.bias.zero_()
    vae = comps["vae"]
    with torch.no_grad():
        half = vae.quant_conv.bias.shape[0] // 2  # output = [mean, logvar]
        vae.quant_conv.bias[half:] = VAE_LOGVAR_BIAS
    vae.register_to_config(scaling_factor=VAE_SCALING)
    comps.update(unet=unet.eval(), text_encoder=text_encoder.eval(), scheduler=_sd21_scheduler())
    pipe = StableDiffusionPipeline(
        **comps, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    pipe.save_pretrained(str(out), safe_serialization=True)
    _write_vocab_merges(out / "tokenizer", vocab, merges)  # as core/tiny.py: slow tokenizers too
    return out


def tiny_sd2_pipeline_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The cached tiny SD2.1-shaped pipeline folder (subfolder 'tiny-random-sd21-v1'), built once."""
    return cached_pipeline_dir(TINY_SD2_CACHE_SUBDIR, build_tiny_sd2_pipeline, cache_dir)


def load_tiny_sd2_pipeline(torch_dtype=torch.float32, cache_dir=None) -> "StableDiffusionPipeline":
    """Load it through the real ``StableDiffusionPipeline.from_pretrained`` path, offline."""
    return load_offline(tiny_sd2_pipeline_dir(cache_dir), torch_dtype)
