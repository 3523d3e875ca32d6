"""Library chatter off: diffusers, transformers and the hub print warnings, info lines and progress
bars that say nothing about an edit. ``Editor.from_pretrained`` calls this unless ``verbose=True``."""

from __future__ import annotations

import logging
import os
import warnings

LIBRARIES = ("diffusers", "transformers", "huggingface_hub", "peft", "accelerate")


def quiet_libraries() -> None:
    """For this process: the libraries' loggers at ERROR, their progress bars and FutureWarnings off.
    Set before they are imported where possible (transformers reads its level at import)."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for name in LIBRARIES:
        logging.getLogger(name).setLevel(logging.ERROR)
        warnings.filterwarnings("ignore", category=FutureWarning, module=name)
    try:
        import diffusers
        import huggingface_hub
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        diffusers.utils.logging.set_verbosity_error()
        diffusers.utils.logging.disable_progress_bar()
        huggingface_hub.utils.disable_progress_bars()
    except Exception:  # pragma: no cover - an older or missing library: nothing more to silence
        pass
