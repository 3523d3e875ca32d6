"""The example third-party package is found through the real entry-point mechanism, listed by
``gooddrag plugins``, selectable by name, and passes the contract suite."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gooddrag.app import cli
from gooddrag.core.registry import default_registry
from gooddrag.testing import check_component

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "plugin-package"


@pytest.fixture
def example_installed(tmp_path, monkeypatch):
    """Expose the package as an installed distribution: a dist-info with its entry points on sys.path
    (what pip writes), so importlib.metadata and pluggy find it exactly as after `pip install`."""
    dist = tmp_path / "gooddrag_example-0.1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: gooddrag-example\nVersion: 0.1.0\n")
    (dist / "entry_points.txt").write_text("[gooddrag]\nexample = gooddrag_example.plugin\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.syspath_prepend(str(EXAMPLE))
    default_registry.cache_clear()
    yield
    default_registry.cache_clear()


def test_example_plugin_is_listed_and_selectable(example_installed, img, tmp_path, capsys):
    reg = default_registry()
    assert reg.owner("tracker", "cosine") == "example"
    assert reg.owner("loss", "l2-info-preserving") == "example"
    assert reg.owner("schedule", "strided-aldd") == "example"
    assert cli.main(["plugins", "--params"]) == 0
    out = capsys.readouterr().out
    assert "cosine" in out and "l2-info-preserving" in out and "strided-aldd" in out and "stride = 2" in out
    code = cli.main(["edit", str(img), "--points", "10,10:20,20", "--dry-run", "--loss", "l2-info-preserving",
                     "--tracker", "cosine", "--schedule", "strided-aldd", "-p", "loss.lam=0.5", "-p", "schedule.stride=3"])
    cfg = json.loads(capsys.readouterr().out)
    assert code == 0 and cfg["loss"] == "l2-info-preserving" and cfg["loss_params"]["lam"] == 0.5
    assert cfg["schedule_params"]["stride"] == 3 and cfg["tracker"] == "cosine"


def test_example_plugin_edits_end_to_end(example_installed, img, tmp_path, capsys):
    code = cli.main(["edit", str(img), "--points", "8,8:30,20", "--model", "tiny-random", "--lora", "off",
                     "--width", "32", "--schedule", "strided-aldd", "--loss", "l2-info-preserving",
                     "--tracker", "cosine", "-p", "schedule.num_inference_steps=10", "-p", "schedule.drag_timesteps=2",
                     "-p", "schedule.drags_per_timestep=1", "--trace", "--out", str(tmp_path / "o")])
    assert code == 0, capsys.readouterr().err
    run = json.loads((tmp_path / "o" / "run.json").read_text())
    # 10 steps (t = 901, 801, ...), strength 0.75 -> start index 2 (t=701); stride 2 -> indices 2 and 4
    assert run["drag_timesteps"] == [701, 501]
    steps = {json.loads(l)["timestep"] for l in (tmp_path / "o" / "trace.jsonl").read_text().splitlines()
             if '"step"' in l}
    assert steps == {701, 501}


def test_example_contract(example_installed):
    from gooddrag_example.cosine import CosineTracker
    from gooddrag_example.l2_loss import L2InfoPreserving
    from gooddrag_example.strided import StridedAlDD

    check_component("tracker", CosineTracker)
    check_component("loss", L2InfoPreserving)
    check_component("schedule", StridedAlDD)


@pytest.mark.parametrize("kind", ["schedule", "loss", "tracker"])
def test_every_builtin_passes_the_contract(kind):
    for _, comp in default_registry().items(kind):
        check_component(kind, comp)
