"""The diffusers Stable Diffusion adapter: the only place that touches UNet internals.

Strategies see ``encode``, ``decode``, ``eps_and_features``, ``ddim_step``, ``invert`` and the
``mutual_attention`` context; everything about diffusers, peft and attention backends is here.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

import attrs
import torch
import torch.nn.functional as F
from attrs.validators import ge

from gooddrag.core.ddim import DDIM
from gooddrag.core.errors import BadInputError, ModelNotFoundError, RequirementError
from gooddrag.core.params import p

SD15_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
SD15_VAE = "stabilityai/sd-vae-ft-mse"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
LORA_ADAPTER = "gooddrag"
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def resolve_device(device: str) -> torch.device:
    """auto -> cuda when available, else cpu; cuda[:i] must exist."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RequirementError(f"--device {device} asked for, but torch sees no CUDA device; use --device cpu")
    return torch.device(device)


def cache_root() -> Path:
    """$GOODDRAG_CACHE or ~/.cache/gooddrag."""
    return Path(os.environ.get("GOODDRAG_CACHE") or Path.home() / ".cache" / "gooddrag")


def _hub_hint(what: str, name: str, flag: str) -> str:
    return (f"{what} {name!r} is not available locally and the hub cannot be reached; download it once "
            f"(hf download {name}) or pass a local copy with {flag} DIR")


class MutualSelfAttention:
    """Self-attention processor for the finishing phase (SPEC 9). The batch is [reference, edited]:
    the reference half attends to itself, the edited half's queries attend to the reference's keys
    and values. Projections are the module's own, so LoRA-adapted layers are used as they are."""

    def __init__(self, backend: str = "sdpa"):
        self.backend = backend

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: Any = None,
                 attention_mask: Any = None, temb: Any = None, *args: Any, **kwargs: Any) -> torch.Tensor:
        residual = hidden_states
        b, n, _ = hidden_states.shape  # (2B, tokens, dim)
        q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        half = b // 2
        k = torch.cat([k[:half], k[:half]])  # edited queries see the reference's keys ...
        v = torch.cat([v[:half], v[:half]])  # ... and values
        heads = attn.heads
        d = q.shape[-1] // heads
        if self.backend == "xformers":
            import xformers.ops as xops

            q, k, v = (x.view(b, -1, heads, d) for x in (q, k, v))
            out = xops.memory_efficient_attention(q, k, v, scale=attn.scale).reshape(b, n, heads * d)
        else:
            q, k, v = (x.view(b, -1, heads, d).transpose(1, 2) for x in (q, k, v))  # (b, heads, n, d)
            out = F.scaled_dot_product_attention(q, k, v, scale=attn.scale)
            out = out.transpose(1, 2).reshape(b, n, heads * d)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


