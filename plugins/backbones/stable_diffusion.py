"""The diffusers Stable Diffusion adapter: the only place that touches UNet internals.

Strategies see ``encode``, ``decode``, ``eps_and_features``, ``ddim_step``, ``invert`` and the
``mutual_attention`` context; everything about diffusers, peft and attention backends is here.
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
from pathlib import Path
from typing import Any, Iterator

import attrs
import torch
import torch.nn.functional as F
from attrs.validators import ge

from gooddrag.core.backbone import ModelFiles
from gooddrag.core.config import DEFAULT_MODEL
from gooddrag.core.ddim import DDIM, check_prediction_type
from gooddrag.core.devices import DTYPES, resolve_device
from gooddrag.core.engine import UNetPasses
from gooddrag.core.errors import BadInputError, GoodDragWarning, ModelNotFoundError, RequirementError
from gooddrag.core.params import p
from gooddrag.plugins.backbones.attention import MutualSelfAttention
from gooddrag.plugins.backbones.lora import PerImageLora
from gooddrag.plugins.backbones.quiet import quiet_libraries
from gooddrag.plugins.backbones.split_weights import SplitWeights

SD15_MODEL = DEFAULT_MODEL
SD15_VAE = "stabilityai/sd-vae-ft-mse"
COMPILE_GRAPHS = 64  # compiled variants allowed per block (see compile)
COMPILE_MODULES = ("torch._dynamo", "torch._inductor", "torch._functorch")  # torch's compile stack
PARK = torch.device("cpu")  # where low-memory mode keeps the VAE and text encoder between calls


def _hub_hint(what: str, name: str) -> str:
    return (f"{what} {name!r} is not available locally and the hub cannot be reached; download it once "
            f"(hf download {name}) or give the {what} as a local copy (a diffusers folder or a file)")


#: DDIM steps of the method's sampler, used until an edit asks for its own
DEFAULT_NUM_STEPS = 50


class StableDiffusionBackbone:
    """Stable Diffusion 1.x/2.x through diffusers (SD1.5 by default, with the ft-MSE VAE)."""

    name = "stable-diffusion"
    #: model_index.json pipeline classes this backbone takes (a single file's layout is inferred)
    pipeline_classes = frozenset({"StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline"})
    claim_priority = 0  # a subclass that claims a narrower set of models sets a higher one
    #: working width when the model's files do not say (the UNet's sample size x 8 when they do)
    default_width = 512
    # optional capabilities of the backbone contract (core/backbone.py)
    supports_low_memory = True
    supports_compile = True
    supports_mixed = True
    configurable = True
    defers_writes = True  # the trained LoRA is cached after the result is out
    #: features are the feature block's output bilinearly upsampled (align_corners=False) by this
    feature_scale = 4
    #: exact fast paths the engine may use (see DragContext): FeatureMaps, and stopping after the
    #: feature block when the loss reads no eps
    fast_paths = frozenset({"patch_features", "features_only"})
    quiet = staticmethod(quiet_libraries)  # called by Editor.from_pretrained unless verbose=True

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
        self.scaling = float(self.vae.config.scaling_factor)  # SD1.x/2.x 0.18215, SDXL 0.13025
        self.num_train_timesteps = int(pipe.scheduler.config.num_train_timesteps)
        self.alphas_cumprod = pipe.scheduler.alphas_cumprod
        self.prediction_type = check_prediction_type(pipe.scheduler.config.get("prediction_type", "epsilon"),
                                                     f"model {model_id!r}")
        self.default_width = int(self.unet.config.sample_size) * int(getattr(pipe, "vae_scale_factor", 8))
        self._ddim: DDIM | None = None
        self._text: dict[str, torch.Tensor] = {}
        self._captured: torch.Tensor | None = None
        self._features_only = False  # while True, the UNet pass stops once the feature block has run
        self._timesteps: dict[int, torch.Tensor] = {}  # device tensors of the timesteps, made once
        #: autocast dtype of the heavy passes (LoRA training, reference, drag), None = the weights' dtype
        self.compute_dtype: torch.dtype | None = None
        self._mixed = False  # inside mixed()
        self._compute_copies: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id -> (tensor, its compute-dtype copy)
        self.low_memory = False  # VAE and text encoder parked in host memory between their calls
        self.park = PARK
        self.compiled = False  # the UNet's transformer blocks run through torch.compile
        self.passes = UNetPasses()  # UNet forward/backward passes so far (the run report's unet_passes)
        self._feature_hook = self.unet.up_blocks[self.params.feature_block].register_forward_hook(self._capture)
        self.unet.requires_grad_(False)
        self.vae.requires_grad_(False)
        self.text_encoders = [m for m in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if m is not None]
        for m in self.text_encoders:
            m.requires_grad_(False)
        self.prompt = ""
        self.vae_id = "auto"  # what --vae asked for, recorded in the config
        self.lora = PerImageLora(self)

    # --- loading ------------------------------------------------------------------------------

    @classmethod
    def claims(cls, files: ModelFiles) -> bool:
        """A diffusers Stable Diffusion 1.x/2.x pipeline (by its model_index.json), or a single file
        with the original SD layout (or a .ckpt, whose tensor names are not read)."""
        if files.pipeline_class is None:
            return files.source == "file" and files.model.endswith(".ckpt")
        return files.pipeline_class in cls.pipeline_classes and files.unet.get("in_channels", 4) == 4

    @classmethod
    def load(cls, model: str = SD15_MODEL, *, vae: str = "auto", device: str = "auto", dtype: str = "fp32",
             attention: str = "auto", files: ModelFiles | None = None) -> "StableDiffusionBackbone":
        """Load once per process from a hub id, a local diffusers folder or a .safetensors/.ckpt file
        (with ``files.config``, a local diffusers folder holding its configs). A prediction type the
        sampler cannot read is refused from the scheduler config, before any weights load."""
        dev, tdtype = resolve_device(device), DTYPES[dtype]
        backend = check_attention(attention, dev)
        if files is not None:
            check_prediction_type(files.prediction_type, f"model {model!r}")
        pipe = _load_pipeline(cls.pipeline_class(), model, tdtype, files)
        swap_vae(pipe, model, vae, tdtype)
        return cls._finish(pipe, dev, tdtype, backend, model, vae)

    @staticmethod
    def pipeline_class() -> type:
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline

    @classmethod
    def _finish(cls, pipe: Any, dev: torch.device, tdtype: torch.dtype, backend: str, model: str, vae: str = "auto"):
        pipe.set_progress_bar_config(disable=True)
        pipe.to(dev)
        if backend == "xformers":
            pipe.enable_xformers_memory_efficient_attention()
        backbone = cls(pipe, device=dev, dtype=tdtype, attention=backend, model_id=model)
        backbone.vae_id = vae
        return backbone

    def optimize(self) -> None:
        """Speed settings that keep results equal up to float rounding: on CUDA, the UNet's
        convolutions in channels-last layout (what cuDNN's tensor-core kernels prefer). Not on the
        CPU: there oneDNN ran a drag step about 10 % slower in channels-last (docs/performance.md)."""
        if self.device.type == "cuda":
            self.unet.to(memory_format=torch.channels_last)

    def unet_parameters(self) -> int:
        """How many parameters the UNet has (``precision auto`` autocasts only large UNets)."""
        return sum(q.numel() for q in self.unet.parameters())

    def set_low_memory(self, on: bool) -> None:
        """Low-memory mode: the VAE (84M parameters) and the text encoder (123M) wait in host memory
        and visit the device only for their calls (encode, decode, a new prompt), so the UNet's
        training and drag passes have that memory to themselves. Results are unchanged: the same
        weights compute the same values, only where they wait changes."""
        self.low_memory = on
        for m in (self.vae, *self.text_encoders):
            m.to(self.park if on else self.device)

    @contextlib.contextmanager
    def visiting(self, module: Any) -> Iterator[None]:
        """``module`` on the device for the duration (low-memory mode), else as it is."""
        if not self.low_memory:
            yield
            return
        module.to(self.device)
        try:
            yield
        finally:
            module.to(self.park)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()  # give the freed blocks back to the UNet's passes

    def compile(self, backend: str = "inductor", mode: str | None = None) -> None:
        """torch.compile the UNet's transformer blocks (diffusers' regional compilation: each block
        shape compiles once, in far less time than the whole UNet), for every pass: LoRA training,
        inversion, reference, drag. The first pass of each shape compiles. If compiling fails, the
        backbone warns once and runs eager from then on (``compiled`` becomes False)."""
        import torch._dynamo

        if not hasattr(self.unet, "compile_repeated_blocks"):
            raise RequirementError("compile needs diffusers 0.35 or newer (regional compilation); "
                                   "pip install -U 'diffusers<0.43', or drop --compile")
        # every (token count, batch, grad mode, weight dtype, attention processor) of a block is its
        # own graph, about 20 in an SD1.5 edit with LoRA training; past dynamo's default limit of 8
        # the remaining ones would silently run eager
        limits = torch._dynamo.config
        name = "recompile_limit" if hasattr(limits, "recompile_limit") else "cache_size_limit"  # torch < 2.6
        setattr(limits, name, max(getattr(limits, name), COMPILE_GRAPHS))
        self.unet.compile_repeated_blocks(backend=backend, mode=mode, dynamic=False)
        self.compiled = True

    def fall_back_to_eager(self, exc: Exception) -> None:
        """The eager fallback: drop the compiled blocks and say why, in one line."""
        for m in self.unet.modules():
            if getattr(m, "_compiled_call_impl", None) is not None:
                m._compiled_call_impl = None
        self.compiled = False
        root: BaseException = exc  # dynamo wraps the backend's own error: say that one
        while (inner := getattr(root, "inner_exception", None) or root.__cause__) is not None:
            root = inner
        first = (str(root).strip().splitlines() or [""])[0][:200]
        warnings.warn(f"torch.compile failed ({type(root).__name__}: {first}); running eager (drop --compile to "
                      "skip the attempt)", GoodDragWarning, stacklevel=3)

    @staticmethod
    def is_compile_error(exc: BaseException) -> bool:
        """A dynamo/inductor error, or any error raised inside torch's compile stack: a backward graph
        compiles lazily, at the first backward pass, and its compiler's error arrives unwrapped."""
        if isinstance(exc, _compile_errors()):
            return True
        tb = exc.__traceback__
        while tb is not None:
            if tb.tb_frame.f_globals.get("__name__", "").startswith(COMPILE_MODULES):
                return True
            tb = tb.tb_next
        return False

    def run_unet(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        """``unet(x, *args, **kwargs)``, counted in ``passes``; with compiled blocks, a compile error in
        the forward pass falls back to eager and the pass runs again (a pass changes no state; its
        autograd graph is dropped). A compile error in a backward pass reaches the Editor, which falls
        back and redoes the edit."""
        self.passes.forward += 1
        into_input = x.requires_grad  # a drag step: count the backward at the input
        x = self.passes.counted(x)
        if not self.compiled:
            out = self.unet(x, *args, **kwargs)
        else:
            try:
                out = self.unet(x, *args, **kwargs)
            except _compile_errors() as exc:
                self.fall_back_to_eager(exc)
                out = self.unet(x, *args, **kwargs)
        if not into_input and isinstance(out, tuple):  # LoRA training: the gradient stops at the weights
            out = (self.passes.counted(out[0]), *out[1:])
        return out

    @contextlib.contextmanager
    def mixed(self) -> Iterator[None]:
        """Within the context, UNet passes autocast to ``compute_dtype``. Only the UNet: the latent,
        the DDIM arithmetic, the losses and the trackers' distances stay fp32. For bf16 the UNet's
        fp32 weights are split for the duration (:mod:`split_weights`): the passes read bf16 weights
        without per-pass copies, and the exact fp32 weights come back on exit."""
        if self.compute_dtype is None:
            yield
            return
        split = SplitWeights(self.unet) if self.compute_dtype == torch.bfloat16 else None
        self._mixed = True
        try:
            yield
        finally:
            self._mixed = False
            self._compute_copies.clear()
            if split is not None:
                split.join()

    def configure(self, params: "StableDiffusionBackbone.Params") -> None:
        """Use ``params`` for the next edit (``backbone.*`` overrides): moves the feature hook."""
        if params.feature_block >= len(self.unet.up_blocks):
            raise BadInputError(f"backbone.feature_block={params.feature_block}: this UNet has "
                                f"{len(self.unet.up_blocks)} up blocks; use 0..{len(self.unet.up_blocks) - 1}")
        if params.feature_block != self.params.feature_block:
            self._feature_hook.remove()
            self._feature_hook = self.unet.up_blocks[params.feature_block].register_forward_hook(self._capture)
        self.params = params

    # --- sampler ------------------------------------------------------------------------------

    def sampler(self, num_steps: int) -> DDIM:
        """The DDIM sampler with ``num_steps`` steps; it becomes the one ``ddim_step`` and ``invert`` use
        (the engine asks for the schedule's at the start of every edit; before any is asked for,
        they use the method's 50 steps)."""
        if self._ddim is None or self._ddim.num_steps != num_steps:
            cfg = self.pipe.scheduler.config
            self._ddim = DDIM(self.alphas_cumprod, num_steps, self.num_train_timesteps, int(cfg.get("steps_offset", 1)),
                              self.prediction_type)
        return self._ddim

    def ddim_step(self, z: torch.Tensor, eps: torch.Tensor, t: int) -> torch.Tensor:
        return (self._ddim or self.sampler(DEFAULT_NUM_STEPS)).step(z, eps, t)

    def invert(self, z0: torch.Tensor, start: int, on_step: Any = None) -> torch.Tensor:
        """DDIM-invert the clean latent up to timesteps[start] (38 steps to t=741 by default);
        ``on_step(step, total)`` after each step (progress, cancellation)."""
        ddim = self._ddim or self.sampler(DEFAULT_NUM_STEPS)
        z = z0
        ts = list(reversed(ddim.timesteps[start:]))
        with torch.no_grad():
            for k, t in enumerate(ts):
                z = ddim.invert_step(z, self.eps(z, t), t)
                if on_step is not None:
                    on_step(k + 1, len(ts))
        return z

    # --- model calls --------------------------------------------------------------------------

    def set_prompt(self, prompt: str) -> None:
        self.prompt = prompt

    def text_embedding(self, batch: int = 1) -> torch.Tensor:
        """CLIP embedding of the prompt, cached per prompt: (batch, 77, D)."""
        if self.prompt not in self._text:
            tok = self.pipe.tokenizer(self.prompt, padding="max_length", max_length=self.pipe.tokenizer.model_max_length,
                                      truncation=True, return_tensors="pt")
            with torch.no_grad(), self.visiting(self.pipe.text_encoder):
                self._text[self.prompt] = self.pipe.text_encoder(tok.input_ids.to(self.device))[0].to(self.dtype)
        return self.in_compute_dtype(self._text[self.prompt]).expand(batch, -1, -1)

    def in_compute_dtype(self, emb: torch.Tensor, always: bool = False) -> torch.Tensor:
        """The prompt embedding ``emb`` as autocast passes read it, cast once (inside ``mixed()``, or
        ``always``): autocast would cast it again at every cross-attention's keys and values, 32
        casts per SD1.5 pass, to the same values."""
        if not (self._mixed or always) or self.compute_dtype is None or emb.dtype == self.compute_dtype:
            return emb
        hit = self._compute_copies.get(id(emb))
        if hit is None or hit[0] is not emb:
            hit = self._compute_copies[id(emb)] = (emb, emb.to(self.compute_dtype))
        return hit[1]

    def _capture(self, module: Any, args: Any, output: torch.Tensor) -> None:
        self._captured = output
        if self._features_only:
            raise _FeaturesReady  # the rest of the UNet only makes eps, which nobody reads

    def _timestep(self, t: int | torch.Tensor) -> torch.Tensor:
        """A device tensor for t, made once: diffusers turns a Python int into a new device tensor
        (a host-to-device copy) at every call."""
        if isinstance(t, torch.Tensor):
            return t
        if t not in self._timesteps:
            self._timesteps[t] = torch.tensor(t, dtype=torch.int64, device=self.device)
        return self._timesteps[t]

    def conditioning(self, batch: int, latent_hw: Any) -> dict[str, Any]:
        """The UNet's keyword inputs besides the latent and t: the prompt's CLIP embedding."""
        return {"encoder_hidden_states": self.text_embedding(batch)}

    def _unet(self, z: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
        cond = self.conditioning(z.shape[0], z.shape[-2:])
        with torch.autocast(self.device.type, dtype=self.compute_dtype, enabled=self._mixed):
            eps = self.run_unet(z.to(self.dtype), self._timestep(t), **cond, return_dict=False)[0]
        return eps.float()

    def eps(self, z: torch.Tensor, t: int) -> torch.Tensor:
        """The model's prediction (noise, or v for v-prediction models), fp32, same shape as z."""
        eps = self._unet(z, t)
        self._captured = None  # features not wanted: don't keep the map alive
        return eps

    def eps_and_features(self, z: torch.Tensor, t: int, upsample: bool = True,
                         need_eps: bool = True) -> tuple[torch.Tensor | None, torch.Tensor]:
        """One UNet pass: eps (1, 4, h, w) fp32 and features (1, C, 4h, 4w) fp32 (or (1, C, h', w') raw, in
        the pass's dtype: bf16 under bf16 autocast, never cast to fp32 and back as a whole).
        ``need_eps=False`` stops the pass after the feature block (up_blocks[3], a quarter of the
        UNet's work, is skipped) and returns eps None."""
        if need_eps:
            eps = self._unet(z, t)
        else:
            eps, self._features_only = None, True
            try:
                self._unet(z, t)
            except _FeaturesReady:
                pass
            finally:
                self._features_only = False
        feats, self._captured = self._captured, None  # (1, C, h', w') in the pass's dtype
        if not upsample:  # raw: the caller reads it patch by patch (in fp32) or upsamples it
            return eps, feats
        return eps, self.upsample_features(feats.float(), z.shape[-2:])  # fp32 for the losses

    def upsample_features(self, feats: torch.Tensor, latent_hw: Any) -> torch.Tensor:
        """Bilinear (align_corners False) to the feature grid: 4x the latent (h, w) = H/2 x W/2."""
        h, w = latent_hw
        return F.interpolate(feats, size=(4 * h, 4 * w), mode="bilinear", align_corners=False)

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """(1, 3, H, W) in [-1, 1] -> posterior mean x scaling, (1, 4, H/8, W/8) fp32."""
        with torch.no_grad(), self.visiting(self.vae):
            z = self.vae.encode(image.to(self.device, self.vae.dtype)).latent_dist.mean.float() * self.scaling
        return z

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """(1, 4, h, w) -> (1, 3, 8h, 8w) in [0, 1], fp32."""
        with torch.no_grad(), self.visiting(self.vae):
            x = self.vae.decode((z / self.scaling).to(self.vae.dtype), return_dict=False)[0].float()
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

    # --- per-image LoRA (docs/method.md, section 1) -------------------------------------------------

    def use_lora(self, mode: str, image: torch.Tensor, params: Any, on_train: Any = None, on_step: Any = None) -> str:
        """``off``, ``auto`` (train once per image, cached) or a path; see :class:`PerImageLora`.
        ``on_step(step, total)`` after each training step."""
        return self.lora.apply(mode, image, params, on_train, on_step)

    def write_deferred(self) -> None:
        """Cache the LoRA this edit trained, on a background thread, now that the result is out."""
        self.lora.write_pending()


def _compile_errors() -> tuple[type[BaseException], ...]:
    """What torch.compile raises when it cannot compile (dynamo, the backend, inductor's C++/CUDA step)."""
    from torch._dynamo.exc import TorchDynamoException

    errors: list[type[BaseException]] = [TorchDynamoException]
    try:
        from torch._inductor.exc import InductorError

        errors.append(InductorError)
    except ImportError:
        pass
    return tuple(errors)


class _FeaturesReady(Exception):
    """Raised by the feature hook to end a UNet pass whose eps is not wanted."""


def check_attention(attention: str, device: torch.device) -> str:
    """auto/sdpa -> sdpa; xformers needs CUDA and the optional extra."""
    if attention in ("auto", "sdpa"):
        return "sdpa"
    if device.type != "cuda":
        raise RequirementError("attention xformers needs a CUDA device; use attention sdpa (or auto) on this machine")
    try:
        import xformers.ops  # noqa: F401
    except ImportError:
        raise RequirementError("attention xformers needs the extra: pip install 'gooddrag[xformers]'") from None
    return "xformers"


def _load_pipeline(pipeline: type, model: str, dtype: torch.dtype, files: ModelFiles | None = None) -> Any:
    path = Path(model)
    kwargs = dict(torch_dtype=dtype)
    if "safety_checker" in inspect.signature(pipeline.__init__).parameters:
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    config = files.config if files is not None else None
    try:
        if path.is_file():
            if path.suffix not in (".safetensors", ".ckpt"):
                raise BadInputError(f"model {model!r}: a single-file model must be .safetensors or .ckpt")
            if config is not None:  # offline: every config from the local base-model folder
                return pipeline.from_single_file(str(path), config=config, local_files_only=True, **kwargs)
            if _offline():
                raise ModelNotFoundError(
                    f"model {model!r}: a single file holds weights but no configs, and the hub is offline; give the "
                    "base model's diffusers folder as its config (--model-config DIR; SD1.x: stable-diffusion-v1-5, "
                    "SDXL: stable-diffusion-xl-base-1.0)")
            return pipeline.from_single_file(str(path), **kwargs)
        if path.is_dir():
            return pipeline.from_pretrained(str(path), local_files_only=True, **kwargs)
        if "/" not in model or model.startswith((".", "/")):
            raise ModelNotFoundError(f"model {model!r}: no such folder or file, and not a hub id (owner/name); "
                                     "pass a diffusers folder, a .safetensors file or a hub id")
        return pipeline.from_pretrained(model, **kwargs)
    except (BadInputError, ModelNotFoundError):
        raise
    except Exception as exc:  # diffusers/hub raise OSError, EnvironmentError, ValueError, hub errors
        raise ModelNotFoundError(_hub_hint("model", model)) from exc


def _offline() -> bool:
    import os

    return os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")


def swap_vae(pipe: Any, model: str, vae: str, dtype: torch.dtype) -> None:
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
        raise ModelNotFoundError(_hub_hint("VAE", vae) + ", or use the VAE 'model' to keep the checkpoint's own") from exc
    pipe.vae = new


