"""Per-image LoRA (docs/method.md, section 1): its settings. Training lives with the backbone
(plugins/backbones/lora.py)."""

from __future__ import annotations

import attrs
from attrs.validators import ge, gt

from gooddrag.core.params import finite, p


@attrs.frozen(kw_only=True)
class LoraParams:
    """Rank-16 LoRA on to_q/to_k/to_v/to_out.0 of every UNet attention, 70 AdamW steps."""

    rank: int = p(16, "LoRA rank", ge(1))
    steps: int = p(70, "training steps", ge(0))
    lr: float = p(5e-4, "AdamW learning rate", gt(0), finite)
    batch_size: int = p(4, "random 512 crops per step (encoded once)", ge(1))
    weight_decay: float = p(1e-2, "AdamW weight decay", ge(0), finite)
    seed: int = p(0, "seed for crops, posterior samples, noise and t", ge(0))
    crop: int = p(512, "crop size in pixels after resizing the short side to it", ge(8))
    fuse: bool = p(True, "merge the LoRA into the UNet weights for editing (same result, fewer kernels per step)")
    checkpointing: bool = p(True, "recompute UNet activations in the backward pass while training (same "
                                  "result; about half the training memory for about a third more time)")

    def cache_fields(self) -> dict:
        """What the trained weights depend on (fusing and checkpointing are how they are applied or
        trained, not what they are)."""
        return {k: v for k, v in attrs.asdict(self).items() if k not in _HOW}


_HOW = ("fuse", "checkpointing")
