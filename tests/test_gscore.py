"""Tests for the ``gscore`` metric against a fake judge server on 127.0.0.1 (never the internet).

The OpenAI-compatible backend talks plain HTTP to the fake; the Gemini backend uses the real
google-genai SDK with its ``base_url`` pointed at the same fake (skipped where the SDK is absent).
"""

from __future__ import annotations

import base64
import io
import json
import math
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from gooddrag.core.errors import GoodDragError, RequirementError
from gooddrag.core.registry import Registry, make_plugin_manager
from gooddrag.core.samples import Sample
from gooddrag.plugins.metrics import gscore as gs_mod
from gooddrag.plugins.metrics.gscore import DEFAULT_PROMPT, GScore, parse_score

try:
    import google.genai  # noqa: F401

    HAVE_GENAI = True
except Exception:  # pragma: no cover - depends on the environment
    HAVE_GENAI = False


class FakeJudge:
    """A scripted HTTP judge. ``script`` holds (status, reply text or error body) per request;
    when it runs out, ``default`` is replied. Requests are recorded."""

    def __init__(self):
        self.script: list[tuple[int, str]] = []
        self.default = (200, "5")
        self.requests: list[dict] = []
        self.redirect_to = ""  # answer every request with 302 to this URL
        judge = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # where a followed redirect arrives
                judge.requests.append({"path": self.path, "headers": dict(self.headers), "body": None,
                                       "method": "GET"})
                self._reply(*judge.default)

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
                judge.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                if judge.redirect_to:
                    self.send_response(302)
                    self.send_header("Location", judge.redirect_to + self.path)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self._reply(*(judge.script.pop(0) if judge.script else judge.default))

            def _reply(self, status, text):
                if status != 200:
                    out = json.dumps({"error": {"code": status, "message": text, "status": "ERR"}})
                elif ":generateContent" in self.path:
                    out = json.dumps({"candidates": [{"content": {"role": "model", "parts": [{"text": text}]},
                                                      "finishReason": "STOP"}]})
                else:
                    out = json.dumps({"id": "x", "object": "chat.completion", "choices": [
                        {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}]})
                data = out.encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def judge(monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setattr(gs_mod, "RETRY_BASE_S", 0.0)
    j = FakeJudge()
    yield j
    j.close()


@pytest.fixture
def keys(monkeypatch):
    for env in ("GEMINI_API_KEY", "GOOGLE_API_KEY", "OPENAI_API_KEY", "MY_JUDGE_KEY"):
        monkeypatch.delenv(env, raising=False)
    return monkeypatch


def result_image() -> Image.Image:
    img = Image.new("RGB", (40, 24), (200, 30, 30))
    img.putpixel((3, 4), (0, 255, 0))
    return img


SAMPLE = Sample(id="animals/cat_1", group="animals", image=Image.new("RGB", (40, 24)), mask=None,
                pairs=(((1.0, 1.0), (5.0, 5.0)),), prompt="a cat")


def openai_metric(judge, tmp_path, **kw) -> GScore:
    kw.setdefault("repeats", 4)
    return GScore(GScore.Params(backend="openai", base_url=judge.url + "/v1", model="judge-vl",
                                replies_dir=str(tmp_path / "replies"), **kw))


# --- parsing ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("reply, want", [
    ("7", 7.0), ("7\n", 7.0), ("**9**", 9.0), ("10", 10.0), ("1", 1.0),
    ("Score: 8/10", 8.0), ("8/10 - natural, with 2 small artifacts", 8.0),
    ("I would rate this image 6 out of 10.", 6.0),
    ("On a scale of 1 to 10, I'd give it a 7.", 7.0),
    ("On a scale from 1-10: 4", 4.0), ("The image scores 3 (on a 1–10 scale).", 3.0),
    ("Rating: 7.5", 7.5), ("There are 2 dogs. Rating: 6", 6.0),
    ("0", None), ("11", None), ("-3", None), ("I cannot rate this image.", None), ("", None), (None, None),
])
def test_parse_score(reply, want):
    assert parse_score(reply) == want


# --- OpenAI-compatible backend ---------------------------------------------------------------------


