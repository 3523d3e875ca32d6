"""The per-image LoRA (docs/method.md, section 1) of a Stable Diffusion backbone: trained once per image on random
crops, cached on disk by everything that changes it, and fused into the UNet for editing.

A cache entry is written with the SHA-256 of its weights; an entry that is truncated, empty,
bit-flipped or without a checksum is retrained and replaced (with a warning) instead of failing
every later run, and a cache that cannot be written is found before training: the LoRA is then
trained for this edit only, with a warning. The key holds what the LoRA was trained on: the image,
the digest of the model's weights (UNet, VAE, text encoder, noise schedule; see fingerprint.py),
the prompt, the LoRA parameters and the dtypes; never the ``--model`` string.

A LoRA that changes nothing (no UNet LoRA weights, or only zeros) is refused when given as a path
and retrained when it is a cache entry: it is never reported as loaded or cached.

A freshly trained LoRA is written to the cache after the edit's result is out, on a background
thread (:meth:`PerImageLora.write_pending`): reading 256 small tensors back from a GPU would stop
the host 256 times in the middle of the edit. The next LoRA lookup waits for the write
(``core/deferred.py``), and a write that fails warns then."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from gooddrag.core import deferred
from gooddrag.core.capture import adam_factors
from gooddrag.core.ddim import DDIM
from gooddrag.core.errors import BadInputError, GoodDragWarning
from gooddrag.plugins.backbones.fingerprint import pipeline_digest, sha256_file
from gooddrag.plugins.backbones.split_weights import SplitWeights

LORA_ADAPTER = "gooddrag"
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
CHECKSUM_NAME = "weights.sha256"
ADAMW_BETAS, ADAMW_EPS = (0.9, 0.999), 1e-8  # torch.optim.AdamW's defaults, as the method trains


_sha256 = sha256_file


def cache_problem(folder: Path) -> str | None:
    """Why the cache entry ``folder`` cannot be trusted, or None when its weights match the checksum
    written with them."""
    weights, checksum = folder / WEIGHTS_NAME, folder / CHECKSUM_NAME
    if folder.is_symlink() or not folder.is_dir():
        return "it is a file, not a folder"
    try:
        if not weights.is_file() or weights.stat().st_size == 0:
            return "its weights file is missing or empty"
        if not checksum.is_file():
            return "it has no checksum (written by an older version or cut short)"
        want = (checksum.read_text().split() or [""])[0]
        if _sha256(weights) != want:
            return "its weights do not match their checksum (truncated or corrupted)"
    except OSError as exc:
        return f"it cannot be read ({exc.strerror or type(exc).__name__})"
    return None


def cache_unwritable(root: Path) -> str | None:
    """Why nothing can be cached under ``root`` (checked before training, not after), or None. A
    file in the way is named (with the variable, when it is $GOODDRAG_CACHE itself)."""
    probe = root
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        env = os.environ.get("GOODDRAG_CACHE")
        if env and probe == Path(env):
            return f"GOODDRAG_CACHE={env!r} is a file, not a folder"
        return f"{str(probe)!r} is a file, not a folder"
    try:
        root.mkdir(parents=True, exist_ok=True)
        os.rmdir(tempfile.mkdtemp(dir=root, prefix=".write-test-"))
    except OSError as exc:
        return f"{root} is not a writable folder ({exc.strerror or type(exc).__name__})"
    return None


def cache_root() -> Path:
    """$GOODDRAG_CACHE or ~/.cache/gooddrag."""
    return Path(os.environ.get("GOODDRAG_CACHE") or Path.home() / ".cache" / "gooddrag")


class PerImageLora:
    """Adds, trains, caches, loads, fuses and drops the LoRA adapter of one backbone's UNet."""

    def __init__(self, backbone: Any):
        self.backbone = backbone
        self._unfused: dict[str, torch.Tensor] | None = None  # base weights while a LoRA is fused in
        self._pending: tuple[Path, dict[str, torch.Tensor]] | None = None  # a trained LoRA not yet cached

    @property
    def unet(self) -> Any:
        return self.backbone.unet

    @property
    def pipe(self) -> Any:
        return self.backbone.pipe

    def apply(self, mode: str, image: torch.Tensor, params: Any, on_train: Any = None, on_step: Any = None) -> str:
        """Apply the per-image LoRA: ``off``, ``auto`` (train or load from the disk cache) or a path.
        ``image`` is the working image (1, 3, H, W) in [-1, 1]. Returns what was done. ``on_step(k,
        total)`` is called after each training step; what it raises (a cancel) stops the training and
        leaves the UNet without the half-trained adapter, and nothing is cached."""
        self.write_pending()  # an earlier edit's LoRA (that edit may have failed after training it)
        deferred.wait()  # the cache is looked up below
        self.drop()
        if mode == "off":
            return "off"
        if mode != "auto":
            self.load(Path(mode))
            if not self.changes_unet():
                self.drop()
                raise BadInputError(f"lora {mode!r} holds no UNet LoRA weights (it would change nothing); pass a "
                                    "LoRA trained by gooddrag/diffusers for the UNet, auto or off")
            status = f"loaded {mode}"
        else:
            folder = cache_root() / "lora" / self.key(image, params)
            status = ""
            if folder.exists():
                problem = cache_problem(folder)
                if problem is None:
                    try:
                        self.load(folder)
                        if self.changes_unet():
                            status = f"cached {folder}"
                        else:
                            self.drop()
                            problem = "it holds no UNet LoRA weights (it would change nothing)"
                    except Exception as exc:  # passed the checksum but cannot be loaded
                        self.drop()
                        problem = f"it cannot be loaded ({type(exc).__name__})"
                if problem:
                    warnings.warn(f"cached LoRA {folder} is damaged: {problem}; retraining and replacing it",
                                  GoodDragWarning, stacklevel=2)
                    _remove(folder)
            if not status:
                unwritable = cache_unwritable(folder.parent)
                if unwritable:
                    warnings.warn(f"the LoRA cache {unwritable}: the LoRA is trained for this edit but not "
                                  "cached; set GOODDRAG_CACHE to a writable folder", GoodDragWarning, stacklevel=2)
                if on_train:
                    on_train()
                try:
                    self.train(image, params, on_step)
                except BaseException:
                    self.drop()
                    raise
                status = "trained (not cached)"
                if not unwritable:  # written once the result is out (write_pending)
                    from peft.utils import get_peft_model_state_dict

                    self._pending = (folder, get_peft_model_state_dict(self.unet, adapter_name=LORA_ADAPTER))
                    status = f"trained {folder}"
        if params.fuse:
            # unfusing subtracts the update again, which is not exact in floating point: keep the
            # original weights (on the host, once per edit) so dropping the LoRA restores them bit for bit
            self._unfused = _host_backup({n: q for n, q in self.unet.named_parameters() if ".base_layer." in n})
            self.pipe.fuse_lora(components=["unet"], lora_scale=1.0, adapter_names=[LORA_ADAPTER])
        return status

    def key(self, image: torch.Tensor, params: Any) -> str:
        """Everything the trained LoRA depends on: the image, the model's weights (their digest, not
        the model's name), the prompt, the LoRA parameters, the weights' and compute dtypes."""
        h = hashlib.sha256()
        h.update(image.detach().float().cpu().numpy().tobytes())
        b = self.backbone
        compute = [str(b.compute_dtype)] if getattr(b, "compute_dtype", None) else []
        h.update(json.dumps(["weights", self.weights_digest(), b.prompt, params.cache_fields(), str(b.dtype),
                             *compute]).encode())
        return h.hexdigest()[:24]

    def weights_digest(self) -> str:
        """The digest of the backbone's weights (fingerprint.py), computed once per loaded model. A
        VAE swapped in after loading is a new object, so its digest is taken again."""
        ids = (id(self.unet), id(self.backbone.vae), id(getattr(self.pipe, "text_encoder", None)))
        if getattr(self, "_digest", (None, None))[0] != ids:
            self._digest = (ids, pipeline_digest(self.pipe, store=cache_root() / "digests"))
        return self._digest[1]

    def changes_unet(self) -> bool:
        """Whether the adapter that was just loaded changes the UNet (LoRA weights that are not all zero)."""
        if LORA_ADAPTER not in (getattr(self.unet, "peft_config", None) or {}):
            return False
        ups = [q for n, q in self.unet.named_parameters() if "lora_B" in n and f".{LORA_ADAPTER}." in n]
        return bool(ups) and bool(torch.stack([q.detach().abs().sum().float() for q in ups]).sum() > 0)

    def drop(self) -> None:
        if self._unfused is not None:
            self.pipe.unfuse_lora(components=["unet"])
            with torch.no_grad():
                for n, q in self.unet.named_parameters():
                    if n in self._unfused:
                        q.copy_(self._unfused[n], non_blocking=True)  # from pinned memory: no host wait
            self._unfused = None
        if getattr(self.unet, "peft_config", None) and LORA_ADAPTER in self.unet.peft_config:
            self.unet.delete_adapters(LORA_ADAPTER)
        te = getattr(self.pipe, "text_encoder", None)
        if te is not None and LORA_ADAPTER in (getattr(te, "peft_config", None) or {}):
            self.pipe.unload_lora_weights()  # a file with text-encoder LoRA layers: none stay behind

    def load(self, path: Path) -> None:
        if not path.exists():
            raise BadInputError(f"lora {str(path)!r}: no such file or folder; pass a LoRA saved by gooddrag/diffusers, auto or off")
        try:
            self.pipe.load_lora_weights(str(path), adapter_name=LORA_ADAPTER)
        except (OSError, ValueError, RuntimeError) as exc:  # truncated or foreign file
            self.drop()
            raise BadInputError(f"lora {str(path)!r} cannot be loaded ({type(exc).__name__}); "
                                "pass a LoRA saved by gooddrag/diffusers, auto or off") from None
        self.unet.requires_grad_(False)

    def write_pending(self) -> None:
        """Cache the LoRA trained by the last edit, if any, on a background thread. The weights were
        taken by reference when training ended: nothing writes to them afterwards, and a fused or
        dropped adapter leaves them as trained."""
        if self._pending is None:
            return
        folder, weights = self._pending
        self._pending = None

        def write() -> None:
            try:
                self.save(folder, weights)
            except OSError as exc:
                warnings.warn(f"the trained LoRA could not be cached in {folder} "
                              f"({exc.strerror or type(exc).__name__}); it was used for that edit only",
                              GoodDragWarning, stacklevel=2)

        deferred.start(write, "gooddrag-lora-cache")

    def save(self, folder: Path, weights: dict[str, torch.Tensor] | None = None) -> None:
        """Write the adapter (or ``weights``, its peft state dict) as a cache entry: weights and their
        checksum in a temporary folder, then renamed into place (a reader sees all or nothing)."""
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        if weights is None:
            weights = get_peft_model_state_dict(self.unet, adapter_name=LORA_ADAPTER)
        layers = convert_state_dict_to_diffusers(_to_host(weights))
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".tmp-"))
        try:
            type(self.pipe).save_lora_weights(str(tmp), unet_lora_layers=layers, safe_serialization=True)
            (tmp / CHECKSUM_NAME).write_text(f"{_sha256(tmp / WEIGHTS_NAME)}  {WEIGHTS_NAME}\n")
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
            _remove(folder)  # a file in the way of the entry
        try:
            os.replace(tmp, folder)
        except OSError:  # another process cached it first
            shutil.rmtree(tmp, ignore_errors=True)

    def train(self, image: torch.Tensor, params: Any, on_step: Any = None) -> None:
        """Rank-r LoRA on to_q/k/v/out of every attention; crops encoded once, posterior re-sampled.
        Every random number is drawn up front, in the order the steps use them, and moved to the
        device once: the loop itself never waits for the host (see :class:`LoraTrainer`)."""
        trainer = self.trainer(image, params)
        b = self.backbone
        step = trainer.step
        if getattr(b, "compiled", False) and b.device.type == "cuda":  # --compile: each step one CUDA graph
            from gooddrag.core.capture import compile_step

            step = compile_step(trainer.step, b.device)
        try:
            for k in range(params.steps):
                if step is trainer.step:
                    trainer.step(*trainer.inputs(k))
                else:
                    try:
                        with torch._dynamo.config.patch(trace_autograd_ops=True):
                            step(*trainer.inputs(k))
                    except Exception as exc:  # a compile error: the same step, eagerly, from this one on
                        if not b.is_compile_error(exc):
                            raise
                        warnings.warn(f"torch.compile of the LoRA step failed ({type(exc).__name__}); training "
                                      "eagerly", GoodDragWarning, stacklevel=2)
                        step = trainer.step
                        trainer.step(*trainer.inputs(k))
                if on_step is not None:  # progress, and a cancel within one step (it may raise)
                    on_step(k + 1, params.steps)
        finally:
            trainer.close()

    def trainer(self, image: torch.Tensor, params: Any) -> "LoraTrainer":
        """Add the adapter and set up its training (see :class:`LoraTrainer`); ``close()`` ends it."""
        return LoraTrainer(self, image, params)


