"""The point editor and the compare view: two small browser-side components built on gradio's own
``gr.HTML`` (its ``html_template`` + ``js_on_load`` + ``props``), no extra package.

Why in the browser: a click drawn by the server waits for a round trip and a re-encoded image
(about a second on a busy machine), and gradio drops a ``select`` event that arrives while the
previous one is still pending, so fast clicks were lost and pairs silently rewired. Here a click
is drawn at once by the page's own script and appended to the component's value (a JSON list of
``[x, y]`` image pixels: handle, target, handle, ...); nothing goes to the server until an event
reads the value (Run, Preview, Save as sample), which then gets the whole list in click order.
"""

from __future__ import annotations

import base64
import io
import json
from typing import Any

from PIL import Image

#: longest side of the picture sent to the page (the points are always in original image pixels)
DISPLAY_SIDE = 1024

POINTS_TEMPLATE = """
<div class="gd-points" data-w="${w}" data-h="${h}">
  <div class="gd-stage">${src ? `<img class="gd-img" src="${src}" draggable="false" alt="the input image">
    <svg class="gd-svg" viewBox="0 0 ${w} ${h}" preserveAspectRatio="none"></svg>`
    : `<div class="gd-empty">Open an image (button above), then click a handle and its target here.</div>`}
  </div>
  <div class="gd-bar">
    <button type="button" class="gd-undo" id="undo">Undo last point</button>
    <button type="button" class="gd-clear" id="clear">Clear points</button>
    <span class="gd-hint">click: add (handle red, then target blue) · drag a point: move it</span>
  </div>
  <div class="gd-list" id="points-list" data-count="0">No points yet.</div>
</div>
"""

POINTS_CSS = """
.gd-stage { position: relative; display: flex; justify-content: center; background: var(--block-background-fill); min-height: 120px; }
.gd-img { display: block; user-select: none; image-rendering: auto; }
.gd-svg { position: absolute; touch-action: none; cursor: crosshair; }
.gd-empty { padding: 48px 16px; color: var(--body-text-color-subdued); text-align: center; }
.gd-bar { display: flex; gap: 8px; align-items: center; flex-wrap: wrap; margin-top: 6px; }
.gd-bar button { padding: 2px 10px; border: 1px solid var(--border-color-primary); border-radius: 6px; background: var(--button-secondary-background-fill); }
.gd-hint { font-size: 12px; color: var(--body-text-color-subdued); }
.gd-list { margin-top: 4px; font-size: 14px; }
"""

