"""Instrument catalogue and shapes for the synthetic trays.

Each class is a fine-grained variant (family x variant x tip x size x handle colour) with a readable
name; ``instrument_parts`` turns one class into filled polygons in the instrument's own frame
(x along the length from the handle end at 0 to the tip at ``length``, y across, both in pixels),
each tagged with a material so that the renderer can shade steel, coloured handles and seams.

Over 400 lines on purpose: it is mostly data, one shape function per instrument family.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from surgdino.errors import ConfigError

MAX_CLASSES = 500

# Materials of a polygon; CUT clears what was drawn before (ring holes, gaps between jaws).
CUT, STEEL, HANDLE, BRIGHT, DARK = 0, 1, 2, 3, 4

FAMILIES = ["scissors", "forceps", "clamp", "needle holder", "scalpel", "retractor", "probe"]
_VARIANTS = {
    "scissors": ["Metzenbaum", "Mayo", "Iris", "Potts-Smith"],
    "forceps": ["Adson", "DeBakey", "Dressing", "Gerald", "Bayonet"],
    "clamp": ["Kelly", "Mosquito", "Kocher", "Allis", "Babcock", "Rochester-Pean"],
    "needle holder": ["Mayo-Hegar", "Crile-Wood", "Olsen-Hegar", "Castroviejo", "Webster"],
    "scalpel": ["No. 3", "No. 4", "No. 7", "Round-knurled"],
    "retractor": ["Army-Navy", "Senn", "Volkmann", "Richardson", "Deaver"],
    "probe": ["Ball-tip", "Grooved director", "Lacrimal", "Malleable", "Explorer"],
}
_TIPS = {
    "scissors": ["straight blunt tip", "curved blunt tip", "straight sharp tip", "curved sharp tip"],
    "forceps": ["straight smooth tip", "straight toothed tip", "curved tip"],
    "clamp": ["straight tip", "curved tip"],
    "needle holder": ["straight jaw", "curved jaw"],
    "scalpel": ["#10 blade", "#11 blade", "#15 blade", "#20 blade"],
    "retractor": ["narrow blade", "wide blade", "3-prong rake", "6-prong rake"],
    "probe": ["straight tip", "angled tip", "hooked tip"],
}
_SIZES_CM = {
    "scissors": [14.5, 18.0, 11.5, 23.0],
    "forceps": [15.0, 12.0, 18.0, 20.0],
    "clamp": [14.0, 12.5, 16.0, 20.0],
    "needle holder": [15.0, 12.0, 18.0, 20.0],
    "scalpel": [13.0, 16.0, 20.0],
    "retractor": [21.0, 16.0, 25.0],
    "probe": [14.5, 12.0, 18.0],
}
HANDLE_COLOURS = ["steel", "gold", "black", "blue", "green"]
_HANDLE_NOUN = {"scissors": "ring handle", "clamp": "ring handle", "needle holder": "ring handle", "forceps": "grip"}


@dataclass(frozen=True)
class InstrumentClass:
    """One fine-grained class: what it is called and what its drawing depends on."""

    family: str
    variant: str
    tip: str
    size_cm: float
    handle: str
    name: str


def _family_classes(family: str) -> list[InstrumentClass]:
    """All variants of one family, ordered so that neighbours differ in shape first, then colour, tip, size.

    The colour order is rotated per family, so the first class of each family has its own handle colour."""
    out = []
    variants, tips, sizes = _VARIANTS[family], _TIPS[family], _SIZES_CM[family]
    noun = _HANDLE_NOUN.get(family, "handle")
    shift = FAMILIES.index(family)
    colours = HANDLE_COLOURS[shift % 5:] + HANDLE_COLOURS[:shift % 5]
    for size in sizes:
        for tip in tips:
            for colour in colours:
                for variant in variants:
                    name = f"{variant} {family}, {tip}, {size:g} cm, {colour} {noun}"
                    out.append(InstrumentClass(family, variant, tip, size, colour, name))
    return out


@functools.cache
def _all_classes() -> tuple[InstrumentClass, ...]:
    per_family = [_family_classes(f) for f in FAMILIES]
    out = []
    for j in range(max(len(p) for p in per_family)):
        for fam in per_family:
            if j < len(fam):
                out.append(fam[j])
    return tuple(out)


def instrument_classes(num_classes: int) -> list[InstrumentClass]:
    """The first ``num_classes`` classes; the first seven are the seven families."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)):
        raise ConfigError(f"num_classes={num_classes!r}: expected an integer between 1 and {MAX_CLASSES}")
    if not 1 <= num_classes <= MAX_CLASSES:
        raise ConfigError(
            f"num_classes={num_classes}: the synthetic instrument generator has 1 to {MAX_CLASSES} classes; "
            f"pass --num-classes between 1 and {MAX_CLASSES}"
        )
    return list(_all_classes()[:num_classes])


