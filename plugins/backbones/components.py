"""Loading the parts of a Stable Diffusion model one by one (for metrics that need a UNet and a VAE
but not the editing adapter, such as DIFT in the MD metric)."""

from __future__ import annotations

from typing import Any

import torch


def load_sd_components(src: str, dtype: torch.dtype, **hub: Any) -> dict[str, Any]:
    """vae, unet, text_encoder, tokenizer and scheduler of a diffusers model folder or hub id.
    ``hub`` goes to every ``from_pretrained`` (``local_files_only``, ``cache_dir``)."""
    import transformers
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from diffusers.utils import deprecation_utils
    from transformers import CLIPTextModel, CLIPTokenizer

    # diffusers and transformers both renamed `torch_dtype` to `dtype` (and warn on the old name)
    dkw = "dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype"
    tkw = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    return {
        "vae": AutoencoderKL.from_pretrained(src, subfolder="vae", **{dkw: dtype}, **hub),
        "unet": UNet2DConditionModel.from_pretrained(src, subfolder="unet", **{dkw: dtype}, **hub),
        "text_encoder": CLIPTextModel.from_pretrained(src, subfolder="text_encoder", **{tkw: dtype}, **hub),
        "tokenizer": CLIPTokenizer.from_pretrained(src, subfolder="tokenizer", **hub),
        "scheduler": DDIMScheduler.from_pretrained(src, subfolder="scheduler", **hub),
    }
