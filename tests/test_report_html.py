"""The self-contained HTML report: structure, charts, no external resources, robustness.

Chromium is not needed here: the page is parsed with the standard library and checked for
well-formed nesting, the SVG charts it must contain and anything that would load a resource.
``make report-screenshot`` renders it in headless Chromium for a person to look at.
"""

from __future__ import annotations

import json
import os
import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hawq_onnx.cli import main
from hawq_onnx.report_html import render_html, write_html
from tests.tiny_models import save_data, save_mlp

_VOID = {"meta", "br", "hr", "img", "input", "link", "area", "base", "col", "source", "wbr"}
_RESOURCE_ATTRS = {"src", "href", "srcset", "xlink:href", "action", "poster", "data"}


class _Page(HTMLParser):
    """Tag counts, nesting errors and every attribute that could fetch something."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.counts: dict[str, int] = {}
        self.resource_attrs: list[tuple[str, str]] = []
        self.attr_values: list[str] = []
        self.styles: list[str] = []
        self.titles: list[str] = []
        self.text: list[str] = []
        self._in_title = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.counts[tag] = self.counts.get(tag, 0) + 1
        self.resource_attrs += [(k, v or "") for k, v in attrs if k in _RESOURCE_ATTRS]
        self.attr_values += [v or "" for _, v in attrs]
        if tag not in _VOID:
            self.stack.append(tag)
        self._in_title = tag == "title"

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.counts[tag] = self.counts.get(tag, 0) + 1
        self.resource_attrs += [(k, v or "") for k, v in attrs if k in _RESOURCE_ATTRS]

    def handle_endtag(self, tag: str) -> None:
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
            return
        self.stack.pop()
        self._in_title = False

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        if self.stack and self.stack[-1] == "style":
            self.styles.append(data)
        if self._in_title:
            self.titles.append(data)


def _parse(text: str) -> _Page:
    page = _Page()
    page.feed(text)
    page.close()
    assert page.errors == [] and page.stack == [], (page.errors, page.stack)
    return page


def _assert_self_contained(text: str, page: _Page) -> None:
    assert page.resource_attrs == []
    for tag in ("script", "link", "img", "iframe", "object", "embed"):
        assert page.counts.get(tag, 0) == 0, tag
    for markup in (*page.attr_values, *page.styles):  # where a URL would be fetched
        assert not re.search(r"(https?:|ftp:|file:|data:|//|url\(|@import)", markup, re.I)


def _svgs(text: str) -> list[str]:
    return re.findall(r"<svg\b.*?</svg>", text, flags=re.S)


def _layer(name: str, bits: int, trace: float | None = None, **extra: Any) -> dict[str, Any]:
    row = {"name": name, "node": f"node_{name}", "op": "Conv", "params": 1000,
           "weight_bits": bits, "act_bits": 8}
    if trace is not None:
        row.update(trace=trace, trace_se=trace / 10)
    row.update(extra)
    return row


FULL = {
    "format": "qdq", "opset": 21, "ir_version": 10, "avg_weight_bits": 4.5,
    "bytes_float": 400_000, "bytes_quant": 60_000, "size_ratio": 0.15,
    "layers": [_layer("a", 4, 12.0), _layer("b", 2, 30.0), _layer("c", 8, 0.5),
               _layer("d", 32, 3.0, float_reason="excluded")],
    "metrics": {"top1_float": 0.91, "top1_quant": 0.9, "drop": 0.01, "agreement": 0.98,
                "sqnr_db": 23.5, "cosine": 0.9931, "latency_float_ms": 1.5,
                "latency_quant_ms": 0.75, "speedup": 2.0, "samples": 500},
    "pareto": {"metric": "size_bytes", "points": [
        {"size_bytes": 40_000 + 10_000 * i, "objective": 1.0 / (i + 1),
         "measured_drop": 0.9 / (i + 1), "chosen": i == 2} for i in range(6)]},
    "build": {"command": "quantize", "tool": "hawq-onnx", "version": "0.1.0",
              "versions": {"onnx": "1.23"}, "inputs": {"model": {"path": "m.onnx",
                                                                  "sha256": "ab" * 32}},
              "recipe": {"model": "m.onnx", "weight_bits": 4, "exclude": ["x"]}},
    "notes": ["bias correction: 3 layer(s)"],
}


def test_full_report_has_every_chart_and_loads_nothing(tmp_path: Path) -> None:
    text = render_html(FULL)
    page = _parse(text)
    _assert_self_contained(text, page)
    assert text.startswith("<!DOCTYPE html>") and page.counts["style"] == 1
    bits, traces, pareto = _svgs(text)
    assert bits.count("<rect") == 4 and "fill=\"#9e9e9e\"" in bits  # the float layer is grey
    assert bits.count("<circle") == 4  # one activation-width dot per layer
    assert traces.count("<rect") == 4 and traces.count("<line") >= 4
    assert pareto.count('r="4"') == 6 and pareto.count('r="9"') == 1  # points, chosen ring
    assert pareto.count('width="8" height="8"') == 6  # measured points
    body = " ".join(page.text)
    for needle in ("91.00%", "90.00%", "400.00 kB", "60.00 kB", "23.5", "0.9931", "excluded",
                   "bias correction: 3 layer(s)", "ab" * 32, 'exclude = ["x"]'):
        assert needle in body, needle


def test_mixed_precision_section_as_the_pipeline_writes_it() -> None:
    """``report["mixed"]``: the front under ``mixed.pareto`` (metric ``latency`` stored as
    ``latency_s``), the chosen point found by its widths, totals and request listed."""
    points = [{"bits": [b, b], "latency_s": 0.001 * b, "predicted_dl": 10.0 ** -b,
               "measured_dl": 2 * 10.0 ** -b} for b in (2, 4, 8)]
    report = {"layers": [_layer("a", 4, 3.0), _layer("b", 4, 5.0)], "bytes_quant": 10,
              "mixed": {"candidate_bits": [2, 4, 8], "loss_model": "hessian",
                        "status": "optimal", "request": {"latency_budget": 0.005},
                        "totals": {"weight_bytes": 2048.0, "predicted_dl": 1e-4},
                        "spearman": {"configs": 6, "spearman": {"hessian": 0.9}},
                        "units": [{"names": ["a"], "bits": 4}, {"names": ["b"], "bits": 4}],
                        "pareto": {"metric": "latency", "points": points}}}
    text = render_html(report)
    _parse(text)
    (pareto,) = [s for s in _svgs(text) if "Pareto" in s]
    assert pareto.count('r="4"') == 3 and pareto.count('width="8" height="8"') == 3
    assert pareto.count('r="9"') == 1 and "widths 4 4" in pareto and "(log)" in pareto
    assert "requested latency budget" in text and "2.05 kB" in text and "optimal" in text
    assert "Spearman ρ, predicted vs measured ΔL (hessian, 6 configurations)</td>" \
        "<td class=n>0.9</td>" in text


def test_missing_sections_render_placeholders() -> None:
    for report in ({}, {"layers": []}, {"layers": "garbage", "metrics": 3, "pareto": [1, "x"]},
                   {"layers": [{"name": "w", "weight_bits": "eight"}]}):
        text = render_html(report)
        page = _parse(text)
        _assert_self_contained(text, page)
        assert _svgs(text) == []
        assert "No per-layer bit widths" in text or "No Hessian traces" in text


def test_analysis_report_shows_traces_only() -> None:
    analysis = {"model": "m.onnx", "samples": 64, "probes": 32, "total_trace": 42.0,
                "layers": [{"name": "w1", "node": "fc1", "op": "Gemm", "params": 128,
                            "trace": 40.0, "trace_se": 2.0},
                           {"name": "w2", "node": "fc2", "op": "Gemm", "params": 64,
                            "trace": -1.0, "trace_se": 3.0}]}
    text = render_html(analysis)
    _parse(text)
    assert "sensitivity analysis: m.onnx" in text and "Bit width" not in text
    (traces,) = _svgs(text)
    assert traces.count("<rect") == 2 and "non-positive trace" in text


def test_names_are_escaped() -> None:
    evil = '<script>alert("x")</script><img src=http://evil.example/a.png>'
    report = dict(FULL, layers=[_layer(evil, 4, 1.0)], notes=[evil])
    text = render_html(report)
    page = _parse(text)
    _assert_self_contained(text, page)
    assert evil not in text and "&lt;script&gt;" in text


def test_many_layers_use_index_labels() -> None:
    report = {"layers": [_layer(f"w{i}", (2, 4, 8)[i % 3], 1.0 + i) for i in range(500)]}
    text = render_html(report)
    bits, traces = _svgs(text)
    assert bits.count("<rect") == 500 and "500 layers" in bits and "rotate(30)" not in bits
    assert traces.count("<rect") == 500 and "node_w499: trace 500" in traces  # hover title


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-10**12, 10**12) | st.text(max_size=8)
    | st.floats(allow_nan=True, allow_infinity=True),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                 max_size=4),
    max_leaves=12)
_KEYS = st.sampled_from(["layers", "metrics", "pareto", "build", "notes", "bytes_float",
                         "bytes_quant", "avg_weight_bits", "total_trace", "analysis", "model"])
_ROW = st.dictionaries(st.sampled_from(["name", "node", "op", "params", "weight_bits",
                                        "act_bits", "trace", "trace_se", "float_reason"]),
                       _JSON, max_size=9)


@settings(max_examples=150, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(_KEYS, _JSON | st.lists(_ROW, max_size=5), max_size=8))
def test_any_json_shaped_report_renders(report: dict[str, Any]) -> None:
    text = render_html(report)
    _assert_self_contained(text, _parse(text))


def test_quantize_writes_the_html_report(tmp_path: Path) -> None:
    model, calib = save_mlp(tmp_path / "mlp.onnx"), save_data(tmp_path / "calib.npz")
    html_path, json_path = tmp_path / "r.html", tmp_path / "r.json"
    assert main(["quantize", str(model), "-o", str(tmp_path / "q.onnx"), "--calib", str(calib),
                 "--eval", str(calib), "--weight-bits", "4", "--max-calib-samples", "8",
                 "--report", str(json_path), "--report-html", str(html_path)]) == 0
    text = html_path.read_text(encoding="utf-8")
    assert text == render_html(json.loads(json_path.read_text()))
    page = _parse(text)
    _assert_self_contained(text, page)
    assert page.titles[0] == "hawq-onnx quantization report: mlp.onnx"
    assert "fc1 (MatMul): W4, A8" in page.titles  # the bar's hover title
    (bits,) = [s for s in _svgs(text) if "bit widths" in s]
    assert bits.count("<rect") == 2 and "W4" in text
    umask = os.umask(0)
    os.umask(umask)
    assert html_path.stat().st_mode & 0o777 == 0o666 & ~umask
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "calib.npz", "mlp.onnx", "q.onnx", "r.html", "r.json"]


def test_unwritable_html_path_is_a_one_line_error(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(Exception, match="cannot write the HTML report"):
        write_html(tmp_path / "missing-dir" / "r.html", FULL)
    assert list(tmp_path.iterdir()) == []


def test_sixteen_bit_activation_dots_sit_above_eight_bit_weights() -> None:
    """A 16-bit activation must be drawn at 16 on an axis that reaches 16, not clipped to 8."""
    from hawq_onnx.report_html import bit_chart

    report = {"layers": [{"name": "w0", "op": "Gemm", "weight_bits": 8, "act_bits": 8},
                         {"name": "w1", "op": "Gemm", "weight_bits": 8, "act_bits": 16}]}
    svg = bit_chart(report)
    dots = [float(y) for y in re.findall(r'<circle cx="[\d.]+" cy="([\d.]+)"', svg)]
    bars = [float(y) for y in re.findall(r'<rect x="[\d.]+" y="([\d.]+)"', svg)]
    assert len(dots) == 2 and len(bars) == 2
    assert dots[0] == pytest.approx(bars[0])  # the 8-bit dot on top of the 8-bit bar
    assert dots[1] < bars[1] - 10  # SVG y grows downwards: 16 bits is well above the bar
    assert ">16<" in svg  # the axis has a 16-bit tick
