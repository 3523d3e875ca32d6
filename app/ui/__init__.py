"""`gooddrag ui`: the interactive drag editor in the browser (gradio, the optional extra ``gooddrag[ui]``).

``launch`` serves the page on localhost by default, never opens a public share link, and keeps one
loaded model per server process; ``page.py`` builds the page, ``controls.py`` turns each component's
``Params`` into controls, ``work.py`` runs edits and writes files (no gradio there).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from gooddrag.core.errors import RequirementError

EXTRA = "pip install 'gooddrag[ui]'"


def require_gradio() -> Any:
    """gradio, or a one-line RequirementError naming the extra."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # read when gradio is imported
    try:
        import gradio
    except ImportError:
        raise RequirementError(f"'gooddrag ui' needs gradio, the optional extra: {EXTRA}") from None
    return gradio


def build(settings: Any, registry: Any = None, pool: Any = None, host: str = "127.0.0.1") -> Any:
    """The page (not launched) for ``settings``; ``registry`` and ``pool`` default to the installed
    plugins and a fresh editor pool; ``host`` is where it will be served (the page warns when that
    is not this machine only)."""
    require_gradio()
    from gooddrag.app.ui.page import build_page
    from gooddrag.app.ui.work import EditorPool
    from gooddrag.core.registry import default_registry

    registry = registry or default_registry()
    return build_page(settings, registry, pool or EditorPool(registry), host=host)


def launch(settings: Any, *, host: str = "127.0.0.1", port: int | None = 7860, registry: Any = None,
           pool: Any = None, block: bool = True, quiet: bool = False, max_upload_mb: float | None = None) -> Any:
    """Serve the editor on ``host:port`` (local only unless a host says otherwise; never a share link).
    With ``block=False`` it returns the running page (``page.close()`` stops it). The server's limits
    (upload size, same-origin writes, the files it serves; app/ui/security.py) are set here."""
    from starlette.middleware import Middleware

    from gooddrag.app.ui.page import CSS
    from gooddrag.app.ui.security import MAX_UPLOAD_MB, ServerFiles, ServerGuard

    files = ServerFiles()  # before the page is built: its components keep their cache folder
    try:
        page = build(settings, registry, pool, host=host)
        page.queue(default_concurrency_limit=1)
        mb = MAX_UPLOAD_MB if max_upload_mb is None else max_upload_mb
        page.launch(server_name=host, server_port=port, share=False, inbrowser=False, prevent_thread_lock=not block,
                    show_error=False, quiet=quiet, ssr_mode=False, mcp_server=False,
                    footer_links=["gradio", "settings"], css=CSS, allowed_paths=[str(Path(settings.out).resolve())],
                    max_file_size=int(mb * 1024 * 1024),
                    app_kwargs={"middleware": [Middleware(ServerGuard, listen_host=host, served=[str(files.folder)])]})
    except BaseException:
        files.cleanup()
        raise
    if block:
        files.cleanup()
        return page
    close = page.close

    def close_and_clean(*args: Any, **kwargs: Any) -> Any:
        try:
            return close(*args, **kwargs)
        finally:
            files.cleanup()

    page.close = close_and_clean
    return page


def default_out() -> Path:
    """Where results go when ``--out`` is not given: a fresh folder under the system temp dir."""
    return Path(tempfile.mkdtemp(prefix="gooddrag-ui-"))
