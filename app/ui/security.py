"""What the `gooddrag ui` server lets a browser do, and nothing more (docs/ui.md, "Server limits").

- Uploads are at most ``max_upload_mb`` (default 25 MB; ``gooddrag ui --max-upload-mb``).
- Only the page's own origin may change anything: a request other than GET/HEAD/OPTIONS whose
  ``Origin`` is not the ``Host`` it was sent to (a form on another web page posting to the upload or
  queue routes) is refused with 403, and so is one that the browser marks cross-site. Requests whose
  ``Host`` is not this server's name (DNS rebinding) are refused too while it listens on loopback.
- The file route (``/gradio_api/file=``) serves only what gradio itself keeps for this server (its
  upload and result cache, a fresh folder per server): never other files under ``--out``.
- The LoRA path field reads only inside the folders the server was started with (``--lora-dir``),
  with the same message whether or not the path exists, so it is no probe of the server's files.
- The upload and cache folder is removed when the server stops.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Sequence
from urllib.parse import unquote, urlsplit

from gooddrag.core.errors import BadInputError

#: the default upload limit in MB: a 4096 x 4096 PNG (the image-size limit) is at most about 50 MB
#: uncompressed, photos are a few MB
MAX_UPLOAD_MB = 25
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1", "[::1]"})
FILE_ROUTE = "/file="


def _host_name(host: str) -> str:
    """``"127.0.0.1:7860"`` -> ``"127.0.0.1"``; ``"[::1]:7860"`` -> ``"[::1]"``."""
    host = host.strip().lower()
    if host.startswith("["):
        return host.split("]", 1)[0] + "]"
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def request_refusal(method: str, headers: dict[str, str], listen_host: str) -> str | None:
    """Why a request must be refused (403), or None. ``headers`` have lower-case names."""
    host = headers.get("host", "")
    if listen_host in LOOPBACK and host and _host_name(host) not in LOOPBACK:
        return f"host {host!r} is not this server"
    if method.upper() in SAFE_METHODS:
        return None
    origin = headers.get("origin")
    if origin is None:
        if headers.get("sec-fetch-site") in ("cross-site", "same-site"):
            return "a cross-site request"
        return None  # not from a browser page (curl, the gradio client, tests)
    parts = urlsplit(origin)
    if origin == "null" or not parts.netloc or parts.netloc.lower() != host.lower():
        return f"origin {origin!r} is not this page's ({host})"
    return None


def file_route_refusal(path: str, served: Sequence[str]) -> str | None:
    """Why ``GET .../file=<path>`` must be refused, or None: only files under ``served`` (gradio's
    folders of this server) are served."""
    target = unquote(path.split(FILE_ROUTE, 1)[1]) if FILE_ROUTE in path else ""
    if not target:
        return None
    real = os.path.realpath(target)
    if any(real == s or real.startswith(s.rstrip(os.sep) + os.sep) for s in served):
        return None
    return "not a file of this server"


class ServerGuard:
    """ASGI middleware: :func:`request_refusal` for every request, :func:`file_route_refusal` for
    the file route. Mounted through the FastAPI app's ``middleware`` argument."""

    def __init__(self, app: Any, listen_host: str = "127.0.0.1", served: Sequence[str] = ()):
        self.app, self.listen_host = app, listen_host
        self.served = [os.path.realpath(s) for s in served]

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope.get("type") == "http":
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
            why = request_refusal(scope.get("method", "GET"), headers, self.listen_host)
            if why is None and FILE_ROUTE in scope.get("path", ""):
                why = file_route_refusal(scope["path"], self.served)
            if why is not None:
                from starlette.responses import PlainTextResponse

                await PlainTextResponse(f"refused: {why}", status_code=403)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def check_lora_path(path: str, folders: Iterable[Path]) -> str:
    """``path`` when it lies inside one of ``folders`` (after resolving links); otherwise one line
    that says so, the same whether the path exists or not."""
    folders = [Path(f) for f in folders]
    real = os.path.realpath(os.path.expanduser(path))
    for f in folders:
        root = os.path.realpath(f)
        if real == root or real.startswith(root.rstrip(os.sep) + os.sep):
            return real
    where = ", ".join(str(f) for f in folders) or "none: start the server with --lora-dir DIR"
    raise BadInputError(f"LoRA path {path!r} is not inside the folders this server may read LoRAs from ({where}); "
                        "put the LoRA there, or use auto/off")


class ServerFiles:
    """A fresh folder for gradio's uploads and result cache for the life of one server (so the file
    route has nothing else to serve, and nothing is left behind), removed by :meth:`cleanup`."""

    def __init__(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="gooddrag-ui-files-"))
        self._old = os.environ.get("GRADIO_TEMP_DIR")
        os.environ["GRADIO_TEMP_DIR"] = str(self.folder)  # read by gradio when components and the app are made

    def cleanup(self) -> None:
        if self._old is None:
            os.environ.pop("GRADIO_TEMP_DIR", None)
        else:
            os.environ["GRADIO_TEMP_DIR"] = self._old
        with contextlib.suppress(OSError):
            shutil.rmtree(self.folder, ignore_errors=True)
