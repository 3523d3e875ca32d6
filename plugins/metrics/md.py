"""MD: mean distance between where each handle's content ends up and its target (DragBench).

The DragDiffusion/DragBench evaluation (``run_eval_point_matching.py``) with DIFT features
(Tang et al. 2023) of Stable Diffusion 2.1:

1. The image goes through the VAE (posterior sample x scaling factor), gets DDPM noise for t=261
   (``scheduler.add_noise``), and the UNet runs once with the sample's prompt. The output of
   ``unet.up_blocks[1]`` is the feature map; it is averaged over an ensemble of 8 noisy copies
   (one batched pass) and upsampled bilinearly (align_corners=False) to the full image size.
2. For each handle/target pair, the original image's feature at the handle is compared by cosine
   similarity with every pixel of the result's feature map; the best match's Euclidean distance
   (px) to the target is the pair's distance.
3. MD is the mean over all pairs pooled across images: ``score`` returns the per-sample sum and
   count (and the per-sample mean), ``aggregate`` pools them.

The full-size (C, H, W) upsampled map of SD2.1 is 1280 x H x W floats (1.3 GB at 512 px); the
same numbers are computed without building it: bilinear upsampling is separable and linear, so
dot products are upsampled as (H, W) maps and the per-pixel feature norms are accumulated over
row chunks (see :func:`cosine_argmax`).
"""

from __future__ import annotations

import math
import os
import socket
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

import attrs
from attrs.validators import ge, le

from gooddrag.core.errors import BadInputError, ModelNotFoundError, RequirementError
from gooddrag.core.hookspecs import hookimpl
from gooddrag.core.params import p

SD21_MODEL = "stabilityai/stable-diffusion-2-1"
# What must be present in a hub cache or a local folder to load the DIFT components.
_NEEDED = ("unet/config.json", "vae/config.json", "text_encoder/config.json",
           "tokenizer/tokenizer_config.json", "scheduler/scheduler_config.json")
_UNET_WEIGHTS = ("unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.bin",
                 "unet/diffusion_pytorch_model.fp16.safetensors")
_TRUE = {"1", "on", "yes", "true"}


def hub_offline() -> bool:
    """True when the user said the Hugging Face hub must not be used (HF_HUB_OFFLINE)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def host_reachable(url: str, timeout: float = 3.0) -> bool:
    """Can a TCP connection to the URL's host be opened (no request is sent)?"""
    u = urlparse(url)
    port = u.port or (443 if u.scheme == "https" else 80)
    try:
        with socket.create_connection((u.hostname or "", port), timeout=timeout):
            return True
    except OSError:
        return False


def _hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT") or "https://huggingface.co"


