"""A deterministic, tiny, randomly initialised Stable-Diffusion-1.5-shaped pipeline.

Why: tests and ``--model tiny-random`` smoke runs need the *real* diffusers loading path
(``StableDiffusionPipeline.from_pretrained``) and the SD1.5 module topology (16 transformer
blocks, 32 attention modules, ``unet.up_blocks[2]``, 8x VAE, 77-token CLIP text encoder) that
drag-editing code hooks into, but must run offline, on CPU, in a fraction of a second.

Everything is generated locally: weights from a fixed torch seed, and a small CLIP-style BPE
vocabulary learned from a built-in corpus. Nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # pragma: no cover
    from diffusers import StableDiffusionPipeline

__all__ = [
    "TINY_MODEL_ID",
    "TINY_CACHE_SUBDIR",
    "build_tiny_pipeline",
    "tiny_pipeline_dir",
    "load_tiny_pipeline",
]

TINY_MODEL_ID = "tiny-random"
# Bump the suffix whenever the generated pipeline changes, so stale caches are not reused.
TINY_CACHE_SUBDIR = "tiny-random-sd15-v1"

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
MAX_LENGTH = 77
TEXT_HIDDEN = 32
NUM_MERGES = 256  # upper bound; the corpus is small, so fewer may be learned

# Damping of the UNet's output conv (after default init) so the random net predicts "noise" of
# modest magnitude (std ~0.04 instead of ~0.4) and inversion/denoising loops stay tame.
UNET_OUT_SCALE = 0.1

# Same split rule as transformers' CLIPTokenizer pre-tokenizer, so trained merges line up.
_CLIP_SPLIT = (
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
)

# Small fixed corpus for the BPE (a few hundred words of ordinary prompt-like English).
_CORPUS = """
a photo of a cat sitting on a wooden table next to a window in the morning light.
a photo of a dog running on the beach at sunset, waves in the background.
a painting of a house by the river, oil on canvas, warm colors, soft brush strokes.
portrait of a woman with long hair, smiling, studio lighting, high detail.
portrait of a man wearing a hat and a coat, standing in the rain in the city.
a red car parked on the street in front of a small shop with a blue door.
a mountain landscape with snow on the peaks and a lake in the valley below.
the quick brown fox jumps over the lazy dog while the birds sing in the trees.
an old castle on a hill under a cloudy sky, dramatic light, wide angle photo.
a bowl of fruit with apples, oranges and bananas on a kitchen counter.
a close up photo of a flower with water drops on the petals, shallow depth of field.
a cartoon drawing of a happy robot holding a balloon in a park with children.
a futuristic city at night with tall buildings, neon lights and flying cars.
a forest path in autumn with yellow and orange leaves covering the ground.
a cup of coffee and a book on a table in a quiet cafe, cozy atmosphere.
a horse standing in a green field near a fence, mountains in the distance.
a bird sitting on a branch, feathers in bright colors, photo taken with a long lens.
a sailing boat on the sea, blue water, white clouds, summer afternoon.
drag the handle point to the target point and keep the rest of the image unchanged.
move the head of the cat to the left, open the mouth, raise the arm, turn the face.
make the mountain taller, make the river wider, move the sun higher in the sky.
the edited image should look natural, sharp and consistent with the original photo.
high quality, best quality, detailed, realistic, photorealistic, cinematic, masterpiece.
low quality, blurry, distorted, deformed, ugly, bad anatomy, extra fingers, watermark.
one two three four five six seven eight nine ten, 1 2 3 4 5 6 7 8 9 0.
there is a small house with a garden and a tree, and a child is playing with a ball.
she is reading a letter by the fire, and he is looking out of the window at the snow.
they walked along the road through the village until they reached the old bridge.
"""


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable unicode map (the 256 base symbols of a byte-level BPE)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _clip_pretokenizer():
    """The normalizer + pre-tokenizer transformers' CLIPTokenizer uses (tokenizers objects)."""
    from tokenizers import Regex, normalizers, pre_tokenizers

    norm = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    pre = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_CLIP_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    return norm, pre