class StableDiffusionBackbone:
    """Stable Diffusion 1.x/2.x through diffusers (SD1.5 by default, with the ft-MSE VAE)."""

    name = "stable-diffusion"

    @attrs.frozen(kw_only=True)
    class Params:
        feature_block: int = p(2, "features = output of unet.up_blocks[i], upsampled to H/2", ge(0))
        mutual_from_block: int = p(10, "mutual self-attention on transformer blocks i.. (10-15 in SD1.5)", ge(0))

    def __init__(self, pipe: Any, *, device: torch.device, dtype: torch.dtype, attention: str = "sdpa",
                 model_id: str = "", params: "StableDiffusionBackbone.Params | None" = None):
        self.params = params or self.Params()
        self.pipe = pipe
        self.unet, self.vae = pipe.unet, pipe.vae
        self.device, self.dtype, self.attention, self.model_id = device, dtype, attention, model_id
        self.scaling = float(self.vae.config.scaling_factor)
        self.num_train_timesteps = int(pipe.scheduler.config.num_train_timesteps)
        self.alphas_cumprod = pipe.scheduler.alphas_cumprod
        self._ddim: DDIM | None = None
        self._text: dict[str, torch.Tensor] = {}
        self._captured: torch.Tensor | None = None
        self.unet.up_blocks[self.params.feature_block].register_forward_hook(self._capture)
        self.unet.requires_grad_(False)
        self.vae.requires_grad_(False)
        pipe.text_encoder.requires_grad_(False)
        self.prompt = ""
        self.vae_id = "auto"  # what --vae asked for, recorded in the config
        self._unfused: dict[str, torch.Tensor] | None = None  # base weights while a LoRA is fused in

    # --- loading ------------------------------------------------------------------------------

    @classmethod
    def load(cls, model: str = SD15_MODEL, *, vae: str = "auto", device: str = "auto", dtype: str = "fp32",
             attention: str = "auto") -> "StableDiffusionBackbone":
        """Load once per process from a hub id, a local diffusers folder or a .safetensors/.ckpt file."""
        dev, tdtype = resolve_device(device), DTYPES[dtype]
        backend = check_attention(attention, dev)
        pipe = _load_pipeline(model, tdtype)
        _swap_vae(pipe, model, vae, tdtype)
        return cls._finish(pipe, dev, tdtype, backend, model, vae)

    @classmethod
    def _finish(cls, pipe: Any, dev: torch.device, tdtype: torch.dtype, backend: str, model: str, vae: str = "auto"):
        pipe.set_progress_bar_config(disable=True)
        pipe.to(dev)
        if backend == "xformers":
            pipe.enable_xformers_memory_efficient_attention()
        backbone = cls(pipe, device=dev, dtype=tdtype, attention=backend, model_id=model)
        backbone.vae_id = vae
        return backbone

    # --- sampler ------------------------------------------------------------------------------

    def sampler(self, num_steps: int) -> DDIM:
        if self._ddim is None or self._ddim.num_steps != num_steps:
            cfg = self.pipe.scheduler.config
            self._ddim = DDIM(self.alphas_cumprod, num_steps, self.num_train_timesteps, int(cfg.get("steps_offset", 1)))
        return self._ddim

    def ddim_step(self, z: torch.Tensor, eps: torch.Tensor, t: int) -> torch.Tensor:
        return self._ddim.step(z, eps, t)

    def invert(self, z0: torch.Tensor, start: int) -> torch.Tensor:
        """DDIM-invert the clean latent up to timesteps[start] (38 steps to t=741 by default)."""
        ddim = self._ddim
        z = z0
        with torch.no_grad():
            for t in reversed(ddim.timesteps[start:]):
                z = ddim.invert_step(z, self.eps(z, t), t)
        return z

    # --- model calls --------------------------------------------------------------------------

    def set_prompt(self, prompt: str) -> None:
        self.prompt = prompt

    def text_embedding(self, batch: int = 1) -> torch.Tensor:
        """CLIP embedding of the prompt, cached per prompt: (batch, 77, D)."""
        if self.prompt not in self._text:
            tok = self.pipe.tokenizer(self.prompt, padding="max_length", max_length=self.pipe.tokenizer.model_max_length,
                                      truncation=True, return_tensors="pt")
            with torch.no_grad():
                self._text[self.prompt] = self.pipe.text_encoder(tok.input_ids.to(self.device))[0].to(self.dtype)
        return self._text[self.prompt].expand(batch, -1, -1)

    def _capture(self, module: Any, args: Any, output: torch.Tensor) -> None:
        self._captured = output

    def _unet(self, z: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
        emb = self.text_embedding(z.shape[0])
        return self.unet(z.to(self.dtype), t, encoder_hidden_states=emb, return_dict=False)[0].float()

    def eps(self, z: torch.Tensor, t: int) -> torch.Tensor:
        """Predicted noise, fp32, same shape as z."""
        eps = self._unet(z, t)
        self._captured = None  # features not wanted: don't keep the map alive
        return eps

    def eps_and_features(self, z: torch.Tensor, t: int, upsample: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """One UNet pass: eps (1, 4, h, w) fp32 and features (1, C, 4h, 4w) (or (1, C, h', w') raw)."""
        eps = self._unet(z, t)
        feats, self._captured = self._captured, None
        return eps, (self.upsample_features(feats, z.shape[-2:]) if upsample else feats)

    def upsample_features(self, feats: torch.Tensor, latent_hw: Any) -> torch.Tensor:
        """Bilinear (align_corners False) to the feature grid: 4x the latent (h, w) = H/2 x W/2."""
        h, w = latent_hw
        return F.interpolate(feats, size=(4 * h, 4 * w), mode="bilinear", align_corners=False)

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """(1, 3, H, W) in [-1, 1] -> posterior mean x scaling, (1, 4, H/8, W/8) fp32."""
        with torch.no_grad():
            z = self.vae.encode(image.to(self.device, self.dtype)).latent_dist.mean.float() * self.scaling
        return z

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """(1, 4, h, w) -> (1, 3, 8h, 8w) in [0, 1], fp32."""
        with torch.no_grad():
            x = self.vae.decode((z / self.scaling).to(self.dtype), return_dict=False)[0].float()
        return (x / 2 + 0.5).clamp(0, 1)

    # --- mutual self-attention ------------------------------------------------------------------

    def transformer_blocks(self) -> list[Any]:
        """Transformer blocks in execution order: down, mid, up (16 in SD1.5)."""
        from diffusers.models.attention import BasicTransformerBlock

        blocks = [*self.unet.down_blocks, self.unet.mid_block, *self.unet.up_blocks]
        return [m for blk in blocks for m in blk.modules() if isinstance(m, BasicTransformerBlock)]

    @contextlib.contextmanager
    def mutual_attention(self) -> Iterator[None]:
        """Within the context, self-attention of blocks ``mutual_from_block``.. is mutual (batch [ref, edit])."""
        attns = [b.attn1 for b in self.transformer_blocks()[self.params.mutual_from_block:]]
        saved = [a.processor for a in attns]
        proc = MutualSelfAttention(self.attention)
        for a in attns:
            a.set_processor(proc)
        try:
            yield
        finally:
            for a, old in zip(attns, saved):
                a.set_processor(old)

    def eps_mutual(self, z_ref: torch.Tensor, z: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        """eps of [reference, edited] in one batch-2 pass with mutual self-attention."""
        with self.mutual_attention():
            eps = self._unet(torch.cat([z_ref, z]), t)
        self._captured = None
        return eps[:1], eps[1:]

    # --- per-image LoRA (SPEC 3) ----------------------------------------------------------------

    def use_lora(self, mode: str, image: torch.Tensor, params: Any, on_train: Any = None) -> str:
        """Apply the per-image LoRA: ``off``, ``auto`` (train or load from the disk cache) or a path.
        ``image`` is the working image (1, 3, H, W) in [-1, 1]. Returns what was done."""
        self._drop_lora()
        if mode == "off":
            return "off"
        if mode != "auto":
            self._load_lora(Path(mode))
            status = f"loaded {mode}"
        else:
            folder = cache_root() / "lora" / self._lora_key(image, params)
            if (folder / "pytorch_lora_weights.safetensors").exists():
                self._load_lora(folder)
                status = f"cached {folder}"
            else:
                if on_train:
                    on_train()
                self._train_lora(image, params)
                self._save_lora(folder)
                status = f"trained {folder}"
        if params.fuse:
            # unfusing subtracts the update again, which is not exact in floating point: keep the
            # original weights (on the host, once per edit) so dropping the LoRA restores them bit for bit
            self._unfused = {n: q.detach().to("cpu", copy=True) for n, q in self.unet.named_parameters()
                             if ".base_layer." in n}
            self.pipe.fuse_lora(components=["unet"], lora_scale=1.0, adapter_names=[LORA_ADAPTER])
        return status

    def _lora_key(self, image: torch.Tensor, params: Any) -> str:
        h = hashlib.sha256()
        h.update(image.detach().float().cpu().numpy().tobytes())
        h.update(json.dumps([self.model_id, self.prompt, params.cache_fields(), str(self.dtype)]).encode())
        return h.hexdigest()[:24]

    def _drop_lora(self) -> None:
        if self._unfused is not None:
            self.pipe.unfuse_lora(components=["unet"])
            with torch.no_grad():
                for n, q in self.unet.named_parameters():
                    if n in self._unfused:
                        q.copy_(self._unfused[n])
            self._unfused = None
        if getattr(self.unet, "peft_config", None) and LORA_ADAPTER in self.unet.peft_config:
            self.unet.delete_adapters(LORA_ADAPTER)

    def _load_lora(self, path: Path) -> None:
        if not path.exists():
            raise BadInputError(f"--lora {path}: no such file or folder; pass a LoRA saved by gooddrag/diffusers, auto or off")
        self.pipe.load_lora_weights(str(path), adapter_name=LORA_ADAPTER)
        self.unet.requires_grad_(False)

    def _save_lora(self, folder: Path) -> None:
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".tmp-"))
        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(self.unet, adapter_name=LORA_ADAPTER))
        type(self.pipe).save_lora_weights(str(tmp), unet_lora_layers=layers, safe_serialization=True)
        try:
            os.replace(tmp, folder)
        except OSError:  # another process cached it first
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)

    def _train_lora(self, image: torch.Tensor, params: Any) -> None:
        """Rank-r LoRA on to_q/k/v/out of every attention; crops encoded once, posterior re-sampled."""
        from peft import LoraConfig

        self.unet.add_adapter(LoraConfig(r=params.rank, lora_alpha=params.rank, init_lora_weights="gaussian",
                                         target_modules=LORA_TARGETS), adapter_name=LORA_ADAPTER)
        lora = [q for q in self.unet.parameters() if q.requires_grad]
        for q in lora:
            q.data = q.data.float()
        gen = torch.Generator().manual_seed(params.seed)
        crops = _random_crops(image, params.crop, params.batch_size, gen)  # (B, 3, c, c)
        with torch.no_grad():
            dist = self.vae.encode(crops.to(self.device, self.dtype)).latent_dist
            mean, std = dist.mean.float(), dist.std.float()
        opt = torch.optim.AdamW(lora, lr=params.lr, betas=(0.9, 0.999), weight_decay=params.weight_decay)
        emb = self.text_embedding(crops.shape[0])
        sched = self.pipe.scheduler
        for _ in range(params.steps):
            latents = (mean + std * torch.randn(mean.shape, generator=gen).to(self.device)) * self.scaling
            noise = torch.randn(latents.shape, generator=gen).to(self.device)
            t = torch.randint(0, self.num_train_timesteps, (latents.shape[0],), generator=gen).to(self.device)
            noisy = sched.add_noise(latents, noise, t)
            with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
                pred = self.unet(noisy.to(self.dtype), t, encoder_hidden_states=emb, return_dict=False)[0]
            loss = F.mse_loss(pred.float(), noise)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        for q in lora:
            q.requires_grad_(False)
            q.data = q.data.to(self.dtype)


