"""A toy backbone whose features are the latent itself: dragging must be possible on it.

It implements the backbone contract without a network: ``encode`` average-pools the image 8x
into 4 channels, eps is zero (so DDIM only rescales the latent), features are the latent
bilinearly upsampled to the feature grid. Used by tests that check the drag machinery moves
content, and by the plugin contract suite.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import attrs
import torch
import torch.nn.functional as F

from gooddrag.core.backbone import Backbone
from gooddrag.core.ddim import DDIM
from gooddrag.core.engine import UNetPasses


class ToyBackbone(Backbone):
    """Features = latent (upsampled); eps = 0; no attention, no LoRA."""

    name = "toy"
    feature_scale = 4
    default_width = 512
    fast_paths = frozenset({"patch_features", "features_only"})

    @attrs.frozen(kw_only=True)
    class Params:
        pass

    def __init__(self, device: str = "cpu"):
        self.device, self.dtype, self.attention, self.model_id = torch.device(device), torch.float32, "sdpa", "toy"
        betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
        self.alphas_cumprod = torch.cumprod(1 - betas, 0)
        self._ddim: DDIM | None = None
        self.calls = 0  # UNet-equivalent forward passes
        self.params = self.Params()
        self.passes = UNetPasses()  # the same, with the backward passes through them

    def sampler(self, num_steps: int) -> DDIM:
        if self._ddim is None or self._ddim.num_steps != num_steps:
            self._ddim = DDIM(self.alphas_cumprod, num_steps)
        return self._ddim

    def ddim_step(self, z: torch.Tensor, eps: torch.Tensor, t: int) -> torch.Tensor:
        return (self._ddim or self.sampler(50)).step(z, eps, t)

    def invert(self, z0: torch.Tensor, start: int, on_step: Any = None) -> torch.Tensor:
        z = z0
        ddim = self._ddim or self.sampler(50)
        ts = list(reversed(ddim.timesteps[start:]))
        for k, t in enumerate(ts):
            z = ddim.invert_step(z, self.eps(z, t), t)
            if on_step is not None:
                on_step(k + 1, len(ts))
        return z

    def set_prompt(self, prompt: str) -> None:
        pass

    def use_lora(self, mode: str, image: Any, params: Any, on_train: Any = None) -> str:
        return "off"

    def eps(self, z: torch.Tensor, t: int) -> torch.Tensor:
        self.calls += 1
        self.passes.forward += 1
        return torch.zeros_like(z)

    def eps_and_features(self, z: torch.Tensor, t: int, upsample: bool = True, need_eps: bool = True):
        z = self.passes.counted(z)  # a backward through this pass is counted
        if need_eps:
            eps = self.eps(z, t) + 0 * z  # keeps the graph: features and eps both depend on z
        else:
            eps, self.calls = None, self.calls + 1
            self.passes.forward += 1
        return eps, (self.upsample_features(z, z.shape[-2:]) if upsample else z)

    def upsample_features(self, feats: torch.Tensor, latent_hw: Any) -> torch.Tensor:
        h, w = latent_hw
        return F.interpolate(feats, size=(4 * h, 4 * w), mode="bilinear", align_corners=False)

    def eps_mutual(self, z_ref: torch.Tensor, z: torch.Tensor, t: int):
        return self.eps(z_ref, t), self.eps(z, t)

    @contextlib.contextmanager
    def mutual_attention(self) -> Iterator[None]:
        yield

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        x = (image.float() + 1) / 2  # (1, 3, H, W) in [0, 1]
        x = torch.cat([x, x.mean(1, keepdim=True)], 1)  # 4 channels
        return F.avg_pool2d(x, 8)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return F.interpolate(z[:, :3], scale_factor=8, mode="nearest").clamp(0, 1)