def _train_clip_bpe(corpus: str = _CORPUS, num_merges: int = NUM_MERGES):
    """Learn a CLIP-format BPE (vocab dict, merge list) from ``corpus``, deterministically.

    Words are split with the `tokenizers` library using CLIP's exact normalizer/pre-tokenizer,
    then merges are counted here with a total tie-break order (count desc, then pair). We do
    not use ``tokenizers.trainers.BpeTrainer`` for the merge loop because it breaks count ties
    in hash-map order, which changes between processes (observed with tokenizers 0.23).
    """
    norm, pre = _clip_pretokenizer()
    words: Counter[tuple[str, ...]] = Counter()
    for line in corpus.strip().splitlines():
        for piece, _ in pre.pre_tokenize_str(norm.normalize_str(line)):
            if piece:
                words[tuple(piece[:-1]) + (piece[-1] + "</w>",)] += 1

    merges: list[tuple[str, str]] = []
    for _ in range(num_merges):
        pairs: Counter[tuple[str, str]] = Counter()
        for w, c in words.items():
            for a, b in zip(w, w[1:]):
                pairs[(a, b)] += c
        if not pairs:
            break
        best, count = min(pairs.items(), key=lambda kv: (-kv[1], kv[0]))
        if count < 2:
            break
        merges.append(best)
        new_words: Counter[tuple[str, ...]] = Counter()
        for w, c in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    out.append(w[i] + w[i + 1])
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            new_words[tuple(out)] += c
        words = new_words

    # CLIP vocab layout: 256 byte symbols, the same with '</w>', one entry per merge, specials.
    base = list(_bytes_to_unicode().values())
    tokens = base + [b + "</w>" for b in base] + ["".join(m) for m in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    vocab: dict[str, int] = {}
    for t in tokens:  # merges can in principle repeat a token; keep first id, stay dense
        vocab.setdefault(t, len(vocab))
    return vocab, merges


def _write_vocab_merges(folder: Path, vocab: dict[str, int], merges) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


def _write_clip_tokenizer_files(folder: Path, vocab, merges) -> Path:
    """Write vocab.json + merges.txt (+ config) loadable by ``CLIPTokenizer.from_pretrained``."""
    _write_vocab_merges(folder, vocab, merges)
    cfg = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MAX_LENGTH,
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "unk_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,
        "do_lower_case": True,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2), encoding="utf-8")
    return folder


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


def _make_components(tok_dir: Path, seed: int) -> dict:
    """Instantiate all pipeline components with weights drawn from ``seed``."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(str(tok_dir), model_max_length=MAX_LENGTH)
    vocab_size = len(tokenizer)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=8,  # default pipeline size 8 * 8 = 64 px
            in_channels=4,
            out_channels=4,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            block_out_channels=(16, 16, 32, 32),
            layers_per_block=2,
            norm_num_groups=8,
            attention_head_dim=2,  # diffusers' legacy name: this is the number of heads
            cross_attention_dim=TEXT_HIDDEN,
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 8, 8, 8),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=4,
            sample_size=64,
            scaling_factor=0.18215,
        )
        text_config = CLIPTextConfig(
            vocab_size=vocab_size,
            hidden_size=TEXT_HIDDEN,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=MAX_LENGTH,
            hidden_act="quick_gelu",
            projection_dim=TEXT_HIDDEN,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        text_encoder = CLIPTextModel(text_config)
        with torch.no_grad():
            # Keep the random UNet's noise prediction small so sampling loops stay finite.
            unet.conv_out.weight.mul_(UNET_OUT_SCALE)
            unet.conv_out.bias.zero_()

    scheduler = sd_ddim_scheduler()
    for m in (unet, vae, text_encoder):
        m.eval()
    return dict(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler
    )


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def sd_ddim_scheduler(prediction_type: str = "epsilon"):
    """DDIM with Stable Diffusion's settings: scaled-linear betas, leading spacing, offset 1."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                         beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                         steps_offset=1, timestep_spacing="leading", prediction_type=prediction_type)


