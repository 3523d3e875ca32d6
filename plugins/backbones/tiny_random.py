"""The ``tiny-random`` backbone: the Stable Diffusion adapter on a tiny random SD1.5-shaped model
that is built locally (for tests and smoke runs; no weights are downloaded)."""

from __future__ import annotations

from gooddrag.core.devices import DTYPES, resolve_device
from gooddrag.plugins.backbones.stable_diffusion import StableDiffusionBackbone, check_attention, swap_vae
from gooddrag.plugins.backbones.tiny_pipeline import load_tiny_pipeline


class TinyRandomBackbone(StableDiffusionBackbone):
    """A tiny random SD1.5-shaped model built locally (for tests and smoke runs; no weights needed)."""

    name = "tiny-random"
    #: it stands in for SD1.5 (sample size 8 x 8 = 64 px would be its own): edits work at SD1.5's width
    default_width = 512

    @classmethod
    def claims(cls, files) -> bool:
        """Only by its registered name (``--model tiny-random``)."""
        return False

    @classmethod
    def load(cls, model: str = "tiny-random", *, vae: str = "auto", device: str = "auto", dtype: str = "fp32",
             attention: str = "auto", files=None) -> "TinyRandomBackbone":
        dev, tdtype = resolve_device(device), DTYPES[dtype]
        backend = check_attention(attention, dev)
        pipe = load_tiny_pipeline(torch_dtype=tdtype)
        if vae not in ("auto", "model"):  # an explicit VAE is honoured for the tiny model too
            swap_vae(pipe, model, vae, tdtype)
        backbone = cls._finish(pipe, dev, tdtype, backend, "tiny-random", vae)
        backbone.default_width = cls.default_width
        return backbone