def _random_crops(image: torch.Tensor, size: int, n: int, gen: torch.Generator) -> torch.Tensor:
    """Resize the short side to ``size`` (bilinear) and draw ``n`` random size x size crops."""
    _, _, h, w = image.shape
    s = size / min(h, w)
    nh, nw = max(size, round(h * s)), max(size, round(w * s))
    img = F.interpolate(image.float(), size=(nh, nw), mode="bilinear", align_corners=False)
    out = []
    for _ in range(n):
        top = int(torch.randint(0, nh - size + 1, (1,), generator=gen))
        left = int(torch.randint(0, nw - size + 1, (1,), generator=gen))
        out.append(img[:, :, top:top + size, left:left + size])
    return torch.cat(out)


def check_attention(attention: str, device: torch.device) -> str:
    """auto/sdpa -> sdpa; xformers needs CUDA and the optional extra."""
    if attention in ("auto", "sdpa"):
        return "sdpa"
    if device.type != "cuda":
        raise RequirementError("--attention xformers needs a CUDA device; use --attention sdpa on this machine")
    try:
        import xformers.ops  # noqa: F401
    except ImportError:
        raise RequirementError("--attention xformers needs the extra: pip install 'gooddrag[xformers]'") from None
    return "xformers"


def _load_pipeline(model: str, dtype: torch.dtype) -> Any:
    from diffusers import StableDiffusionPipeline

    path = Path(model)
    kwargs = dict(torch_dtype=dtype, safety_checker=None, requires_safety_checker=False)
    try:
        if path.is_file():
            if path.suffix not in (".safetensors", ".ckpt"):
                raise BadInputError(f"--model {model}: a single-file model must be .safetensors or .ckpt")
            return StableDiffusionPipeline.from_single_file(str(path), **kwargs)
        if path.is_dir():
            return StableDiffusionPipeline.from_pretrained(str(path), local_files_only=True, **kwargs)
        if "/" not in model or model.startswith((".", "/")):
            raise ModelNotFoundError(f"--model {model!r}: no such folder or file, and not a hub id (owner/name); "
                                     "pass a diffusers folder, a .safetensors file or a hub id")
        return StableDiffusionPipeline.from_pretrained(model, **kwargs)
    except (BadInputError, ModelNotFoundError):
        raise
    except Exception as exc:  # diffusers/hub raise OSError, EnvironmentError, ValueError, hub errors
        raise ModelNotFoundError(_hub_hint("model", model, "--model")) from exc


