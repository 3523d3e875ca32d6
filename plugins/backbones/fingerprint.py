"""What a loaded model *is*, as a digest of its weights: the per-image LoRA's cache key holds it, so
a LoRA trained on one model is never served for another (a different model at the same relative
path, a folder retrained in place, another VAE), whatever the ``--model`` string says.

A component loaded from a folder (a diffusers folder, the hub's snapshot folder, the tiny model's
generated files) is identified by the SHA-256 of its weight and config files, plus the bytes of a
strided sample of its tensors in memory (at most 1024 values each: cheap, exact, and it tells a
module built from that folder's config but not its weights from one loaded from its files). Hashing is done once
per file version: the digest is kept in memory and in ``<cache>/digests/``, filed under the file's
real path, size, inode, mtime and ctime (ctime changes on every write and cannot be set back, so a
file rewritten in place, even with its old mtime restored, is hashed again). Anything else (a
single-file checkpoint, a pipeline built in memory) is identified by hashing its tensors once per
loaded model.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable

import torch

#: files of a component folder that hold or shape its weights
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".json")
_MEMO: dict[tuple, str] = {}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_digest(path: Path, store: Path | None = None) -> str:
    """SHA-256 of ``path``'s bytes, hashed once per file version (memoised in this process and,
    when ``store`` is a writable folder, across processes)."""
    st = os.stat(path)
    version = (os.path.realpath(path), st.st_size, st.st_ino, st.st_dev, st.st_mtime_ns, st.st_ctime_ns)
    if version in _MEMO:
        return _MEMO[version]
    stamp = hashlib.sha256(repr(version).encode()).hexdigest()[:40]
    digest = None
    if store is not None:
        try:
            text = (store / stamp).read_text().strip()
            digest = text if len(text) == 64 and all(c in "0123456789abcdef" for c in text) else None
        except OSError:
            pass
    if digest is None:
        digest = sha256_file(path)
        if store is not None:
            try:  # best effort: a read-only cache only costs a re-hash next time
                store.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(dir=store, prefix=".tmp-")
                with os.fdopen(fd, "w") as fh:
                    fh.write(digest + "\n")
                os.replace(tmp, store / stamp)
            except OSError:
                pass
    _MEMO[version] = digest
    return digest


def folder_digest(folder: Path, store: Path | None = None) -> str:
    """Digest of a component folder's weight and config files (names and contents)."""
    h = hashlib.sha256()
    for f in sorted(p for p in Path(folder).iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES)):
        h.update(f"{f.name}\0{file_digest(f, store)}\n".encode())
    return h.hexdigest()


def tensors_digest(module: torch.nn.Module, sample: int | None = None) -> str:
    """Digest of a module's parameters and buffers as loaded (names, dtypes, shapes, bytes); with
    ``sample``, of at most that many evenly strided values of each tensor."""
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        if "lora_" in name:  # an adapter's own weights: not the model's
            continue
        name = name.replace(".base_layer.", ".")  # peft's wrapper stays after its adapter is dropped
        t = t.detach()
        if sample is not None and t.numel() > sample:
            t = t.reshape(-1)[:: t.numel() // sample][:sample]
        t = t.to("cpu").contiguous()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\n".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def component_digest(module: Any, store: Path | None = None) -> str:
    """Digest of one pipeline component: its source folder's files when it was loaded from one,
    else its tensors."""
    source = getattr(getattr(module, "config", None), "_name_or_path", None)
    folder = Path(source) if source else None
    if folder is not None and folder.is_dir() and any(f.suffix in (".safetensors", ".bin") for f in folder.iterdir()):
        return "files:" + folder_digest(folder, store) + ":" + tensors_digest(module, sample=1024)
    return "tensors:" + tensors_digest(module)


def pipeline_digest(pipe: Any, components: Iterable[str] = ("unet", "vae", "text_encoder"),
                    store: Path | None = None) -> str:
    """Digest of everything in ``pipe`` that a LoRA trained on it depends on: the weights of
    ``components`` and the noise schedule (the scheduler's config)."""
    parts = {name: component_digest(getattr(pipe, name), store) for name in components
             if getattr(pipe, name, None) is not None}
    sched = getattr(getattr(pipe, "scheduler", None), "config", {}) or {}
    parts["scheduler"] = json.dumps({k: v for k, v in dict(sched).items() if not k.startswith("_")},
                                    sort_keys=True, default=str)
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
