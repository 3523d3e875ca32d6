"""IF: image fidelity = 1 - LPIPS(AlexNet) between the original image and the result.

As in DragDiffusion's evaluation (``run_eval_similarity.py``, used by GoodDrag): both images are
scaled to [-1, 1], resized to 224 x 224 (bilinear, align_corners=False) and compared with
``lpips.LPIPS(net='alex')`` (version 0.1). Higher is better.

Requirements: the maintained ``lpips`` package (``pip install 'gooddrag[lpips]'``) with a
torchvision that matches the installed torch, and torchvision's ImageNet AlexNet weights, either
in torch's hub cache (``$TORCH_HOME/hub/checkpoints/alexnet-owt-7be5be79.pth``, downloaded by
torchvision on first use when online) or given with ``--metric-param if.alexnet=PATH``. LPIPS's own linear
layers ship inside the lpips package.

Injection point: ``--metric-param if.net_factory=module:function`` replaces LPIPS with the callable that
``function()`` returns, ``(x0, x1) -> distance`` on (1, 3, S, S) tensors in [-1, 1]; the tests
use it to run this metric's own code without torchvision.
"""

from __future__ import annotations

import importlib
import math
import os
from pathlib import Path
from typing import Any

import attrs
from attrs.validators import ge

from gooddrag.core.errors import RequirementError
from gooddrag.core.hookspecs import hookimpl
from gooddrag.core.params import p

ALEXNET_FILE = "alexnet-owt-7be5be79.pth"  # torchvision's AlexNet_Weights.IMAGENET1K_V1
ALEXNET_URL = "https://download.pytorch.org/models/" + ALEXNET_FILE
INSTALL = ("pip install 'gooddrag[lpips]' with a torchvision built for your torch "
           "(same index, e.g. the PyTorch CPU index)")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def import_lpips() -> Any:
    """Import lpips (which imports torchvision); RequirementError with the reason if it can't."""
    try:
        import lpips
    except ModuleNotFoundError as exc:
        missing = exc.name or "lpips"
        raise RequirementError(f"if: the '{missing}' package is missing, so LPIPS cannot load; {INSTALL}") from None
    except Exception as exc:  # torchvision's wheel built for another torch: RuntimeError at import
        raise RequirementError(f"if: lpips cannot load ({_first_line(exc)}), usually a torchvision that does "
                               f"not match torch; {INSTALL}") from None
    return lpips


def resolve_factory(spec: str) -> Any:
    """``module:attr`` -> the attribute (a callable)."""
    mod, _, attr = spec.partition(":")
    if not mod or not attr:
        raise RequirementError(f"if.net_factory={spec!r} must look like 'package.module:function'")
    try:
        obj = getattr(importlib.import_module(mod), attr)
    except (ImportError, AttributeError) as exc:
        raise RequirementError(f"if.net_factory={spec!r} cannot be imported ({_first_line(exc)})") from None
    if not callable(obj):
        raise RequirementError(f"if.net_factory={spec!r} is not callable")
    return obj


def torch_hub_alexnet() -> Path:
    """Where torchvision keeps (or would download) the AlexNet weights."""
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints" / ALEXNET_FILE


def load_alexnet_into(net: Any, path: str | os.PathLike) -> None:
    """Load a torchvision AlexNet state dict (``features.i.weight`` ... keys; ``classifier.*`` is
    ignored; a features-only dict with ``i.weight`` keys works too) into lpips' ``alexnet``
    wrapper, whose ``slice1..slice5`` keep the original layer indices as module names."""
    import torch

    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    where = {idx: f"{sname}.{idx}" for sname, sl in net.named_children() for idx, _ in sl.named_children()}
    mapped = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "features":
            parts = parts[1:]
        if len(parts) == 2 and parts[0] in where:
            mapped[f"{where[parts[0]]}.{parts[1]}"] = value
    try:
        net.load_state_dict(mapped, strict=True)
    except RuntimeError as exc:
        raise RequirementError(f"if: {path} is not a torchvision AlexNet state dict ({_first_line(exc)}); "
                               f"use {ALEXNET_FILE} from torchvision") from None


def to_tensor(image: Any) -> Any:
    """PIL image -> (1, 3, H, W) float32 in [-1, 1] (x / 127.5 - 1, as DragDiffusion)."""
    import numpy as np
    import torch

    arr = np.asarray(image.convert("RGB"), dtype=np.float32)
    return torch.from_numpy(arr / 127.5 - 1.0).permute(2, 0, 1)[None].contiguous()


