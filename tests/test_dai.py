"""DAI (docs/metrics.md): hand-computed values, both normalisations, the border rule, the unchanged image."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from gooddrag.core.errors import BadInputError, ConfigError
from gooddrag.core.params import build_params
from gooddrag.core.samples import Sample
from gooddrag.plugins.metrics.dai import Dai, pair_ssd, parse_gammas


def _img(arr) -> Image.Image:
    return Image.fromarray(np.asarray(arr, dtype=np.uint8))


def _sample(image: Image.Image, pairs) -> Sample:
    return Sample(id="t", group="g", image=image, mask=None, pairs=tuple(pairs))


def _dai(gammas="1", pairmean=True) -> Dai:
    return Dai(Dai.Params(gammas=gammas, pairmean=pairmean))


def test_black_vs_white_hand_computed():
    black = _img(np.zeros((9, 9, 3)))
    white = _img(np.full((9, 9, 3), 255))
    # one pair, g=1: 9 pixels x 3 channels x (1-0)^2 = 27; / N=1 / 9 / N=1 = 3
    one = _dai("1").score(_sample(black, [((4, 4), (5, 4))]), white, None)
    assert one == pytest.approx({"dai_1": 3.0, "dai_pairmean_1": 3.0})
    # two pairs: (27 + 27) / 2 / 9 = 3 per pair; the official value divides by N again: 1.5
    two = _dai("1").score(_sample(black, [((4, 4), (5, 4)), ((3, 3), (4, 5))]), white, None)
    assert two == pytest.approx({"dai_1": 1.5, "dai_pairmean_1": 3.0})


def test_single_pixel_values_hand_computed():
    orig = np.zeros((7, 7, 3), np.uint8)
    orig[3, 2] = (255, 0, 0)  # red at handle (x=2, y=3)
    res = np.zeros((7, 7, 3), np.uint8)
    res[3, 4] = (0, 0, 51)  # 0.2 blue at target (x=4, y=3)
    s = _sample(_img(orig), [((2, 3), (4, 3))])
    # g=0: one pixel: (1-0)^2 + 0 + (0-0.2)^2 = 1.04 ; g=1: the same two pixels, /9
    out = _dai("0,1").score(s, _img(res), None)
    assert out["dai_0"] == pytest.approx(1.04)
    assert out["dai_1"] == pytest.approx(1.04 / 9)
    assert out["dai_pairmean_1"] == pytest.approx(1.04 / 9)
    assert list(out) == ["dai_0", "dai_1", "dai_pairmean_0", "dai_pairmean_1"]
    assert list(_dai("0,1", pairmean=False).score(s, _img(res), None)) == ["dai_0", "dai_1"]


def _official(original: np.ndarray, result: np.ndarray, pairs, r: int) -> float:
    """The public compute_DAI.py formula, re-derived here with numpy slicing (valid away from borders)."""
    total = 0.0
    for (hx, hy), (tx, ty) in pairs:
        a = original[hy - r:hy + r + 1, hx - r:hx + r + 1]
        b = result[ty - r:ty + r + 1, tx - r:tx + r + 1]
        total += float(np.sum(np.square(a - b)))
    total /= len(pairs)
    total /= (1 + 2 * r) ** 2
    return total / len(pairs)


def test_matches_official_formula_and_pairmean_away_from_borders():
    rng = np.random.default_rng(3)
    a = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    b = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    pairs = [((12, 11), (20, 14)), ((30, 25), (28, 22)), ((25, 18), (25, 20))]
    out = _dai("1,5,10").score(_sample(_img(a), pairs), _img(b), None)
    fa, fb = a / 255.0, b / 255.0
    for g in (1, 5, 10):
        want = _official(fa, fb, pairs, g)
        assert out[f"dai_{g}"] == pytest.approx(want, rel=1e-12)
        assert out[f"dai_pairmean_{g}"] == pytest.approx(want * len(pairs), rel=1e-12)


def test_unchanged_image_gives_the_patch_difference_not_zero():
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    pairs = [((10, 10), (16, 12)), ((25, 20), (22, 15))]
    image = _img(arr)
    out = _dai("1,5").score(_sample(image, pairs), image.copy(), None)
    f = arr.astype(np.float64) / 255.0
    for g in (1, 5):
        total = 0.0
        for (hx, hy), (tx, ty) in pairs:
            for dy in range(-g, g + 1):
                for dx in range(-g, g + 1):
                    for c in range(3):
                        total += (f[hy + dy, hx + dx, c] - f[ty + dy, tx + dx, c]) ** 2
        want = total / len(pairs) / (2 * g + 1) ** 2 / len(pairs)
        assert want > 0
        assert out[f"dai_{g}"] == pytest.approx(want, rel=1e-12)


def test_border_patches_are_clipped_on_both_sides_consistently():
    rng = np.random.default_rng(1)
    a = rng.random((12, 15, 3))
    b = rng.random((12, 15, 3))
    # handle at the left edge (x=0), target at y=10 near the bottom (h=12): with g=2 the valid offsets
    # are dx in [0, 2] (handle x=0 - 0) and dy in [-2, 1] (target y=10 + 1 = 11 is the last row)
    ssd, count = pair_ssd(a, b, (0, 5), (7, 10), 2)
    want = sum(float(np.sum((a[5 + dy, 0 + dx] - b[10 + dy, 7 + dx]) ** 2)) for dy in range(-2, 2) for dx in range(0, 3))
    assert count == 12 and ssd == pytest.approx(want)
    # the metric divides a clipped pair's sum by its pixel count (mean per pixel), not by (2g+1)^2
    s = _sample(_img((a * 255).round()), [((0, 5), (7, 10))])
    res = _img((b * 255).round())
    fa, fb = np.asarray(s.image, float) / 255, np.asarray(res, float) / 255
    want = sum(float(np.sum((fa[5 + dy, dx] - fb[10 + dy, 7 + dx]) ** 2)) for dy in range(-2, 2) for dx in range(3)) / 12
    assert _dai("2").score(s, res, None)["dai_2"] == pytest.approx(want)
    # a patch entirely inside gives exactly the official number
    inside = _dai("1").score(_sample(s.image, [((4, 4), (9, 6))]), res, None)["dai_1"]
    assert inside == pytest.approx(_official(fa, fb, [((4, 4), (9, 6))], 1))


def test_result_of_another_size_is_refused():
    s = _sample(_img(np.zeros((8, 10, 3))), [((2, 2), (5, 5))])
    with pytest.raises(BadInputError, match="result is 12x8 but the original is 10x8"):
        _dai().score(s, _img(np.zeros((8, 12, 3))), None)


def test_rgba_and_grey_results_are_compared_as_rgb():
    s = _sample(_img(np.full((8, 8, 3), 100)), [((2, 2), (5, 5))])
    grey = Image.fromarray(np.full((8, 8), 100, np.uint8), "L")
    assert _dai("1").score(s, grey, None)["dai_1"] == 0.0
    assert _dai("1").score(s, s.image.convert("RGBA"), None)["dai_1"] == 0.0


def test_gammas_param_from_cli_string_and_validation():
    m = Dai(build_params("metric", Dai, {"gammas": "1, 3"}))
    assert m.gammas == (1, 3) and m.keys() == ["dai_1", "dai_3", "dai_pairmean_1", "dai_pairmean_3"]
    assert Dai().gammas == (1, 5, 10, 20)
    assert Dai(Dai.Params(gammas=(2, 4))).gammas == (2, 4)
    assert parse_gammas("20,1") == (20, 1)
    for bad in ("a,b", "-1", "1,1", ""):
        with pytest.raises(ConfigError, match="metric.gammas"):
            build_params("metric", Dai, {"gammas": bad})


def test_aggregate_is_the_mean_over_samples_that_have_the_key():
    rows = [{"dai_1": 1.0, "dai_5": 2.0}, {"dai_1": 3.0}, {"dai_1": float("nan")}]
    assert Dai().aggregate(rows) == {"dai_1": 2.0, "dai_5": 2.0}


def test_contract_and_registration():
    from gooddrag.core.registry import default_registry
    from gooddrag.testing import check_component, check_metric

    assert default_registry().get("metric", "dai") is Dai
    check_component("metric", Dai)
    s = _sample(_img(np.random.default_rng(0).integers(0, 256, (24, 24, 3))), [((5, 5), (15, 12))])
    check_metric(Dai, s)
    Dai().check()  # needs nothing
