"""Built-in backbones: Stable Diffusion through diffusers, and the tiny random test model.

This folder is the only place that imports diffusers and peft: ``stable_diffusion.py`` (the adapter),
``stable_diffusion_xl.py`` (SDXL's conditioning on top of it),
``attention.py`` (mutual self-attention), ``lora.py`` (the per-image LoRA), ``tiny_pipeline.py`` and
``tiny_random.py`` (the offline test model).
"""

from gooddrag.core.hookspecs import hookimpl


@hookimpl
def gooddrag_register_backbones():
    from gooddrag.plugins.backbones.stable_diffusion import StableDiffusionBackbone
    from gooddrag.plugins.backbones.stable_diffusion_xl import StableDiffusionXLBackbone
    from gooddrag.plugins.backbones.tiny_random import TinyRandomBackbone

    return [StableDiffusionBackbone, StableDiffusionXLBackbone, TinyRandomBackbone]