def instrument_class_names(num_classes: int) -> list[str]:
    """Readable fine-grained names, e.g. 'Metzenbaum scissors, curved blunt tip, 18 cm, gold ring handle'."""
    return [c.name for c in instrument_classes(num_classes)]


# ---- geometry helpers (all coordinates in pixels of the instrument frame) ----

def _strip(xs: np.ndarray, ys: np.ndarray, hw: np.ndarray, min_hw: float = 0.7) -> np.ndarray:
    """Polygon of a band of half-width ``hw`` (at least ``min_hw`` pixels) around the centre line (xs, ys)."""
    pts = np.stack([xs, ys], 1)  # [N, 2]
    d = np.gradient(pts, axis=0)
    d /= np.linalg.norm(d, axis=1, keepdims=True) + 1e-9
    n = np.stack([-d[:, 1], d[:, 0]], 1)
    hw = np.maximum(np.asarray(hw, dtype=np.float64), min_hw)[:, None]
    return np.concatenate([pts + n * hw, (pts - n * hw)[::-1]], 0)  # [2N, 2]


def _ellipse(cx: float, cy: float, rx: float, ry: float, n: int = 24, rot: float = 0.0) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    x, y = rx * np.cos(t), ry * np.sin(t)
    c, s = np.cos(rot), np.sin(rot)
    return np.stack([cx + c * x - s * y, cy + s * x + c * y], 1)  # [n, 2]


def _rect(x0: float, x1: float, y0: float, y1: float) -> np.ndarray:
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=np.float64)


def _profile(s: np.ndarray, knots: list[float], widths: list[float]) -> np.ndarray:
    return np.interp(s, knots, widths)


def _line(x0: float, x1: float, y0: float = 0.0, n: int = 24, curve: float = 0.0, curve_from: float = 0.0,
          bend: float = 0.0, bend_at: float = 1.0, hook: float = 0.0):
    """Centre line from x0 to x1: optional parabolic curve, a kink of ``bend`` radians and an end hook."""
    s = np.linspace(0.0, 1.0, n)
    length = x1 - x0
    xs = x0 + s * length
    q = np.clip((s - curve_from) / max(1e-6, 1 - curve_from), 0, 1)
    ys = y0 + curve * length * q**2
    if bend:
        past = np.clip(s - bend_at, 0, None) * length
        xs = xs - past * (1 - np.cos(bend))
        ys = ys + past * np.sin(bend)
    if hook:
        q = np.clip((s - 0.88) / 0.12, 0, 1)
        ys = ys + hook * length * q**2
        xs = xs - 0.5 * hook * length * q**3
    return s, xs, ys


def _rings(L: float, cx: float, cy: float, rx: float, ry: float, t: float, tilt: float) -> list:
    parts = []
    for sign in (-1, 1):
        parts.append((_ellipse(cx, sign * cy, rx, ry, 28, sign * tilt), HANDLE))
        parts.append((_ellipse(cx, sign * cy, rx - t, ry - t, 28, sign * tilt), CUT))
    return parts


