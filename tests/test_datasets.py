"""Drag100 and DragBench readers: layout, groups, detection, malformed samples, the restricted unpickler."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gooddrag.core.errors import BadInputError, ConfigError
from gooddrag.core.registry import default_registry
from gooddrag.core.samples import MalformedSample
from gooddrag.app.bench.selection import open_dataset, select_samples
from gooddrag.plugins.datasets.drag100 import Drag100, content_class
from gooddrag.plugins.datasets.dragbench import DragBench, safe_load_pickle

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


def read_all(dataset, root: Path) -> list:
    """Every sample; the first malformed one's recorded error is raised (bench records it as failed)."""
    out = list(dataset.samples(root))
    for s in out:
        if isinstance(s, MalformedSample):
            raise BadInputError(s.error)
    return out


def write_drag100_sample(root: Path, name: str, w: int = 32, h: int = 16, points=((4, 8), (12, 8)), seed: int = 0,
                         mask_size=None) -> Path:
    d = root / name
    d.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(d / "original.jpg")
    mw, mh = mask_size or (w, h)
    m = np.zeros((mh, mw), np.uint8)
    m[:, : mw // 2] = 255
    Image.fromarray(m).save(d / "mask.png")
    (d / "points.json").write_text(json.dumps({"points": [list(p) for p in points]}))
    return d


def write_dragbench_sample(root: Path, category: str, name: str, w: int = 32, h: int = 16,
                           points=((4, 8), (12, 8)), prompt: str = "a photo", protocol: int = 4, seed: int = 0) -> Path:
    d = root / category / name
    d.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(d / "original_image.png")
    mask = np.zeros((h, w), np.uint8)
    mask[2:10, 3:20] = 1
    meta = {"prompt": prompt, "points": [list(p) for p in points], "mask": mask}
    (d / "meta_data.pkl").write_bytes(pickle.dumps(meta, protocol=protocol))  # numpy's own pickling
    return d


# --- Drag100 ------------------------------------------------------------------------------------


def test_drag100_samples_sorted_with_groups(tmp_path):
    for i, name in enumerate(["nature_3", "cat_2", "generated_3_human", "generated_5_snow_leopard", "widget_0"]):
        write_drag100_sample(tmp_path, name, seed=i)
    (tmp_path / ".hidden").mkdir()
    (tmp_path / "README.md").write_text("not a sample")
    samples = read_all(Drag100(), tmp_path)
    assert [s.id for s in samples] == sorted(s.id for s in samples)
    groups = {s.id: s.group for s in samples}
    assert groups == {"cat_2": "animal", "generated_3_human": "human", "generated_5_snow_leopard": "animal",
                      "nature_3": "landscape", "widget_0": "other"}
    s = samples[0]
    assert s.pairs == (((4.0, 8.0), (12.0, 8.0)),) and s.prompt == "" and s.path == tmp_path / s.id
    assert s.image.mode == "RGB" and s.image.size == (32, 16)
    assert s.mask.dtype == bool and s.mask.shape == (16, 32) and s.mask[:, :16].all() and not s.mask[:, 16:].any()


def test_drag100_group_falls_back_to_index_json(tmp_path):
    write_drag100_sample(tmp_path, "widget_0")
    write_drag100_sample(tmp_path, "gizmo_1")
    (tmp_path / "index.json").write_text(json.dumps([{"sample": "widget_0", "content_group": "object"}]))
    assert {s.id: s.group for s in Drag100().samples(tmp_path)} == {"gizmo_1": "other", "widget_0": "object"}
    assert content_class("cat_12") == "cat" and content_class("generated_10_dragon") == "dragon"


def test_drag100_keeps_a_pair_whose_handle_is_its_target(tmp_path):
    # Drag100's plants_3 has such pairs; the official DAI counts them
    write_drag100_sample(tmp_path, "plants_3", points=((4, 8), (12, 8), (20, 4), (20, 4)))
    (s,) = Drag100().samples(tmp_path)
    assert len(s.pairs) == 2


@pytest.mark.parametrize("breakage, message", [
    (lambda d: os.remove(d / "points.json"), "points.json is missing"),
    (lambda d: (d / "points.json").write_text("{not json"), "points.json is not valid JSON"),
    (lambda d: (d / "points.json").write_text('{"points": [[1, 2], [3, 4], [5, 6]]}'), "odd number"),
    (lambda d: (d / "points.json").write_text('{"pts": []}'), 'no "points" list'),
    (lambda d: (d / "points.json").write_text('{"points": [[1, 2], [99, 4]]}'), "target 1 at \\(99, 4\\) is outside"),
    (lambda d: os.remove(d / "mask.png"), "mask.png is missing"),
    (lambda d: Image.new("L", (8, 8)).save(d / "mask.png"), "mask.png has shape \\(8, 8\\)"),
    (lambda d: (d / "original.jpg").write_bytes(b"garbage"), "original.jpg .*is not a readable image"),
])
def test_drag100_malformed_sample_is_named(tmp_path, breakage, message):
    write_drag100_sample(tmp_path, "cat_0")
    d = write_drag100_sample(tmp_path, "dog_1")
    breakage(d)
    with pytest.raises(BadInputError, match=f"sample 'dog_1': .*{message}"):
        read_all(Drag100(), tmp_path)


# --- DragBench ----------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", [0, 1, 2, 3, 4, 5])
def test_dragbench_reads_numpy_pickles_without_numpy_unpickling(tmp_path, protocol):
    write_dragbench_sample(tmp_path, "animals", "JH_2", prompt="a dog", protocol=protocol)
    write_dragbench_sample(tmp_path, "animals", "JH_1", points=((1, 1), (5, 5), (30, 15), (20, 3)), seed=1,
                           protocol=protocol)
    write_dragbench_sample(tmp_path, "art_work", "PJC_1", seed=2, protocol=protocol)
    samples = read_all(DragBench(), tmp_path)
    assert [s.id for s in samples] == ["animals/JH_1", "animals/JH_2", "art_work/PJC_1"]
    assert [s.group for s in samples] == ["animals", "animals", "art_work"]
    s = samples[1]
    assert s.prompt == "a dog" and s.pairs == (((4.0, 8.0), (12.0, 8.0)),)
    want = np.zeros((16, 32), bool)
    want[2:10, 3:20] = True
    assert s.mask.dtype == bool and np.array_equal(s.mask, want)
    assert samples[0].pairs == (((1.0, 1.0), (5.0, 5.0)), ((30.0, 15.0), (20.0, 3.0)))


def test_safe_unpickler_matches_numpy_for_arrays():
    arrs = {"u8": np.arange(12, dtype=np.uint8).reshape(3, 4), "f4": np.linspace(0, 1, 6, dtype=np.float32),
            "fortran": np.asfortranarray(np.arange(6, dtype=np.int32).reshape(2, 3)), "be": np.arange(3, dtype=">i2")}
    for proto in range(6):
        back = safe_load_pickle(pickle.dumps({"a": arrs, "l": [1, "x"]}, protocol=proto))
        assert back["l"] == [1, "x"]
        for k, v in arrs.items():
            assert np.array_equal(back["a"][k], v) and back["a"][k].dtype == v.dtype, (proto, k)


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_dragbench_refuses_a_pickle_with_a_forbidden_global(tmp_path):
    d = write_dragbench_sample(tmp_path, "animals", "JH_evil")
    marker = tmp_path / "pwned"
    meta = {"prompt": "x", "points": [[4, 8], [12, 8]], "mask": np.zeros((16, 32), np.uint8), "x": _Evil(marker)}
    data = pickle.dumps(meta, protocol=4)  # pickling does not run os.system; unpickling would
    assert b"system" in data
    (d / "meta_data.pkl").write_bytes(data)
    with pytest.raises(BadInputError, match=r"sample 'animals/JH_evil': meta_data.pkl is refused: forbidden global "
                                            r"(posix|os|nt)\.system"):
        read_all(DragBench(), tmp_path)
    assert not marker.exists()


@pytest.mark.parametrize("payload, message", [
    (lambda: pickle.dumps({"f": eval}), "forbidden global builtins.eval"),
    (lambda: pickle.dumps({"mask": np.array([object()], dtype=object)}), "not a plain numeric type"),
    (lambda: b"\x80\x04K", "refused"),
    (lambda: pickle.dumps([1, 2]), "does not hold a dict"),
    (lambda: pickle.dumps({"prompt": "x", "points": [[4, 8], [12, 8]]}), "lacks mask"),
    (lambda: pickle.dumps({"prompt": "x", "points": [[4, 8], [12, 8]], "mask": np.zeros((3, 3), np.uint8)}),
     r"mask has shape \(3, 3\) but the image is 16x32"),
])
def test_dragbench_malformed_pickles_are_named(tmp_path, payload, message):
    d = write_dragbench_sample(tmp_path, "art_work", "PJC_bad")
    (d / "meta_data.pkl").write_bytes(payload())
    with pytest.raises(BadInputError, match=f"sample 'art_work/PJC_bad': .*{message}"):
        read_all(DragBench(), tmp_path)


def test_dragbench_json_fallback_when_the_pickle_is_absent(tmp_path):
    d = tmp_path / "land_scape" / "YAN_1"
    d.mkdir(parents=True)
    Image.new("RGB", (20, 10), (9, 9, 9)).save(d / "original_image.png")
    m = np.zeros((10, 20), np.uint8)
    m[:5] = 255
    Image.fromarray(m).save(d / "mask.png")
    (d / "meta_data.json").write_text(json.dumps({"prompt": "hills", "handle_points": [[1, 2]],
                                                  "target_points": [[5, 6]], "mask_file": "mask.png"}))
    (s,) = DragBench().samples(tmp_path)
    assert s.id == "land_scape/YAN_1" and s.prompt == "hills" and s.pairs == (((1.0, 2.0), (5.0, 6.0)),)
    assert s.mask[:5].all() and not s.mask[5:].any()


# --- detection and selection ------------------------------------------------------------------------


def test_format_auto_detection(tmp_path):
    reg = default_registry()
    write_drag100_sample(tmp_path / "a", "cat_0")
    write_dragbench_sample(tmp_path / "b", "animals", "JH_1")
    (tmp_path / "c").mkdir()
    assert Drag100.detect(tmp_path / "a") and not DragBench.detect(tmp_path / "a")
    assert DragBench.detect(tmp_path / "b") and not Drag100.detect(tmp_path / "b")
    assert open_dataset(reg, tmp_path / "a")[1] == "drag100"
    assert open_dataset(reg, tmp_path / "b", "auto")[1] == "dragbench"
    assert open_dataset(reg, tmp_path / "b", "dragbench")[1] == "dragbench"
    with pytest.raises(BadInputError, match="not a dataset folder of any known format"):
        open_dataset(reg, tmp_path / "c")
    with pytest.raises(BadInputError, match="does not exist"):
        open_dataset(reg, tmp_path / "nope")
    with pytest.raises(ConfigError, match="unknown dataset 'drag200'; available: .*drag100"):
        open_dataset(reg, tmp_path / "a", "drag200")


def test_limit_then_shard(tmp_path):
    for i in range(7):
        write_drag100_sample(tmp_path, f"cat_{i}", seed=i)
    ds = Drag100()
    ids = lambda **kw: [s.id for s in select_samples(ds, tmp_path, **kw)]  # noqa: E731
    assert ids() == [f"cat_{i}" for i in range(7)]
    assert ids(limit=3) == ["cat_0", "cat_1", "cat_2"]
    assert ids(shard=(1, 3)) == ["cat_1", "cat_4"]
    assert ids(limit=5, shard=(0, 2)) == ["cat_0", "cat_2", "cat_4"]


def test_contract_and_registration():
    from gooddrag.testing import check_component

    reg = default_registry()
    assert reg.get("dataset", "drag100") is Drag100 and reg.get("dataset", "dragbench") is DragBench
    check_component("dataset", Drag100)
    check_component("dataset", DragBench)


# --- the real data, when present ------------------------------------------------------------------


@pytest.mark.skipif(not (DATA / "drag100" / "index.json").is_file(), reason="../shared/data/drag100 not present")
def test_real_drag100_counts_and_groups():
    samples = read_all(Drag100(), DATA / "drag100")
    assert len(samples) == 100 and sum(len(s.pairs) for s in samples) == 242
    index = {r["sample"]: r["content_group"] for r in json.loads((DATA / "drag100" / "index.json").read_text())}
    assert {s.id: s.group for s in samples} == index
    assert all(s.mask.shape == (s.image.size[1], s.image.size[0]) for s in samples)


@pytest.mark.skipif(not (DATA / "dragbench" / "index.json").is_file(), reason="../shared/data/dragbench not present")
def test_real_dragbench_pickles_match_the_json_conversion():
    samples = read_all(DragBench(), DATA / "dragbench")
    assert len(samples) == 20 and sum(len(s.pairs) for s in samples) == 32
    for s in samples:
        meta = json.loads((s.path / "meta_data.json").read_text())
        assert s.prompt == meta["prompt"] and s.group == meta["category"]
        assert [list(h) for h, _ in s.pairs] == meta["handle_points"]
        assert [list(t) for _, t in s.pairs] == meta["target_points"]
        assert int(s.mask.sum()) == meta["mask_nonzero_pixels"]
        assert np.array_equal(s.mask, np.asarray(Image.open(s.path / "mask.png")) > 127)


# --- hostile files --------------------------------------------------------------------------------


class _Bomb:
    """Pickles as numpy's own ``_frombuffer(2_200_000_000, dtype, shape)``: a size, not bytes."""

    def __reduce__(self):
        from numpy._core.numeric import _frombuffer

        return (_frombuffer, (2_200_000_000, np.dtype("u1"), (1,), "C"))


def _nested(depth: int) -> bytes:
    return b"\x80\x02" + b"]" * depth + b"a" * (depth - 1) + b"."  # EMPTY_LIST x depth, APPEND x depth-1


def test_hostile_pickles_are_refused_by_name_without_allocating(tmp_path):
    import tracemalloc

    d = write_dragbench_sample(tmp_path, "art_work", "PJC_bad")
    bomb = pickle.dumps({"mask": _Bomb()}, protocol=5)
    assert len(bomb) < 200
    (d / "meta_data.pkl").write_bytes(bomb)
    tracemalloc.start()
    try:
        with pytest.raises(BadInputError, match="sample 'art_work/PJC_bad': meta_data.pkl is refused: array buffer"):
            read_all(DragBench(), tmp_path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 50 << 20
    (d / "meta_data.pkl").write_bytes(_nested(200_000))
    with pytest.raises(BadInputError, match="sample 'art_work/PJC_bad': meta_data.pkl is refused: nested too deeply"):
        read_all(DragBench(), tmp_path)


def _json_sample(root: Path, mask_file) -> Path:
    d = root / "land_scape" / "YAN_1"
    d.mkdir(parents=True)
    Image.new("RGB", (32, 16)).save(d / "original_image.png")
    (d / "meta_data.json").write_text(json.dumps({"prompt": "p", "handle_points": [[4, 8]], "target_points": [[9, 8]],
                                                  "mask_file": mask_file}))
    return d


@pytest.mark.parametrize("mask_file, message", [
    (7, "mask_file is 7, not a file name"),
    (None, "mask_file is None"),
    ("../outside.png", "mask_file '../outside.png' is outside the sample folder"),
    ("/etc/passwd", "mask_file '/etc/passwd' is outside the sample folder"),
    ("link.png", "mask_file 'link.png' leads outside the sample folder"),
])
def test_dragbench_mask_file_must_stay_in_the_sample_folder(tmp_path, mask_file, message):
    root = tmp_path / "ds"
    d = _json_sample(root, mask_file)
    Image.new("L", (32, 16), 255).save(root / "land_scape" / "outside.png")
    os.symlink(root / "land_scape" / "outside.png", d / "link.png")
    with pytest.raises(BadInputError, match=f"sample 'land_scape/YAN_1': meta_data.json {message}"):
        read_all(DragBench(), root)


@pytest.mark.parametrize("make, message", [
    (lambda p: os.mkfifo(p), "points.json .* is not a regular file"),
    (lambda p: os.symlink("/dev/zero", p), r"points.json links outside its sample folder \(to /dev/zero\)"),
    (lambda p: p.write_bytes(b" " * (2 << 20)), "points.json .* is 2097152 bytes, over the 1048576-byte limit"),
    (lambda p: p.mkdir(), "points.json .* is a folder"),
])
def test_drag100_points_json_must_be_a_small_regular_file(tmp_path, make, message):
    d = write_drag100_sample(tmp_path, "dog_1")
    os.remove(d / "points.json")
    make(d / "points.json")
    with pytest.raises(BadInputError, match=f"sample 'dog_1': {message}"):
        read_all(Drag100(), tmp_path)


@pytest.mark.parametrize("points", ['["12", "34"]', "[[true, 2], [3, 4]]", '[[1, 2], ["3", 4]]', "[[1, 2, 3], [3, 4]]"])
def test_points_must_be_numbers(tmp_path, points):
    d = write_drag100_sample(tmp_path, "dog_1")
    (d / "points.json").write_text('{"points": %s}' % points)
    with pytest.raises(BadInputError, match=r"sample 'dog_1': points.json: point \d is .*not \[x, y\] with two numbers"):
        read_all(Drag100(), tmp_path)
