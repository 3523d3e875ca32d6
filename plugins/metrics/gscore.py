"""GScore: a vision-language model judges how natural the edited image looks, 1-10.

The GoodDrag paper's protocol (it used Gemini Pro Vision): the judge sees the edited image alone,
rates its naturalness/quality from 1 to 10, ``repeats`` times (default 10) as independent
requests; a sample's GScore is the mean of the valid ratings, reported with their std.

Backends:
- ``gemini`` (default): Google's official ``google-genai`` SDK (``pip install 'gooddrag[gscore]'``),
  key from GEMINI_API_KEY or GOOGLE_API_KEY; ``base_url`` overrides the endpoint.
- ``openai``: any OpenAI-compatible ``/chat/completions`` endpoint (vLLM, llama.cpp server,
  LM Studio, OpenAI itself) over plain HTTP with the standard library; key from OPENAI_API_KEY
  (any non-empty value for a server without authentication).

Every request is saved: the raw reply text (and the response JSON) goes to
``<replies_dir>/gscore_replies.jsonl`` (one JSON object per request, appended as it arrives) and is
kept in memory in ``GScore.replies[sample_id]``. A reply without a rating in 1-10 counts as a
failure (``gscore_failed``), never as a zero.

Credentials: a redirect is never followed (it would carry the key to whatever host it names; it is a
one-line error instead), the key is replaced by ``[redacted]`` wherever a reply or an error echoes
it, and a key sent to a plain ``http://`` host other than localhost is warned about once.
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
import re
import time
import sys
import urllib.error
import urllib.parse
import urllib.request
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import attrs
from attrs.validators import ge, gt

from gooddrag.core.errors import GoodDragError, RequirementError
from gooddrag.core.hookspecs import hookimpl
from gooddrag.core.params import finite, p

DEFAULT_GEMINI_MODEL = "gemini-2.5-flash"
DEFAULT_OPENAI_URL = "https://api.openai.com/v1"
GEMINI_KEYS = ("GEMINI_API_KEY", "GOOGLE_API_KEY")
OPENAI_KEY = "OPENAI_API_KEY"
REPLIES_FILE = "gscore_replies.jsonl"
RETRY_BASE_S = 1.0  # first back-off; doubled per retry, capped at 30 s
RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}

DEFAULT_PROMPT = (
    "You are an expert judge of image quality. The image below was produced by an image-editing "
    "model that moved parts of a picture (for example, turned a head, stretched an object or "
    "opened a mouth). Rate how natural and realistic the image looks on a scale from 1 to 10, where "
    "1 means severely broken (distorted or melted shapes, duplicated or missing parts, smeared "
    "textures, obvious artifacts) and 10 means completely natural: it could be an unedited, "
    "high-quality photograph or artwork, with plausible shapes, consistent lighting and sharp, "
    "coherent details. Judge only the visual naturalness and quality, not the subject or the "
    "style. Answer with a single integer from 1 to 10 and nothing else."
)

_NUM = r"(?<![\w.])(-?\d+(?:\.\d+)?)"
_SCALE = re.compile(r"(?<![\w.])(?:from\s+|between\s+)?1\s*(?:-|–|—|to|and)\s*10(?![\w.])", re.I)
_OUT_OF = re.compile(_NUM + r"\s*(?:/|out\s+of)\s*10(?![\d.])", re.I)
_LABELLED = re.compile(r"\b(?:score|rating|rate|grade)\b[^0-9\n-]{0,24}" + _NUM, re.I)
_FIRST = re.compile(_NUM)


def parse_score(text: str | None) -> float | None:
    """The rating in a reply, or None (a failure). Mentions of the scale itself ("1-10", "1 to
    10") are ignored; "N/10" or "N out of 10" wins, then a number after "score"/"rating", then
    the first number. A value outside 1..10 is a failure, not clipped."""
    if not text:
        return None
    t = _SCALE.sub(" ", text.replace("*", " "))
    for pattern in (_OUT_OF, _LABELLED, _FIRST):
        m = pattern.search(t)
        if m:
            value = float(m.group(1))
            return value if 1.0 <= value <= 10.0 else None
    return None


def png_bytes(image: Any) -> bytes:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG")
    return buf.getvalue()


def _error_detail(body: str) -> str:
    """The message of an error body ({"error": {"message": ...}}, {"detail": ...}) or its start."""
    try:
        data = json.loads(body)
    except ValueError:
        return body
    if isinstance(data, dict):
        err = data.get("error", data)
        if isinstance(err, dict):
            for key in ("message", "detail", "msg"):
                if err.get(key):
                    return str(err[key])
        elif isinstance(err, str):
            return err
        if data.get("detail"):
            return str(data["detail"])
    return body


class _Transient(Exception):
    """A request failed in a way worth retrying (timeout, connection, HTTP 429/5xx)."""


REDACTED = "[redacted]"
_LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1"}
_warned_plain_http: set[str] = set()


def strip_userinfo(url: str) -> str:
    """``scheme://user:password@host/...`` -> ``scheme://host/...``: a URL fit to record or print."""
    return re.sub(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/@\s]*@", r"\1", url)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Never follow a redirect: it would resend the Authorization header to the host it names."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: D102
        return None  # urllib then raises the 3xx as an HTTPError


_OPENER = urllib.request.build_opener(_NoRedirect)


def _first_line(text: Any, limit: int = 200) -> str:
    s = str(text).strip().splitlines()
    return s[0][:limit] if s else ""


class GScore:
    """GScore: a vision-language model rates the result's naturalness 1-10, N times (default 10;
    Gemini by default, or an OpenAI-compatible server); mean and std of the valid ratings. Needs an
    API key. Higher is better."""

    name = "gscore"
    higher_is_better = True

    @attrs.frozen(kw_only=True)
    class Params:
        backend: Literal["gemini", "openai"] = p("gemini", "gemini (google-genai SDK) or openai "
                                                           "(OpenAI-compatible HTTP)")
        model: str = p("", f"judge model; empty: {DEFAULT_GEMINI_MODEL} for gemini (required for openai)")
        base_url: str = p("", f"endpoint; openai: the server's /v1 URL (default {DEFAULT_OPENAI_URL}); "
                              "gemini: override the API URL")
        api_key_env: str = p("", "env var with the key; empty: GEMINI_API_KEY/GOOGLE_API_KEY or OPENAI_API_KEY")
        repeats: int = p(10, "independent ratings per image (the paper: 10)", ge(1))
        temperature: float | None = p(None, "sampling temperature; none = the backend's default", finite)
        max_tokens: int = p(512, "reply length limit (reasoning models need room)", ge(1))
        timeout: float = p(120.0, "seconds per request", gt(0), finite)
        retries: int = p(3, "retries per request on timeouts, connection errors, HTTP 429/5xx", ge(0))
        prompt: str = p("", "judge instruction; empty: the built-in one (docs/metrics.md)")
        replies_dir: str = p("", f"append every request and raw reply to DIR/{REPLIES_FILE}; "
                                 "empty: $GOODDRAG_CACHE/gscore (~/.cache/gooddrag/gscore)")

    def __init__(self, params: "GScore.Params | None" = None):
        self.params = params or self.Params()
        self._client: Any = None
        #: sample id -> one record per request (reply text, parsed score, error), latest scoring
        self.replies: dict[str, list[dict[str, Any]]] = {}

    # --- configuration --------------------------------------------------------------------------

    @property
    def model(self) -> str:
        return self.params.model or (DEFAULT_GEMINI_MODEL if self.params.backend == "gemini" else "")

    @property
    def prompt(self) -> str:
        return self.params.prompt or DEFAULT_PROMPT

    def _key_envs(self) -> tuple[str, ...]:
        if self.params.api_key_env:
            return (self.params.api_key_env,)
        return GEMINI_KEYS if self.params.backend == "gemini" else (OPENAI_KEY,)

    def _key(self) -> str:
        for env in self._key_envs():
            if os.environ.get(env, "").strip():
                return os.environ[env].strip()
        return ""

    def _scrub(self, obj: Any) -> Any:
        """``obj`` (text, or JSON-like data) with the API key replaced: a judge may echo it back."""
        key = self._key()
        if isinstance(obj, str):
            return strip_userinfo(obj.replace(key, REDACTED) if key else obj)
        if isinstance(obj, dict):
            return {k: self._scrub(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return [self._scrub(v) for v in obj]
        return obj

    def _endpoint(self) -> str:
        """The configured endpoint, printable (no user:password)."""
        url = self.params.base_url or (DEFAULT_OPENAI_URL if self.params.backend == "openai" else "")
        return strip_userinfo(url)

    def _redirect(self, code: int, location: str) -> None:
        raise GoodDragError(f"gscore: the judge at {self._endpoint()} answered HTTP {code}, a redirect to "
                            f"{strip_userinfo(location) or '(no location)'}, which is not followed (it would carry "
                            "the API key there); set --metric-param gscore.base_url to the final URL")

    def _warn_plain_http(self) -> None:
        url = self.params.base_url
        if not url.lower().startswith("http://"):
            return
        host = (urllib.parse.urlsplit(url).hostname or "").lower()
        if host in _LOCAL_HOSTS or host in _warned_plain_http:
            return
        _warned_plain_http.add(host)
        print(f"warning: gscore sends the API key to {host} over plain http:// (readable on the network); "
              "use https:// for a remote judge", file=sys.stderr, flush=True)

    def replies_path(self) -> Path:
        if self.params.replies_dir:
            root = Path(self.params.replies_dir).expanduser()
        else:
            cache = os.environ.get("GOODDRAG_CACHE")
            root = (Path(cache).expanduser() if cache else Path.home() / ".cache" / "gooddrag") / "gscore"
        return root / REPLIES_FILE

    def check(self) -> None:
        """Refuse (one line) when the SDK, the key or the endpoint settings are missing; no request."""
        prm = self.params
        if prm.backend == "gemini":
            try:
                import google.genai  # noqa: F401
            except Exception as exc:
                raise RequirementError(f"gscore: the google-genai SDK cannot be imported ({type(exc).__name__}); "
                                       "pip install 'gooddrag[gscore]', or use --metric-param gscore.backend=openai") from None
        else:
            if not self.model:
                raise RequirementError("gscore: the openai backend needs the judge model: --metric-param gscore.model=NAME")
            url = prm.base_url or DEFAULT_OPENAI_URL
            if not url.startswith(("http://", "https://")):
                raise RequirementError(f"gscore.base_url={strip_userinfo(url)!r} must be an http(s) URL such as "
                                       "http://host:port/v1")
        if not self._key():
            envs = " or ".join(self._key_envs())
            extra = " (any non-empty value for a server without authentication)" if prm.backend == "openai" else ""
            raise RequirementError(f"gscore: no API key for the {prm.backend} backend: set {envs}{extra}, "
                                   "or name another variable with --metric-param gscore.api_key_env=VAR")
        self._warn_plain_http()

    # --- backends -------------------------------------------------------------------------------

    def _gemini(self, image_png: bytes) -> tuple[str, Any]:
        from google import genai
        from google.genai import errors as gerrors
        from google.genai import types

        if self._client is None:
            opts: dict[str, Any] = {"timeout": int(self.params.timeout * 1000)}
            if self.params.base_url:
                opts["base_url"] = self.params.base_url
            if "retry_options" in types.HttpOptions.model_fields:  # retries are ours
                opts["retry_options"] = types.HttpRetryOptions(attempts=1)
            if "client_args" in types.HttpOptions.model_fields:  # the SDK follows redirects, key included
                opts["client_args"] = {"follow_redirects": False}
            self._client = genai.Client(api_key=self._key(), http_options=types.HttpOptions(**opts))
        cfg: dict[str, Any] = {"max_output_tokens": self.params.max_tokens}
        if self.params.temperature is not None:
            cfg["temperature"] = self.params.temperature
        try:
            resp = self._client.models.generate_content(
                model=self.model,
                contents=[types.Part.from_bytes(data=image_png, mime_type="image/png"), self.prompt],
                config=types.GenerateContentConfig(**cfg),
            )
        except gerrors.APIError as exc:
            code = int(getattr(exc, "code", 0) or 0)
            if 300 <= code < 400:
                resp_obj = getattr(exc, "response", None)
                self._redirect(code, str(getattr(resp_obj, "headers", {}).get("location", "")))
            if code in RETRY_STATUS:
                raise _Transient(self._scrub(f"HTTP {code}: {_first_line(getattr(exc, 'message', '') or exc)}")) from exc
            self._refuse(code, getattr(exc, "message", "") or str(exc))
        except Exception as exc:  # transport: timeouts, connection refused, DNS
            raise _Transient(self._scrub(f"{type(exc).__name__}: {_first_line(exc)}")) from exc
        raw = resp.model_dump(mode="json", exclude_none=True, exclude={"sdk_http_response"})
        try:
            text = resp.text
        except Exception:  # no candidates / blocked
            text = None
        return text or "", raw

    def _openai(self, image_png: bytes) -> tuple[str, Any]:
        url = (self.params.base_url or DEFAULT_OPENAI_URL).rstrip("/") + "/chat/completions"
        data_url = "data:image/png;base64," + base64.b64encode(image_png).decode("ascii")
        body: dict[str, Any] = {
            "model": self.model,
            "messages": [{"role": "user", "content": [
                {"type": "text", "text": self.prompt},
                {"type": "image_url", "image_url": {"url": data_url}},
            ]}],
            "max_tokens": self.params.max_tokens,
        }
        if self.params.temperature is not None:
            body["temperature"] = self.params.temperature
        req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST", headers={
            "Content-Type": "application/json", "Authorization": f"Bearer {self._key()}"})
        try:
            with _OPENER.open(req, timeout=self.params.timeout) as resp:
                raw = json.loads(resp.read().decode("utf-8"))
        except urllib.error.HTTPError as exc:
            if 300 <= exc.code < 400:
                self._redirect(exc.code, exc.headers.get("Location", ""))
            detail = _error_detail(exc.read().decode("utf-8", "replace"))
            if exc.code in RETRY_STATUS:
                raise _Transient(self._scrub(f"HTTP {exc.code}: {_first_line(detail)}")) from exc
            self._refuse(exc.code, detail)
        except (urllib.error.URLError, TimeoutError, OSError, ValueError) as exc:
            raise _Transient(self._scrub(f"{type(exc).__name__}: {_first_line(getattr(exc, 'reason', exc))}")) from exc
        try:
            content = raw["choices"][0]["message"].get("content")
        except (KeyError, IndexError, TypeError, AttributeError):
            content = None
        if isinstance(content, list):  # content parts
            content = " ".join(str(c.get("text", "")) for c in content if isinstance(c, dict))
        return (content if isinstance(content, str) else ""), raw

    def _refuse(self, code: int, detail: Any) -> None:
        detail = self._scrub(str(detail))
        where = f"the {self.params.backend} API ({self.model})"
        if code in (401, 403):
            raise RequirementError(f"gscore: {where} refused the key from {' or '.join(self._key_envs())} "
                                   f"(HTTP {code}: {_first_line(detail)}); check the key")
        raise GoodDragError(f"gscore: {where} answered HTTP {code}: {_first_line(detail)}; "
                            "check --metric-param gscore.model and gscore.base_url")

    def _ask(self, image_png: bytes) -> tuple[str, Any, int]:
        """One rating request with retries: (reply text, raw response, attempts)."""
        call = self._gemini if self.params.backend == "gemini" else self._openai
        for attempt in range(self.params.retries + 1):
            try:
                text, raw = call(image_png)
                return text, raw, attempt + 1
            except _Transient:
                if attempt == self.params.retries:
                    raise
                time.sleep(min(RETRY_BASE_S * 2 ** attempt, 30.0))
        raise AssertionError("unreachable")  # pragma: no cover

    # --- scoring --------------------------------------------------------------------------------

    def _save(self, record: dict[str, Any]) -> None:
        path = self.replies_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")

    def score(self, sample: Any, result: Any, final_points: list[list[float]] | None = None) -> dict[str, float]:
        """``gscore`` (mean of valid ratings), ``gscore_std`` (their population std),
        ``gscore_n`` (valid ratings) and ``gscore_failed`` (replies without a rating or failed
        requests). Raises if every request failed to reach the judge."""
        image_png = png_bytes(result)
        records: list[dict[str, Any]] = []
        self.replies[sample.id] = records
        scores: list[float] = []
        transport_errors = 0
        for i in range(self.params.repeats):
            rec: dict[str, Any] = {
                "sample": sample.id, "repeat": i, "backend": self.params.backend, "model": self.model,
                "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            }
            try:
                text, raw, attempts = self._ask(image_png)
                text, raw = self._scrub(text), self._scrub(raw)
            except _Transient as exc:
                transport_errors += 1
                rec.update(reply=None, score=None, error=str(exc), attempts=self.params.retries + 1)
            else:
                value = parse_score(text)
                rec.update(reply=text, score=value, error=None if value is not None else "no rating 1-10 in reply",
                           attempts=attempts, raw=raw)
                if value is not None:
                    scores.append(value)
            records.append(rec)
            self._save(rec)
        if transport_errors == self.params.repeats:
            raise GoodDragError(f"gscore: every request to the {self.params.backend} judge failed "
                                f"(last: {records[-1]['error']}); see {self.replies_path()}")
        n = len(scores)
        mean = sum(scores) / n if n else float("nan")
        std = math.sqrt(sum((s - mean) ** 2 for s in scores) / n) if n else float("nan")
        return {"gscore": mean, "gscore_std": std, "gscore_n": float(n),
                "gscore_failed": float(self.params.repeats - n)}

    def aggregate(self, rows: list[dict[str, float]]) -> dict[str, float]:
        """Mean over samples of the per-sample mean and std; failures and ratings summed."""
        means = [r["gscore"] for r in rows if math.isfinite(r.get("gscore", float("nan")))]
        stds = [r["gscore_std"] for r in rows if math.isfinite(r.get("gscore_std", float("nan")))]
        return {
            "gscore": sum(means) / len(means) if means else float("nan"),
            "gscore_std": sum(stds) / len(stds) if stds else float("nan"),
            "gscore_n": float(sum(r.get("gscore_n", 0.0) for r in rows)),
            "gscore_failed": float(sum(r.get("gscore_failed", 0.0) for r in rows if "gscore" in r)),
            "gscore_samples": float(len(means)),
        }


@hookimpl
def gooddrag_register_metrics() -> list[type]:
    return [GScore]