def hub_cache_dir() -> str | None:
    """The hub cache folder as the environment says now (HF_HUB_CACHE, HF_HOME/hub), else None
    (huggingface_hub's default)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return None


def _in_hub_cache(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - a dependency of diffusers
        return False
    cache = hub_cache_dir()

    def cached(name: str) -> bool:
        try:
            return isinstance(try_to_load_from_cache(repo_id, name, cache_dir=cache), str)
        except Exception:  # malformed repo id and the like
            return False

    return all(cached(f) for f in _NEEDED) and any(cached(f) for f in _UNET_WEIGHTS)


def _is_diffusers_folder(path: Path) -> bool:
    return all((path / f).is_file() for f in _NEEDED)


def interp_matrix(n_out: int, n_in: int, dtype: Any = None, device: Any = None):
    """(n_out, n_in) matrix M with M @ v == F.interpolate(v, n_out, 'linear', align_corners=False)."""
    import torch
    import torch.nn.functional as F

    eye = torch.eye(n_in, dtype=dtype or torch.float32, device=device).unsqueeze(0)  # (1, n_in, n_in)
    return F.interpolate(eye, size=n_out, mode="linear", align_corners=False)[0].T.contiguous()


def source_vectors(feats, points_rc, size_hw):
    """Feature vectors (N, C) of the map ``feats`` (C, h, w) upsampled to ``size_hw`` at integer
    pixel positions ``points_rc`` [(row, col), ...]."""
    import torch

    C, h, w = feats.shape
    ry = interp_matrix(size_hw[0], h, feats.dtype, feats.device)
    rx = interp_matrix(size_hw[1], w, feats.dtype, feats.device)
    rows = torch.tensor([r for r, _ in points_rc], device=feats.device)
    cols = torch.tensor([c for _, c in points_rc], device=feats.device)
    return torch.einsum("nh,chw,nw->nc", ry[rows], feats, rx[cols])


def cosine_argmax(vectors, feats, size_hw, chunk_elems: int = 1 << 25):
    """For each vector (N, C), the (row, col) of the pixel with the highest cosine similarity in
    ``feats`` (C, h, w) bilinearly upsampled (align_corners=False) to ``size_hw``, and that
    similarity. Equal to upsampling with ``F.interpolate`` and using ``nn.CosineSimilarity``, but
    without materialising the (C, H, W) map. Ties go to the first pixel in row-major order."""
    import torch

    C, h, w = feats.shape
    H, W = size_hw
    ry = interp_matrix(H, h, feats.dtype, feats.device)  # (H, h)
    rx = interp_matrix(W, w, feats.dtype, feats.device)  # (W, w)
    dots = torch.einsum("nc,chw->nhw", vectors, feats)
    dots = ry @ dots @ rx.T  # (N, H, W): linear, so upsampling commutes with the dot product
    norm2 = torch.empty(H, W, dtype=feats.dtype, device=feats.device)
    rows = max(1, chunk_elems // max(1, C * W))
    for r0 in range(0, H, rows):
        up = torch.einsum("rh,chw->crw", ry[r0:r0 + rows], feats) @ rx.T  # (C, r, W)
        norm2[r0:r0 + rows] = (up * up).sum(0)
    vnorm = vectors.norm(dim=1).view(-1, 1, 1)
    cos = dots / (norm2.sqrt().unsqueeze(0) * vnorm).clamp_min(1e-8)
    best = cos.flatten(1).argmax(dim=1)
    sims = cos.flatten(1).gather(1, best[:, None])[:, 0]
    return [(int(i) // W, int(i) % W) for i in best.tolist()], sims


class MeanDistance:
    """MD (DragBench): pixel distance from the best DIFT-feature match of each handle in the
    result to its target, pooled over all pairs of all images. Needs SD2.1 weights. Lower is better."""

    name = "md"
    higher_is_better = False

    @attrs.frozen(kw_only=True)
    class Params:
        model: str = p(SD21_MODEL, "DIFT model: SD2.1 hub id or a local diffusers folder")
        t: int = p(261, "DIFT timestep: noise added before the single UNet pass", ge(0), le(999))
        up_block: int = p(1, "features = output of unet.up_blocks[i]", ge(0))
        ensemble: int = p(8, "noisy copies averaged per image", ge(1))
        batch: int = p(8, "noisy copies per UNet pass (lower it to save memory)", ge(1))
        size: int = p(0, "network input: 0 = own size rounded to a multiple of 64 (DragBench "
                         "evaluation); N = resized to N x N first (DIFT demos: 768)", ge(0))
        posterior: Literal["sample", "mean"] = p("sample", "VAE latent: posterior sample (DIFT) or mean")
        seed: int = p(0, "seed of the posterior and diffusion noise (same noise for both images)")
        device: str = p("auto", "auto, cpu or cuda[:i]")
        dtype: Literal["fp32", "fp16", "bf16"] = p("fp32", "model precision (DIFT used fp32)")

    def __init__(self, params: "MeanDistance.Params | None" = None):
        self.params = params or self.Params()
        self._models: dict[str, Any] | None = None
        self._text: dict[str, Any] = {}
        self._feat_cache: list[tuple[Any, Any]] = []

    # --- requirements ---------------------------------------------------------------------------

    def check(self) -> None:
        """Refuse (one line) when the DIFT model can be neither read locally nor downloaded."""
        model = self.params.model
        path = Path(model).expanduser()
        hint = "pass --metric-param md.model=DIR (a diffusers Stable Diffusion 2.1 folder)"
        if path.is_dir():
            if not _is_diffusers_folder(path):
                raise RequirementError(f"md: {model!r} is not a diffusers model folder (needs "
                                       f"{', '.join(_NEEDED)}); {hint}")
            return
        if path.exists() or model.startswith((".", "/", "~")) or model.count("/") != 1:
            raise RequirementError(f"md: DIFT model {model!r} is neither a diffusers folder nor a hub "
                                   f"id (owner/name); {hint}")
        if _in_hub_cache(model):
            return
        if hub_offline():
            why = "the hub is offline (HF_HUB_OFFLINE is set)"
        elif not host_reachable(_hub_endpoint()):
            why = f"the hub ({_hub_endpoint()}) cannot be reached"
        else:
            return  # it will be downloaded on first use
        raise RequirementError(f"md: DIFT model {model!r} is not in the local Hugging Face cache and {why}; "
                               f"{hint} or download it once (hf download {model})")

    # --- models ---------------------------------------------------------------------------------

    def _load(self) -> dict[str, Any]:
        if self._models is not None:
            return self._models
        from gooddrag.core.devices import DTYPES, resolve_device
        from gooddrag.plugins.backbones.components import load_sd_components

        prm = self.params
        device, dtype = resolve_device(prm.device), DTYPES[prm.dtype]
        path = Path(prm.model).expanduser()
        src = str(path) if path.is_dir() else prm.model
        local: dict[str, Any] = {"local_files_only": True} if path.is_dir() or hub_offline() else {}
        if not path.is_dir() and hub_cache_dir():
            local["cache_dir"] = hub_cache_dir()
        try:
            parts = load_sd_components(src, dtype, **local)
        except Exception as exc:  # hub / file errors of diffusers and transformers
            raise ModelNotFoundError(f"md: cannot load DIFT model {prm.model!r} ({type(exc).__name__}: "
                                     f"{str(exc).splitlines()[0] if str(exc) else ''}); pass --metric-param md.model=DIR "
                                     "(a diffusers SD2.1 folder) or download it once") from exc
        vae, unet, text_encoder = parts["vae"], parts["unet"], parts["text_encoder"]
        if prm.up_block >= len(unet.up_blocks):
            raise BadInputError(f"md.up_block={prm.up_block}: the UNet has {len(unet.up_blocks)} up blocks")
        for m in (vae, unet, text_encoder):
            m.to(device).eval().requires_grad_(False)
        self._models = dict(parts, device=device, dtype=dtype)
        return self._models

    def _embedding(self, prompt: str):
        import torch

        if prompt not in self._text:
            if len(self._text) >= 64:  # a dataset has one prompt per sample: keep memory bounded
                self._text.clear()
            m = self._models
            tok = m["tokenizer"]
            ids = tok(prompt, padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids.to(m["device"])
            with torch.no_grad():
                self._text[prompt] = m["text_encoder"](ids)[0].to(m["dtype"])
        return self._text[prompt]

    def network_size(self, width: int, height: int) -> tuple[int, int]:
        """(W, H) the image is resized to before the VAE (see the ``size`` param)."""
        if self.params.size:
            return self.params.size, self.params.size
        return max(64, round(width / 64) * 64), max(64, round(height / 64) * 64)

    def features(self, image: Any, prompt: str = ""):
        """DIFT feature map (C, h, w), fp32, of a PIL image: ensemble mean, not yet upsampled.

        The last two maps are kept (keyed by pixels, size and prompt), so scoring an unedited
        result, or the same original twice in a row, costs no second UNet pass."""
        import hashlib

        import numpy as np
        import torch
        from PIL import Image

        m = self._load()
        prm = self.params
        device, dtype = m["device"], m["dtype"]
        img = image.convert("RGB")
        key = (hashlib.sha1(img.tobytes()).hexdigest(), img.size, prompt)
        for k, v in self._feat_cache:
            if k == key:
                return v
        size = self.network_size(*img.size)
        if img.size != size:
            img = img.resize(size, Image.BICUBIC)
        x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]
        x = x.to(device, dtype)
        emb = self._embedding(prompt)
        captured: list[Any] = []

        class _Stop(Exception):
            pass

        def hook(module: Any, args: Any, output: Any) -> None:
            captured.append(output)
            raise _Stop  # the rest of the UNet is not needed (DIFT exits early too)

        handle = m["unet"].up_blocks[prm.up_block].register_forward_hook(hook)
        try:
            with torch.no_grad():
                dist = m["vae"].encode(x).latent_dist  # one encode; the copies differ by noise only
                mean, std = dist.mean.float(), dist.std.float()
                shape = (prm.ensemble, *mean.shape[1:])
                # All noise is drawn up front, so `batch` changes memory use, not the result.
                gen = torch.Generator(device=device).manual_seed(prm.seed)
                eps_post = torch.randn(shape, generator=gen, device=device)
                eps_t = torch.randn(shape, generator=gen, device=device)
                z = mean + std * eps_post if prm.posterior == "sample" else mean.expand(shape)
                z = z * float(m["vae"].config.scaling_factor)
                t = torch.full((prm.ensemble,), prm.t, device=device, dtype=torch.long)
                noisy = m["scheduler"].add_noise(z, eps_t, t)  # sqrt(a_t) z + sqrt(1 - a_t) eps
                total = None
                for i in range(0, prm.ensemble, prm.batch):
                    j = min(prm.ensemble, i + prm.batch)
                    captured.clear()
                    try:
                        m["unet"](noisy[i:j].to(dtype), t[i:j],
                                  encoder_hidden_states=emb.expand(j - i, -1, -1))
                    except _Stop:
                        pass
                    part = captured[0].float().sum(0)
                    total = part if total is None else total + part
        finally:
            handle.remove()
        feats = total / prm.ensemble
        self._feat_cache = [(key, feats), *self._feat_cache[:1]]
        return feats

    # --- scoring --------------------------------------------------------------------------------

    def matches(self, sample: Any, result: Any) -> list[tuple[tuple[int, int], float]]:
        """For each pair: ((x, y) of the best match in the result, distance to the target in px)."""
        import torch
        from PIL import Image

        pairs = list(sample.pairs)
        if not pairs:
            return []
        W, H = sample.image.size
        if result.size != (W, H):
            result = result.convert("RGB").resize((W, H), Image.BILINEAR)
        src = self.features(sample.image, sample.prompt)
        res = self.features(result, sample.prompt)
        handles_rc = [(min(max(int(round(hy)), 0), H - 1), min(max(int(round(hx)), 0), W - 1))
                      for (hx, hy), _ in pairs]
        with torch.no_grad():
            vecs = source_vectors(src, handles_rc, (H, W))
            best, _ = cosine_argmax(vecs, res, (H, W))
        out = []
        for (r, c), (_, (tx, ty)) in zip(best, pairs, strict=True):
            out.append(((c, r), math.hypot(c - tx, r - ty)))
        return out

    def score(self, sample: Any, result: Any, final_points: list[list[float]] | None = None) -> dict[str, float]:
        """``md`` (this sample's mean distance, px), ``md_sum`` and ``md_pairs`` (for pooling)."""
        dists = [d for _, d in self.matches(sample, result)]
        n = len(dists)
        total = float(sum(dists))
        return {"md": total / n if n else float("nan"), "md_sum": total, "md_pairs": float(n)}

    def aggregate(self, rows: list[dict[str, float]]) -> dict[str, float]:
        """``md`` pooled over all pairs of all samples (DragBench), plus the mean of per-sample means."""
        total, n, means = 0.0, 0.0, []
        for row in rows:
            s, k = row.get("md_sum"), row.get("md_pairs")
            if s is None or k is None or not (math.isfinite(s) and math.isfinite(k)):
                continue
            total += s
            n += k
            if k > 0:
                means.append(s / k)
        return {
            "md": total / n if n else float("nan"),
            "md_sample_mean": sum(means) / len(means) if means else float("nan"),
            "md_pairs": n,
            "md_samples": float(len(means)),
        }


@hookimpl
def gooddrag_register_metrics() -> list[type]:
    return [MeanDistance]