class LoraTrainer:
    """One LoRA training run as a step function of device tensors with static shapes.

    The step's inputs (posterior sample, noise, timestep) are slices of tensors drawn up front; the
    encoded crops, the text embedding, the LoRA weights and AdamW's state (moments and a device step
    count) are buffers updated in place. Nothing in a step reads a value back to the host, so a
    step can be captured whole (``torch.compile``; no graph break, ``benchmarks/counts.py``)."""

    _cast_prompt = True  # the prompt embedding enters in the compute dtype (a test turns it off to compare)

    def __init__(self, lora: PerImageLora, image: torch.Tensor, params: Any):
        from peft import LoraConfig

        b = self.backbone = lora.backbone
        self.unet, self.params = lora.unet, params
        self.unet.add_adapter(LoraConfig(r=params.rank, lora_alpha=params.rank, init_lora_weights="gaussian",
                                         target_modules=LORA_TARGETS), adapter_name=LORA_ADAPTER)
        self.weights = [q for q in self.unet.parameters() if q.requires_grad]
        for q in self.weights:
            q.data = q.data.float()
        gen = torch.Generator().manual_seed(params.seed)
        crops = _random_crops(image, params.crop, params.batch_size, gen)  # (B, 3, c, c)
        with torch.no_grad(), b.visiting(b.vae):
            dist = b.vae.encode(crops.to(b.device, b.vae.dtype)).latent_dist
            self.mean, self.std = dist.mean.float(), dist.std.float()  # (B, 4, c/8, c/8)
        draws = [(torch.randn(self.mean.shape, generator=gen), torch.randn(self.mean.shape, generator=gen),
                  torch.randint(0, b.num_train_timesteps, (self.mean.shape[0],), generator=gen))
                 for _ in range(params.steps)]
        self.draws = [torch.stack(x).to(b.device) for x in zip(*draws)] if draws else []  # (steps, B, ...)
        self.compute = getattr(b, "compute_dtype", None) or b.dtype  # LoRA weights and AdamW stay fp32 either way
        self.cond = b.conditioning(crops.shape[0], self.mean.shape[-2:])  # the prompt (and SDXL's pooled/size inputs)
        if self.compute != torch.float32 and self._cast_prompt:  # once: autocast would cast it at every cross-attention
            self.cond["encoder_hidden_states"] = self.cond["encoder_hidden_states"].to(self.compute)
        # only its alphas and prediction type: q(z_t | x0) and the training target (noise, or v)
        self.ddim = DDIM(b.alphas_cumprod, 1, b.num_train_timesteps, prediction_type=b.prediction_type)
        self.ddim.alphas_cumprod = self.ddim.alphas_cumprod.to(b.device)  # once, not a host-to-device copy per step
        self.exp_avg = [torch.zeros_like(q) for q in self.weights]
        self.exp_avg_sq = [torch.zeros_like(q) for q in self.weights]
        self.count = torch.zeros(1, dtype=torch.int64, device=b.device)  # (1,) AdamW's step, on the device
        self.factors = adam_factors(params.lr, ADAMW_BETAS, ADAMW_EPS, params.steps, b.device)  # (steps + 1, 2)
        self.checkpointing = params.checkpointing and hasattr(self.unet, "enable_gradient_checkpointing")
        if self.checkpointing:
            self.unet.enable_gradient_checkpointing()
        # bf16 autocast would cast every frozen fp32 weight at every pass (and again when a checkpointed
        # block recomputes); split them once for the whole training: the passes read the bf16 halves
        self.split = SplitWeights(self.unet, frozen_only=True) if self.compute == torch.bfloat16 else None

    def inputs(self, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Step k's posterior sample (B, 4, c/8, c/8), noise (same) and timesteps (B,): views, no copies."""
        return self.draws[0][k], self.draws[1][k], self.draws[2][k]

    def step(self, posterior: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """One training step: noise prediction loss, its gradient, AdamW. Returns the loss (0-d, detached)."""
        b = self.backbone
        latents = (self.mean + self.std * posterior) * b.scaling
        noisy = self.ddim.add_noise(latents, noise, t)
        with torch.autocast(b.device.type, dtype=self.compute, enabled=self.compute != torch.float32):
            pred = b.run_unet(noisy.to(b.dtype), t, **self.cond, return_dict=False)[0]
        b._captured = None  # the feature hook's capture: not wanted here, and not to be kept alive
        loss = F.mse_loss(pred.float(), self.ddim.target(latents, noise, t))  # noise, or v
        grads = torch.autograd.grad(loss, self.weights)
        self._adamw(list(grads))
        return loss.detach()

    @torch.no_grad()
    def _adamw(self, grads: list[torch.Tensor]) -> None:
        """AdamW (decoupled weight decay; torch.optim.AdamW's update, its step count on the device)
        over all LoRA weights at once: a dozen multi-tensor ops per step."""
        p = self.params
        b1, b2 = ADAMW_BETAS
        self.count += 1
        torch._foreach_mul_(self.weights, 1 - p.lr * p.weight_decay)
        torch._foreach_lerp_(self.exp_avg, grads, 1 - b1)
        torch._foreach_mul_(self.exp_avg_sq, b2)
        torch._foreach_addcmul_(self.exp_avg_sq, grads, grads, 1 - b2)
        c = self.factors.index_select(0, self.count)[0]  # (2,): this step's bias-corrected (c1, c2)
        n = len(self.weights)  # the 0-d factors go in as lists of tensors: a tensor scalar would be read by the host
        denom = torch._foreach_sqrt(self.exp_avg_sq)
        torch._foreach_mul_(denom, [c[0]] * n)
        torch._foreach_add_(denom, [c[1]] * n)
        torch._foreach_addcdiv_(self.weights, self.exp_avg, denom)

    def close(self) -> None:
        """End training: the LoRA weights frozen and in the backbone's dtype."""
        if self.checkpointing:
            self.unet.disable_gradient_checkpointing()
            self.checkpointing = False
        if self.split is not None:
            self.split.join()  # the exact fp32 base weights are back
            self.split = None
        b = self.backbone
        for q in self.weights:
            q.requires_grad_(False)
            q.data = q.data.to(b.dtype)


def _to_host(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Host copies of ``weights``: from a GPU, one gather and one read (not one read per tensor)."""
    values = list(weights.values())
    if not values or values[0].device.type == "cpu" or any(v.dtype != values[0].dtype for v in values):
        return {n: v.detach().to("cpu", copy=True).contiguous() for n, v in weights.items()}
    flat = torch.cat([v.detach().reshape(-1) for v in values]).cpu()  # one device-to-host copy
    return {n: part.view(v.shape).clone() for (n, v), part in zip(weights.items(), flat.split([v.numel() for v in values]))}


def _host_backup(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Copies of ``weights`` in host memory. From CUDA: slices of one pinned buffer filled by
    non-blocking copies, queued on the stream before anything changes the weights, so the host never
    waits for them (a pageable copy per weight would stop the host 160 times)."""
    first = next(iter(weights.values()), None)
    if first is None or first.device.type != "cuda" or any(q.dtype != first.dtype for q in weights.values()):
        return {n: q.detach().to("cpu", copy=True) for n, q in weights.items()}
    out, offset = {}, 0
    pinned = torch.empty(sum(q.numel() for q in weights.values()), dtype=first.dtype, pin_memory=True)
    for n, q in weights.items():
        out[n] = pinned[offset:offset + q.numel()].view(q.shape)
        out[n].copy_(q.detach(), non_blocking=True)
        offset += q.numel()
    return out


def _remove(path: Path) -> None:
    """Remove a cache entry, whether a folder, a file or a link."""
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


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