def _ringed(L: float, pivot: float, ring: float = 1.0, ratchet: bool = True, tilt: float = 0.2) -> list:
    """Two shanks from finger rings to a pivot at ``pivot*L`` (scissors, clamps, needle holders)."""
    rx, ry, t = 0.085 * L * ring, 0.062 * L * ring, max(0.017 * L, 1.6)
    cx, cy = 0.085 * L * ring + 0.01 * L, 0.08 * L * ring
    parts = []
    for sign in (-1, 1):
        s, xs, ys = _line(cx + 0.4 * rx, pivot * L, sign * (cy - 0.3 * ry), 12)
        ys = ys - sign * (cy - 0.3 * ry - 0.012 * L) * s**0.8
        parts.append((_strip(xs, ys, _profile(s, [0, 1], [0.018 * L, 0.014 * L])), STEEL))
    parts += _rings(L, cx, cy, rx, ry, t, tilt)
    if ratchet:
        x0 = cx + rx + 0.01 * L
        parts.append((_rect(x0, x0 + 0.07 * L, -0.03 * L, 0.03 * L), STEEL))
        for k in range(4):
            xk = x0 + (0.012 + 0.015 * k) * L
            parts.append((_rect(xk, xk + max(0.004 * L, 0.8), -0.022 * L, 0.022 * L), DARK))
    return parts


def _scissors(c: InstrumentClass, L: float) -> list:
    v = c.variant
    pivot = {"Metzenbaum": 0.6, "Mayo": 0.5, "Iris": 0.55, "Potts-Smith": 0.68}[v]
    bw = {"Metzenbaum": 0.026, "Mayo": 0.04, "Iris": 0.028, "Potts-Smith": 0.018}[v] * L
    sharp = "sharp" in c.tip
    tip_w = (0.002 if sharp else 0.012) * L
    curve = 0.12 if "curved" in c.tip else 0.0
    bend = 0.6 if v == "Potts-Smith" else 0.0
    parts = _ringed(L, pivot, ring=1.1 if v == "Mayo" else 1.0, ratchet=False)
    s, xs, ys = _line(pivot * L - 0.04 * L, L, 0.0, 24, curve=curve, curve_from=0.3, bend=bend, bend_at=0.15)
    parts.append((_strip(xs, ys, _profile(s, [0, 0.15, 0.7, 1], [0.8 * bw, bw, 0.7 * bw, tip_w])), BRIGHT))
    k = (s > 0.12) & (s < 0.93)
    parts.append((_strip(xs[k], ys[k] + 0.15 * bw, np.full(k.sum(), 0.0035 * L), 0.3), DARK))
    parts.append((_ellipse(pivot * L, 0.0, 0.022 * L, 0.022 * L, 16), STEEL))
    return parts


def _clamp(c: InstrumentClass, L: float) -> list:
    v = c.variant
    pivot = {"Kelly": 0.58, "Mosquito": 0.6, "Kocher": 0.58, "Allis": 0.6, "Babcock": 0.6, "Rochester-Pean": 0.55}[v]
    jw = {"Kelly": 0.022, "Mosquito": 0.015, "Kocher": 0.024, "Allis": 0.016, "Babcock": 0.016,
          "Rochester-Pean": 0.03}[v] * L
    curve = 0.1 if "curved" in c.tip else 0.0
    parts = _ringed(L, pivot, ring=0.9)
    s, xs, ys = _line(pivot * L, L, 0.0, 24, curve=curve, curve_from=0.2)
    parts.append((_strip(xs, ys, _profile(s, [0, 0.3, 1], [jw, 0.9 * jw, 0.45 * jw])), STEEL))
    k = s > 0.1
    parts.append((_strip(xs[k], ys[k], np.full(k.sum(), 0.003 * L), 0.3), DARK))
    bx = pivot * L
    parts.append((_rect(bx - 0.04 * L, bx + 0.04 * L, -0.032 * L, 0.032 * L), DARK))
    parts.append((_rect(bx - 0.034 * L, bx + 0.034 * L, -0.026 * L, 0.026 * L), STEEL))
    tx, ty = xs[-1], ys[-1]
    if v == "Allis":
        parts.append((_ellipse(tx - 0.01 * L, ty, 0.018 * L, 0.04 * L, 16), STEEL))
        parts.append((_rect(tx + 0.002 * L, tx + 0.008 * L, ty - 0.035 * L, ty + 0.035 * L), DARK))
    elif v == "Babcock":
        parts.append((_ellipse(tx - 0.02 * L, ty, 0.035 * L, 0.045 * L, 20), STEEL))
        parts.append((_ellipse(tx - 0.02 * L, ty, 0.02 * L, 0.03 * L, 20), CUT))
    elif v == "Kocher":
        parts.append((_ellipse(tx - 0.008 * L, ty, 0.014 * L, 0.016 * L, 12), STEEL))
        parts.append((_rect(tx - 0.012 * L, tx - 0.006 * L, ty - 0.012 * L, ty + 0.012 * L), DARK))
    return parts


