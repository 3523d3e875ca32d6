"""The backbone contract: what the engine calls on a diffusion model adapter, with shapes, and how a
model name finds its backbone.

A backbone *class* (registered through ``gooddrag_register_backbones``) says which models it takes
(:meth:`BackboneClass.claims`, from the model's own files: ``model_index.json``'s pipeline class, a
single file's tensor names) and loads one (:meth:`BackboneClass.load`). The loaded *instance* is a
:class:`Backbone`. Optional capabilities are flags on the instance, never probed with ``hasattr``.

Shapes: image (1, 3, H, W) in [-1, 1]; latent z (B, 4, h, w) fp32 with h = H/8; features on the
feature grid (1, C, H/2, W/2). ``pred`` is the model output in the sampler's ``prediction_type``
(noise for epsilon models, v for v-prediction models): read it only through the sampler
(``step``, ``invert_step``, ``predict_x0``, ``noise``), never as noise directly.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any, ClassVar, ContextManager, Iterable, Protocol, runtime_checkable

import attrs
import torch

from gooddrag.core.ddim import DDIM
from gooddrag.core.errors import ConfigError, ModelNotFoundError

#: what the engine may turn on when the backbone lists it in ``fast_paths`` (all exact; see DragContext)
FAST_PATHS = frozenset({"patch_features", "features_only"})


@runtime_checkable
class Backbone(Protocol):
    """A loaded diffusion model, as the engine uses it. A backbone may subclass this Protocol to
    inherit the defaults below (no optional capability, nothing to optimise or silence)."""

    name: ClassVar[str]
    device: torch.device
    dtype: torch.dtype  # the weights' dtype
    attention: str  # sdpa | xformers
    model_id: str
    feature_scale: int  # the feature grid is feature_scale x the latent (h, w)
    default_width: int  # working width in px the model was trained at (SD1.5 512, SD2 768, SDXL 1024)
    vae_id: str = "auto"  # what --vae asked for (recorded in the config)
    params: Any = None  # its Params (``backbone.*`` overrides)
    # --- optional capabilities: flags, each with the methods it promises (see CAPABILITIES) -------
    fast_paths: frozenset = frozenset()  # subset of FAST_PATHS the backbone implements exactly
    supports_low_memory: bool = False  # set_low_memory(on)
    supports_compile: bool = False  # compile(), is_compile_error(exc), fall_back_to_eager(exc)
    supports_mixed: bool = False  # mixed() context, compute_dtype attribute, unet_parameters()
    configurable: bool = False  # configure(params) after loading
    defers_writes: bool = False  # write_deferred(): disk writes left until the result is out (optional flag)
    compiled: bool = False  # compile() ran and has not fallen back
    passes: Any = None  # a core.engine.UNetPasses counting its UNet passes (the report's unet_passes), or None

    def optimize(self) -> None:
        """Speed settings that change no result (called after loading unless faithful)."""

    @staticmethod
    def quiet() -> None:
        """Silence the backbone's libraries (called before loading unless verbose)."""

    def sampler(self, num_steps: int) -> DDIM:
        """The DDIM sampler for ``num_steps`` (made once per step count), with the model's prediction type."""

    def ddim_step(self, z: torch.Tensor, pred: torch.Tensor, t: int) -> torch.Tensor:
        """z (B, 4, h, w) at t -> t - stride, with the last sampler made."""

    def invert(self, z0: torch.Tensor, start: int) -> torch.Tensor:
        """DDIM-invert the clean latent (1, 4, h, w) up to timesteps[start]."""

    def set_prompt(self, prompt: str) -> None: ...

    def use_lora(self, mode: str, image: torch.Tensor, params: Any, on_train: Any = None) -> str:
        """off | auto | a path; returns a status line (``off``, ``trained DIR``, ``cached DIR``, ...)."""

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """(1, 3, H, W) in [-1, 1] -> (1, 4, H/8, W/8) fp32, already scaled."""

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """(1, 4, h, w) -> (1, 3, 8h, 8w) in [0, 1] fp32."""

    def eps(self, z: torch.Tensor, t: int) -> torch.Tensor:
        """The model's prediction for z at t, fp32, shape of z."""

    def eps_and_features(self, z: torch.Tensor, t: int, upsample: bool = True,
                         need_eps: bool = True) -> tuple[torch.Tensor | None, torch.Tensor]:
        """One pass: pred (1, 4, h, w) (None when need_eps is False) and features (1, C, 4h, 4w),
        or the raw low-resolution map (1, C, h', w') when upsample is False."""

    def upsample_features(self, feats: torch.Tensor, latent_hw: Any) -> torch.Tensor:
        """Raw features (1, C, h', w') -> the feature grid (1, C, 4h, 4w)."""

    def eps_mutual(self, z_ref: torch.Tensor, z: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Predictions of [reference, edited] with mutual self-attention (the finish, method.md 6)."""

    def mutual_attention(self) -> ContextManager[None]: ...


class BackboneClass(Protocol):
    """A registered backbone class: what selection and loading call before an instance exists."""

    name: ClassVar[str]
    Params: ClassVar[type]

    @classmethod
    def claims(cls, files: "ModelFiles") -> bool:
        """Whether this backbone takes the model described by ``files`` (read before any weights load)."""

    @classmethod
    def load(cls, model: str, *, vae: str = "auto", device: str = "auto", dtype: str = "fp32",
             attention: str = "auto", files: "ModelFiles | None" = None) -> Backbone: ...


#: the methods every loaded backbone must have, and what each optional flag adds
REQUIRED_METHODS = ("sampler", "ddim_step", "invert", "set_prompt", "use_lora", "encode", "decode", "eps",
                    "eps_and_features", "upsample_features", "eps_mutual", "mutual_attention")
REQUIRED_ATTRIBUTES = ("name", "device", "dtype", "attention", "model_id", "feature_scale", "default_width", "vae_id",
                       "params", "fast_paths", "compiled", "passes", "supports_low_memory", "supports_compile",
                       "supports_mixed", "configurable")  # the last ones: declared, or inherited from Backbone
CAPABILITIES = {
    "supports_low_memory": ("set_low_memory",),
    "supports_compile": ("compile", "is_compile_error", "fall_back_to_eager"),
    "supports_mixed": ("mixed", "unet_parameters"),
    "configurable": ("configure",),
    "defers_writes": ("write_deferred",),
}


def capability(backbone: Any, flag: str) -> bool:
    """An optional capability's flag (False when the backbone does not declare it)."""
    return bool(getattr(backbone, flag, False))


def require(backbone: Any, flag: str, what: str, option: str) -> None:
    """One line when an option needs a capability the backbone (class or instance) does not have."""
    if not capability(backbone, flag):
        name = getattr(backbone, "name", type(backbone).__name__)
        raise ConfigError(f"backbone {name!r} has no {what}; drop {option}")


def model_width(registry: Any, model: str, backbone: str | None = None, config: str | None = None) -> int:
    """The working width for a model before loading: its UNet's sample size x the VAE's downsampling
    when its files say (SD1.5 512, SD 2.x 768, SDXL 1024), else its backbone's ``default_width``;
    512 when the model cannot be read here (loading it then says why, in one line)."""
    from gooddrag.core.errors import GoodDragError

    try:
        cls, files = select_backbone(registry, model, backbone, config)
    except GoodDragError:
        return 512
    default = int(getattr(cls, "default_width", 512))
    return default if files.source == "registered" else files.sample_width(default)


def contract_problems(backbone: Any) -> list[str]:
    """What a loaded backbone lacks of the contract (empty when it conforms)."""
    out = [f"method {m}()" for m in REQUIRED_METHODS if not callable(getattr(backbone, m, None))]
    out += [f"attribute {a}" for a in REQUIRED_ATTRIBUTES if not hasattr(backbone, a)]
    for flag, methods in CAPABILITIES.items():
        if capability(backbone, flag):
            out += [f"method {m}() (it sets {flag})" for m in methods if not callable(getattr(backbone, m, None))]
    extra = set(getattr(backbone, "fast_paths", ())) - FAST_PATHS
    if extra:
        out.append(f"fast_paths within {sorted(FAST_PATHS)} (it lists {sorted(extra)})")
    return out


# --- which backbone takes a model ------------------------------------------------------------------

@attrs.frozen
class ModelFiles:
    """What was read about a model before loading it: enough to pick a backbone and refuse a model
    the sampler cannot read, without touching its weights."""

    model: str  # as given: a registered backbone name, a folder, a file, a hub id or another id
    source: str  # registered | folder | file | hub | name (none of those: a plugin may still claim it)
    pipeline_class: str | None = None  # model_index.json's _class_name (or inferred from a file's tensors)
    scheduler: dict = attrs.field(factory=dict)  # scheduler/scheduler_config.json
    unet: dict = attrs.field(factory=dict)  # unet/config.json
    vae: dict = attrs.field(factory=dict)  # vae/config.json
    config: str | None = None  # the local diffusers folder a single file's configs come from
    read: tuple[str, ...] = ()  # what was read, for messages
    problem: str | None = None  # why nothing could be read (said when no backbone claims the model)

    @property
    def prediction_type(self) -> str:
        return str(self.scheduler.get("prediction_type", "epsilon"))

    def sample_width(self, default: int) -> int:
        """The width in px the UNet was trained at: unet sample_size x the VAE's downsampling."""
        size = self.unet.get("sample_size")
        if isinstance(size, (list, tuple)):
            size = size[-1]
        if not isinstance(size, int):
            return default
        down = 2 ** (len(self.vae.get("block_out_channels", (0, 0, 0, 0))) - 1)
        return size * down

    def describe(self) -> str:
        return ", ".join(self.read) if self.read else "nothing (no files found)"


#: tensor-name prefixes that tell a single-file checkpoint's architecture (original SD/SGM layouts)
FILE_SIGNATURES = (
    ("conditioner.embedders.1.", "StableDiffusionXLPipeline"),  # SDXL: OpenCLIP bigG as second encoder
    ("cond_stage_model.", "StableDiffusionPipeline"),  # SD 1.x / 2.x
)
_CONFIG_FILES = {"scheduler": "scheduler/scheduler_config.json", "unet": "unet/config.json",
                 "vae": "vae/config.json"}


def read_model(model: str, registered: Iterable[str] = (), config: str | None = None) -> ModelFiles:
    """Read what a model is from its own small files: ``model_index.json`` and the scheduler, UNet and
    VAE configs of a folder or hub id (downloaded alone, or from the hub cache), or a single file's
    tensor names plus the configs of ``config`` (a local diffusers folder)."""
    if model in set(registered):
        return ModelFiles(model, "registered", read=(f"the registered backbone name {model!r}",))
    path = Path(model)
    if path.is_file():
        return _read_file(path, config)
    if path.is_dir():
        return _read_folder(model, path, "folder")
    if "/" not in model or model.startswith((".", "/")) or model.count("/") > 1 or ":" in model:
        return ModelFiles(model, "name", read=("nothing (no such folder or file, and not a hub id owner/name)",),
                          problem=f"model {model!r}: no such folder or file, and not a hub id (owner/name); "
                                  "pass a diffusers folder, a .safetensors file or a hub id")
    return _read_hub(model)


def _json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _read_folder(model: str, folder: Path, source: str, config: str | None = None) -> ModelFiles:
    index = folder / "model_index.json"
    read = [f"{index} (_class_name {_json(index).get('_class_name')!r})" if index.is_file()
            else f"no model_index.json in {folder}"]
    parts = {k: _json(folder / rel) for k, rel in _CONFIG_FILES.items()}
    return ModelFiles(model, source, _json(index).get("_class_name"), read=tuple(read), config=config, **parts)


def _read_file(path: Path, config: str | None) -> ModelFiles:
    """A single-file checkpoint: its architecture from its tensor names (the safetensors header, no
    weights), its configs from ``config`` when given."""
    if path.suffix not in (".safetensors", ".ckpt"):
        raise ConfigError(f"model {str(path)!r}: a single-file model must be .safetensors or .ckpt")
    keys = _safetensors_keys(path) if path.suffix == ".safetensors" else None
    if path.suffix == ".safetensors" and keys is None:
        raise ModelNotFoundError(f"model {str(path)!r} is not a readable .safetensors file (its header does not "
                                 "parse); pass a complete checkpoint, a diffusers folder or a hub id")
    inferred = next((cls for prefix, cls in FILE_SIGNATURES if any(k.startswith(prefix) for k in keys or ())), None)
    read = [f"{path.name}'s tensor names ({inferred or 'no known layout'})" if keys is not None
            else f"{path.name} (a .ckpt: tensor names not read)"]
    if config is None:
        return ModelFiles(str(path), "file", inferred, read=tuple(read))
    folder = Path(config)
    if not (folder / "model_index.json").is_file():
        raise ModelNotFoundError(f"config {config!r} for {path.name} is not a diffusers folder (no model_index.json); "
                                 "give the folder of the base model the file was fine-tuned from")
    cfg = _read_folder(str(path), folder, "file", config=str(folder))
    return attrs.evolve(cfg, pipeline_class=inferred or cfg.pipeline_class, read=(*read, *cfg.read))


def _safetensors_keys(path: Path) -> list[str] | None:
    """Tensor names from a .safetensors header (8-byte length, then JSON), or None if it does not parse."""
    try:
        with path.open("rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > 100_000_000:
                return None
            header = json.loads(f.read(n))
    except (OSError, ValueError, struct.error):
        return None
    return [k for k in header if k != "__metadata__"] if isinstance(header, dict) else None


def _read_hub(model: str) -> ModelFiles:
    """The small config files of a hub model (from the cache; downloaded alone when online)."""
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:  # pragma: no cover - diffusers depends on it
        return ModelFiles(model, "hub", read=("nothing (huggingface_hub is not installed)",))
    got: dict[str, dict] = {}
    for key, rel in {"index": "model_index.json", **_CONFIG_FILES}.items():
        try:
            got[key] = _json(Path(hf_hub_download(model, rel)))
        except Exception:  # offline and not cached, no such repo, no such file
            if key == "index":
                return ModelFiles(model, "hub", read=(f"nothing ({model}/model_index.json is not cached and the hub "
                                                      "cannot be reached)",),
                                  problem=f"model {model!r} is not available locally and the hub cannot be reached; "
                                          f"download it once (hf download {model}) or give the model as a local "
                                          "copy (a diffusers folder or a file)")
            got[key] = {}
    cls = got["index"].get("_class_name")
    return ModelFiles(model, "hub", cls, scheduler=got["scheduler"], unet=got["unet"], vae=got["vae"],
                      read=(f"{model}/model_index.json (_class_name {cls!r})",))


def select_backbone(registry: Any, model: str, backbone: str | None = None,
                    config: str | None = None) -> tuple[type, ModelFiles]:
    """The backbone class that takes ``model`` and what was read about it.

    ``backbone`` (``--backbone NAME``) picks one by name. Otherwise a model that is a registered
    backbone name picks it, and any other model goes to the first backbone whose ``claims`` accepts
    its files, most specific first (third-party backbones before built-ins, then by ``claim_priority``)."""
    names = registry.names("backbone")
    files = read_model(model, names, config)
    if backbone is not None:
        return registry.get("backbone", backbone), files
    if files.source == "registered":
        return registry.get("backbone", model), files
    for name in _by_specificity(registry, names):
        cls = registry.get("backbone", name)
        claims = getattr(cls, "claims", None)
        if callable(claims) and claims(files):
            return cls, files
    if files.problem:
        raise ModelNotFoundError(files.problem)
    raise ConfigError(f"no backbone takes model {model!r}: read {files.describe()}; backbones: {', '.join(names)} "
                      "(pick one with --backbone NAME)")


def _by_specificity(registry: Any, names: Iterable[str]) -> list[str]:
    """Third-party backbones first, then higher ``claim_priority`` (a subclass claims before its base)."""
    def key(name: str) -> tuple[int, int]:
        cls = registry.get("backbone", name)
        builtin = getattr(cls, "__module__", "").startswith("gooddrag.")
        return (int(builtin), -int(getattr(cls, "claim_priority", 0)))
    return sorted(names, key=key)

