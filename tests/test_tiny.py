"""Tests for gooddrag.plugins.backbones.tiny_pipeline: the offline tiny random SD1.5-shaped pipeline."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from gooddrag.plugins.backbones import tiny_pipeline as tiny


def _weight_hashes(folder: Path) -> dict[str, str]:
    files = sorted(folder.rglob("*.safetensors"))
    return {str(f.relative_to(folder)): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("gooddrag-cache")


@pytest.fixture(scope="module")
def pipe(cache_root):
    mp = pytest.MonkeyPatch()
    mp.setenv("HF_HUB_OFFLINE", "1")
    try:
        yield tiny.load_tiny_pipeline(cache_dir=cache_root)
    finally:
        mp.undo()


@pytest.fixture(scope="module")
def empty_embedding(pipe):
    tok = pipe.tokenizer
    ids = tok(
        "", padding="max_length", max_length=tok.model_max_length, truncation=True,
        return_tensors="pt",
    ).input_ids
    with torch.no_grad():
        return pipe.text_encoder(ids)[0]


def test_model_id_and_cache_layout(pipe, cache_root):
    from diffusers import StableDiffusionPipeline

    assert tiny.TINY_MODEL_ID == "tiny-random"
    assert isinstance(pipe, StableDiffusionPipeline)
    folder = tiny.tiny_pipeline_dir(cache_root)  # cached: must not rebuild
    assert folder == cache_root / "tiny-random-sd15-v1"
    assert (folder / "model_index.json").is_file()
    assert (folder / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (folder / "tokenizer" / "vocab.json").is_file()
    assert (folder / "tokenizer" / "merges.txt").is_file()
    # no temp/junk left next to it
    assert [p.name for p in cache_root.iterdir()] == ["tiny-random-sd15-v1"]
    assert pipe.safety_checker is None and pipe.feature_extractor is None


def test_unet_has_sd15_topology(pipe):
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.attention_processor import Attention

    unet = pipe.unet
    mods = list(unet.modules())
    assert sum(isinstance(m, BasicTransformerBlock) for m in mods) == 16
    assert sum(isinstance(m, Attention) for m in mods) == 32
    per_block = [
        sum(isinstance(m, BasicTransformerBlock) for m in b.modules()) for b in unet.down_blocks
    ]
    assert per_block == [2, 2, 2, 0]
    assert sum(isinstance(m, BasicTransformerBlock) for m in unet.mid_block.modules()) == 1
    assert [len(getattr(b, "attentions", [])) for b in unet.up_blocks] == [0, 3, 3, 3]
    assert len(unet.up_blocks) == 4 and len(unet.up_blocks[2].attentions) == 3
    assert unet.config.in_channels == unet.config.out_channels == 4
    assert unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size


def test_vae_downsamples_8x(pipe):
    assert pipe.vae.config.scaling_factor == pytest.approx(0.18215)
    assert pipe.vae_scale_factor == 8
    with torch.no_grad():
        latent = pipe.vae.encode(torch.rand(1, 3, 64, 64) * 2 - 1).latent_dist.mean
        assert latent.shape == (1, 4, 8, 8)
        image = pipe.vae.decode(latent).sample
    assert image.shape == (1, 3, 64, 64)
    assert torch.isfinite(image).all()


def test_tokenizer_and_text_encoder(pipe, empty_embedding):
    from transformers import CLIPTokenizer

    tok = pipe.tokenizer
    assert isinstance(tok, CLIPTokenizer)
    assert tok.model_max_length == 77
    assert tok.bos_token == "<|startoftext|>" and tok.eos_token == "<|endoftext|>"
    assert len(tok) == pipe.text_encoder.config.vocab_size
    assert pipe.text_encoder.config.max_position_embeddings == 77

    assert tok("").input_ids == [tok.bos_token_id, tok.eos_token_id]
    ids = tok("a photo of a cat").input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.unk_token_id not in ids[1:-1]
    assert any(t.endswith("</w>") for t in tok.convert_ids_to_tokens(ids))
    assert tok.decode(ids, skip_special_tokens=True) == "a photo of a cat"
    # unseen text and non-ASCII still go through the byte-level fallback
    odd = tok("Zebra-like QUOKKA 42 ünïcödé 日本").input_ids
    assert tok.unk_token_id not in odd[1:-1]

    assert empty_embedding.shape == (1, 77, pipe.text_encoder.config.hidden_size)
    assert torch.isfinite(empty_embedding).all()


def test_written_vocab_loads_with_clip_tokenizer(pipe, cache_root):
    """The plain vocab.json + merges.txt (no tokenizer.json) load on their own."""
    import shutil

    from transformers import CLIPTokenizer

    src = tiny.tiny_pipeline_dir(cache_root) / "tokenizer"
    only = cache_root.parent / "vocab-merges-only"
    only.mkdir(exist_ok=True)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(src / name, only / name)
    tok = CLIPTokenizer.from_pretrained(str(only), model_max_length=77)
    for text in ("", "a photo of a cat", "move the head to the left"):
        assert tok(text).input_ids == pipe.tokenizer(text).input_ids


def test_unet_forward_is_finite(pipe, empty_embedding):
    torch.manual_seed(0)
    latent = torch.randn(1, 4, 32, 32)
    with torch.no_grad():
        out = pipe.unet(latent, 981, encoder_hidden_states=empty_embedding).sample
    assert out.shape == latent.shape
    assert torch.isfinite(out).all()
    assert 0 < out.abs().max() < 100


def test_scheduler_is_sd15_ddim(pipe):
    from diffusers import DDIMScheduler

    sched = pipe.scheduler
    assert isinstance(sched, DDIMScheduler)
    cfg = sched.config
    assert cfg.beta_start == pytest.approx(0.00085)
    assert cfg.beta_end == pytest.approx(0.012)
    assert cfg.beta_schedule == "scaled_linear"
    assert cfg.num_train_timesteps == 1000
    assert cfg.clip_sample is False
    assert cfg.set_alpha_to_one is False
    assert cfg.steps_offset == 1
    assert cfg.timestep_spacing == "leading"
    assert cfg.prediction_type == "epsilon"
    sched.set_timesteps(50)
    assert len(sched.timesteps) == 50
    assert int(sched.timesteps[0]) == 981
    assert int(sched.timesteps[-1]) == 1


def test_build_is_deterministic_per_seed(tmp_path):
    global_state = torch.random.get_rng_state()
    a = tiny.build_tiny_pipeline(tmp_path / "a", seed=0)
    b = tiny.build_tiny_pipeline(tmp_path / "b", seed=0)
    c = tiny.build_tiny_pipeline(tmp_path / "c", seed=1)
    assert torch.equal(torch.random.get_rng_state(), global_state), "global RNG was touched"

    ha, hb, hc = _weight_hashes(a), _weight_hashes(b), _weight_hashes(c)
    assert set(ha) == {
        "text_encoder/model.safetensors",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
    }
    assert ha == hb
    assert set(hc) == set(ha)
    assert all(hc[k] != ha[k] for k in ha)
    # tokenizer files are deterministic too
    for name in ("vocab.json", "merges.txt"):
        assert (a / "tokenizer" / name).read_bytes() == (b / "tokenizer" / name).read_bytes()


def test_cache_build_replaces_incomplete_folder(tmp_path):
    broken = tmp_path / "tiny-random-sd15-v1"
    broken.mkdir()
    (broken / "half-written.bin").write_bytes(b"x")
    folder = tiny.tiny_pipeline_dir(tmp_path)
    assert folder == broken
    assert (folder / "model_index.json").is_file()
    assert not (folder / "half-written.bin").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["tiny-random-sd15-v1"]


def test_default_cache_honours_env(tmp_path, monkeypatch):
    monkeypatch.setenv("GOODDRAG_CACHE", str(tmp_path / "envcache"))
    assert tiny._default_cache_root() == tmp_path / "envcache"