def _needle_holder(c: InstrumentClass, L: float) -> list:
    v = c.variant
    curve = 0.12 if "curved" in c.tip else 0.0
    jaw_mat = HANDLE if c.handle == "gold" else BRIGHT
    if v == "Castroviejo":
        pivot = 0.74
        s, xs, ys = _line(0.0, pivot * L, 0.0, 16)
        parts = [(_strip(xs, ys, _profile(s, [0, 0.1, 0.7, 1], [0.02 * L, 0.05 * L, 0.045 * L, 0.015 * L])), HANDLE)]
        parts.append((_strip(xs[2:-2], ys[2:-2], _profile(s[2:-2], [0, 0.3, 0.8, 1], [0.0, 0.022 * L, 0.02 * L, 0.0])), CUT))
        parts.append((_rect(0.45 * L, 0.5 * L, -0.04 * L, 0.04 * L), STEEL))
        jw = 0.012 * L
    else:
        pivot = {"Mayo-Hegar": 0.7, "Crile-Wood": 0.72, "Olsen-Hegar": 0.66, "Webster": 0.7}[v]
        jw = {"Mayo-Hegar": 0.034, "Crile-Wood": 0.026, "Olsen-Hegar": 0.032, "Webster": 0.024}[v] * L
        parts = _ringed(L, pivot, ring=0.95)
        bx = pivot * L
        parts.append((_rect(bx - 0.045 * L, bx + 0.04 * L, -0.036 * L, 0.036 * L), STEEL))
    s, xs, ys = _line(pivot * L, L, 0.0, 16, curve=curve, curve_from=0.2)
    parts.append((_strip(xs, ys, _profile(s, [0, 0.2, 1], [1.1 * jw, jw, 0.75 * jw])), jaw_mat))
    parts.append((_ellipse(xs[-1], ys[-1], 0.75 * jw, 0.75 * jw, 12), jaw_mat))
    for q in (0.35, 0.55, 0.75):
        i = int(q * (len(xs) - 1))
        parts.append((_rect(xs[i], xs[i] + max(0.004 * L, 0.8), ys[i] - 0.7 * jw, ys[i] + 0.7 * jw), DARK))
    if v == "Olsen-Hegar":
        parts.append((_rect(pivot * L + 0.03 * L, pivot * L + 0.12 * L, -0.004 * L, 0.004 * L), DARK))
    return parts


