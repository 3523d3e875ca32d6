"""The layout's rules, read from the source: arrows only run down.

    app/ (front-ends)          -> anything below
    testing/                   -> core, strategies, plugins (never app)
    plugins/                   -> core and other plugins
    schedules/ losses/ trackers/ (strategies) -> core only, never another strategy
    core/                      -> core only; no diffusers, peft, transformers, typer, gradio or ray
    diffusers, peft, transformers: only plugins/backbones/ (and testing/'s tiny models, app's log settings)

Every ``import`` counts, including the lazy ones inside functions.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STRATEGIES = ("schedules", "losses", "trackers")
#: third-party packages that only the backbone plugins may import (besides the tiny test models in
#: testing/ and the front-ends' log settings)
MODEL_LIBS = {"diffusers", "peft", "transformers", "accelerate", "xformers"}
FRONT_END_LIBS = {"typer", "click", "gradio", "ray"}


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module) of every import in ``path``; relative imports resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = ["gooddrag", *path.relative_to(ROOT).parent.parts]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.append((node.lineno, mod))
            if mod == "gooddrag" or mod.endswith((".schedules", ".losses", ".trackers", ".plugins")):
                out += [(node.lineno, f"{mod}.{a.name}") for a in node.names]  # from gooddrag.x import module
    return out


def floor(parts: tuple[str, ...]) -> str:
    """The floor of a file (by its path relative to the root) or a gooddrag module (by its dotted parts)."""
    top = parts[0] if parts else ""
    if top in STRATEGIES:
        return "strategy"
    if top in ("core", "plugins", "app", "testing"):
        return top
    return "root"


PACKAGE_DIRS = ("core", "schedules", "losses", "trackers", "plugins", "app", "testing")


def sources() -> list[Path]:
    """Every module of the package: the root __init__ and the subpackages (not build/, tests/, ...)."""
    return sorted([ROOT / "__init__.py", *(p for d in PACKAGE_DIRS for p in (ROOT / d).rglob("*.py"))])


def violation(path: Path, module: str) -> str | None:
    """Why importing ``module`` from ``path`` breaks the layout, or None."""
    rel = path.relative_to(ROOT).parts
    here = floor(rel)
    lib = module.split(".")[0]
    if lib != "gooddrag":
        if lib in MODEL_LIBS and not (rel[:2] == ("plugins", "backbones") or here in ("app", "testing")):
            return f"{lib} belongs in plugins/backbones/"
        if lib in FRONT_END_LIBS and here in ("core", "strategy", "plugins") and not (lib == "ray" and rel[:2] == ("plugins", "runners")):
            return f"{lib} belongs to the front-ends (app/)"
        return None
    target_parts = tuple(module.split(".")[1:])
    there = floor(target_parts)
    if there == "root":
        return None if here in ("app", "root") else "only the front-ends may import the package root"
    allowed = {
        "root": {"core"},
        "core": {"core"},
        "strategy": {"core", "strategy"},
        "plugins": {"core", "plugins"},
        "testing": {"core", "strategy", "plugins", "testing"},
        "app": {"core", "strategy", "plugins", "testing", "app"},
    }[here]
    if there not in allowed:
        return f"{here} may not import {there}"
    if here == there == "strategy" and target_parts != (*rel[:-1], Path(rel[-1]).stem):
        return "a strategy imports no other strategy"
    return None


def test_the_scan_sees_the_whole_package():
    found = {p.relative_to(ROOT).parts[0] for p in sources()}
    assert {"core", "plugins", "app", "testing", "schedules", "losses", "trackers"} <= found
    assert len(sources()) > 40


def test_arrows_only_run_down():
    bad = [f"{p.relative_to(ROOT)}:{line}: imports {mod} ({why})"
           for p in sources() for line, mod in imports(p) if (why := violation(p, mod))]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("path, module, expected", [
    ("core/editor.py", "gooddrag.plugins.metrics.dai", "core may not import plugins"),
    ("core/editor.py", "diffusers", "diffusers belongs in plugins/backbones/"),
    ("core/editor.py", "typer", "typer belongs to the front-ends (app/)"),
    ("losses/info_preserving.py", "gooddrag.trackers.nearest", "a strategy imports no other strategy"),
    ("schedules/aldd.py", "gooddrag.schedules.single_step", "a strategy imports no other strategy"),
    ("schedules/aldd.py", "gooddrag.plugins.presets", "strategy may not import plugins"),
    ("plugins/presets.py", "gooddrag.app.cli", "plugins may not import app"),
    ("plugins/presets.py", "gooddrag.schedules.aldd", "plugins may not import strategy"),
    ("plugins/metrics/md.py", "diffusers", "diffusers belongs in plugins/backbones/"),
    ("testing/__init__.py", "gooddrag.app.cli", "testing may not import app"),
    ("core/registry.py", "gooddrag", "only the front-ends may import the package root"),
])
def test_the_rule_catches_each_kind_of_wrong_arrow(path, module, expected):
    assert violation(ROOT / path, module) == expected


@pytest.mark.parametrize("path, module", [
    ("app/cli.py", "gooddrag.app.outputs.files"),
    ("schedules/aldd.py", "gooddrag.core.engine"),
    ("plugins/backbones/stable_diffusion.py", "diffusers"),
    ("plugins/metrics/md.py", "gooddrag.plugins.backbones.components"),
    ("testing/__init__.py", "gooddrag.plugins.backbones.tiny_pipeline"),
])
def test_the_rule_allows_the_downward_arrows(path, module):
    assert violation(ROOT / path, module) is None


def test_relative_imports_are_resolved(tmp_path):
    assert ("gooddrag.core.engine" in {m for _, m in imports(ROOT / "schedules" / "aldd.py")})


def test_importing_the_editor_loads_no_model_or_front_end_library():
    code = ("import sys, gooddrag.core.editor, gooddrag.core.config, gooddrag.core.registry\n"
            "from gooddrag import Editor, EditResult\n"
            "bad = sorted(m for m in ('diffusers', 'peft', 'transformers', 'typer', 'gradio', 'ray') if m in sys.modules)\n"
            "print(','.join(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""


def test_the_cli_starts_without_torch():
    """`gooddrag --version` must stay instant: the package root imports the Editor lazily."""
    code = "import sys; from gooddrag.app import cli; import gooddrag; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
