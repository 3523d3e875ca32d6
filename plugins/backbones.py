"""Built-in backbones: Stable Diffusion through diffusers, and the tiny random test model."""

from gooddrag.core.hookspecs import hookimpl


@hookimpl
def gooddrag_register_backbones():
    from gooddrag.core.backbone import StableDiffusionBackbone, TinyRandomBackbone

    return [StableDiffusionBackbone, TinyRandomBackbone]