def _forceps(c: InstrumentClass, L: float) -> list:
    v = c.variant
    mw, taper, tip_w = {"Adson": (0.05, 0.55, 0.01), "DeBakey": (0.03, 0.75, 0.012), "Dressing": (0.045, 0.7, 0.014),
                        "Gerald": (0.035, 0.62, 0.006), "Bayonet": (0.035, 0.5, 0.01)}[v]
    mw, tip_w = mw * L, tip_w * L
    curve = 0.1 if "curved" in c.tip else 0.0
    s, xs, ys = _line(0.0, L, 0.0, 32, curve=curve, curve_from=0.75)
    if v == "Bayonet":
        ys = ys + 0.05 * L * np.clip((s - 0.45) / 0.08, 0, 1)
    hw = _profile(s, [0, 0.04, 0.3, 0.5, taper, 1], [0.018 * L, 0.03 * L, mw, 0.9 * mw, 0.5 * mw, tip_w])
    parts = [(_strip(xs, ys, hw), STEEL)]
    g = (s > 0.22) & (s < min(0.55, taper))
    parts.append((_strip(xs[g], ys[g], hw[g] * 0.85), HANDLE))
    for q in np.linspace(0.25, min(0.52, taper - 0.03), 6):
        i = int(q * (len(xs) - 1))
        parts.append((_rect(xs[i], xs[i] + max(0.004 * L, 0.8), ys[i] - 0.6 * hw[i], ys[i] + 0.6 * hw[i]), DARK))
    gap = (s > 0.05) & (s < 0.93)
    gw = _profile(s[gap], [0.05, 0.3, 0.7, 0.93], [0.0, 0.012 * L, 0.006 * L, 0.0])
    parts.append((_strip(xs[gap], ys[gap], gw), CUT))
    if "toothed" in c.tip:
        parts.append((_ellipse(xs[-1], ys[-1], 1.2 * tip_w, 1.4 * tip_w, 10), STEEL))
    return parts


def _scalpel(c: InstrumentClass, L: float) -> list:
    v = c.variant
    hl = 0.78 if v == "No. 7" else 0.72
    w = {"No. 3": 0.045, "No. 4": 0.055, "No. 7": 0.032, "Round-knurled": 0.035}[v] * L
    s, xs, ys = _line(0.0, hl * L, 0.0, 16)
    prof = [0.8 * w, w, w, 0.7 * w, 0.35 * w] if v != "Round-knurled" else [w, w, w, w, 0.4 * w]
    parts = [(_strip(xs, ys, _profile(s, [0, 0.1, 0.6, 0.9, 1], prof)), STEEL)]
    g = (s > 0.1) & (s < 0.6)
    parts.append((_strip(xs[g], ys[g], np.full(g.sum(), 0.8 * w)), HANDLE))
    for q in np.linspace(0.15, 0.55, 9 if v == "Round-knurled" else 5):
        parts.append((_rect(q * hl * L, q * hl * L + max(0.004 * L, 0.8), -0.7 * w, 0.7 * w), DARK))
    bx = hl * L - 0.03 * L
    blade = c.tip.split()[0]
    bl = (L - bx) * (0.75 if blade == "#15" else 1.0)
    if blade == "#11":
        pts = [(0, -0.12), (1.0, -0.12), (0.05, 0.2), (0, 0.15)]
    else:
        belly = {"#10": 0.2, "#15": 0.16, "#20": 0.26}[blade]
        pts = [(0, -0.12), (0.92, -0.12), (1.0, -0.06), (0.88, 0.6 * belly), (0.65, belly), (0.3, belly),
               (0.06, 0.8 * belly), (0, 0.6 * belly)]
    poly = np.array(pts, dtype=np.float64) * bl
    poly[:, 0] += bx
    parts.append((poly, BRIGHT))
    parts.append((_rect(bx, bx + 0.3 * bl, -0.025 * bl, 0.025 * bl), DARK))
    return parts


def _rake(x0: float, x1: float, half: float, n: int, w: float) -> list:
    parts = []
    for y in np.linspace(-half, half, n):
        s, xs, ys = _line(x0, x1, 0.5 * y, 8)
        ys = ys + 0.5 * y * s
        parts.append((_strip(xs, ys, np.full(len(s), w)), STEEL))
        parts.append((_ellipse(xs[-1], ys[-1], 1.3 * w, 1.3 * w, 10), STEEL))
    return parts


