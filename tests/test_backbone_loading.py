"""Backbone loading options: explicit VAE, attention backend, single-file and missing models,
and a LoRA given by path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from gooddrag.plugins.backbones.tiny_random import TinyRandomBackbone
from gooddrag.core.editor import Editor, select_backbone
from gooddrag.core.errors import ModelNotFoundError, RequirementError
from gooddrag.core.registry import default_registry
from gooddrag.core.deferred import wait as wait_for_cache_writes
from gooddrag.plugins.backbones.tiny_pipeline import tiny_pipeline_dir
from gooddrag.testing import random_image


def test_model_name_selects_the_backbone():
    reg = default_registry()
    assert select_backbone(reg, "tiny-random")[0].name == "tiny-random"
    assert select_backbone(reg, str(tiny_pipeline_dir()))[0].name == "stable-diffusion"  # by its model_index.json
    with pytest.raises(ModelNotFoundError, match="hub cannot be reached"):  # offline, not cached: one line
        select_backbone(reg, "some/hub-id")
    with pytest.raises(ModelNotFoundError, match="no such folder or file"):
        select_backbone(reg, "/models/sd15")


def test_explicit_vae_folder_is_used_and_recorded():
    b = TinyRandomBackbone.load(vae=str(tiny_pipeline_dir() / "vae"), device="cpu")
    assert b.vae_id.endswith("vae") and b.vae is b.pipe.vae
    assert Editor(b).config().load.vae == b.vae_id


def test_missing_vae_and_model_are_one_line_errors(tmp_path):
    with pytest.raises(ModelNotFoundError) as exc:
        TinyRandomBackbone.load(vae=str(tmp_path / "no-vae"), device="cpu")
    assert "VAE" in str(exc.value) and "--" not in str(exc.value) and "\n" not in str(exc.value)
    bogus = tmp_path / "model.safetensors"
    bogus.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelNotFoundError) as exc:
        Editor.from_pretrained(str(bogus), device="cpu")
    assert str(bogus) in str(exc.value) and "model" in str(exc.value) and "--" not in str(exc.value)
    with pytest.raises(ModelNotFoundError, match="no such folder or file"):
        Editor.from_pretrained(str(tmp_path / "nothing-here"), device="cpu")


def test_xformers_needs_cuda_and_the_extra():
    with pytest.raises(RequirementError, match="xformers needs a CUDA device"):
        TinyRandomBackbone.load(attention="xformers", device="cpu")


def test_lora_by_path_equals_the_trained_one(tiny_editor):
    image = random_image(32, 32, seed=7)
    kw = dict(width=32, overrides=["lora.steps=2", "lora.crop=32", "lora.batch_size=2",
                                   "schedule.drag_timesteps=1", "schedule.drags_per_timestep=1"])
    trained = tiny_editor.edit(image, [((8, 8), (20, 20))], lora="auto", **kw)
    folder = trained.report["lora"].split(" ", 1)[1]
    by_path = tiny_editor.edit(image, [((8, 8), (20, 20))], lora=folder, **kw)
    assert by_path.report["lora"] == f"loaded {folder}"
    assert by_path.image.tobytes() == trained.image.tobytes()


def test_fused_lora_gives_the_unfused_result(tiny_editor):
    b = tiny_editor.backbone
    image = random_image(32, 32, seed=11)
    kw = dict(width=32, overrides=["lora.steps=3", "lora.crop=32", "lora.batch_size=2",
                                   "schedule.drag_timesteps=1", "schedule.drags_per_timestep=1"])
    def weights():  # base weights by their plain name (peft renames x.weight to x.base_layer.weight)
        return {n.replace(".base_layer", ""): p for n, p in b.unet.named_parameters() if "lora_" not in n}

    tiny_editor.edit(image, [((8, 8), (20, 20))], lora="off", **kw)
    base = {n: p.detach().clone() for n, p in weights().items()}
    fused = tiny_editor.edit(image, [((8, 8), (20, 20))], lora="auto", **kw)
    changed = [n for n, p in weights().items() if not torch.equal(p, base[n])]
    assert changed and all("to_" in n for n in changed)  # the LoRA now lives in the attention weights
    plain = tiny_editor.edit(image, [((8, 8), (20, 20))], lora="auto", **{**kw, "overrides": kw["overrides"] +
                                                                          ["lora.fuse=false"]})
    assert plain.report["lora"].startswith("cached")  # fusing is not part of the cache key
    a = np.asarray(fused.image, dtype=float)
    c = np.asarray(plain.image, dtype=float)
    assert np.abs(a - c).max() <= 2  # same edit up to float rounding (8-bit output)
    tiny_editor.edit(image, [((8, 8), (20, 20))], lora="off", **kw)
    assert all(torch.equal(p, base[n]) for n, p in weights().items())  # restored bit for bit on drop


_LORA_KW = dict(width=32, overrides=["lora.steps=1", "lora.crop=32", "lora.batch_size=1", "lora.rank=2",
                                     "schedule.num_inference_steps=10", "schedule.drag_timesteps=1",
                                     "schedule.drags_per_timestep=1"])


@pytest.mark.parametrize("damage", ["truncate", "empty", "bitflip", "no-checksum"])
def test_damaged_lora_cache_entry_is_retrained_and_replaced(tiny_editor, tmp_path, monkeypatch, damage):
    monkeypatch.setenv("GOODDRAG_CACHE", str(tmp_path / "cache"))
    image = random_image(32, 32, seed=11)
    first = tiny_editor.edit(image, [((8, 8), (20, 20))], lora="auto", **_LORA_KW)
    folder = Path(first.report["lora"].split(" ", 1)[1])
    wait_for_cache_writes()  # the cache entry is written after the result is out
    weights = folder / "pytorch_lora_weights.safetensors"
    good = weights.read_bytes()
    if damage == "truncate":
        weights.write_bytes(good[: len(good) // 2])
    elif damage == "empty":
        weights.write_bytes(b"")
    elif damage == "bitflip":
        data = bytearray(good)
        data[-5] ^= 0x40  # a weight, not the header
        weights.write_bytes(bytes(data))
    else:
        (folder / "weights.sha256").unlink()
    again = tiny_editor.edit(image, [((8, 8), (20, 20))], lora="auto", **_LORA_KW)
    assert again.report["lora"] == f"trained {folder}"
    assert any(w.startswith(f"cached LoRA {folder} is damaged") and "retraining and replacing it" in w
               for w in again.report["warnings"])
    wait_for_cache_writes()
    assert weights.read_bytes() == good  # replaced by the same (deterministic) training
    third = tiny_editor.edit(image, [((8, 8), (20, 20))], lora="auto", **_LORA_KW)
    assert third.report["lora"] == f"cached {folder}" and third.image.tobytes() == first.image.tobytes()


@pytest.mark.parametrize("where", ["file", "read-only"])
def test_unwritable_lora_cache_is_found_before_training(tiny_editor, tmp_path, monkeypatch, where):
    from gooddrag.plugins.backbones import lora as lora_mod

    if where == "file":
        (tmp_path / "cachefile").write_text("x")
        monkeypatch.setenv("GOODDRAG_CACHE", str(tmp_path / "cachefile"))
    else:
        monkeypatch.setenv("GOODDRAG_CACHE", "/sys/gooddrag-cache")  # not writable, even by root
    trained = []
    real_train = lora_mod.PerImageLora.train
    monkeypatch.setattr(lora_mod.PerImageLora, "train", lambda self, *a: (trained.append(1), real_train(self, *a)))
    res = tiny_editor.edit(random_image(32, 32, seed=12), [((8, 8), (20, 20))], lora="auto", **_LORA_KW)
    assert res.report["lora"] == "trained (not cached)" and trained == [1]
    assert any(("not a writable folder" in w or "is a file, not a folder" in w)
               and "set GOODDRAG_CACHE to a writable folder" in w
               for w in res.report["warnings"])


def test_lora_path_that_cannot_be_loaded_is_one_line(tiny_editor, tmp_path):
    from gooddrag.core.errors import BadInputError

    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 10)
    with pytest.raises(BadInputError, match=r"lora .*bad.safetensors.* cannot be loaded"):
        tiny_editor.edit(random_image(32, 32), [((8, 8), (20, 20))], lora=str(bad), **_LORA_KW)