POINTS_JS = r"""
const NS = 'http://www.w3.org/2000/svg', MAX_H = 420;
const read = () => { try { const p = JSON.parse(props.value || '[]'); return Array.isArray(p) ? p : []; } catch (e) { return []; } };
const size = () => [Number(props.w) || 1, Number(props.h) || 1];
const radius = () => { const [w, h] = size(); return Math.max(3, Math.round(Math.min(w, h) / 60)); };
const fmt = (p) => `(${p[0]}, ${p[1]})`;

function node(tag, attrs) {
  const el = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
  return el;
}

function draw() {
  const pts = read(), r = radius();
  const svg = element.querySelector('.gd-svg'), img = element.querySelector('.gd-img');
  if (svg && img) {
    // the picture fills the panel's width (small images scaled up too), at most MAX_H tall, its own aspect
    const [w, h] = size(), stage = element.querySelector('.gd-stage');
    const scale = Math.min((stage.clientWidth || w) / w, MAX_H / h);
    img.style.width = Math.round(w * scale) + 'px'; img.style.height = Math.round(h * scale) + 'px';
    // the overlay covers exactly the displayed picture
    svg.style.left = img.offsetLeft + 'px'; svg.style.top = img.offsetTop + 'px';
    svg.style.width = img.clientWidth + 'px'; svg.style.height = img.clientHeight + 'px';
    svg.replaceChildren();
    for (let i = 0; i < pts.length; i += 2) {
      const h = pts[i], t = pts[i + 1];
      if (t) {
        svg.appendChild(node('line', {x1: h[0], y1: h[1], x2: t[0], y2: t[1], stroke: 'black', 'stroke-width': r * 0.9}));
        svg.appendChild(node('line', {x1: h[0], y1: h[1], x2: t[0], y2: t[1], stroke: 'white', 'stroke-width': r * 0.45}));
        svg.appendChild(node('circle', {cx: t[0], cy: t[1], r: r, fill: 'rgb(40,90,230)', stroke: 'white', 'stroke-width': r / 3, 'data-index': i + 1, class: 'gd-target'}));
      }
      svg.appendChild(node('circle', {cx: h[0], cy: h[1], r: r, fill: 'rgb(230,40,40)', stroke: 'white', 'stroke-width': r / 3, 'data-index': i, class: 'gd-handle'}));
      const label = node('text', {x: h[0] + r * 1.3, y: h[1] - r * 1.3, fill: 'white', stroke: 'black', 'stroke-width': r / 4,
                                  'paint-order': 'stroke', 'font-size': r * 3, 'font-family': 'sans-serif', 'font-weight': 'bold'});
      label.textContent = String(i / 2 + 1);
      svg.appendChild(label);
    }
  }
  const list = element.querySelector('.gd-list');
  if (list) {
    list.dataset.count = String(pts.length);
    if (!pts.length) { list.textContent = 'No points yet.'; return; }
    const rows = [];
    for (let i = 0; i < pts.length; i += 2) {
      rows.push(`${i / 2 + 1}: ${fmt(pts[i])} → ` + (pts[i + 1] ? fmt(pts[i + 1]) : '(click its target)'));
    }
    list.textContent = 'Pairs: ' + rows.join('; ');
  }
}

function save(pts) { props.value = JSON.stringify(pts); draw(); }

function toImage(ev) {
  const img = element.querySelector('.gd-img'), [w, h] = size();
  const b = img.getBoundingClientRect();
  const x = Math.round((ev.clientX - b.left) * w / b.width), y = Math.round((ev.clientY - b.top) * h / b.height);
  return [Math.min(w - 1, Math.max(0, x)), Math.min(h - 1, Math.max(0, y)), w / b.width];
}

let dragging = null;  // {index, pointerId}
element.addEventListener('pointerdown', (ev) => {
  if (!ev.target.closest || !ev.target.closest('.gd-svg') || ev.button !== 0) return;
  ev.preventDefault();
  const [x, y, scale] = toImage(ev), pts = read();
  // a press on a placed point (within 10 screen px) picks it up; anywhere else adds a point at once
  let best = -1, bestD = Math.max(radius(), 10 * scale);
  pts.forEach((p, i) => { const d = Math.hypot(p[0] - x, p[1] - y); if (d <= bestD) { best = i; bestD = d; } });
  if (best >= 0) {
    dragging = {index: best, id: ev.pointerId};
    element.querySelector('.gd-svg').setPointerCapture(ev.pointerId);
    return;
  }
  pts.push([x, y]);
  save(pts);
});
element.addEventListener('pointermove', (ev) => {
  if (!dragging || ev.pointerId !== dragging.id) return;
  const [x, y] = toImage(ev), pts = read();
  pts[dragging.index] = [x, y];
  save(pts);
});
const drop = (ev) => { if (dragging && ev.pointerId === dragging.id) dragging = null; };
element.addEventListener('pointerup', drop);
element.addEventListener('pointercancel', drop);
element.addEventListener('click', (ev) => {
  if (ev.target.closest('.gd-undo')) { save(read().slice(0, -1)); }
  else if (ev.target.closest('.gd-clear')) { save([]); }
});
new ResizeObserver(draw).observe(element);
element.addEventListener('load', draw, true);  // the picture loaded: place the overlay on it
watch(['value', 'src', 'w', 'h'], draw);
draw();
"""

RESULT_TEMPLATE = """
<div class="gd-result" data-final="${final}">${src ? `<img class="gd-result-img" src="${src}" alt="${alt}">`
  : `<div class="gd-empty">The result appears here (live while dragging).</div>`}</div>
"""

RESULT_CSS = """
.gd-result { display: flex; justify-content: center; background: var(--block-background-fill); min-height: 120px; }
.gd-result-img { display: block; width: 100%; max-width: 100%; height: auto; max-height: 420px; object-fit: contain;
                 image-rendering: auto; }
.gd-empty { padding: 48px 16px; color: var(--body-text-color-subdued); text-align: center; }
"""

COMPARE_TEMPLATE = """
<div class="gd-compare">${before && after ? `
  <div class="gd-cmp-stage">
    <img class="gd-before" src="${before}" alt="input">
    <img class="gd-after" src="${after}" alt="result">
    <div class="gd-cmp-line"></div>
  </div>
  <input class="gd-cmp-range" type="range" min="0" max="100" value="50" aria-label="input | result">
  <div class="gd-cmp-legend"><span>◀ input</span><span>result ▶</span></div>`
  : `<div class="gd-empty">Input | result comparison appears after an edit.</div>`}
</div>
"""