def _blade_end(c: InstrumentClass, L: float, x0: float, scale: float = 1.0) -> list:
    tip = c.tip
    if "prong" in tip:
        n = 3 if tip.startswith("3") else 6
        return _rake(x0, L, (0.05 if n == 3 else 0.09) * L * scale, n, max(0.009 * L, 1.0))
    w = (0.06 if tip.startswith("narrow") else 0.1) * L * scale
    s, xs, ys = _line(x0, L, 0.0, 8)
    return [(_strip(xs, ys, _profile(s, [0, 0.3, 1], [0.5 * w, w, 0.9 * w])), STEEL)]


def _retractor(c: InstrumentClass, L: float) -> list:
    v = c.variant
    if v in ("Army-Navy", "Senn"):
        s, xs, ys = _line(0.1 * L, 0.86 * L, 0.0, 8)
        parts = [(_strip(xs, ys, np.full(len(s), 0.035 * L)), HANDLE)]
        parts.append((_strip(xs[2:-2], ys[2:-2], _profile(s[2:-2], [0.25, 0.4, 0.6, 0.75], [0, 0.012 * L, 0.012 * L, 0])), CUT))
        if v == "Army-Navy":
            s, xs, ys = _line(0.0, 0.12 * L, 0.0, 6)
            parts.append((_strip(xs, ys, _profile(s, [0, 0.6, 1], [0.07 * L, 0.07 * L, 0.03 * L])), STEEL))
        else:
            parts += _rake(0.12 * L, 0.0, 0.04 * L, 3, max(0.008 * L, 1.0))
        return parts + _blade_end(c, L, 0.85 * L, 0.8)
    if v == "Volkmann":
        parts = [(_ellipse(0.06 * L, 0.0, 0.06 * L, 0.035 * L, 24), HANDLE),
                 (_ellipse(0.06 * L, 0.0, 0.035 * L, 0.015 * L, 24), CUT)]
        s, xs, ys = _line(0.1 * L, 0.8 * L, 0.0, 10)
        parts.append((_strip(xs, ys, _profile(s, [0, 0.7, 1], [0.03 * L, 0.025 * L, 0.012 * L])), HANDLE))
        return parts + _blade_end(c, L, 0.78 * L, 1.1)
    if v == "Richardson":
        parts = [(_ellipse(0.12 * L, 0.0, 0.12 * L, 0.045 * L, 28), HANDLE),
                 (_ellipse(0.12 * L, 0.0, 0.09 * L, 0.022 * L, 28), CUT)]
        s, xs, ys = _line(0.23 * L, 0.82 * L, 0.0, 8)
        parts.append((_strip(xs, ys, np.full(len(s), 0.022 * L)), STEEL))
        return parts + _blade_end(c, L, 0.8 * L, 1.3)
    s, xs, ys = _line(0.0, 0.55 * L, 0.0, 8)  # Deaver: long handle, wide curved blade
    parts = [(_strip(xs, ys, np.full(len(s), 0.03 * L)), HANDLE)]
    s, xs, ys = _line(0.5 * L, L, 0.0, 16, curve=0.12)
    width = 0.5 if c.tip.startswith("narrow") else 1.0
    parts.append((_strip(xs, ys, _profile(s, [0, 0.25, 1], [0.03 * L, (0.06 + 0.04 * width) * L, (0.06 + 0.04 * width) * L])), STEEL))
    if "prong" in c.tip:
        parts += _blade_end(c, L, 0.9 * L, 0.8)
    return parts