def build_tiny_pipeline(path: str | os.PathLike, seed: int = 0) -> Path:
    """Write the tiny pipeline as a diffusers folder (save_pretrained, safetensors) at `path`; return it."""
    from diffusers import StableDiffusionPipeline

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    vocab, merges = _train_clip_bpe()
    with tempfile.TemporaryDirectory(prefix=".tiny-tok-", dir=out) as tok_tmp:
        comps = _make_components(_write_clip_tokenizer_files(Path(tok_tmp), vocab, merges), seed)
    pipe = StableDiffusionPipeline(
        **comps, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    pipe.save_pretrained(str(out), safe_serialization=True)
    # transformers 5 saves only tokenizer.json + config; keep the plain CLIP vocab/merges too
    # (same content) so the folder also loads with older/slow CLIP tokenizers.
    _write_vocab_merges(out / "tokenizer", vocab, merges)
    return out


def _default_cache_root() -> Path:
    env = os.environ.get("GOODDRAG_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "gooddrag"


def _is_complete(folder: Path) -> bool:
    return (folder / "model_index.json").is_file()


def cached_pipeline_dir(subdir: str, build, cache_dir: str | os.PathLike | None = None) -> Path:
    """A cached folder ``subdir`` holding what ``build(path)`` writes, built once.

    Default cache: $GOODDRAG_CACHE or ~/.cache/gooddrag. The build goes to a temp dir in the same
    parent and is renamed into place atomically, so concurrent or interrupted builds never leave a
    half-written folder under the final name.
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else _default_cache_root()
    final = root / subdir
    if _is_complete(final):
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{subdir}.tmp-", dir=root))
    try:
        build(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; the cache may be shared
        if final.exists() and not _is_complete(final):
            # Not produced by us (we only ever rename finished builds); move it out of the way.
            junk = Path(tempfile.mkdtemp(prefix=f".{subdir}.junk-", dir=root))
            try:
                os.replace(final, junk / "old")
            except OSError:
                pass
            shutil.rmtree(junk, ignore_errors=True)
        try:
            os.replace(tmp, final)
        except OSError:
            # Another process won the race and renamed a complete build first.
            if not _is_complete(final):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def tiny_pipeline_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The cached tiny SD1.5-shaped pipeline folder (subfolder 'tiny-random-sd15-v1'), built once."""
    return cached_pipeline_dir(TINY_CACHE_SUBDIR, build_tiny_pipeline, cache_dir)


def load_offline(folder: str | os.PathLike, torch_dtype=torch.float32) -> "StableDiffusionPipeline":
    """Load a pipeline folder through the real ``StableDiffusionPipeline.from_pretrained`` path.

    ``local_files_only=True`` and ``HF_HUB_OFFLINE=1`` (unless already set) guarantee no hub access.
    """
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import deprecation_utils

    # Newer diffusers renamed `torch_dtype` to `dtype` (and warn on the old name); older ones
    # only know `torch_dtype`.
    dtype_kw = "dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype"
    had = "HF_HUB_OFFLINE" in os.environ
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        return StableDiffusionPipeline.from_pretrained(
            str(folder), **{dtype_kw: torch_dtype}, local_files_only=True,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
    finally:
        if not had:
            os.environ.pop("HF_HUB_OFFLINE", None)


def load_tiny_pipeline(torch_dtype=torch.float32, cache_dir=None) -> "StableDiffusionPipeline":
    """Load the tiny pipeline through the real ``StableDiffusionPipeline.from_pretrained`` path, offline."""
    return load_offline(tiny_pipeline_dir(cache_dir), torch_dtype)
