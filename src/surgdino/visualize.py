"""Pictures: instances (ground truth or predictions) drawn on images, training curves, per-class AP."""

from __future__ import annotations

import colorsys
import json
import math
import os
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from surgdino.errors import DataError
from surgdino.log import get_logger

logger = get_logger(__name__)


def _numpy(x: Any) -> np.ndarray | None:
    """Tensors, lists and arrays → numpy (None stays None)."""
    if x is None:
        return None
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def instance_colors(n: int) -> np.ndarray:
    """``n`` distinct, saturated RGB colours (golden-ratio hue steps), uint8 [n, 3]."""
    out = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        hue = (0.13 + i * 0.618033988749895) % 1.0
        sat = 0.85 if i % 2 == 0 else 0.65
        val = 0.95 if (i // 2) % 2 == 0 else 0.8
        out[i] = [round(c * 255) for c in colorsys.hsv_to_rgb(hue, sat, val)]
    return out


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1: bundled scalable font
    except TypeError:
        return ImageFont.load_default()


def _boundary(mask: np.ndarray, width: int) -> np.ndarray:
    """Pixels of ``mask`` within ``width`` pixels of its edge (bool [H, W])."""
    inner = mask.copy()
    for _ in range(width):
        shrunk = inner.copy()
        shrunk[1:, :] &= inner[:-1, :]
        shrunk[:-1, :] &= inner[1:, :]
        shrunk[:, 1:] &= inner[:, :-1]
        shrunk[:, :-1] &= inner[:, 1:]
        inner = shrunk
    return mask & ~inner


def draw_instances(
    image: np.ndarray,
    boxes: Any,
    masks: Any | None,
    labels: Any,
    class_names: Sequence[str] | None,
    scores: Any | None = None,
    alpha: float = 0.5,
) -> np.ndarray:
    """Draw translucent masks with contours, boxes (xyxy pixels) and "name 0.87" labels on a copy
    of ``image`` (uint8 [H, W, 3] RGB); colours differ per instance. Returns uint8 [H, W, 3]."""
    img = _numpy(image)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"draw_instances: image must be [H, W, 3], got {img.shape}")
    img = img.astype(np.uint8)
    h, w = img.shape[:2]
    boxes = _numpy(boxes)
    boxes = np.zeros((0, 4), np.float32) if boxes is None else boxes.reshape(-1, 4).astype(np.float64)
    labels = _numpy(labels)
    labels = np.zeros(len(boxes), np.int64) if labels is None else labels.reshape(-1).astype(np.int64)
    scores = _numpy(scores)
    masks = _numpy(masks)
    k = len(boxes) if len(boxes) else (len(masks) if masks is not None else 0)
    if masks is not None and masks.shape[0] != k:
        raise ValueError(f"draw_instances: {masks.shape[0]} masks for {k} boxes")
    if masks is not None and masks.shape[1:] != (h, w):
        raise ValueError(f"draw_instances: masks are {masks.shape[1:]}, the image is {(h, w)}")
    colors = instance_colors(k)
    out = img.astype(np.float32)
    line = max(1, round(min(h, w) / 400))
    if masks is not None:
        masks = masks.astype(bool)
        # Larger masks first so small instruments on top stay visible.
        areas = masks.reshape(k, h * w).sum(1)
        for i in np.argsort(-areas, kind="stable"):
            if not areas[i]:
                continue
            # Work in the mask's box plus a 1-pixel margin (all False), so contours match the full image's.
            rows, cols = np.nonzero(masks[i].any(1))[0], np.nonzero(masks[i].any(0))[0]
            ys = slice(max(0, rows[0] - 1), rows[-1] + 2)
            xs = slice(max(0, cols[0] - 1), cols[-1] + 2)
            m, region = masks[i, ys, xs], out[ys, xs]  # views
            region[m] = (1 - alpha) * region[m] + alpha * colors[i]
            region[_boundary(m, line)] = colors[i]
    canvas = Image.fromarray(out.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for i in range(len(boxes)):
        x0, y0, x1, y1 = boxes[i].tolist()
        draw.rectangle([x0, y0, max(x0, x1), max(y0, y1)], outline=tuple(int(c) for c in colors[i]), width=line)
    # Labels on a translucent layer above all boxes; long class names are cut to fit near their box.
    overlay = Image.new("RGBA", canvas.size, (0, 0, 0, 0))
    odraw = ImageDraw.Draw(overlay)
    font = _font(max(10, min(24, round(min(h, w) / 45))))
    for i in range(len(boxes)):
        x0, y0, x1, _ = boxes[i].tolist()
        color = tuple(int(c) for c in colors[i])
        lab = int(labels[i]) if i < len(labels) else -1
        name = class_names[lab] if class_names is not None and 0 <= lab < len(class_names) else str(lab)
        suffix = "" if scores is None else f" {float(scores[i]):.2f}"
        text = _fit_text(odraw, name, suffix, font, max(x1 - x0, w / 4))
        tx0, ty0, tx1, ty1 = odraw.textbbox((0, 0), text, font=font)
        tw, th = tx1 - tx0 + 4, ty1 - ty0 + 2
        lx = min(max(0.0, x0), max(0.0, w - tw))
        ly = y0 - th if y0 - th >= 0 else min(max(0.0, y0), max(0.0, h - th))
        lum = 0.299 * color[0] + 0.587 * color[1] + 0.114 * color[2]
        odraw.rectangle([lx, ly, lx + tw, ly + th], fill=color + (200,))
        odraw.text((lx + 2 - tx0, ly + 1 - ty0), text, fill=(0, 0, 0, 255) if lum > 140 else (255, 255, 255, 255),
                   font=font)
    canvas = Image.alpha_composite(canvas.convert("RGBA"), overlay).convert("RGB")
    return np.asarray(canvas)


def _fit_text(draw: ImageDraw.ImageDraw, name: str, suffix: str, font: Any, max_width: float) -> str:
    """``name + suffix``, with the name shortened (ending in "..") until it fits ``max_width`` pixels."""
    text = name + suffix
    if draw.textlength(text, font=font) <= max_width:
        return text
    lo, hi = 1, len(name)  # longest prefix that fits
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if draw.textlength(name[:mid].rstrip() + ".." + suffix, font=font) <= max_width:
            lo = mid
        else:
            hi = mid - 1
    return name[:lo].rstrip() + ".." + suffix


def save_image(path: str, array: Any) -> str:
    """Write a uint8 [H, W, 3] (or [H, W]) array as an image file (format from the extension)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(_numpy(array).astype(np.uint8)).save(path)
    return path


def read_metrics(metrics_jsonl: str) -> list[dict[str, Any]]:
    """Lines of the engine's metrics.jsonl; an unreadable (e.g. half-written last) line is skipped with a log line."""
    if not os.path.isfile(metrics_jsonl):
        raise DataError(f"{metrics_jsonl}: metrics file not found; it is written to OUTPUT_DIR during training")
    rows = []
    with open(metrics_jsonl, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                logger.warning(f"{metrics_jsonl}:{n}: not valid JSON, skipped")
                continue
            if isinstance(row, dict) and "iter" in row:
                rows.append(row)
    return rows


def _series(rows: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for r in rows:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            xs.append(r["iter"])
            ys.append(v)
    return xs, ys


def _smooth(ys: list[float], window: int) -> np.ndarray:
    """Moving median (robust to loss spikes) over ``window`` points."""
    arr = np.asarray(ys, dtype=np.float64)
    half = window // 2
    return np.array([np.median(arr[max(0, i - half): i + half + 1]) for i in range(len(arr))])


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_training_curves(metrics_jsonl: str, out_dir: str) -> list[str]:
    """PNGs from metrics.jsonl: total loss, each loss term (auxiliary ``*_<k>`` terms beside their
    final-layer term), learning rate, and segm/bbox AP over iterations. Returns the written paths."""
    rows = read_metrics(metrics_jsonl)
    if not rows:
        raise DataError(f"{metrics_jsonl}: no metric lines with an 'iter' yet; train for a few iterations first")
    plt = _pyplot()
    os.makedirs(out_dir, exist_ok=True)
    keys = sorted({k for r in rows for k in r})
    written = []

    def finish(fig, name: str) -> None:
        path = os.path.join(out_dir, name)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)

    def line(ax, key: str, **kw) -> None:
        xs, ys = _series(rows, key)
        if not xs:
            return
        if len(xs) > 20 and kw.get("smooth", True):
            ax.plot(xs, ys, alpha=0.3, color=kw.get("color"))
            ax.plot(xs, _smooth(ys, max(3, len(xs) // 20)), label=key, color=kw.get("color"))
        else:
            ax.plot(xs, ys, label=key, marker="o" if len(xs) < 20 else None, color=kw.get("color"))

    if "total_loss" in keys:
        fig, ax = plt.subplots(figsize=(7, 4))
        line(ax, "total_loss", color="C0")
        ax.set_xlabel("iteration")
        ax.set_ylabel("total loss")
        ax.set_title("total loss")
        ax.grid(alpha=0.3)
        finish(fig, "total_loss.png")

    loss_keys = [k for k in keys if k.startswith("loss")]
    groups: dict[str, list[str]] = {}
    for k in loss_keys:
        groups.setdefault(re.sub(r"_\d+$", "", k), []).append(k)
    if groups:
        n = len(groups)
        cols = min(3, n)
        nrows = math.ceil(n / cols)
        fig, axes = plt.subplots(nrows, cols, figsize=(5 * cols, 3.2 * nrows), squeeze=False)
        for ax, (base, members) in zip(axes.flat, sorted(groups.items())):
            for m in members:
                if m != base:
                    xs, ys = _series(rows, m)
                    ax.plot(xs, ys, alpha=0.25, linewidth=0.8, color="gray")
            if base in members:
                line(ax, base, color="C1")
            aux = len(members) - (base in members)
            ax.set_title(base + (f" (+{aux} auxiliary, gray)" if aux else ""), fontsize=9)
            ax.set_xlabel("iteration")
            ax.grid(alpha=0.3)
        for ax in list(axes.flat)[n:]:
            ax.axis("off")
        finish(fig, "losses.png")

    if "lr" in keys:
        fig, ax = plt.subplots(figsize=(7, 3))
        line(ax, "lr", smooth=False)
        ax.set_xlabel("iteration")
        ax.set_ylabel("learning rate")
        ax.set_title("learning rate")
        ax.grid(alpha=0.3)
        finish(fig, "lr.png")

    for task in ("segm", "bbox"):
        metric_keys = [k for k in keys if k.startswith(f"{task}/A")]  # AP*, AR*
        if not metric_keys:
            continue
        fig, ax = plt.subplots(figsize=(7, 4))
        for i, k in enumerate(metric_keys):
            xs, ys = _series(rows, k)
            if xs:
                ax.plot(xs, ys, marker="o", label=k.split("/", 1)[1], color=f"C{i % 10}",
                        linewidth=2.0 if k == f"{task}/AP" else 1.0)
        ax.set_xlabel("iteration")
        ax.set_ylabel("AP / AR (%)")
        ax.set_title(f"{task} evaluation, AP (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, ncol=2)
        finish(fig, f"eval_{task}.png")
    return written


def plot_per_class_ap(per_class: dict[str, float], out_path: str, title: str = "AP (%) per class") -> str:
    """Horizontal bar chart of per-class AP, best first; classes without a value (NaN) are marked."""
    plt = _pyplot()
    items = sorted(per_class.items(), key=lambda kv: (-(kv[1] if kv[1] == kv[1] else -1.0), kv[0]))
    values = [v if v == v else 0.0 for _, v in items]
    height = max(2.5, 0.22 * len(items) + 1.0)
    fig, ax = plt.subplots(figsize=(8, height))
    y = np.arange(len(items))
    ax.barh(y, values, color=[("C0" if v == v else "lightgray") for _, v in items])
    ax.set_yticks(y)
    ax.set_yticklabels([n if v == v else f"{n} (no GT)" for n, v in items], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("AP (%)")
    finite = [v for _, v in items if v == v]
    mean = f", mean {np.mean(finite):.1f}" if finite else ""
    ax.set_title(f"{title} ({len(items)} classes{mean})")
    ax.set_ylim(len(items) - 0.5, -0.5)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path
