"""A deterministic, tiny, randomly initialised Stable-Diffusion-XL-SHAPED pipeline (for tests).

Why: the SDXL backbone's tests need the real ``StableDiffusionXLPipeline.from_pretrained`` path and
SDXL's module topology, offline, on CPU, in about a second. The folder is a diffusers SDXL pipeline
(``model_index.json`` names ``StableDiffusionXLPipeline``, so the backbone is chosen from it) with:

- SDXL's UNet topology: ``DownBlock2D`` + 2 ``CrossAttnDownBlock2D`` / 2 ``CrossAttnUpBlock2D`` +
  ``UpBlock2D``, 2 layers per block, ``transformer_layers_per_block=(1, 2, 10)`` (70 transformer
  blocks, as SDXL), ``use_linear_projection``, ``text_time`` added conditioning with 6 time ids;
  SDXL's channels (320, 640, 1280) divided by 20 and its heads (5, 10, 20) divided by 5
  (head size 16 instead of 64);
- two CLIP text encoders, the second with a projection (SDXL's CLIP ViT-L and OpenCLIP bigG),
  16 and 32 wide (SDXL: 768 and 1280), so the cross-attention width is 48 (SDXL: 2048) and the
  added embedding is 6 x 8 + 32 = 80 wide (SDXL: 6 x 256 + 1280 = 2816);
- the second tokenizer pads with ``!`` (as SDXL's);
- SDXL's scheduler: Euler, scaled-linear betas 0.00085..0.012, leading spacing, epsilon;
- the tiny VAE of the SD1.5-shaped pipeline with SDXL's ``scaling_factor`` 0.13025 and
  ``force_upcast``.

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
    UNET_OUT_SCALE,
    _make_components,
    _train_clip_bpe,
    _write_clip_tokenizer_files,
    _write_vocab_merges,
    cached_pipeline_dir,
)

if TYPE_CHECKING:  # pragma: no cover
    from diffusers import StableDiffusionXLPipeline

__all__ = ["TINY_SDXL_CACHE_SUBDIR", "build_tiny_sdxl_pipeline", "tiny_sdxl_pipeline_dir",
           "load_tiny_sdxl_pipeline"]

# Bump the suffix whenever the generated pipeline changes, so stale caches are not reused.
TINY_SDXL_CACHE_SUBDIR = "tiny-random-sdxl-v1"
TINY_SDXL_CHANNELS = (16, 32, 64)  # SDXL's (320, 640, 1280) / 20
TINY_SDXL_HEADS = (1, 2, 4)  # SDXL's (5, 10, 20) / 5
SDXL_TRANSFORMER_LAYERS = (1, 2, 10)
TEXT_1, TEXT_2 = 16, 32  # widths of the two text encoders (SDXL: 768, 1280)
TIME_EMBED = 8  # addition_time_embed_dim (SDXL: 256)
SDXL_VAE_SCALING = 0.13025


def _sdxl_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8,  # 64 px (SDXL: 128 -> 1024 px)
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=TINY_SDXL_CHANNELS,
        layers_per_block=2,
        norm_num_groups=8,
        attention_head_dim=TINY_SDXL_HEADS,
        transformer_layers_per_block=SDXL_TRANSFORMER_LAYERS,
        cross_attention_dim=TEXT_1 + TEXT_2,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_EMBED,
        projection_class_embeddings_input_dim=6 * TIME_EMBED + TEXT_2,
    )


def _text_config(tokenizer, hidden: int, act: str):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                          num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=MAX_LENGTH,
                          hidden_act=act, projection_dim=hidden, bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


def _sdxl_scheduler():
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                  beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading",
                                  prediction_type="epsilon", interpolation_type="linear", use_karras_sigmas=False)


def build_tiny_sdxl_pipeline(path: str | os.PathLike, seed: int = 0) -> Path:
    """Write the tiny SDXL-shaped pipeline as a diffusers folder at ``path``; return it."""
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    vocab, merges = _train_clip_bpe()
    with tempfile.TemporaryDirectory(prefix=".tiny-tok-", dir=out) as tok_tmp:
        tok_dir = _write_clip_tokenizer_files(Path(tok_tmp) / "one", vocab, merges)
        comps = _make_components(tok_dir, seed)  # tokenizer and VAE
        tok2_dir = _write_clip_tokenizer_files(Path(tok_tmp) / "two", vocab, merges)
        cfg_path = tok2_dir / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        cfg["pad_token"] = "!"  # SDXL's second tokenizer pads with "!"
        cfg_path.write_text(json.dumps(cfg, indent=2), encoding="utf-8")
        tokenizer_2 = CLIPTokenizer.from_pretrained(str(tok2_dir), model_max_length=MAX_LENGTH)
    tokenizer = comps["tokenizer"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 2)
        unet = _sdxl_unet()
        text_encoder = CLIPTextModel(_text_config(tokenizer, TEXT_1, "quick_gelu"))
        text_encoder_2 = CLIPTextModelWithProjection(_text_config(tokenizer_2, TEXT_2, "gelu"))
        with torch.no_grad():
            unet.conv_out.weight.mul_(UNET_OUT_SCALE)
            unet.conv_out.bias.zero_()
    vae = comps["vae"]
    vae.register_to_config(scaling_factor=SDXL_VAE_SCALING, force_upcast=True)
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder.eval(), text_encoder_2=text_encoder_2.eval(), tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=unet.eval(), scheduler=_sdxl_scheduler(), force_zeros_for_empty_prompt=True,
    )
    pipe.save_pretrained(str(out), safe_serialization=True)
    for sub in ("tokenizer", "tokenizer_2"):  # as tiny_pipeline: slow tokenizers load the folder too
        _write_vocab_merges(out / sub, vocab, merges)
    return out


def tiny_sdxl_pipeline_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The cached tiny SDXL-shaped pipeline folder (subfolder 'tiny-random-sdxl-v1'), built once."""
    return cached_pipeline_dir(TINY_SDXL_CACHE_SUBDIR, build_tiny_sdxl_pipeline, cache_dir)


def load_tiny_sdxl_pipeline(torch_dtype=torch.float32, cache_dir=None) -> "StableDiffusionXLPipeline":
    """Load it through the real ``StableDiffusionXLPipeline.from_pretrained`` path, offline."""
    from diffusers import StableDiffusionXLPipeline

    from diffusers.utils import deprecation_utils

    dtype_kw = "dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype"  # renamed in diffusers
    had = "HF_HUB_OFFLINE" in os.environ
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        return StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl_pipeline_dir(cache_dir)),
                                                         **{dtype_kw: torch_dtype}, local_files_only=True)
    finally:
        if not had:
            os.environ.pop("HF_HUB_OFFLINE", None)
