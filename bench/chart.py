#!/usr/bin/env python3
"""Charts of the benchmark's emergency scenarios, as hand-written SVG.

One picture per scenario: the latency of every emergency message (from the
relay's 250 to its arrival at the sink) against the time it was sent, every
relay on the same axes. Standard library only, so `make bench` needs no
plotting package.

`python3 bench/chart.py [results.json]` redraws the charts from a saved run
(default target/bench/results.json) into the same directory.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from xml.sax.saxutils import escape

# Colour-blind-safe (Okabe-Ito), each with its own marker shape, so the
# series stay apart in grey print too.
COLOURS = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9"]
MARKERS = ["circle", "square", "triangle", "diamond", "circle", "square"]

WIDTH, HEIGHT = 760, 440
LEFT, RIGHT, TOP, BOTTOM = 86, 24, 48, 106  # plot margins; the legend sits below the x axis


def nice_step(span: float, target_ticks: int = 6) -> float:
    """A 1/2/5 x 10^n step giving about `target_ticks` ticks over `span`."""
    if span <= 0 or not math.isfinite(span):
        return 1.0
    raw = span / target_ticks
    mag = 10 ** math.floor(math.log10(raw))
    for m in (1, 2, 5, 10):
        if raw <= m * mag:
            return m * mag
    return 10 * mag


def linear_ticks(lo: float, hi: float) -> tuple[float, float, list[float]]:
    """(axis low, axis high, tick values) covering [lo, hi] on round numbers."""
    if hi <= lo:
        hi = lo + 1.0
    step = nice_step(hi - lo)
    start = math.floor(lo / step) * step
    end = math.ceil(hi / step) * step
    ticks = []
    v = start
    for _ in range(100):
        if v > end + step / 2:
            break
        ticks.append(round(v, 10))
        v += step
    return start, end, ticks


def log_ticks(lo: float, hi: float) -> tuple[float, float, list[float]]:
    """Decades covering [lo, hi] (both > 0)."""
    a = math.floor(math.log10(lo))
    b = math.ceil(math.log10(hi))
    if b == a:
        b = a + 1
    return 10.0**a, 10.0**b, [10.0**e for e in range(a, b + 1)]


def tick_label(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    if abs(v) >= 1:
        return f"{v:g}"
    return f"{v:.3g}"


def marker(shape: str, x: float, y: float, colour: str, hollow: bool = False) -> str:
    """A filled marker, or a hollow one for a value drawn at the axis floor."""
    paint = f'fill="#ffffff" stroke="{colour}" stroke-width="1.5"' if hollow else f'fill="{colour}"'
    r = 4.0
    if shape == "square":
        return f'<rect x="{x - r:.1f}" y="{y - r:.1f}" width="{2 * r:.1f}" height="{2 * r:.1f}" {paint}/>'
    if shape == "triangle":
        pts = f"{x:.1f},{y - r - 1:.1f} {x - r - 0.5:.1f},{y + r:.1f} {x + r + 0.5:.1f},{y + r:.1f}"
        return f'<polygon points="{pts}" {paint}/>'
    if shape == "diamond":
        pts = f"{x:.1f},{y - r - 1:.1f} {x + r + 1:.1f},{y:.1f} {x:.1f},{y + r + 1:.1f} {x - r - 1:.1f},{y:.1f}"
        return f'<polygon points="{pts}" {paint}/>'
    return f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{r:.1f}" {paint}/>'


def latency_chart(
    title: str,
    series: list[tuple[str, list[tuple[float, float | None]]]],
    x_label: str = "sent at (s after the first emergency message)",
    y_label: str = "latency, 250 to arrival at the sink (ms)",
    note: str = "",
    guides: list[tuple[float, str]] = (),
) -> str:
    """An SVG document: one line and marker series per relay.

    `series` is [(label, [(x seconds, y ms or None), ...]), ...]; None means
    the message never arrived and is counted in the legend. The y axis turns
    logarithmic when the values span more than two decades (one relay in
    milliseconds, another in tens of seconds); values at or below its floor
    (a latency of 0 or less: the message reached the sink before the client
    had read its 250) are drawn hollow on the floor, which is labelled
    "≤". `guides` are dashed
    horizontal lines with a label, such as one bulk transaction's time.
    """
    xs = [x for _, pts in series for x, y in pts if y is not None]
    ys = [y for _, pts in series for x, y in pts if y is not None]
    ys += [g for g, _ in guides]
    if not xs:
        xs, ys = [0.0, 1.0], [0.0, 1.0]
    x0, x1, xticks = linear_ticks(min(0.0, min(xs)), max(xs))
    positive = [y for y in ys if y > 0]
    use_log = bool(positive) and max(positive) / max(min(positive), 1e-9) > 100
    any_clamped = False
    if use_log:
        floor = max(min(positive), 0.01)
        y0, y1, yticks = log_ticks(floor, max(positive))
        any_clamped = min(ys) < y0
    else:
        y0, y1, yticks = linear_ticks(min(0.0, min(ys)), max(ys) * 1.05 if max(ys) > 0 else 1.0)

    pw, ph = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def px(x: float) -> float:
        return LEFT + (x - x0) / (x1 - x0) * pw

    def clamped(y: float) -> bool:
        return use_log and y < y0

    def py(y: float) -> float:
        if use_log:
            y = max(y, y0)
            f = (math.log10(y) - math.log10(y0)) / (math.log10(y1) - math.log10(y0))
        else:
            f = (y - y0) / (y1 - y0)
        return TOP + ph - f * ph

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
        f'viewBox="0 0 {WIDTH} {HEIGHT}" font-family="DejaVu Sans, Helvetica, Arial, sans-serif" font-size="12">',
        f"<title>{escape(title)}</title>",
        f'<rect x="0" y="0" width="{WIDTH}" height="{HEIGHT}" fill="#ffffff"/>',
        f'<text x="{WIDTH / 2:.0f}" y="22" text-anchor="middle" font-size="15" font-weight="bold">{escape(title)}</text>',
    ]
    if note:
        out.append(f'<text x="{WIDTH / 2:.0f}" y="38" text-anchor="middle" fill="#444444">{escape(note)}</text>')
    # Grid, ticks and tick labels.
    out.append('<g class="y-axis" stroke="#dddddd" stroke-width="1">')
    for t in yticks:
        y = py(t)
        out.append(f'<line x1="{LEFT}" y1="{y:.1f}" x2="{LEFT + pw}" y2="{y:.1f}"/>')
    out.append("</g>")
    out.append('<g class="y-ticks" text-anchor="end" fill="#222222">')
    for i, t in enumerate(yticks):
        text = ("≤ " if i == 0 and any_clamped else "") + tick_label(t)
        out.append(f'<text x="{LEFT - 8}" y="{py(t) + 4:.1f}">{escape(text)}</text>')
    out.append("</g>")
    out.append('<g class="x-axis" stroke="#dddddd" stroke-width="1">')
    for t in xticks:
        x = px(t)
        out.append(f'<line x1="{x:.1f}" y1="{TOP}" x2="{x:.1f}" y2="{TOP + ph}"/>')
    out.append("</g>")
    out.append('<g class="x-ticks" text-anchor="middle" fill="#222222">')
    for t in xticks:
        out.append(f'<text x="{px(t):.1f}" y="{TOP + ph + 18}">{escape(tick_label(t))}</text>')
    out.append("</g>")
    out.append(
        f'<rect x="{LEFT}" y="{TOP}" width="{pw}" height="{ph}" fill="none" stroke="#333333" stroke-width="1"/>'
    )
    out.append(f'<text x="{LEFT + pw / 2:.0f}" y="{TOP + ph + 38}" text-anchor="middle">{escape(x_label)}</text>')
    cy = TOP + ph / 2
    scale_note = " (log scale)" if use_log else ""
    out.append(
        f'<text x="18" y="{cy:.0f}" text-anchor="middle" transform="rotate(-90 18 {cy:.0f})">'
        f"{escape(y_label + scale_note)}</text>"
    )
    for value, text in guides:
        y = py(value)
        out.append('<g class="guide" fill="#555555">')
        out.append(
            f'<line x1="{LEFT}" y1="{y:.1f}" x2="{LEFT + pw}" y2="{y:.1f}" stroke="#555555" stroke-dasharray="6 4"/>'
        )
        out.append(
            f'<text x="{LEFT + pw - 4}" y="{y - 5:.1f}" text-anchor="end" stroke="#ffffff" stroke-width="3" '
            f'paint-order="stroke">{escape(text)}</text>'
        )
        out.append("</g>")
    # Series, then the legend below the plot (never over the data).
    legend_y = TOP + ph + 62
    col_w = pw / max(1, min(3, len(series)))
    for i, (label, pts) in enumerate(series):
        colour, shape = COLOURS[i % len(COLOURS)], MARKERS[i % len(MARKERS)]
        shown = sorted((x, y) for x, y in pts if y is not None)
        missing = sum(1 for _, y in pts if y is None)
        out.append(f'<g class="series" data-label="{escape(label, {chr(34): "&quot;"})}">')
        if len(shown) > 1:
            path = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in shown)
            out.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="1.5" stroke-opacity="0.7"/>')
        for x, y in shown:
            out.append(marker(shape, px(x), py(y), colour, hollow=clamped(y)))
        out.append("</g>")
        lx = LEFT + (i % 3) * col_w
        ly = legend_y + (i // 3) * 20
        text = label + (f" ({missing} never arrived)" if missing else "")
        out.append('<g class="legend">')
        out.append(f'<line x1="{lx:.1f}" y1="{ly:.1f}" x2="{lx + 24:.1f}" y2="{ly:.1f}" stroke="{colour}" stroke-width="2"/>')
        out.append(marker(shape, lx + 12, ly, colour))
        out.append(f'<text x="{lx + 32:.1f}" y="{ly + 4:.1f}">{escape(text)}</text>')
        out.append("</g>")
    if any_clamped:
        out.append(
            f'<text class="footnote" x="{LEFT}" y="{HEIGHT - 10}" font-size="11" fill="#444444">'
            f"{escape(f'Hollow: {tick_label(y0)} ms or less; at or below 0, the message reached the sink before the client read its 250.')}"
            "</text>"
        )
    out.append("</svg>")
    return "\n".join(out) + "\n"


# The scenarios of bench/run.py that send emergency messages: results.json
# key, variant (None: every row), chart file stem, title.
SCENARIOS = [
    ("emergency", "backlog", "backlog", "Emergency lane: bulk queued for a slow smarthost"),
    ("emergency", "arriving", "arriving", "Emergency lane: bulk arriving at full rate"),
    ("shared_workers", None, "shared-workers", "Shared workers: 2 workers serve pools B (priority 5) and A"),
]


def guides_of(key: str, rows: list[dict]) -> list[tuple[float, str]]:
    """The shared-worker chart marks one bulk transaction: the wait a
    worker that is busy with bulk mail adds, and what `reserve_workers` saves."""
    delay = rows[0].get("sink_delay_ms") if key == "shared_workers" else None
    return [(float(delay), f"one bulk transaction ({delay} ms)")] if delay else []


def series_of(rows: list[dict]) -> list[tuple[str, list[tuple[float, float | None]]]]:
    out = []
    for r in rows:
        lat = r.get("latency_ms_in_send_order") or []
        at = r.get("sent_at_s") or [i * r.get("spacing_s", 0.25) for i in range(len(lat))]
        out.append((r.get("label") or r["relay"], list(zip(at, lat))))
    return out


def write_charts(res: dict, out_dir: Path) -> list[Path]:
    """Writes target/bench/emergency-<scenario>.svg for each scenario in `res`."""
    written = []
    for key, variant, stem, title in SCENARIOS:
        rows = [
            r
            for r in res.get(key) or []
            if (variant is None or r.get("variant") == variant) and r.get("latency_ms_in_send_order")
        ]
        if not rows:
            continue
        note = f"BENCH_SCALE={res.get('scale', '?')}"
        bulk = rows[0].get("bulk_messages")
        if bulk:
            note += f", {bulk:,} bulk messages"
        note += f", {len(rows[0]['latency_ms_in_send_order'])} emergency messages; every point is one"
        path = out_dir / f"emergency-{stem}.svg"
        path.write_text(latency_chart(title, series_of(rows), note=note, guides=guides_of(key, rows)))
        written.append(path)
    return written


def main() -> int:
    target = Path(os.environ.get("CARGO_TARGET_DIR", Path(__file__).resolve().parent.parent / "target"))
    src = Path(sys.argv[1]) if len(sys.argv) > 1 else target / "bench" / "results.json"
    res = json.loads(src.read_text())
    for p in write_charts(res, src.parent):
        print(f"written: {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
