"""Write a diffusers Stable Diffusion (1.x or XL) pipeline as ONE original-layout checkpoint file,
the way fine-tunes are shared (``model.diffusion_model.*``, ``first_stage_model.*``,
``cond_stage_model.*`` / ``conditioner.embedders.*``), so the single-file loading path can be tested
offline on the tiny random pipelines. The key layout is the original Stable Diffusion / SGM
repositories'; diffusers' ``from_single_file`` reads it back.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

__all__ = ["write_single_file"]

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
           "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def _unet_key(key: str, cfg: Any, attn_up: set[int]) -> str:
    """A diffusers UNet2DConditionModel key -> its original (LDM/SGM) name."""
    per = cfg.layers_per_block + 1  # blocks per resolution level in the original layout
    fixed = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
    for old, new in fixed.items():
        if key.startswith(old + "."):
            return new + key[len(old):]

    def resnet(rest: str) -> str:
        name, _, tail = rest.partition(".")
        return f"{_RESNET.get(name, name)}.{tail}"

    if m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        idx = 1 + i * per + j
        return f"input_blocks.{idx}.0.{resnet(rest)}" if kind == "resnets" else f"input_blocks.{idx}.1.{rest}"
    if m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
        return f"input_blocks.{(int(m[1]) + 1) * per}.0.op.{m[2]}"
    if m := re.match(r"mid_block\.resnets\.(\d+)\.(.*)", key):
        return f"middle_block.{2 * int(m[1])}.{resnet(m[2])}"
    if m := re.match(r"mid_block\.attentions\.0\.(.*)", key):
        return f"middle_block.1.{m[1]}"
    if m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        idx = i * per + j
        return f"output_blocks.{idx}.0.{resnet(rest)}" if kind == "resnets" else f"output_blocks.{idx}.1.{rest}"
    if m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key):
        i = int(m[1])
        return f"output_blocks.{i * per + per - 1}.{2 if i in attn_up else 1}.conv.{m[2]}"
    raise KeyError(f"no original name for UNet key {key}")


def _vae_key(key: str, levels: int) -> str:
    """A diffusers AutoencoderKL key -> its original name (``attn`` projections are 1x1 convs there)."""
    key = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
    if m := re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
        return f"encoder.down.{m[1]}.block.{m[2]}.{m[3]}"
    if m := re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
        return f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
    if m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
        return f"decoder.up.{levels - 1 - int(m[1])}.block.{m[2]}.{m[3]}"
    if m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key):
        return f"decoder.up.{levels - 1 - int(m[1])}.upsample.conv.{m[2]}"
    if m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.*)", key):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}"
    if m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.*)", key):
        rest = m[2]
        for old, new in (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")):
            if rest.startswith(old + "."):
                rest = new + rest[len(old):]
        return f"{m[1]}.mid.attn_1.{rest}"
    return key


def _clip(model: Any, prefix: str) -> dict[str, torch.Tensor]:
    """HF CLIP text model -> ``prefix`` + its ``text_model.*`` names (transformers 5 drops that level)."""
    out = {}
    for k, v in model.state_dict().items():
        if k.startswith("text_projection"):
            continue
        out[prefix + (k if k.startswith("text_model.") else "text_model." + k)] = v
    return out


def _open_clip(model: Any, prefix: str) -> dict[str, torch.Tensor]:
    """HF CLIPTextModelWithProjection -> OpenCLIP names (fused in_proj, transposed text_projection)."""
    sd = {k.removeprefix("text_model."): v for k, v in model.state_dict().items()}
    out = {prefix + "token_embedding.weight": sd.pop("embeddings.token_embedding.weight"),
           prefix + "positional_embedding": sd.pop("embeddings.position_embedding.weight"),
           prefix + "ln_final.weight": sd.pop("final_layer_norm.weight"),
           prefix + "ln_final.bias": sd.pop("final_layer_norm.bias"),
           prefix + "text_projection": sd.pop("text_projection.weight").T.contiguous()}
    sd.pop("embeddings.position_ids", None)
    for i in range(model.config.num_hidden_layers):
        src, dst = f"encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        for part in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{part}"] = torch.cat([sd.pop(f"{src}self_attn.{p}_proj.{part}") for p in "qkv"])
            for old, new in (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"),
                             ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
                out[f"{dst}{new}.{part}"] = sd.pop(f"{src}{old}.{part}")
    return out


def write_single_file(pipe: Any, path: str | Path) -> Path:
    """Save ``pipe`` (a StableDiffusionPipeline or StableDiffusionXLPipeline) as one .safetensors file."""
    from safetensors.torch import save_file

    unet, vae = pipe.unet, pipe.vae
    attn_up = {i for i, b in enumerate(unet.up_blocks) if getattr(b, "attentions", None)}
    state = {f"model.diffusion_model.{_unet_key(k, unet.config, attn_up)}": v for k, v in unet.state_dict().items()}
    levels = len(vae.config.block_out_channels)
    for k, v in vae.state_dict().items():
        name = _vae_key(k, levels)
        if ".mid.attn_1." in name and v.dim() == 2:
            v = v[:, :, None, None]  # linear -> 1x1 conv
        state[f"first_stage_model.{name}"] = v
    if getattr(pipe, "text_encoder_2", None) is not None:
        state.update(_clip(pipe.text_encoder, "conditioner.embedders.0.transformer."))
        state.update(_open_clip(pipe.text_encoder_2, "conditioner.embedders.1.model."))
    else:
        state.update(_clip(pipe.text_encoder, "cond_stage_model.transformer."))
    out = Path(path)
    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(out))
    return out