def _swap_vae(pipe: Any, model: str, vae: str, dtype: torch.dtype) -> None:
    """--vae auto: ft-MSE VAE for SD1.x (as the paper), the model's own otherwise; model: keep own."""
    if vae == "model":
        return
    if vae == "auto":
        if pipe.unet.config.cross_attention_dim != 768:  # not SD1.x
            return
        vae = SD15_VAE
    from diffusers import AutoencoderKL

    path = Path(vae)
    try:
        if path.is_file():
            new = AutoencoderKL.from_single_file(str(path), torch_dtype=dtype)
        elif path.is_dir():
            new = AutoencoderKL.from_pretrained(str(path), torch_dtype=dtype, local_files_only=True)
        else:
            new = AutoencoderKL.from_pretrained(vae, torch_dtype=dtype)
    except Exception as exc:
        raise ModelNotFoundError(_hub_hint("VAE", vae, "--vae") + ", or --vae model to keep the checkpoint's own") from exc
    pipe.vae = new


class TinyRandomBackbone(StableDiffusionBackbone):
    """A tiny random SD1.5-shaped model built locally (for tests and smoke runs; no weights needed)."""

    name = "tiny-random"

    @classmethod
    def load(cls, model: str = "tiny-random", *, vae: str = "auto", device: str = "auto", dtype: str = "fp32",
             attention: str = "auto") -> "TinyRandomBackbone":
        from gooddrag.core.tiny import load_tiny_pipeline

        dev, tdtype = resolve_device(device), DTYPES[dtype]
        backend = check_attention(attention, dev)
        pipe = load_tiny_pipeline(torch_dtype=tdtype)
        if vae not in ("auto", "model"):  # an explicit VAE is honoured for the tiny model too
            _swap_vae(pipe, model, vae, tdtype)
        return cls._finish(pipe, dev, tdtype, backend, "tiny-random", vae)
