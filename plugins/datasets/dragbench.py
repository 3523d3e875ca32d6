"""DragBench (DragDiffusion benchmark) reader, with a restricted unpickler.

Layout::

    <root>/<category>/<sample>/original_image.png
    <root>/<category>/<sample>/meta_data.pkl    {'prompt': str, 'points': [[x, y], ...], 'mask': uint8 HxW 0/1}

Our local copy also has ``meta_data.json`` and ``mask.png`` (upstream has neither): they are used only
when ``meta_data.pkl`` is absent. The sample id is ``<category>/<sample>``, the group is the category.

The pickle is never unpickled with the standard machinery. :class:`SafeUnpickler` resolves only the
numpy globals an ndarray pickle needs (``_reconstruct``/``ndarray``/``dtype`` for protocols <= 4,
``_frombuffer``/``dtype`` for protocol 5, and ``_codecs.encode`` with latin-1, which protocols 0-2
use for bytes) and maps them onto inert stand-ins that only record their arguments: no numpy code
runs while unpickling, and any other global (``os.system``, ...) is refused. The stand-ins are
turned into arrays afterwards with ``np.frombuffer`` for plain numeric dtypes only. Sizes are
bounded before anything is allocated: the file is at most ``MAX_PICKLE_BYTES`` and array data must
be bytes taken from it (a size the pickle merely names is refused).
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any, Iterator

import attrs
import numpy as np

from gooddrag.core.errors import BadInputError
from gooddrag.core.hookspecs import hookimpl
from gooddrag.core.inputs import read_small_file
from gooddrag.core.samples import Sample
from gooddrag.plugins.datasets import (bad, check_mask, check_pairs, guarded, pairs_from_flat, read_image,
                                       read_json, sample_file, subfolders)

IMAGE_NAME = "original_image.png"
PICKLE_NAME = "meta_data.pkl"
JSON_NAME = "meta_data.json"
#: a DragBench meta_data.pkl holds a mask and a few points (< 1 MB at 512 px); refuse far larger
MAX_PICKLE_BYTES = 64 << 20

#: numeric dtype codes accepted in a pickled array (no object arrays)
_DTYPES = {"b1", "u1", "u2", "u4", "u8", "i1", "i2", "i4", "i8", "f2", "f4", "f8"}


class _NDArrayType:
    """Stand-in for ``numpy.ndarray`` (only passed around as an argument)."""


class _DType:
    """Stand-in for ``numpy.dtype(code, align, copy)``; BUILD gives it the byte order."""

    def __init__(self, code: Any = None, align: Any = False, copy: Any = True):
        if not isinstance(code, str) or code not in _DTYPES:
            raise pickle.UnpicklingError(f"array dtype {code!r} is not a plain numeric type")
        self.code, self.order = code, "|"

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) > 1 and state[1] in ("<", ">", "|", "="):
            self.order = state[1]

    def to_numpy(self) -> np.dtype:
        order = "" if self.order in ("|", "=") else self.order
        return np.dtype(order + self.code)


class _Array:
    """Stand-in for an ndarray: shape, dtype, order and raw bytes, filled by BUILD or _frombuffer."""

    def __init__(self) -> None:
        self.shape: Any = None
        self.dtype: Any = None
        self.fortran = False
        self.data: Any = None

    def __setstate__(self, state: Any) -> None:
        if not (isinstance(state, tuple) and len(state) == 5):
            raise pickle.UnpicklingError("unexpected ndarray state")
        _, self.shape, self.dtype, self.fortran, self.data = state

    def to_numpy(self) -> np.ndarray:
        if not isinstance(self.dtype, _DType):
            raise ValueError("array without a dtype")
        if not isinstance(self.data, (bytes, bytearray)):
            raise ValueError("array data is not raw bytes")
        if not isinstance(self.shape, (tuple, list)) or not all(
                isinstance(s, int) and not isinstance(s, bool) and 0 <= s for s in self.shape):
            raise ValueError(f"array shape {self.shape!r} is not a tuple of sizes")
        shape = tuple(self.shape)
        flat = np.frombuffer(bytes(self.data), dtype=self.dtype.to_numpy())
        if flat.size != int(np.prod(shape, dtype=np.int64)):
            raise ValueError(f"array data does not match its shape {shape}")
        return flat.reshape(shape, order="F" if self.fortran else "C").copy()


def _reconstruct(cls: Any, shape: Any = (0,), typecode: Any = b"b") -> _Array:
    if cls is not _NDArrayType:
        raise pickle.UnpicklingError("_reconstruct of something other than ndarray")
    return _Array()


def _frombuffer(buf: Any, dtype: Any, shape: Any, order: Any = "C") -> _Array:
    # only bytes that are in the file: bytes(n) of an int n would allocate n bytes the pickle chose
    if not isinstance(buf, (bytes, bytearray, pickle.PickleBuffer)):
        raise pickle.UnpicklingError(f"array buffer is a {type(buf).__name__}, not bytes")
    arr = _Array()
    arr.shape, arr.dtype, arr.fortran = shape, dtype, order == "F"
    arr.data = bytes(buf.raw() if isinstance(buf, pickle.PickleBuffer) else buf)
    return arr


def _latin1(text: Any, encoding: Any = "utf-8", errors: Any = "strict") -> bytes:
    """``_codecs.encode(str, 'latin1')``: how protocols 0-2 pickle bytes (the array data)."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1") or errors != "strict":
        raise pickle.UnpicklingError("_codecs.encode is allowed only for latin-1 text")
    return text.encode("latin-1")


