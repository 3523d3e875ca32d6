"""A broken plugin costs only itself: every plugin mistake is one line naming the plugin and what was
expected, and everything else keeps working. The broken package (tests/fixtures/broken_plugins) is
exposed through a real dist-info with entry points, as after `pip install`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gooddrag.app import cli
from gooddrag.core.registry import default_registry
from gooddrag.testing import ContractError, check_component

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "broken_plugins"
FAST = ["--model", "tiny-random", "--lora", "off", "--width", "32", "-p", "schedule.num_inference_steps=10",
        "-p", "schedule.drag_timesteps=1", "-p", "schedule.drags_per_timestep=1"]


@pytest.fixture
def install(tmp_path, monkeypatch):
    """install(name=module, ...) exposes gooddrag_broken.<module> under entry-point name ``name``."""

    def _install(**eps: str) -> None:
        dist = tmp_path / "gooddrag_broken-0.1.0.dist-info"
        dist.mkdir(exist_ok=True)
        (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: gooddrag-broken\nVersion: 0.1.0\n")
        lines = "".join(f"{name} = gooddrag_broken.{module}\n" for name, module in eps.items())
        (dist / "entry_points.txt").write_text("[gooddrag]\n" + lines)
        monkeypatch.syspath_prepend(str(tmp_path))
        monkeypatch.syspath_prepend(str(FIXTURE))
        default_registry.cache_clear()

    yield _install
    default_registry.cache_clear()


def run(args, capsys):
    code = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def warnings_of(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("warning: plugin")]


def test_broken_packages_cost_only_themselves(install, img, tmp_path, capsys):
    install(**{"bad-import": "bad_import", "typo": "typo_hook", "returns-class": "returns_class",
               "unmarked": "unmarked"})
    code, out, err = run(["plugins"], capsys)
    assert code == 0
    lines = warnings_of(err)
    assert len(lines) == 4, err  # one line per broken plugin, nothing else
    by_name = {n: next(l for l in lines if f"plugin {n!r}" in l) for n in ("bad-import", "typo", "returns-class", "unmarked")}
    assert ("importing gooddrag_broken.bad_import failed (ModuleNotFoundError: No module named "
            "'gooddrag_dependency_that_is_not_installed'); fix or reinstall that package") in by_name["bad-import"]
    assert ("it implements 'gooddrag_register_tracker', which is not a gooddrag hook; rename it (did you mean "
            "'gooddrag_register_trackers'?)") in by_name["typo"]
    assert ("gooddrag_register_trackers returned the class LonelyTracker; it must return a list of tracker classes; "
            "return [LonelyTracker]") in by_name["returns-class"]
    assert "'gooddrag_register_losses' is not marked as a hook implementation" in by_name["unmarked"]
    assert all(l.endswith(f"(or switch it off: --disable-plugin {n})") for n, l in by_name.items())
    for name in ("bad-import", "typo", "returns-class", "unmarked"):  # listed as broken
        row = next(l for l in out.splitlines() if f" {name} " in l)
        assert "broken" in row
    assert "Traceback" not in err

    # a built-in edit still works
    code, _, err = run(["edit", img, "--points", "8,8:30,20", *FAST, "--out", tmp_path / "o"], capsys)
    assert code == 0 and (tmp_path / "o" / "result.png").exists(), err

    # asking for the broken plugin's component fails in one line naming the plugin
    code, _, err = run(["edit", img, "--points", "8,8:30,20", *FAST, "--tracker", "lonely", "--out", tmp_path / "x"],
                       capsys)
    assert code == 2 and not (tmp_path / "x").exists()
    last = err.strip().splitlines()[-1]
    assert last == ("error: tracker 'lonely' comes from plugin 'returns-class', which failed to load: "
                    "gooddrag_register_trackers returned the class LonelyTracker; it must return a list of tracker "
                    "classes; return [LonelyTracker]")


def test_unknown_component_names_the_plugins_that_did_not_load(install, img, capsys):
    install(**{"bad-import": "bad_import"})
    code, _, err = run(["edit", img, "--points", "8,8:30,20", "--tracker", "cosine2", "--dry-run"], capsys)
    assert code == 2
    assert err.strip().splitlines()[-1] == ("error: unknown tracker 'cosine2'; available: nearest; plugins not loaded: "
                                            "'bad-import' (broken) (see 'gooddrag plugins')")


@pytest.mark.parametrize("how", ["flag", "env"])
def test_a_plugin_can_be_switched_off(install, capsys, monkeypatch, how):
    install(**{"bad-import": "bad_import"})
    args = ["plugins"]
    if how == "flag":
        args = ["--disable-plugin", "bad-import", "plugins"]
    else:
        monkeypatch.setenv("GOODDRAG_DISABLE_PLUGINS", "bad-import")
    code, out, err = run(args, capsys)
    assert code == 0 and not warnings_of(err), err
    row = next(l for l in out.splitlines() if " bad-import " in l)
    assert "disabled" in row


def test_disabling_an_unknown_plugin_says_what_is_installed(capsys):
    default_registry.cache_clear()
    code, _, err = run(["--disable-plugin", "nope", "plugins"], capsys)
    default_registry.cache_clear()
    assert code == 0
    assert "warning: --disable-plugin nope: no plugin of that name is installed; installed: aldd," in err


@pytest.mark.parametrize("tracker, got", [
    ("wrong-shape", "a torch.float32 tensor of shape (1, 1) on cpu"),
    ("wrong-device", "a torch.float32 tensor of shape (1, 2) on meta"),
])
def test_a_tracker_breaking_its_contract_fails_after_its_first_call(install, img, tmp_path, capsys, tracker, got):
    install(**{"bad-components": "bad_components"})
    code, _, err = run(["edit", img, "--points", "8,8:30,20", *FAST, "--tracker", tracker, "--trace",
                        "--out", tmp_path / "o"], capsys)
    assert code == 2 and not (tmp_path / "o").exists()
    assert err.strip().splitlines()[-1] == (
        f"error: tracker {tracker!r} (plugin 'bad-components') returned {got}; expected a torch.float32 tensor of "
        "shape (1, 2) on cpu, like the points it was given")


def test_a_loss_returning_a_tuple_fails_in_one_line(install, img, tmp_path, capsys):
    install(**{"bad-components": "bad_components"})
    code, _, err = run(["edit", img, "--points", "8,8:30,20", *FAST, "--loss", "tuple-loss", "--out", tmp_path / "o"],
                       capsys)
    assert code == 2 and not (tmp_path / "o").exists()
    assert err.strip().splitlines()[-1] == ("error: loss 'tuple-loss' (plugin 'bad-components') returned a tuple; "
                                            "expected gooddrag.core.engine.LossParts(total, motion, preserve)")


def test_contract_suite_says_what_was_expected_and_what_came_back(install):
    install(**{"bad-components": "bad_components"})
    from gooddrag_broken.bad_components import TupleLoss, WrongShapeTracker

    with pytest.raises(ContractError) as exc:
        check_component("tracker", WrongShapeTracker)
    assert str(exc.value) == ("tracker 'wrong-shape'.track(...): expected a torch.float32 tensor of shape (2, 2) on cpu "
                              "like its input points, got a torch.float32 tensor of shape (2, 1) on cpu")
    with pytest.raises(ContractError, match=r"loss 'tuple-loss' return value: expected LossParts\(total, motion, "
                                            r"preserve\), got a tuple$"):
        check_component("loss", TupleLoss)


def test_tracker_contract_allows_a_stated_tolerance():
    """A sub-pixel tracker that lands within TRACK_TOLERANCE of the planted feature passes; one
    that lands a whole pixel off fails, naming both positions."""
    import attrs

    from gooddrag.trackers.nearest import Nearest

    class SubPixel(Nearest):
        """Nearest, then a quarter-pixel refinement."""

        name = "sub-pixel"
        shift = 0.25

        def track(self, ref_vectors, feats, points):
            return super().track(ref_vectors, feats, points) + self.shift

    check_component("tracker", SubPixel)
    Off = type("Off", (SubPixel,), {"shift": 1.0, "__doc__": "Off by one."})
    with pytest.raises(ContractError, match=r"expected \[\[11.0, 12.0\], \[19.0, 6.0\]\] within 0.5 px, got "
                                            r"\[\[12.0, 13.0\], \[20.0, 7.0\]\]"):
        check_component("tracker", Off)
    assert attrs.has(SubPixel.Params)


def test_example_tracker_keeps_the_device_of_its_points():
    """The example plugin's clamp uses no host tensors, so it runs wherever the points live (meta
    tensors stand in for CUDA here: a CPU tensor mixed in raises on them)."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "plugin-package"))
    try:
        from gooddrag_example.cosine import CosineTracker
    finally:
        sys.path.pop(0)
    tracker = CosineTracker(CosineTracker.Params(radius=2))
    feats = torch.rand(1, 4, 16, 16, device="meta")
    out = tracker.track(torch.rand(1, 4, device="meta"), feats, torch.tensor([[3.0, 4.0]], device="meta"))
    assert out.device.type == "meta" and out.shape == (1, 2)
