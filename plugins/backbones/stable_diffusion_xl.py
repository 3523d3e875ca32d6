"""The SDXL backbone: the Stable Diffusion adapter with SDXL's conditioning (docs/backbones.md).

What SDXL adds to SD 1.x/2.x, and where it lives here:

- two text encoders (CLIP ViT-L and OpenCLIP bigG): the prompt embedding is both penultimate hidden
  states side by side, (1, 77, 768 + 1280); the second encoder's projected pooled output (1, 1280)
  conditions every block through the ``text_time`` embedding;
- size conditioning: ``time_ids`` = original size, crop top-left, target size, (1, 6), here the
  working size, no crop (an uncropped image at the size it is edited);
- its VAE's own ``scaling_factor`` (0.13025, read from the config like every backbone); the SDXL
  VAE overflows in fp16, so with ``--dtype fp16`` it runs in fp32 unless a VAE that does not (the
  fp16-fix VAE, ``madebyollin/sdxl-vae-fp16-fix``) is given with ``--vae``;
- 1024 px (UNet sample size 128);
- the feature layer: ``up_blocks[1]``'s output, 640 channels at the latent's resolution, the same
  width and place in the decoder as SD1.5's ``up_blocks[2]`` (docs/backbones.md says why);
- mutual self-attention on the six transformer blocks of ``up_blocks[1]`` (of 70), the decoder's
  highest-resolution attention, as SD1.5's blocks 10-15.

Everything else (sampler, LoRA, low memory, compile, mixed precision) is the Stable Diffusion
adapter's, unchanged.
"""

from __future__ import annotations

from typing import Any

import attrs
import torch
from attrs.validators import ge

from gooddrag.core.backbone import ModelFiles
from gooddrag.core.params import p
from gooddrag.plugins.backbones.stable_diffusion import StableDiffusionBackbone

SDXL_MODEL = "stabilityai/stable-diffusion-xl-base-1.0"
SDXL_FP16_VAE = "madebyollin/sdxl-vae-fp16-fix"


class StableDiffusionXLBackbone(StableDiffusionBackbone):
    """Stable Diffusion XL (base 1.0 and its fine-tunes) through diffusers, at 1024 px."""

    name = "stable-diffusion-xl"
    pipeline_classes = frozenset({"StableDiffusionXLPipeline"})  # the refiner (Img2Img, 5 time ids) is not
    claim_priority = 10
    default_width = 1024

    @attrs.frozen(kw_only=True)
    class Params:
        feature_block: int = p(1, "features = output of unet.up_blocks[i] (SDXL: 1, 640 channels at the "
                               "latent's resolution), upsampled to H/2", ge(0))
        mutual_from_block: int = p(64, "mutual self-attention on transformer blocks i.. (64-69 in SDXL: "
                                   "up_blocks[1])", ge(0))

    def __init__(self, pipe: Any, **kwargs: Any):
        super().__init__(pipe, **kwargs)
        self._pooled: dict[str, torch.Tensor] = {}
        self._time_ids: dict[tuple[int, int], torch.Tensor] = {}

    @classmethod
    def claims(cls, files: ModelFiles) -> bool:
        """An SDXL pipeline by its model_index.json, or a single file with SDXL's layout."""
        return files.pipeline_class in cls.pipeline_classes and files.unet.get("in_channels", 4) == 4

    @staticmethod
    def pipeline_class() -> type:
        from diffusers import StableDiffusionXLPipeline

        return StableDiffusionXLPipeline

    @classmethod
    def load(cls, model: str = SDXL_MODEL, **kwargs: Any) -> "StableDiffusionXLBackbone":
        """As the Stable Diffusion adapter; in fp16 a VAE that asks for it (``force_upcast``, SDXL's
        own) runs in fp32, as diffusers' pipeline does."""
        backbone = super().load(model, **kwargs)
        if backbone.vae.dtype == torch.float16 and backbone.vae.config.get("force_upcast", False):
            backbone.vae.to(torch.float32)
        return backbone

    # --- conditioning ------------------------------------------------------------------------------

    def _encode_prompt(self) -> None:
        """Both encoders' penultimate hidden states, concatenated, and the last encoder's pooled output."""
        pipe, embeds = self.pipe, []
        pooled = None
        with torch.no_grad():
            for tok, enc in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)):
                ids = tok(self.prompt, padding="max_length", max_length=tok.model_max_length, truncation=True,
                          return_tensors="pt").input_ids
                with self.visiting(enc):
                    out = enc(ids.to(self.device), output_hidden_states=True)
                if out[0].ndim == 2:  # the projection encoder's text_embeds (1, D2)
                    pooled = out[0]
                embeds.append(out.hidden_states[-2])  # (1, 77, Di)
        self._text[self.prompt] = torch.cat(embeds, dim=-1).to(self.dtype)  # (1, 77, D1 + D2)
        self._pooled[self.prompt] = pooled.to(self.dtype)

    def text_embedding(self, batch: int = 1) -> torch.Tensor:
        """(batch, 77, D1 + D2): both encoders' penultimate hidden states, cached per prompt."""
        if self.prompt not in self._text:
            self._encode_prompt()
        return self.in_compute_dtype(self._text[self.prompt]).expand(batch, -1, -1)

    def pooled_embedding(self, batch: int = 1) -> torch.Tensor:
        """(batch, D2): the second encoder's projected pooled output."""
        if self.prompt not in self._pooled:
            self._encode_prompt()
        return self._pooled[self.prompt].expand(batch, -1)

    def time_ids(self, latent_hw: Any, batch: int = 1) -> torch.Tensor:
        """(batch, 6): original size (H, W), crop top-left (0, 0), target size (H, W), for the
        working size H x W = 8h x 8w (made once per size)."""
        h, w = (int(x) * self.pipe.vae_scale_factor for x in latent_hw)
        if (h, w) not in self._time_ids:
            self._time_ids[(h, w)] = torch.tensor([[h, w, 0, 0, h, w]], dtype=self.dtype, device=self.device)
        return self._time_ids[(h, w)].expand(batch, -1)

    def conditioning(self, batch: int, latent_hw: Any) -> dict[str, Any]:
        return {"encoder_hidden_states": self.text_embedding(batch),
                "added_cond_kwargs": {"text_embeds": self.pooled_embedding(batch),
                                      "time_ids": self.time_ids(latent_hw, batch)}}