_ALLOWED: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,
    ("numpy", "ndarray"): _NDArrayType,
    ("numpy", "dtype"): _DType,
    ("_codecs", "encode"): _latin1,
}


class SafeUnpickler(pickle.Unpickler):
    """Resolves only the numpy globals of an ndarray pickle, onto inert stand-ins; refuses the rest."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"forbidden global {module}.{name}") from None

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("persistent ids are not allowed")


def _materialise(obj: Any) -> Any:
    if isinstance(obj, _Array):
        return obj.to_numpy()
    if isinstance(obj, dict):
        return {k: _materialise(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_materialise(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_materialise(v) for v in obj)
    if isinstance(obj, (_DType, _NDArrayType)) or obj is _NDArrayType:
        raise ValueError("a bare numpy type in the data")
    return obj


def safe_load_pickle(data: bytes) -> Any:
    """Unpickle ``data`` with :class:`SafeUnpickler` and turn array stand-ins into numpy arrays.
    Raises ``pickle.UnpicklingError`` or ``ValueError`` on anything unexpected."""
    return _materialise(SafeUnpickler(io.BytesIO(data)).load())


def read_meta_pickle(path: Path, sample_id: str) -> dict[str, Any]:
    try:
        data = read_small_file(path, path.name, MAX_PICKLE_BYTES)
    except BadInputError as exc:
        raise bad(sample_id, str(exc)) from None
    try:
        meta = safe_load_pickle(data)
    except RecursionError:
        raise bad(sample_id, f"{path.name} is refused: nested too deeply") from None
    except (pickle.UnpicklingError, ValueError, TypeError, EOFError, AttributeError, IndexError, KeyError,
            MemoryError, OverflowError) as exc:
        raise bad(sample_id, f"{path.name} is refused: {exc or type(exc).__name__}") from None
    if not isinstance(meta, dict):
        raise bad(sample_id, f"{path.name} does not hold a dict")
    return meta


class DragBench:
    """DragBench: <category>/<sample>/original_image.png + meta_data.pkl (read without unpickling code)."""

    name = "dragbench"

    @attrs.frozen(kw_only=True)
    class Params:
        pass

    def __init__(self, params: "DragBench.Params | None" = None):
        self.params = params or DragBench.Params()

    @staticmethod
    def detect(folder: Path) -> bool:
        """True when some <category>/<sample>/ folder has original_image.png and meta_data.pkl/json."""
        folder = Path(folder)
        if not folder.is_dir():
            return False
        for cat in subfolders(folder):
            for d in subfolders(cat):
                if (d / IMAGE_NAME).is_file() and ((d / PICKLE_NAME).is_file() or (d / JSON_NAME).is_file()):
                    return True
        return False

    def samples(self, folder: Path) -> Iterator[Sample]:
        folder = Path(folder)
        for cat in subfolders(folder):
            for d in subfolders(cat):
                if any((d / n).exists() for n in (IMAGE_NAME, PICKLE_NAME, JSON_NAME)):
                    yield guarded(f"{cat.name}/{d.name}", cat.name, d, lambda: self.load(d, cat.name))

    @staticmethod
    def load(d: Path, category: str) -> Sample:
        sid = f"{category}/{d.name}"
        image = read_image(d / IMAGE_NAME, sid)
        if (d / PICKLE_NAME).is_file():
            meta = read_meta_pickle(d / PICKLE_NAME, sid)
            where = PICKLE_NAME
            if "points" not in meta or "mask" not in meta:
                raise bad(sid, f"{where} lacks {'points' if 'points' not in meta else 'mask'}")
            pairs = pairs_from_flat(meta["points"], sid, where)
            mask_arr = meta["mask"]
            if not isinstance(mask_arr, np.ndarray):
                raise bad(sid, f"{where}: mask is not an array")
        elif (d / JSON_NAME).is_file():
            where = JSON_NAME
            meta = read_json(d / JSON_NAME, sid)
            try:
                flat = [c for h, t in zip(meta["handle_points"], meta["target_points"]) for c in (h, t)]
                if len(meta["handle_points"]) != len(meta["target_points"]):
                    raise ValueError
            except (ValueError, KeyError, TypeError):
                raise bad(sid, f"{where} is not valid (handle_points, target_points, prompt)") from None
            pairs = pairs_from_flat(flat, sid, where)
            mask_path = sample_file(d, meta.get("mask_file", "mask.png"), sid, f"{where} mask_file")
            mask_arr = np.asarray(read_image(mask_path, sid, mode="L")) > 127
        else:
            raise bad(sid, f"{PICKLE_NAME} is missing ({d / PICKLE_NAME})")
        prompt = meta.get("prompt", "")
        if not isinstance(prompt, str):
            raise bad(sid, f"{where}: prompt is not a string")
        check_pairs(pairs, image.size, sid)
        mask = check_mask(mask_arr, image.size, sid, f"{where} mask")
        return Sample(id=sid, group=category, image=image, mask=mask, pairs=pairs, prompt=prompt, path=d)


@hookimpl
def gooddrag_register_datasets():
    return [DragBench]