def test_openai_backend_mean_std_failures_and_saved_replies(judge, keys, tmp_path):
    keys.setenv("OPENAI_API_KEY", "sk-test")
    judge.script = [(200, "7"), (200, "Score: 9/10"), (200, "I cannot rate this"), (200, "8")]
    m = openai_metric(judge, tmp_path)
    m.check()
    row = m.score(SAMPLE, result_image(), None)
    assert row["gscore"] == pytest.approx(8.0)
    assert row["gscore_std"] == pytest.approx(math.sqrt(2 / 3))  # population std of 7, 9, 8
    assert row["gscore_n"] == 3 and row["gscore_failed"] == 1  # a failure, not a zero

    assert len(judge.requests) == 4
    req = judge.requests[0]
    assert req["path"] == "/v1/chat/completions"
    assert req["headers"]["Authorization"] == "Bearer sk-test"
    body = req["body"]
    assert body["model"] == "judge-vl" and "temperature" not in body
    text, image = body["messages"][0]["content"]
    assert text == {"type": "text", "text": DEFAULT_PROMPT}
    url = image["image_url"]["url"]
    assert url.startswith("data:image/png;base64,")
    sent = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert sent.size == (40, 24) and sent.convert("RGB").getpixel((3, 4)) == (0, 255, 0)

    lines = [json.loads(x) for x in (tmp_path / "replies" / "gscore_replies.jsonl").read_text().splitlines()]
    assert [x["reply"] for x in lines] == ["7", "Score: 9/10", "I cannot rate this", "8"]
    assert [x["score"] for x in lines] == [7.0, 9.0, None, 8.0]
    assert all(x["sample"] == "animals/cat_1" and x["model"] == "judge-vl" for x in lines)
    assert lines[2]["error"] and lines[0]["raw"]["choices"][0]["message"]["content"] == "7"
    assert m.replies["animals/cat_1"] == lines


def test_openai_params_reach_the_request(judge, keys, tmp_path):
    keys.setenv("MY_JUDGE_KEY", "k2")
    m = openai_metric(judge, tmp_path, repeats=1, temperature=0.7, max_tokens=16, prompt="Rate it.",
                      api_key_env="MY_JUDGE_KEY")
    m.check()
    assert m.score(SAMPLE, result_image(), None)["gscore"] == 5.0
    body = judge.requests[0]["body"]
    assert body["temperature"] == 0.7 and body["max_tokens"] == 16
    assert body["messages"][0]["content"][0]["text"] == "Rate it."
    assert judge.requests[0]["headers"]["Authorization"] == "Bearer k2"


def test_retries_transient_errors(judge, keys, tmp_path):
    keys.setenv("OPENAI_API_KEY", "sk")
    judge.script = [(503, "overloaded"), (429, "slow down"), (200, "6")]
    m = openai_metric(judge, tmp_path, repeats=1, retries=2)
    assert m.score(SAMPLE, result_image(), None)["gscore"] == 6.0
    assert m.replies[SAMPLE.id][0]["attempts"] == 3


def test_bad_key_and_bad_model_raise(judge, keys, tmp_path):
    keys.setenv("OPENAI_API_KEY", "wrong")
    judge.script = [(401, "invalid api key")]
    with pytest.raises(RequirementError, match="OPENAI_API_KEY.*HTTP 401"):
        openai_metric(judge, tmp_path).score(SAMPLE, result_image(), None)
    judge.script = [(404, "model judge-vl not found")]
    with pytest.raises(GoodDragError, match="HTTP 404: model judge-vl not found"):
        openai_metric(judge, tmp_path).score(SAMPLE, result_image(), None)


def test_unreachable_judge_is_an_error_not_a_score(keys, tmp_path, monkeypatch):
    monkeypatch.setattr(gs_mod, "RETRY_BASE_S", 0.0)
    keys.setenv("OPENAI_API_KEY", "sk")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    m = GScore(GScore.Params(backend="openai", base_url=f"http://127.0.0.1:{port}/v1", model="x", repeats=2,
                             retries=1, timeout=5, replies_dir=str(tmp_path)))
    with pytest.raises(GoodDragError, match="every request"):
        m.score(SAMPLE, result_image(), None)
    lines = (tmp_path / "gscore_replies.jsonl").read_text().splitlines()
    assert len(lines) == 2 and all(json.loads(x)["error"] for x in lines)


def test_default_replies_dir_is_under_the_cache(keys, tmp_path):
    keys.setenv("GOODDRAG_CACHE", str(tmp_path))
    assert GScore().replies_path() == tmp_path / "gscore" / "gscore_replies.jsonl"


# --- Gemini backend (google-genai SDK) -------------------------------------------------------------


