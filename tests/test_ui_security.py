"""The `gooddrag ui` server's limits (issue 24, item 5): upload size, same-origin writes, the file
route's allow-list, the LoRA path folders, and no uploads left behind. A real server on a free
loopback port; no model is loaded (the model loads on the first edit)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

gr = pytest.importorskip("gradio")
httpx = pytest.importorskip("httpx")

from gooddrag.core.errors import BadInputError  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from gooddrag.app.ui import launch
    from gooddrag.app.ui.page import UiSettings
    from gooddrag.core.config import LoadOptions

    root = tmp_path_factory.mktemp("ui")
    (root / "out").mkdir()
    (root / "out" / "secret.txt").write_text("not for the browser")  # another file in the --out tree
    settings = UiSettings(load=LoadOptions(model="tiny-random", device="cpu"), width=32, out=root / "out",
                          samples=root / "samples")
    port = _free_port()
    page = launch(settings, host="127.0.0.1", port=port, block=False, quiet=True, max_upload_mb=0.05)
    try:
        yield {"base": f"http://127.0.0.1:{port}", "host": f"127.0.0.1:{port}", "root": root, "page": page}
    finally:
        page.close()


def _upload(server, data: bytes = b"x" * 100, **headers):
    return httpx.post(f"{server['base']}/gradio_api/upload", files={"files": ("a.png", data, "image/png")},
                      headers=headers, timeout=30)


def test_cross_origin_writes_are_refused_and_same_origin_ones_work(server):
    evil = _upload(server, origin="http://evil.example")
    assert evil.status_code == 403 and "origin 'http://evil.example' is not this page's" in evil.text
    assert _upload(server, **{"sec-fetch-site": "cross-site"}).status_code == 403
    queue = httpx.post(f"{server['base']}/gradio_api/queue/join", json={}, headers={"origin": "http://evil.example"})
    assert queue.status_code == 403
    assert _upload(server, origin="null").status_code == 403
    ok = _upload(server, origin=f"http://{server['host']}")
    assert ok.status_code == 200, ok.text


def test_a_foreign_host_is_refused(server):
    r = httpx.get(f"{server['base']}/", headers={"host": "rebound.example:80"})
    assert r.status_code == 403 and "host 'rebound.example:80' is not this server" in r.text


def test_uploads_have_a_size_limit(server):
    r = _upload(server, data=b"x" * 60_000, origin=f"http://{server['host']}")  # over 0.05 MB
    assert r.status_code == 413, (r.status_code, r.text)


def test_the_file_route_serves_only_this_servers_files(server):
    secret = server["root"] / "out" / "secret.txt"
    r = httpx.get(f"{server['base']}/gradio_api/file={secret}")
    assert r.status_code == 403 and "not a file of this server" in r.text
    r = httpx.get(f"{server['base']}/gradio_api/file={server['root'] / 'out' / '..' / 'out' / 'secret.txt'}")
    assert r.status_code == 403
    uploaded = _upload(server, data=b"hello", origin=f"http://{server['host']}").json()[0]
    r = httpx.get(f"{server['base']}/gradio_api/file={uploaded}")
    assert r.status_code == 200 and r.content == b"hello"


def test_the_lora_path_reads_only_the_given_folders(tmp_path):
    from gooddrag.app.ui.security import check_lora_path

    allowed = tmp_path / "loras"
    (allowed / "mine").mkdir(parents=True)
    assert check_lora_path(str(allowed / "mine"), [allowed]) == str((allowed / "mine").resolve())
    (tmp_path / "link").symlink_to("/etc")
    msgs = []
    for probe in ("/etc/passwd", "/no/such/file", str(allowed / ".." / "elsewhere"), str(tmp_path / "link" / "passwd")):
        with pytest.raises(BadInputError) as exc:
            check_lora_path(probe, [allowed])
        msgs.append(str(exc.value).replace(repr(probe), "P"))
    assert len(set(msgs)) == 1  # the same answer whether the file exists or not: no file oracle
    with pytest.raises(BadInputError, match="none: start the server with --lora-dir DIR"):
        check_lora_path("/etc/passwd", [])


def test_uploads_are_removed_when_the_server_stops(tmp_path):
    import os

    from gooddrag.app.ui import launch
    from gooddrag.app.ui.page import UiSettings
    from gooddrag.core.config import LoadOptions

    before = os.environ.get("GRADIO_TEMP_DIR")
    settings = UiSettings(load=LoadOptions(model="tiny-random", device="cpu"), width=32, out=tmp_path / "out",
                          samples=tmp_path / "samples")
    port = _free_port()
    page = launch(settings, host="127.0.0.1", port=port, block=False, quiet=True)
    try:
        path = httpx.post(f"http://127.0.0.1:{port}/gradio_api/upload",
                          files={"files": ("a.png", b"abc", "image/png")}, timeout=30).json()[0]
        assert Path(path).is_file()
    finally:
        page.close()
    assert not Path(path).exists() and os.environ.get("GRADIO_TEMP_DIR") == before