def _probe(c: InstrumentClass, L: float) -> list:
    v = c.variant
    bend = 0.5 if "angled" in c.tip else 0.0
    hook = 0.06 if "hooked" in c.tip else 0.0
    rod = max(0.007 * L, 0.9)
    if v == "Lacrimal":
        parts = []
        for x0, x1 in ((0.42 * L, 0.0), (0.58 * L, L)):
            s, xs, ys = _line(x0, x1, 0.0, 16, bend=bend, bend_at=0.85, hook=hook if x1 else 0.0)
            parts.append((_strip(xs, ys, np.full(len(s), 0.8 * rod)), STEEL))
        parts.append((_rect(0.4 * L, 0.6 * L, -0.03 * L, 0.03 * L), HANDLE))
        return parts
    if v == "Grooved director":
        parts = [(_ellipse(0.06 * L, 0.0, 0.06 * L, 0.07 * L, 24), HANDLE),
                 (_rect(0.04 * L, 0.08 * L, -0.015 * L, 0.015 * L), CUT)]
        s, xs, ys = _line(0.11 * L, L, 0.0, 16, bend=bend, bend_at=0.85, hook=hook)
        parts.append((_strip(xs, ys, np.full(len(s), 0.022 * L)), STEEL))
        k = (s > 0.05) & (s < 0.95)
        parts.append((_strip(xs[k], ys[k], np.full(k.sum(), 0.006 * L)), DARK))
        return parts
    if v == "Malleable":
        parts = [(_ellipse(0.025 * L, 0.0, 0.025 * L, 0.02 * L, 16), STEEL),
                 (_ellipse(0.025 * L, 0.0, 0.013 * L, 0.009 * L, 16), CUT)]
        s, xs, ys = _line(0.045 * L, L, 0.0, 24, curve=0.06, bend=bend, bend_at=0.85, hook=hook)
        parts.append((_strip(xs, ys, np.full(len(s), 1.2 * rod)), STEEL))
        return parts
    if v == "Explorer":
        s, xs, ys = _line(0.15 * L, 0.85 * L, 0.0, 8)
        parts = [(_strip(xs, ys, np.full(len(s), 0.025 * L)), HANDLE)]
        for q in np.linspace(0.25, 0.75, 8):
            parts.append((_rect(q * L, q * L + max(0.004 * L, 0.8), -0.02 * L, 0.02 * L), DARK))
        s, xs, ys = _line(0.15 * L, 0.0, 0.0, 10, hook=0.1)
        parts.append((_strip(xs, ys, _profile(s, [0, 1], [1.4 * rod, 0.5 * rod])), STEEL))
        s, xs, ys = _line(0.85 * L, L, 0.0, 10, bend=bend, bend_at=0.4, hook=hook * 2)
        parts.append((_strip(xs, ys, _profile(s, [0, 1], [1.4 * rod, 0.5 * rod])), STEEL))
        return parts
    s, xs, ys = _line(0.0, 0.32 * L, 0.0, 6)  # ball-tip probe: flat knurled handle, thin rod, ball
    parts = [(_strip(xs, ys, _profile(s, [0, 0.8, 1], [0.022 * L, 0.022 * L, 0.01 * L])), HANDLE)]
    for q in np.linspace(0.04, 0.26, 6):
        parts.append((_rect(q * L, q * L + max(0.004 * L, 0.8), -0.016 * L, 0.016 * L), DARK))
    s, xs, ys = _line(0.3 * L, L, 0.0, 16, bend=bend, bend_at=0.85, hook=hook)
    parts.append((_strip(xs, ys, np.full(len(s), rod)), STEEL))
    parts.append((_ellipse(xs[-1], ys[-1], 2.0 * rod, 2.0 * rod, 12), STEEL))
    return parts


_DRAW = {"scissors": _scissors, "forceps": _forceps, "clamp": _clamp, "needle holder": _needle_holder,
         "scalpel": _scalpel, "retractor": _retractor, "probe": _probe}


def instrument_parts(cls: InstrumentClass, length: float) -> list[tuple[np.ndarray, int]]:
    """Polygons ``[(points [N, 2], material)]`` drawing ``cls`` with its tip at x=length, in painting order."""
    return _DRAW[cls.family](cls, float(length))


@functools.lru_cache(maxsize=4096)
def packed_parts(cls: InstrumentClass, length: float) -> tuple[np.ndarray, tuple[int, ...], tuple[int, ...]]:
    """``instrument_parts`` packed for fast placement: (all points [P, 2], split offsets, materials); cached."""
    parts = instrument_parts(cls, length)
    pts = np.concatenate([p for p, _ in parts], 0)
    ends = tuple(int(e) for e in np.cumsum([len(p) for p, _ in parts])[:-1])
    return pts, ends, tuple(int(m) for _, m in parts)