@pytest.mark.skipif(not HAVE_GENAI, reason="google-genai not installed (pip install 'gooddrag[gscore]')")
def test_gemini_backend_through_the_sdk(judge, keys, tmp_path):
    keys.setenv("GEMINI_API_KEY", "g-key")
    judge.script = [(200, "8"), (503, "busy"), (200, "Rating: 6"), (200, "no idea")]
    m = GScore(GScore.Params(base_url=judge.url, repeats=3, temperature=1.0, replies_dir=str(tmp_path)))
    m.check()
    row = m.score(SAMPLE, result_image(), None)
    assert row == pytest.approx({"gscore": 7.0, "gscore_std": 1.0, "gscore_n": 2.0, "gscore_failed": 1.0})
    req = judge.requests[0]
    assert req["path"].endswith("/models/gemini-2.5-flash:generateContent")
    assert req["headers"].get("x-goog-api-key") == "g-key"
    parts = req["body"]["contents"][0]["parts"]
    blob = parts[0].get("inlineData") or parts[0].get("inline_data")
    data = blob["data"] + "=" * (-len(blob["data"]) % 4)  # the SDK sends url-safe base64
    assert Image.open(io.BytesIO(base64.urlsafe_b64decode(data))).size == (40, 24)
    assert parts[1]["text"] == DEFAULT_PROMPT
    assert req["body"]["generationConfig"]["temperature"] == 1.0
    replies = [r["reply"] for r in m.replies[SAMPLE.id]]
    assert replies == ["8", "Rating: 6", "no idea"]
    assert [r["attempts"] for r in m.replies[SAMPLE.id]] == [1, 2, 1]  # our retry, not the SDK's
    judge.script = [(403, "API key not valid")]
    with pytest.raises(RequirementError, match="GEMINI_API_KEY or GOOGLE_API_KEY.*HTTP 403"):
        m.score(SAMPLE, result_image(), None)


# --- requirements, aggregation, registration ----------------------------------------------------------


def test_check_refusals(keys, monkeypatch):
    with pytest.raises(RequirementError) as exc:
        GScore().check()
    msg = str(exc.value)
    assert "\n" not in msg and "GEMINI_API_KEY or GOOGLE_API_KEY" in msg
    keys.setenv("GOOGLE_API_KEY", "k")
    if HAVE_GENAI:
        GScore().check()
    monkeypatch.setitem(sys.modules, "google.genai", None)
    with pytest.raises(RequirementError, match=r"pip install 'gooddrag\[gscore\]'"):
        GScore().check()

    with pytest.raises(RequirementError, match="gscore.model=NAME"):
        GScore(GScore.Params(backend="openai")).check()
    with pytest.raises(RequirementError, match="OPENAI_API_KEY"):
        GScore(GScore.Params(backend="openai", model="m")).check()
    keys.setenv("OPENAI_API_KEY", "k")
    GScore(GScore.Params(backend="openai", model="m", base_url="http://host:8000/v1")).check()
    with pytest.raises(RequirementError, match="http"):
        GScore(GScore.Params(backend="openai", model="m", base_url="host:8000")).check()


def test_aggregate():
    rows = [
        {"gscore": 8.0, "gscore_std": 1.0, "gscore_n": 10.0, "gscore_failed": 0.0},
        {"gscore": 6.0, "gscore_std": 0.0, "gscore_n": 8.0, "gscore_failed": 2.0},
        {"gscore": float("nan"), "gscore_std": float("nan"), "gscore_n": 0.0, "gscore_failed": 10.0},
        {"md": 1.0},
    ]
    out = GScore().aggregate(rows)
    assert out == {"gscore": 7.0, "gscore_std": 0.5, "gscore_n": 18.0, "gscore_failed": 12.0,
                   "gscore_samples": 2.0}


def test_registered_through_the_hook():
    reg = Registry(make_plugin_manager([gs_mod], entry_points=False))
    assert reg.get("metric", "gscore") is GScore and GScore.__doc__
    assert GScore.Params().repeats == 10


def test_contract_suite(judge, keys, tmp_path):
    import attrs

    from gooddrag.core.params import p
    from gooddrag.testing import check_component, check_metric

    check_component("metric", GScore)  # no key: refused in one line
    keys.setenv("OPENAI_API_KEY", "sk")
    url, replies = judge.url + "/v1", str(tmp_path)

    class LocalJudge(GScore):
        """GScore against the fake judge."""

        @attrs.frozen(kw_only=True)
        class Params(GScore.Params):
            backend: str = p("openai", "backend")
            base_url: str = p(url, "url")
            model: str = p("judge", "model")
            repeats: int = p(2, "repeats")
            replies_dir: str = p(replies, "replies")

    check_metric(LocalJudge, SAMPLE, result_image())


