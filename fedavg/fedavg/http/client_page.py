"""What a client's own page shows (``GET /`` on a client), computed from its
private data: the points, the scatter of y against the first feature as SVG
coordinates, its own least-squares line and the last global model it received."""
from __future__ import annotations

from typing import Any

from ..client import LocalClient
from ..trace import fmt

PAGE_ROWS = 500  # the table lists at most this many points (the scatter draws them all)
SVG_W, SVG_H, SVG_PAD = 560, 360, 40


def page_context(client: LocalClient) -> dict[str, Any]:
    """What the client's page shows, computed here from the private data:
    the points, the scatter of y against the first feature as SVG
    coordinates, the local least-squares model and the last global model."""
    x, y = client.X[:, 0], client.y
    theta = client.least_squares()
    last = client.last_global.get()
    lo_x, hi_x = _padded(float(x.min()), float(x.max()))
    # One feature: the y axis must hold the lines too, across the x range.
    ys = [float(y.min()), float(y.max())]
    lines = []
    if client.num_features == 1:
        lines.append(("lstsq", float(theta[0]), float(theta[1])))
        if last is not None:
            lines.append(("global", float(last["w"][0]), float(last["b"])))
        ys += [w * xv + b for _, w, b in lines for xv in (lo_x, hi_x)]
    lo_y, hi_y = _padded(min(ys), max(ys))

    def sx(v: float) -> float:
        return SVG_PAD + (v - lo_x) / (hi_x - lo_x) * (SVG_W - 2 * SVG_PAD)

    def sy(v: float) -> float:
        return SVG_H - SVG_PAD - (v - lo_y) / (hi_y - lo_y) * (SVG_H - 2 * SVG_PAD)

    return {
        "client_id": client.client_id, "n": len(y), "d": client.num_features,
        "rows": [(list(map(float, xr)), float(yr)) for xr, yr in zip(client.X[:PAGE_ROWS], y[:PAGE_ROWS])],
        "points": [(sx(float(a)), sy(float(b))) for a, b in zip(x, y)],
        "lines": [{"name": name, "w": w, "b": b, "x1": sx(lo_x), "y1": sy(w * lo_x + b), "x2": sx(hi_x),
                   "y2": sy(w * hi_x + b)} for name, w, b in lines],
        "lstsq": {"w": theta[:-1].tolist(), "b": float(theta[-1])}, "last": last,
        "axes": {"x": (lo_x, hi_x), "y": (lo_y, hi_y), "w": SVG_W, "h": SVG_H, "pad": SVG_PAD},
        "x_range": (float(x.min()), float(x.max())), "page_rows": PAGE_ROWS, "fmt": fmt,
    }


def _padded(lo: float, hi: float) -> tuple[float, float]:
    """[lo, hi] widened by 5% each side (by 1 when lo == hi), so points are not on the frame."""
    margin = 0.05 * (hi - lo) or 1.0
    return lo - margin, hi + margin