COMPARE_CSS = """
.gd-cmp-stage { position: relative; width: 100%; margin: 0 auto; }
.gd-cmp-stage img { display: block; width: 100%; height: auto; }
.gd-after { position: absolute; left: 0; top: 0; width: 100% !important; height: 100% !important; clip-path: inset(0 0 0 50%); }
.gd-cmp-line { position: absolute; top: 0; bottom: 0; left: 50%; width: 2px; background: white; box-shadow: 0 0 2px black; }
.gd-cmp-range { width: 100%; }
.gd-cmp-legend { display: flex; justify-content: space-between; font-size: 12px; }
.gd-empty { padding: 24px 16px; color: var(--body-text-color-subdued); text-align: center; }
"""

COMPARE_JS = r"""
element.addEventListener('input', (ev) => {
  if (!ev.target.classList.contains('gd-cmp-range')) return;
  const v = ev.target.value;
  const after = element.querySelector('.gd-after'), line = element.querySelector('.gd-cmp-line');
  if (after) after.style.clipPath = `inset(0 0 0 ${v}%)`;
  if (line) line.style.left = `${v}%`;
});
"""


def data_url(image: Image.Image, max_side: int = DISPLAY_SIDE, exact: bool = False) -> str:
    """The picture as an inline ``data:`` URL (JPEG, or PNG when ``exact``; at most ``max_side`` px):
    the page shows it without a file on the server, so no server path ever reaches the page."""
    im = image.convert("RGB")
    if max(im.size) > max_side:
        im = im.copy()
        im.thumbnail((max_side, max_side), Image.LANCZOS)
    buf = io.BytesIO()
    im.save(buf, "PNG" if exact else "JPEG", **({} if exact else {"quality": 90}))
    kind = "png" if exact else "jpeg"
    return f"data:image/{kind};base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def points_component(**kwargs: Any) -> Any:
    """The point editor: value = JSON list of [x, y] image pixels (handle, target, ...); props
    ``src`` (the picture), ``w``, ``h`` (its original size)."""
    import gradio as gr

    return gr.HTML("[]", html_template=POINTS_TEMPLATE, css_template=POINTS_CSS, js_on_load=POINTS_JS,
                   src="", w=1, h=1, apply_default_css=False, **kwargs)


def points_update(image: Image.Image | None, shown: Image.Image | None = None, keep_points: bool = False) -> Any:
    """A new picture in the point editor (``shown``: what to display, e.g. with the locked region
    dimmed; default the image itself); the points are cleared unless ``keep_points``."""
    import gradio as gr

    if image is None:
        return gr.HTML(value="[]", src="", w=1, h=1)
    w, h = image.size
    extra = {} if keep_points else {"value": "[]"}
    return gr.HTML(src=data_url(shown if shown is not None else image), w=w, h=h, **extra)


def parse_points(value: Any) -> list[list[float]]:
    """The point editor's value -> [[x, y], ...] (handle, target, ...); malformed -> a BadInputError."""
    from gooddrag.core.errors import BadInputError

    try:
        pts = json.loads(value) if isinstance(value, str) else (value or [])
        out = [[float(p[0]), float(p[1])] for p in pts]
    except (ValueError, TypeError, IndexError, KeyError):
        raise BadInputError("the points could not be read; clear them and click again") from None
    return out


def compare_component(**kwargs: Any) -> Any:
    """Input | result with a slider; both pictures are shown whole (scaled to fit)."""
    import gradio as gr

    return gr.HTML("", html_template=COMPARE_TEMPLATE, css_template=COMPARE_CSS, js_on_load=COMPARE_JS,
                   before="", after="", apply_default_css=False, **kwargs)


def compare_update(before: Image.Image | None, after: Image.Image | None) -> Any:
    import gradio as gr

    if before is None or after is None:
        return gr.HTML(before="", after="")
    return gr.HTML(before=data_url(before), after=data_url(after.resize(before.size)))


def result_component(**kwargs: Any) -> Any:
    """The result panel: a live preview while dragging, then the result with its final handles. The
    picture is inline (rendered in the same update as the status), so a late preview can never be
    shown over the final result."""
    import gradio as gr

    return gr.HTML("", html_template=RESULT_TEMPLATE, css_template=RESULT_CSS, js_on_load=None, src="",
                   final="no", alt="", apply_default_css=False, **kwargs)


def result_update(image: Image.Image | None, final: bool = False) -> Any:
    """A preview (JPEG) or the final result (PNG, exact colours), or nothing."""
    import gradio as gr

    if image is None:
        return gr.HTML(src="", final="no", alt="")
    return gr.HTML(src=data_url(image, exact=final), final="yes" if final else "no",
                   alt="the result with its final handles" if final else "live preview")
