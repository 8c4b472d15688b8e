"""A human-readable build report: one self-contained HTML file rendered from the JSON report.

Why self-contained: the file is a CI artifact opened from a build page or an e-mail, often
offline or behind a strict content policy. So everything is inline: CSS in a ``<style>``
element, charts as inline SVG (hover titles are SVG ``<title>`` elements), no scripts, no
fonts, no images, no URLs. The renderer takes the report dict ``quantize --report`` writes
(or an ``analyze`` result) and tolerates missing sections: a uniform build has no traces or
Pareto front, an analysis has no bit widths; each absent part says so in one line instead
of failing.
"""

from __future__ import annotations

import html
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from hawq_onnx.errors import HawqError
from hawq_onnx.model_io import write_atomic
from hawq_onnx.recipe import dump_recipe

#: chart geometry (CSS pixels); the page is designed for ~1200 px wide windows.
WIDTH, HEIGHT = 1080, 330
_MARGIN = {"left": 64, "right": 16, "top": 16, "bottom": 96}
_BIT_COLORS = {2: "#b2182b", 3: "#e2714f", 4: "#f1a340", 5: "#a6d96a", 6: "#66bd63",
               7: "#1a9850", 8: "#4393c3", 16: "#2166ac"}
_FLOAT_COLOR = "#9e9e9e"
_LABELED_BARS = 48  # above this many layers, x labels would overlap: indices only

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,'Segoe UI',Roboto,Helvetica,Arial,sans-serif;
margin:24px;color:#1b1b1b;background:#fff;max-width:1120px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;
border-bottom:1px solid #ddd;padding-bottom:4px}
.sub{color:#555;margin:0 0 16px}.cards{display:flex;flex-wrap:wrap;gap:10px}
.card{border:1px solid #ddd;border-radius:6px;padding:8px 12px;min-width:150px}
.card b{display:block;font-size:18px}.card span{color:#555;font-size:12px}
table{border-collapse:collapse;font-size:13px}td,th{padding:3px 8px;border-bottom:1px solid #eee;
text-align:left}td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}
.muted{color:#777}.legend span{display:inline-block;margin-right:12px;font-size:12px}
.legend i{display:inline-block;width:11px;height:11px;margin-right:4px;vertical-align:-1px}
svg text{font:11px system-ui,sans-serif;fill:#333}code{font-size:12px}
details{margin:8px 0}summary{cursor:pointer}
"""


# ---------------------------------------------------------------------- small helpers
def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _num(value: Any) -> float | None:
    """A finite float, or None for anything else (missing, null, NaN, strings)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _bytes(value: Any) -> str:
    number = _num(value)
    if number is None:
        return "–"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(number) >= size:
            return f"{number / size:.2f} {unit}"
    return f"{number:.0f} B"


def _fmt(value: Any, digits: int = 4) -> str:
    number = _num(value)
    if number is None:
        return "–" if value is None else _e(value)
    if number == int(number) and abs(number) < 1e15:
        return f"{int(number):,}"
    return f"{number:.{digits}g}"


def _pct(value: Any) -> str:
    number = _num(value)
    return "–" if number is None else f"{100 * number:.2f}%"


def _short(text: str, width: int = 28) -> str:
    return text if len(text) <= width else "…" + text[-(width - 1):]


def _nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round tick values covering [low, high]."""
    if high <= low:
        high = low + 1.0
    raw = (high - low) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    start = math.floor(low / step) * step
    ticks = [round(start + i * step, 12) for i in range(count * 3 + 2)]
    last = next(i for i, t in enumerate(ticks) if t >= high - step * 1e-9)
    return ticks[:last + 1]


# ---------------------------------------------------------------------- SVG primitives
class _Frame:
    """A plot area with linear (or log10) axes mapping data to SVG coordinates."""

    def __init__(self, x_range: tuple[float, float], y_range: tuple[float, float],
                 y_log: bool = False, width: int = WIDTH, height: int = HEIGHT) -> None:
        self.width, self.height, self.y_log = width, height, y_log
        self.x0, self.x1 = x_range
        self.y0, self.y1 = y_range
        self.left, self.top = _MARGIN["left"], _MARGIN["top"]
        self.inner_w = width - _MARGIN["left"] - _MARGIN["right"]
        self.inner_h = height - _MARGIN["top"] - _MARGIN["bottom"]

    def x(self, value: float) -> float:
        span = (self.x1 - self.x0) or 1.0
        return self.left + (value - self.x0) / span * self.inner_w

    def y(self, value: float) -> float:
        low, high, v = self.y0, self.y1, value
        if self.y_log:
            low, high, v = math.log10(low), math.log10(high), math.log10(max(value, self.y0))
        span = (high - low) or 1.0
        return self.top + self.inner_h - (v - low) / span * self.inner_h

    def axes(self, y_ticks: Iterable[float], y_label: str, x_label: str = "",
             y_text: Callable[[float], str] = lambda v: f"{v:g}") -> list[str]:
        parts = []
        for tick in y_ticks:
            py = self.y(tick)
            parts.append(f'<line x1="{self.left}" x2="{self.left + self.inner_w}" '
                         f'y1="{py:.1f}" y2="{py:.1f}" stroke="#eee"/>')
            parts.append(f'<text x="{self.left - 6}" y="{py + 4:.1f}" '
                         f'text-anchor="end">{_e(y_text(tick))}</text>')
        bottom = self.top + self.inner_h
        parts.append(f'<line x1="{self.left}" x2="{self.left + self.inner_w}" y1="{bottom}" '
                     f'y2="{bottom}" stroke="#888"/>')
        parts.append(f'<line x1="{self.left}" x2="{self.left}" y1="{self.top}" y2="{bottom}" '
                     'stroke="#888"/>')
        parts.append(f'<text transform="translate(14,{self.top + self.inner_h / 2:.0f}) '
                     f'rotate(-90)" text-anchor="middle">{_e(y_label)}</text>')
        if x_label:
            parts.append(f'<text x="{self.left + self.inner_w / 2:.0f}" '
                         f'y="{bottom + 40}" text-anchor="middle">{_e(x_label)}</text>')
        return parts

    def svg(self, parts: Sequence[str], label: str) -> str:
        return (f'<svg role="img" aria-label="{_e(label)}" '
                f'width="{self.width}" height="{self.height}" '
                f'viewBox="0 0 {self.width} {self.height}">' + "".join(parts) + "</svg>")


def _x_labels(frame: _Frame, labels: Sequence[str], centers: Sequence[float]) -> list[str]:
    bottom = frame.top + frame.inner_h
    if len(labels) > _LABELED_BARS:
        step = max(1, len(labels) // 10)
        return [f'<text x="{centers[i]:.1f}" y="{bottom + 14}" text-anchor="middle">{i}</text>'
                for i in range(0, len(labels), step)] + [
            f'<text x="{frame.left + frame.inner_w / 2:.0f}" y="{bottom + 34}" '
            f'text-anchor="middle">layer index (network order, {len(labels)} layers)</text>']
    return [f'<text transform="translate({c - 3:.1f},{bottom + 10}) rotate(30)">'
            f'{_e(_short(text, 24))}<title>{_e(text)}</title></text>'
            for text, c in zip(labels, centers, strict=True)]


# ---------------------------------------------------------------------- sections
def _layers(report: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    layers = report.get("layers")
    return [row for row in layers if isinstance(row, Mapping)] if isinstance(layers, list) \
        else []


def _label(row: Mapping[str, Any]) -> str:
    return str(row.get("node") or row.get("name") or "?")


def bit_chart(report: Mapping[str, Any]) -> str:
    """Per-layer weight widths (bars) and activation widths (dots); float layers grey."""
    rows = [r for r in _layers(report) if _num(r.get("weight_bits")) is not None]
    if not rows:
        return '<p class="muted">No per-layer bit widths in this report.</p>'
    widths = [int(r["weight_bits"]) for r in rows]
    acts = [int(a) for a in (_num(r.get("act_bits")) for r in rows) if a is not None]
    top = max([8, *[w for w in widths + acts if w < 32]])
    frame = _Frame((0, len(rows)), (0, top + 1))
    slot = frame.inner_w / len(rows)
    parts = frame.axes([t for t in (2, 4, 8, 16) if t <= top], "bits")
    centers = []
    for i, (row, bits) in enumerate(zip(rows, widths, strict=True)):
        is_float = bits >= 32
        height_bits = top + 1 if is_float else bits
        x = frame.x(i) + slot * 0.1
        y = frame.y(height_bits)
        color = _FLOAT_COLOR if is_float else _BIT_COLORS.get(bits, "#762a83")
        tip = f"{_label(row)} ({row.get('op', '?')}): " + (
            f"float ({row.get('float_reason', 'kept float')})" if is_float else f"W{bits}")
        act = _num(row.get("act_bits"))
        tip += "" if act is None else f", A{int(act)}"
        parts.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{max(slot * 0.8, 0.8):.1f}" '
                     f'height="{frame.y(0) - y:.1f}" fill="{color}"><title>{_e(tip)}</title>'
                     "</rect>")
        centers.append(frame.x(i) + slot / 2)
        if act is not None and act < 32:
            parts.append(f'<circle cx="{centers[-1]:.1f}" cy="{frame.y(act):.1f}" '
                         f'r="{min(4.0, max(1.5, slot / 5)):.1f}" fill="#000" fill-opacity="0.65">'
                         f"<title>activation {int(act)} bits</title></circle>")
    parts += _x_labels(frame, [_label(r) for r in rows], centers)
    used = sorted({w for w in widths if w < 32})
    legend = "".join(f'<span><i style="background:{_BIT_COLORS.get(b, "#762a83")}"></i>W{b}'
                     "</span>" for b in used)
    if any(w >= 32 for w in widths):
        legend += f'<span><i style="background:{_FLOAT_COLOR}"></i>float</span>'
    legend += '<span><i style="background:#000;border-radius:50%"></i>activation bits</span>'
    return frame.svg(parts, "per-layer bit widths") + f'<div class="legend">{legend}</div>'


def _trace_rows(report: Mapping[str, Any]) -> list[tuple[str, float, float | None, int]]:
    """(label, trace, SE, params) from layer rows, or a nested analysis/sensitivity."""
    sources = [report, report.get("analysis"), report.get("sensitivity")]
    for source in sources:
        if not isinstance(source, Mapping):
            continue
        rows = [(_label(r), _num(r.get("trace")), _num(r.get("trace_se")),
                 int(_num(r.get("params")) or 0)) for r in _layers(source)]
        found = [(label, t, se, p) for label, t, se, p in rows if t is not None]
        if found:
            return found
    return []


def trace_chart(report: Mapping[str, Any]) -> str:
    """Hessian trace per layer on a log axis, with ±SE whiskers."""
    rows = _trace_rows(report)
    if not rows:
        return ('<p class="muted">No Hessian traces in this report (a uniform build measures '
                "none; mixed-precision builds and <code>analyze</code> do).</p>")
    positive = [t for _, t, _, _ in rows if t > 0]
    low = min(positive) if positive else 1e-6
    high = max(positive) if positive else 1.0
    low_exp, high_exp = math.floor(math.log10(low)), math.ceil(math.log10(high))
    high_exp = max(high_exp, low_exp + 1)
    frame = _Frame((0, len(rows)), (10.0 ** low_exp, 10.0 ** high_exp), y_log=True)
    mantissas = (1, 2, 5) if high_exp - low_exp <= 3 else (1,)
    ticks = [m * 10.0 ** e for e in range(low_exp, high_exp + 1) for m in mantissas
             if m * 10.0 ** e <= 10.0 ** high_exp]
    parts = frame.axes(ticks, "trace (log scale)", "", lambda v: f"{v:g}")
    slot = frame.inner_w / len(rows)
    centers = []
    for i, (label, trace, se, params) in enumerate(rows):
        x = frame.x(i) + slot * 0.1
        bar_top = frame.y(max(trace, frame.y0))
        tip = f"{label}: trace {trace:.4g}" + (f" ± {se:.2g}" if se is not None else "") + \
            (f", {params:,} params, trace/params {trace / params:.3g}" if params else "")
        color = "#5e3c99" if trace > 0 else "#e66101"
        parts.append(f'<rect x="{x:.1f}" y="{bar_top:.1f}" width="{max(slot * 0.8, 0.8):.1f}" '
                     f'height="{max(frame.y(frame.y0) - bar_top, 0):.1f}" fill="{color}">'
                     f"<title>{_e(tip)}</title></rect>")
        centers.append(frame.x(i) + slot / 2)
        if se is not None and se > 0 and trace > 0:
            y_hi, y_lo = frame.y(trace + se), frame.y(max(trace - se, frame.y0))
            parts.append(f'<line x1="{centers[-1]:.1f}" x2="{centers[-1]:.1f}" '
                         f'y1="{y_hi:.1f}" y2="{y_lo:.1f}" stroke="#111"/>')
    parts += _x_labels(frame, [r[0] for r in rows], centers)
    note = "" if len(positive) == len(rows) else \
        '<p class="muted">Orange bars: non-positive trace estimates (shown at the axis floor).</p>'
    return frame.svg(parts, "per-layer Hessian trace") + note


_X_KEYS = ("size_bytes", "bytes", "avg_weight_bits", "bops", "latency_s", "latency",
           "latency_ms")
_Y_KEYS = ("predicted_dl", "objective", "predicted_loss", "predicted_delta_loss", "omega",
           "loss")
_MEASURED_KEYS = ("measured_dl", "measured_drop", "measured_delta_loss", "measured_loss",
                  "drop")
_METRIC_KEYS = {"latency": "latency_s"}  # the budget metric -> its field in a point


def _mixed(report: Mapping[str, Any]) -> Mapping[str, Any]:
    mixed = report.get("mixed")
    return mixed if isinstance(mixed, Mapping) else {}


def _pareto_points(report: Mapping[str, Any]) -> tuple[list[Mapping[str, Any]], str | None]:
    """The front's points and budget metric: ``report["pareto"]`` or the mixed-precision
    section's ``mixed.pareto`` ({"metric", "points"})."""
    front = report.get("pareto", report.get("pareto_front", _mixed(report).get("pareto")))
    metric = None
    if isinstance(front, Mapping):
        metric = front.get("metric") if isinstance(front.get("metric"), str) else None
        front = front.get("points", front.get("front"))
    if not isinstance(front, list):
        return [], None
    metric = _METRIC_KEYS.get(metric, metric) if metric else None
    return [p for p in front if isinstance(p, Mapping)], metric


def _chosen(report: Mapping[str, Any], point: Mapping[str, Any]) -> bool:
    """Marked chosen, or the same widths as the allocation the build wrote."""
    if point.get("chosen") or point.get("selected"):
        return True
    units = _mixed(report).get("units")
    if not isinstance(units, list) or not isinstance(point.get("bits"), list):
        return False
    return [u.get("bits") for u in units if isinstance(u, Mapping)] == point["bits"]


def _first_key(points: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> str | None:
    return next((k for k in keys if any(_num(p.get(k)) is not None for p in points)), None)


def pareto_chart(report: Mapping[str, Any]) -> str:
    """Predicted loss (and measured drop, when present) against the budget metric."""
    points, metric = _pareto_points(report)
    x_key = metric if metric and points and _first_key(points, [metric]) else \
        _first_key(points, _X_KEYS)
    y_key = _first_key(points, _Y_KEYS)
    if not points or x_key is None or y_key is None:
        return '<p class="muted">No Pareto front in this report (uniform precision).</p>'
    usable = sorted((p for p in points if _num(p.get(x_key)) is not None
                     and _num(p.get(y_key)) is not None), key=lambda p: float(p[x_key]))
    measured_key = _first_key(usable, _MEASURED_KEYS)
    ys = [float(p[y_key]) for p in usable]
    if measured_key:
        ys += [float(p[measured_key]) for p in usable if _num(p.get(measured_key)) is not None]
    xs = [float(p[x_key]) for p in usable]
    pad_x = (max(xs) - min(xs)) * 0.05 or 1.0
    y_log = min(ys) > 0 and max(ys) / min(ys) > 50  # loss increases span decades
    if y_log:
        low, high = math.floor(math.log10(min(ys))), math.ceil(math.log10(max(ys)))
        y_ticks = [10.0 ** e for e in range(low, max(high, low + 1) + 1)]
    else:
        y_ticks = _nice_ticks(min(0.0, min(ys)), max(ys) * 1.05 if max(ys) > 0 else 1.0)
    frame = _Frame((min(xs) - pad_x, max(xs) + pad_x), (y_ticks[0], y_ticks[-1]), y_log=y_log)
    x_text = _bytes if "bytes" in x_key else (lambda v: f"{v:.4g}")
    parts = frame.axes(y_ticks, f"{y_key}{' (log)' if y_log else ''}, lower is better",
                       x_key.replace("_", " "), lambda v: f"{v:.3g}")
    for tick in _nice_ticks(min(xs) - pad_x, max(xs) + pad_x, 8):
        if frame.x0 <= tick <= frame.x1:
            parts.append(f'<text x="{frame.x(tick):.1f}" y="{frame.top + frame.inner_h + 16}" '
                         f'text-anchor="middle">{_e(x_text(tick))}</text>')
    path = " ".join(f"{'M' if i == 0 else 'L'}{frame.x(float(p[x_key])):.1f},"
                    f"{frame.y(float(p[y_key])):.1f}" for i, p in enumerate(usable))
    parts.append(f'<path d="{path}" fill="none" stroke="#4393c3" stroke-width="1.5"/>')
    for p in usable:
        px, py = frame.x(float(p[x_key])), frame.y(float(p[y_key]))
        keys = (x_key, y_key, measured_key, "avg_weight_bits", "drop")
        tip = ", ".join(f"{k} {_fmt(p[k])}" for k in dict.fromkeys(keys)
                        if k and _num(p.get(k)) is not None)
        if isinstance(p.get("bits"), list):
            tip += f"; widths {' '.join(str(b) for b in p['bits'])}"
        parts.append(f'<circle cx="{px:.1f}" cy="{py:.1f}" r="4" fill="#4393c3">'
                     f"<title>{_e(tip)}</title></circle>")
        if measured_key and _num(p.get(measured_key)) is not None:
            my = frame.y(float(p[measured_key]))
            parts.append(f'<rect x="{px - 4:.1f}" y="{my - 4:.1f}" width="8" height="8" '
                         f'fill="#d6604d"><title>measured {_e(_fmt(p[measured_key]))}</title>'
                         "</rect>")
        if _chosen(report, p):
            parts.append(f'<circle cx="{px:.1f}" cy="{py:.1f}" r="9" fill="none" '
                         'stroke="#111" stroke-width="2"><title>chosen</title></circle>')
    legend = '<span><i style="background:#4393c3"></i>predicted</span>'
    if measured_key:
        legend += f'<span><i style="background:#d6604d"></i>measured ({_e(measured_key)})</span>'
    legend += '<span><i style="border:2px solid #111;border-radius:50%"></i>chosen</span>'
    return frame.svg(parts, "Pareto front") + f'<div class="legend">{legend}</div>'


def _cards(report: Mapping[str, Any]) -> str:
    metrics = report.get("metrics") if isinstance(report.get("metrics"), Mapping) else {}
    cards: list[tuple[str, str]] = []
    if _num(report.get("bytes_float")) is not None:
        cards.append((f"{_bytes(report.get('bytes_float'))} → "
                      f"{_bytes(report.get('bytes_quant'))}",
                      f"model size ({_fmt(report.get('size_ratio'))}×)"))
    if _num(report.get("avg_weight_bits")) is not None:
        cards.append((_fmt(report["avg_weight_bits"]), "average weight bits (by params)"))
    if _num(metrics.get("top1_float")) is not None:
        cards.append((f"{_pct(metrics.get('top1_float'))} → {_pct(metrics.get('top1_quant'))}",
                      "top-1 accuracy"))
    if _num(metrics.get("sqnr_db")) is not None:
        cards.append((f"{_fmt(metrics['sqnr_db'])} dB", "output SQNR"))
    if _num(metrics.get("latency_float_ms")) is not None:
        cards.append((f"{_fmt(metrics['latency_float_ms'])} → "
                      f"{_fmt(metrics.get('latency_quant_ms'))} ms", "latency (1 thread)"))
    if _num(report.get("total_trace")) is not None:
        cards.append((_fmt(report["total_trace"]), "total Hessian trace"))
    if not cards:
        return '<p class="muted">No summary figures in this report.</p>'
    return '<div class="cards">' + "".join(
        f'<div class="card"><b>{value}</b><span>{_e(label)}</span></div>'
        for value, label in cards) + "</div>"


def mixed_section(report: Mapping[str, Any]) -> str:
    """What the mixed-precision search was asked for and what it chose."""
    mixed = _mixed(report)
    if not mixed:
        return ""
    request = mixed.get("request") if isinstance(mixed.get("request"), Mapping) else {}
    totals = mixed.get("totals") if isinstance(mixed.get("totals"), Mapping) else {}
    rows = [("candidate bits", ", ".join(str(b) for b in mixed.get("candidate_bits") or [])),
            ("candidate activation bits",
             ", ".join(str(b) for b in mixed.get("candidate_act_bits") or [])),
            ("loss model", mixed.get("loss_model")), ("solver status", mixed.get("status"))]
    acts = mixed.get("activations") if isinstance(mixed.get("activations"), list) else []
    rows += [(f"activation {_short(str(a.get('tensor', '')), 48)}", f"{a.get('bits')} bits")
             for a in acts if isinstance(a, Mapping)]
    rows += [(f"requested {k.replace('_', ' ')}", v) for k, v in request.items()
             if v not in (None, False)]
    rows += [(k.replace("_", " "), _bytes(v) if k.endswith("bytes") else _fmt(v))
             for k, v in totals.items() if v is not None]
    check = mixed.get("spearman")  # {"configs", "samples", "spearman": {model: rho}, ...}
    if isinstance(check, Mapping):
        rhos = check.get("spearman") if isinstance(check.get("spearman"), Mapping) else {}
        rows += [(f"Spearman ρ, predicted vs measured ΔL ({model}, {_fmt(check.get('configs'))}"
                  " configurations)", _fmt(rho)) for model, rho in rhos.items()
                 if _num(rho) is not None]
    body = "".join(f"<tr><td>{_e(k)}</td><td class=n>{_e(v)}</td></tr>" for k, v in rows
                   if v not in (None, ""))
    return f"<h2>Mixed precision</h2><table>{body}</table>"


_METRIC_ROWS = (("top-1 accuracy", "top1_float", "top1_quant", _pct),
                ("model size", "bytes_float", "bytes_quant", _bytes),
                ("latency, ms (1 thread)", "latency_float_ms", "latency_quant_ms", _fmt))


def metrics_table(report: Mapping[str, Any]) -> str:
    """Before/after figures: accuracy, size, latency; agreement, SQNR and cosine."""
    metrics = dict(report.get("metrics") or {}) if isinstance(report.get("metrics"),
                                                              Mapping) else {}
    for key in ("bytes_float", "bytes_quant"):
        metrics.setdefault(key, report.get(key))
    rows = [f"<tr><td>{_e(name)}</td><td class=n>{fmt(metrics.get(a))}</td>"
            f"<td class=n>{fmt(metrics.get(b))}</td></tr>"
            for name, a, b, fmt in _METRIC_ROWS
            if _num(metrics.get(a)) is not None or _num(metrics.get(b)) is not None]
    extra = [(name, fmt(metrics.get(key))) for name, key, fmt in (
        ("top-1 drop", "drop", _pct), ("top-1 agreement", "agreement", _pct),
        ("output SQNR, dB", "sqnr_db", _fmt),
        ("output cosine", "cosine", lambda v: _fmt(v, 6)),
        ("speed-up", "speedup", _fmt), ("samples", "samples", _fmt))
        if _num(metrics.get(key)) is not None]
    if not rows and not extra:
        return '<p class="muted">No before/after metrics (run quantize with --eval).</p>'
    table = ("<table><tr><th></th><th class=n>float</th><th class=n>quantized</th></tr>"
             + "".join(rows) + "</table>") if rows else ""
    if extra:
        table += "<table>" + "".join(f"<tr><td>{_e(n)}</td><td class=n>{v}</td></tr>"
                                     for n, v in extra) + "</table>"
    return table


_LAYER_COLUMNS = (("layer", "name"), ("node", "node"), ("op", "op"), ("params", "params"),
                  ("W bits", "weight_bits"), ("A bits", "act_bits"),
                  ("granularity", "granularity"), ("trace", "trace"), ("SE", "trace_se"),
                  ("float because", "float_reason"))


def layer_table(report: Mapping[str, Any]) -> str:
    rows = _layers(report)
    if not rows:
        return '<p class="muted">No layers in this report.</p>'
    columns = [(title, key) for title, key in _LAYER_COLUMNS
               if any(row.get(key) is not None for row in rows)]
    head = "".join(f"<th>{_e(t)}</th>" for t, _ in columns)
    body = "".join("<tr>" + "".join(
        f"<td class=n>{_fmt(row.get(k))}</td>" if _num(row.get(k)) is not None
        else f"<td>{_e(row.get(k) if row.get(k) is not None else '')}</td>"
        for _, k in columns) + "</tr>" for row in rows)
    return (f"<details><summary>{len(rows)} layers</summary><table><tr>{head}</tr>{body}"
            "</table></details>")


def build_section(report: Mapping[str, Any]) -> str:
    """Tool versions, the resolved recipe and input hashes (the ``build`` section)."""
    build = report.get("build")
    if not isinstance(build, Mapping):
        return '<p class="muted">No build provenance in this report.</p>'
    versions = build.get("versions") if isinstance(build.get("versions"), Mapping) else {}
    lines = [f"<p>{_e(build.get('tool', 'hawq-onnx'))} {_e(build.get('version', '?'))}; "
             + ", ".join(f"{_e(k)} {_e(v)}" for k, v in versions.items()
                         if k != build.get("tool", "hawq-onnx")) + "</p>"]
    inputs = build.get("inputs") if isinstance(build.get("inputs"), Mapping) else {}
    if inputs:
        lines.append("<table>" + "".join(
            f"<tr><td>{_e(k)}</td><td>{_e(v.get('path', ''))}</td>"
            f"<td><code>{_e(v.get('sha256', ''))}</code></td></tr>"
            for k, v in inputs.items() if isinstance(v, Mapping)) + "</table>")
    recipe = build.get("recipe") if isinstance(build.get("recipe"), Mapping) else {}
    if recipe:
        command = build.get("command") if isinstance(build.get("command"), str) else None
        lines.append("<details><summary>resolved recipe (TOML)</summary><pre>"
                     f"{_e(dump_recipe(recipe, command))}</pre></details>")
    return "".join(lines)


def _notes(report: Mapping[str, Any]) -> str:
    notes = report.get("notes")
    if not isinstance(notes, list) or not notes:
        return ""
    return "<h2>Notes</h2><ul>" + "".join(f"<li>{_e(n)}</li>" for n in notes[:50]) + "</ul>"


def _is_quantization(report: Mapping[str, Any]) -> bool:
    return any("weight_bits" in row for row in _layers(report)) or "bytes_quant" in report


def _title(report: Mapping[str, Any]) -> tuple[str, str]:
    build = report.get("build") if isinstance(report.get("build"), Mapping) else {}
    inputs = build.get("inputs") if isinstance(build.get("inputs"), Mapping) else {}
    model = (inputs.get("model") or {}).get("path") if isinstance(inputs.get("model"),
                                                                   Mapping) else None
    model = model or report.get("model") or "model"
    if _is_quantization(report):
        kind = "quantization report"
        detail = ", ".join(str(p) for p in (
            report.get("format"), report.get("opset") and f"opset {report['opset']}",
            report.get("ir_version") and f"IR {report['ir_version']}") if p)
    else:
        kind, detail = "sensitivity analysis", f"{report.get('samples', '?')} samples, " \
            f"{report.get('probes', '?')} probes"
    return f"hawq-onnx {kind}: {Path(str(model)).name}", detail


def render_html(report: Mapping[str, Any]) -> str:
    """The whole page for one report dict (any section may be missing)."""
    title, detail = _title(report)
    quantization = _is_quantization(report)
    sections = [("Summary", _cards(report))]
    if quantization:  # an analysis has no widths, no before/after and no front
        sections += [("Before / after", metrics_table(report)),
                     ("Bit width per layer", bit_chart(report))]
    sections.append(("Hessian trace per layer", trace_chart(report)))
    if quantization:
        sections.append(("Pareto front", pareto_chart(report)))
    sections += [("Layers", layer_table(report)), ("Build", build_section(report))]
    body = "".join(f"<h2>{_e(name)}</h2>{content}" for name, content in sections)
    body = body.replace("<h2>Bit width per layer</h2>",
                        mixed_section(report) + "<h2>Bit width per layer</h2>", 1)
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>"
            f"<h1>{_e(title)}</h1><p class=\"sub\">{_e(detail)}</p>{body}{_notes(report)}"
            "</body></html>\n")


def write_html(path: str | os.PathLike[str], report: Mapping[str, Any]) -> Path:
    """Render and write atomically (``model_io.write_atomic``: nothing partial on failure,
    ordinary file permissions)."""
    target = Path(path)
    text = render_html(report)
    try:
        return write_atomic(target, text)
    except OSError as exc:
        raise HawqError(f"cannot write the HTML report {target}: "
                        f"{exc.strerror or exc}") from exc


__all__ = ["bit_chart", "layer_table", "metrics_table", "pareto_chart", "render_html",
           "trace_chart", "write_html"]
