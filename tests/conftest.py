"""Shared fixtures: offline hub, a per-session cache (tiny model, LoRA), small images."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    """Every model in the suite is tiny: one intra-op thread is as fast, and far faster when other
    processes share the 2 cores (OpenMP threads spin-wait under oversubscription)."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session", autouse=True)
def _cache(tmp_path_factory):
    """Keep the tiny model and LoRA caches out of $HOME."""
    path = tmp_path_factory.mktemp("gooddrag-cache")
    old = os.environ.get("GOODDRAG_CACHE")
    os.environ["GOODDRAG_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("GOODDRAG_CACHE", None)
    else:
        os.environ["GOODDRAG_CACHE"] = old


@pytest.fixture(scope="session")
def tiny_backbone(_cache):
    from gooddrag.plugins.backbones.tiny_random import TinyRandomBackbone

    return TinyRandomBackbone.load(device="cpu")


@pytest.fixture(scope="session")
def tiny_editor(tiny_backbone):
    from gooddrag.core.editor import Editor

    return Editor(tiny_backbone)


def make_image(path, w=48, h=32, seed=0):
    rng = np.random.RandomState(seed)
    Image.fromarray((rng.rand(h, w, 3) * 255).astype("uint8")).save(path)
    return path


@pytest.fixture
def img(tmp_path):
    return make_image(tmp_path / "img.png")