# --- credentials: redirects, echoed keys, recorded URLs, plain http ------------------------------------


@pytest.fixture
def other_host(judge):
    """A second judge (another origin) that a redirect points to."""
    j = FakeJudge()
    j.default = (200, "9")
    yield j
    j.close()


def test_openai_redirect_is_an_error_and_the_key_goes_nowhere_else(judge, other_host, keys, tmp_path):
    keys.setenv("OPENAI_API_KEY", "sk-secret-123")
    judge.redirect_to = other_host.url
    m = openai_metric(judge, tmp_path, repeats=1)
    with pytest.raises(GoodDragError) as exc:
        m.score(SAMPLE, result_image(), None)
    msg = str(exc.value)
    assert "HTTP 302" in msg and "redirect" in msg and "gscore.base_url" in msg and "\n" not in msg
    assert other_host.requests == []  # not followed: the key never left for the other host
    assert "sk-secret-123" not in msg


@pytest.mark.skipif(not HAVE_GENAI, reason="google-genai not installed (pip install 'gooddrag[gscore]')")
def test_gemini_redirect_is_an_error_and_the_key_goes_nowhere_else(judge, other_host, keys, tmp_path):
    keys.setenv("GEMINI_API_KEY", "g-secret-123")
    judge.redirect_to = other_host.url
    m = GScore(GScore.Params(base_url=judge.url, repeats=1, retries=0, replies_dir=str(tmp_path)))
    with pytest.raises(GoodDragError, match="HTTP 302.*redirect"):
        m.score(SAMPLE, result_image(), None)
    assert other_host.requests == []


def test_a_reply_or_error_echoing_the_key_is_redacted(judge, keys, tmp_path):
    keys.setenv("OPENAI_API_KEY", "sk-secret-123")
    judge.script = [(200, "7, and your key is sk-secret-123"), (503, "bad key sk-secret-123"), (200, "8")]
    m = openai_metric(judge, tmp_path, repeats=2, retries=1)
    row = m.score(SAMPLE, result_image(), None)
    assert row["gscore"] == pytest.approx(7.5)
    saved = (tmp_path / "replies" / "gscore_replies.jsonl").read_text()
    assert "sk-secret-123" not in saved and "[redacted]" in saved
    assert "sk-secret-123" not in json.dumps(m.replies)
    judge.script = [(400, "key sk-secret-123 is not allowed here")]
    with pytest.raises(GoodDragError) as exc:
        m.score(SAMPLE, result_image(), None)
    assert "sk-secret-123" not in str(exc.value) and "[redacted]" in str(exc.value)


def test_recorded_base_url_has_no_credentials(keys, tmp_path):
    from gooddrag.app.bench.results import build_summary, new_row, score_row

    class Fixed(GScore):
        def score(self, sample, result, final_points=None):
            return {"gscore": 5.0, "gscore_std": 0.0, "gscore_n": 1.0, "gscore_failed": 0.0}

    m = Fixed(GScore.Params(backend="openai", model="m", base_url="https://alice:pw-secret@judge.example/v1"))
    row = new_row(SAMPLE)
    score_row(row, [m], SAMPLE, result_image(), None, tmp_path / "scores.json", "k")
    summary = build_summary([row], [m], command="score", dataset={}, config=None)
    text = json.dumps(summary) + (tmp_path / "scores.json").read_text()
    assert "pw-secret" not in text and "alice" not in text
    assert summary["metrics"]["gscore"]["params"]["base_url"] == "https://judge.example/v1"


def test_plain_http_to_a_remote_host_warns_once(keys, capsys, monkeypatch):
    monkeypatch.setattr(gs_mod, "_warned_plain_http", set())
    keys.setenv("OPENAI_API_KEY", "k")
    GScore(GScore.Params(backend="openai", model="m", base_url="http://127.0.0.1:8000/v1")).check()
    GScore(GScore.Params(backend="openai", model="m", base_url="https://judge.example/v1")).check()
    assert capsys.readouterr().err == ""
    for _ in range(2):
        GScore(GScore.Params(backend="openai", model="m", base_url="http://judge.example:8000/v1")).check()
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("warning: gscore sends the API key to judge.example over plain http://")
