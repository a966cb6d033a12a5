"""Inline SVG charts, rendered on the server: a line chart, a gauge and a bar.

Written by hand because the page must work offline and make no request beyond its own
(no CDN, no script): a few dozen lines of SVG do what the dashboard needs, and a
JavaScript charting library shipped in the package would still need a client-side
runtime and a Content-Security-Policy exception. Every number is formatted here and
every label escaped, so templates only place the markup.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from html import escape

from markupsafe import Markup

__all__ = ["bar", "gauge", "line_chart"]

_INK = "#1f2937"
_GRID = "#d1d5db"


def _safe(svg: str) -> Markup:
    # Every value placed in ``svg`` is a number formatted here or a string passed through
    # html.escape, so the markup is safe by construction.
    return Markup(svg)  # noqa: S704


def _fmt(value: float) -> str:
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"


def line_chart(
    series: Sequence[tuple[str, str, Sequence[tuple[float, float]]]],
    *,
    width: int = 460,
    height: int = 220,
    x_label: str = "round",
    title: str = "",
    zero_based: bool = True,
) -> Markup:
    """One or more series ``(name, colour, [(x, y), ...])`` on shared axes, values labelled.

    ``zero_based`` starts the y axis at 0; otherwise it starts just below the data (for
    accuracies that move in the second decimal).
    """
    points = [p for _, _, pts in series for p in pts]
    if not points:
        return _safe(f'<p class="empty">{escape(title)}: no data yet</p>')
    left, right, top, bottom = 52, 16, 28, 40
    xs = [p[0] for p in points]
    ys = [p[1] for p in points]
    x0, x1 = min(xs), max(xs)
    y0, y1 = (min(0.0, *ys), max(ys)) if zero_based else (min(ys), max(ys))
    if not zero_based:
        y0 -= (y1 - y0) * 0.25 or 0.05
    if x1 == x0:
        x1 = x0 + 1
    if y1 == y0:
        y1 = y0 + 1
    y1 += (y1 - y0) * 0.12

    pad = 22  # keeps the first and last value labels clear of the axes

    def sx(x: float) -> float:
        return left + pad + (x - x0) / (x1 - x0) * (width - left - right - 2 * pad)

    def sy(y: float) -> float:
        return height - bottom - (y - y0) / (y1 - y0) * (height - top - bottom)

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" '
        f'width="{width}" height="{height}" role="img" aria-label="{escape(title)}">',
        f'<text x="{left}" y="16" font-size="13" font-weight="600" fill="{_INK}">'
        f"{escape(title)}</text>",
    ]
    for tick in range(5):
        y = y0 + (y1 - y0) * tick / 4
        parts.append(
            f'<line x1="{left}" x2="{width - right}" y1="{sy(y):.1f}" y2="{sy(y):.1f}" '
            f'stroke="{_GRID}" stroke-width="1"/>'
            f'<text x="{left - 6}" y="{sy(y) + 4:.1f}" font-size="11" text-anchor="end" '
            f'fill="{_INK}">{_fmt(y)}</text>'
        )
    for x in sorted(set(xs)):
        parts.append(
            f'<text x="{sx(x):.1f}" y="{height - bottom + 16}" font-size="11" '
            f'text-anchor="middle" fill="{_INK}">{_fmt(x)}</text>'
        )
    parts.append(
        f'<text x="{(left + width - right) / 2:.1f}" y="{height - 6}" font-size="11" '
        f'text-anchor="middle" fill="{_INK}">{escape(x_label)}</text>'
    )
    for index, (name, colour, pts) in enumerate(series):
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
        parts.append(
            f'<polyline points="{path}" fill="none" stroke="{escape(colour)}" stroke-width="2.5"/>'
        )
        for x, y in pts:
            parts.append(
                f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3.5" fill="{escape(colour)}"/>'
                f'<text x="{sx(x):.1f}" y="{sy(y) - 8:.1f}" font-size="11" '
                f'text-anchor="middle" fill="{escape(colour)}">{_fmt(y)}</text>'
            )
        parts.append(
            f'<rect x="{width - right - 120}" y="{6 + 14 * index}" width="10" height="10" '
            f'fill="{escape(colour)}"/><text x="{width - right - 105}" y="{15 + 14 * index}" '
            f'font-size="11" fill="{_INK}">{escape(name)}</text>'
        )
    parts.append("</svg>")
    return _safe("".join(parts))


def gauge(used: float, total: float, *, label: str, width: int = 200) -> Markup:
    """A half-circle gauge of ``used`` out of ``total``, green to red as it fills."""
    fraction = 0.0 if total <= 0 else max(0.0, min(1.0, used / total))
    height = width * 0.62
    cx, cy, r = width / 2, width / 2, width / 2 - 14

    def point(f: float) -> tuple[float, float]:
        angle = math.pi * (1 - f)
        return cx + r * math.cos(angle), cy - r * math.sin(angle)

    (ax, ay), (bx, by) = point(0.0), point(1.0)
    fx, fy = point(fraction)
    colour = "#16a34a" if fraction < 0.6 else "#d97706" if fraction < 0.9 else "#dc2626"
    return _safe(
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height:.0f}" '
        f'width="{width}" height="{height:.0f}" role="img" '
        f'aria-label="{escape(label)}: {used:.3f} of {total:g}">'
        f'<path d="M {ax:.1f} {ay:.1f} A {r} {r} 0 0 1 {bx:.1f} {by:.1f}" fill="none" '
        f'stroke="{_GRID}" stroke-width="16"/>'
        + (
            f'<path d="M {ax:.1f} {ay:.1f} A {r} {r} 0 0 1 {fx:.1f} {fy:.1f}" fill="none" '
            f'stroke="{colour}" stroke-width="16"/>'
            if fraction > 0
            else ""
        )
        + f'<text x="{cx}" y="{cy - 14:.1f}" font-size="20" font-weight="700" '
        f'text-anchor="middle" fill="{_INK}">{used:.3f}</text>'
        f'<text x="{cx}" y="{cy + 4:.1f}" font-size="12" text-anchor="middle" '
        f'fill="{_INK}">of {total:g} ({fraction:.0%})</text></svg>'
    )


def bar(value: float, threshold: float, *, width: int = 160) -> Markup:
    """A horizontal bar of a PSI against its threshold (the tick)."""
    scale = max(threshold * 2, value, 1e-9)
    filled = min(1.0, value / scale) * width
    tick = threshold / scale * width
    colour = "#dc2626" if value >= threshold else "#2563eb"
    return _safe(
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="14" '
        f'viewBox="0 0 {width} 14" aria-hidden="true">'
        f'<rect x="0" y="2" width="{width}" height="10" fill="#e5e7eb"/>'
        f'<rect x="0" y="2" width="{filled:.1f}" height="10" fill="{colour}"/>'
        f'<line x1="{tick:.1f}" x2="{tick:.1f}" y1="0" y2="14" stroke="{_INK}" '
        'stroke-width="2"/></svg>'
    )