class ImageFidelity:
    """IF: 1 - LPIPS(AlexNet) between original and result at 224 x 224 (DragDiffusion's
    evaluation). Needs the lpips package and AlexNet weights. Higher is better."""

    name = "if"
    higher_is_better = True

    @attrs.frozen(kw_only=True)
    class Params:
        alexnet: str = p("", "torchvision AlexNet state dict (alexnet-owt-7be5be79.pth) for offline use; "
                             "empty: torch's hub cache, downloaded if missing")
        size: int = p(224, "both images resized to size x size (bilinear); 0 = own size", ge(0))
        device: str = p("auto", "auto, cpu or cuda[:i]")
        net_factory: str = p("", "module:function returning (x0, x1) -> distance in place of LPIPS(alex)")

    def __init__(self, params: "ImageFidelity.Params | None" = None):
        self.params = params or self.Params()
        self._net: Any = None
        self._device: Any = None

    # --- requirements ---------------------------------------------------------------------------

    def check(self) -> None:
        """Refuse (one line) when LPIPS or the AlexNet weights cannot be had; loads no model."""
        prm = self.params
        if prm.net_factory:
            resolve_factory(prm.net_factory)
            return
        import_lpips()
        if prm.alexnet:
            if not Path(prm.alexnet).expanduser().is_file():
                raise RequirementError(f"if.alexnet={prm.alexnet!r}: no such file; pass a torchvision AlexNet "
                                       f"state dict ({ALEXNET_FILE})")
            return
        cached = torch_hub_alexnet()
        if cached.is_file():
            return
        from gooddrag.plugins.metrics.md import host_reachable, hub_offline

        if hub_offline():
            why = "downloads are off (HF_HUB_OFFLINE is set)"
        elif not host_reachable(ALEXNET_URL):
            why = "download.pytorch.org cannot be reached"
        else:
            return  # torchvision downloads it on first use
        raise RequirementError(f"if: AlexNet weights are not in {cached.parent} and {why}; pass "
                               f"--metric-param if.alexnet=PATH (torchvision's {ALEXNET_FILE}) or put that file there")

    # --- model ----------------------------------------------------------------------------------

    def _load(self) -> Any:
        if self._net is not None:
            return self._net
        from gooddrag.core.devices import resolve_device

        prm = self.params
        device = resolve_device(prm.device)
        if prm.net_factory:
            net = resolve_factory(prm.net_factory)()
        else:
            lpips = import_lpips()
            # pnet_rand=True: torchvision builds an untrained AlexNet (no download); weights follow.
            offline_weights = prm.alexnet or (str(torch_hub_alexnet()) if torch_hub_alexnet().is_file() else "")
            net = lpips.LPIPS(net="alex", version="0.1", pretrained=True, pnet_rand=bool(offline_weights),
                              verbose=False)
            if offline_weights:
                load_alexnet_into(net.net, Path(offline_weights).expanduser())
        if hasattr(net, "to"):
            net = net.to(device)
        if hasattr(net, "eval"):
            net.eval()
        self._net, self._device = net, device
        return net

    # --- scoring --------------------------------------------------------------------------------

    def prepare(self, sample: Any, result: Any) -> tuple[Any, Any]:
        """The two network inputs, (1, 3, S, S) in [-1, 1] on the metric's device."""
        import torch.nn.functional as F
        from PIL import Image

        x0 = to_tensor(sample.image)
        if self.params.size == 0 and result.size != sample.image.size:
            result = result.convert("RGB").resize(sample.image.size, Image.BILINEAR)
        x1 = to_tensor(result)
        if self.params.size:
            s = (self.params.size, self.params.size)
            x0 = F.interpolate(x0, s, mode="bilinear", align_corners=False)
            x1 = F.interpolate(x1, s, mode="bilinear", align_corners=False)
        return x0.to(self._device), x1.to(self._device)

    def score(self, sample: Any, result: Any, final_points: list[list[float]] | None = None) -> dict[str, float]:
        """``if`` = 1 - LPIPS and ``if_lpips`` = LPIPS."""
        import torch

        net = self._load()
        x0, x1 = self.prepare(sample, result)
        with torch.no_grad():
            d = net(x0, x1)
        dist = float(d.float().mean()) if isinstance(d, torch.Tensor) else float(d)
        return {"if": 1.0 - dist, "if_lpips": dist}

    def aggregate(self, rows: list[dict[str, float]]) -> dict[str, float]:
        """Mean over samples."""
        out = {}
        for key in ("if", "if_lpips"):
            vals = [r[key] for r in rows if key in r and math.isfinite(r[key])]
            out[key] = sum(vals) / len(vals) if vals else float("nan")
        out["if_samples"] = float(sum(1 for r in rows if "if" in r and math.isfinite(r["if"])))
        return out


@hookimpl
def gooddrag_register_metrics() -> list[type]:
    return [ImageFidelity]
