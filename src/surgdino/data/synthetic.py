"""Synthetic instrument trays: the embedded default dataset (COCO format, deterministic by seed).

Procedural instruments (7 families, up to 500 fine-grained classes) are drawn as shaded metal
polygons, in random z-order and any rotation, on steel-tray or drape backgrounds. A label map
painted in z-order gives occlusion-correct visible masks: masks are pairwise disjoint, boxes come
from the visible masks, and mostly hidden instances are dropped.

Over 400 lines on purpose: rendering, the z-order label map and the COCO writer of one tray share its
random state, so that one seed gives one tray; the instrument shapes live in ``synth_instruments.py``.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ProcessPoolExecutor

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from pycocotools import mask as mask_util

from surgdino.data.synth_instruments import (
    BRIGHT,
    DARK,
    HANDLE,
    STEEL,
    InstrumentClass,
    instrument_class_names,
    instrument_classes,
    packed_parts,
)
from surgdino.errors import ConfigError

__all__ = ["generate_synthetic_dataset", "instrument_class_names", "render_tray"]

_SS = 2  # supersampling of the instrument rasteriser (anti-aliased edges)
_HANDLE_RGB = {"steel": (168, 172, 178), "gold": (205, 162, 72), "black": (38, 38, 42), "blue": (38, 86, 178),
               "green": (36, 138, 84)}
_HANDLE_SPEC = {"steel": 1.0, "gold": 0.8, "black": 0.45, "blue": 0.35, "green": 0.35}


# ---- backgrounds ----

def _smooth_noise(rng: np.random.Generator, h: int, w: int, cell: int) -> np.ndarray:
    """Low-frequency noise in [-1, 1]: a coarse random grid upsampled bilinearly."""
    gh, gw = max(2, h // cell + 2), max(2, w // cell + 2)
    g = rng.uniform(-1, 1, (gh, gw)).astype(np.float32)
    return np.asarray(Image.fromarray(g, mode="F").resize((w, h), Image.BILINEAR), dtype=np.float32)


def _steel_tray(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    base = rng.uniform(115, 185)
    tint = np.array([1.0, 1.0 + rng.uniform(-0.02, 0.03), 1.0 + rng.uniform(-0.02, 0.06)], np.float32)
    vertical = rng.random() < 0.5
    n = w if vertical else h
    streak = np.convolve(rng.standard_normal(n + 4).astype(np.float32), np.ones(5, np.float32) / 5, "valid")
    streak = streak * rng.uniform(4, 10) + rng.standard_normal(n).astype(np.float32) * 2.0
    lum = np.broadcast_to(streak[None, :] if vertical else streak[:, None], (h, w))
    lum = base + lum + 12 * _smooth_noise(rng, h, w, max(8, min(h, w) // 6))
    if rng.random() < 0.4:  # perforated tray
        step = max(6, int(rng.uniform(0.03, 0.05) * min(h, w)))
        r = step * rng.uniform(0.12, 0.22)
        tile = Image.new("L", (step, 2 * step), 0)  # two staggered rows of holes
        d = ImageDraw.Draw(tile)
        for cx, cy in ((step / 2, step / 2), (0, 1.5 * step), (step, 1.5 * step)):
            d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        reps = (h // (2 * step) + 2, w // step + 2)
        oy, ox = rng.integers(0, step, 2)
        holes = Image.fromarray(np.tile(np.asarray(tile), reps)[oy:oy + h, ox:ox + w])
        holes = holes.filter(ImageFilter.GaussianBlur(0.6))
        lum = lum * (1 - 0.55 * np.asarray(holes, np.float32) / 255)
    return lum[:, :, None] * tint


def _drape(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    colours = [(40, 88, 145), (48, 112, 98), (60, 120, 150), (34, 70, 120), (70, 130, 115)]
    rgb = np.array(colours[rng.integers(len(colours))], np.float32) * rng.uniform(0.8, 1.2)
    sh, sw = max(4, h // 4), max(4, w // 4)
    yy, xx = np.mgrid[0:sh, 0:sw].astype(np.float32) / max(sh, sw)
    folds = np.zeros((sh, sw), np.float32)
    for _ in range(rng.integers(2, 5)):
        a, f, p = rng.uniform(0, np.pi), rng.uniform(1.5, 6), rng.uniform(0, 2 * np.pi)
        folds += rng.uniform(0.3, 1.0) * (np.abs(np.sin(f * (np.cos(a) * xx + np.sin(a) * yy) * np.pi + p)) - 0.63)
    folds = np.asarray(Image.fromarray(folds, mode="F").resize((w, h), Image.BILINEAR), np.float32)
    weave = (rng.random((h, w), dtype=np.float32) - 0.5) * 0.16
    weave[::2, :] += 0.03
    lum = 1 + 0.18 * folds + weave + 0.08 * _smooth_noise(rng, h, w, max(8, min(h, w) // 5))
    return lum[:, :, None] * rgb


def _wrap(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Sterilisation wrap: light crepe paper or towel with crinkles."""
    colours = [(200, 205, 212), (170, 192, 214), (205, 212, 200), (185, 185, 190)]
    rgb = np.array(colours[rng.integers(len(colours))], np.float32) * rng.uniform(0.8, 1.05)
    crinkle = np.abs(_smooth_noise(rng, h, w, max(4, min(h, w) // 24))) + 0.5 * _smooth_noise(rng, h, w, max(8, min(h, w) // 5))
    lum = 1 + 0.12 * (crinkle - 0.5)
    return lum[:, :, None] * rgb


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Steel tray (brushed, sometimes perforated), surgical drape or sterilisation wrap, [H, W, 3] float."""
    r = rng.random()
    img = _steel_tray(rng, h, w) if r < 0.45 else _drape(rng, h, w) if r < 0.85 else _wrap(rng, h, w)
    return img.astype(np.float32)


# ---- instruments ----

FIELD_CM = 40.0  # default tray width in view (cm): 12.8 px/cm at 512 px

class _Scene:
    """Per-image lighting and material look shared by all instruments."""

    def __init__(self, rng: np.random.Generator, h: int, w: int, field_cm: float = FIELD_CM):
        a = rng.uniform(0, 2 * np.pi)
        light = np.array([np.cos(a), np.sin(a), rng.uniform(0.8, 1.6)], np.float32)
        self.light = light / np.linalg.norm(light)
        half = self.light + np.array([0, 0, 1], np.float32)
        self.half = half / np.linalg.norm(half)
        self.shininess = rng.uniform(12, 40)
        self.env_angle = rng.uniform(0, np.pi)
        self.steel_tone = rng.uniform(0.85, 1.15)
        self.streaks = np.convolve(rng.standard_normal(260), np.ones(3) / 3, "valid").astype(np.float32)  # [258]
        scale = np.sqrt(h * w)
        self.pad = int(max(4, 0.018 * scale))
        self.shadow = (rng.uniform(-0.5, 0.5, 2) * self.pad).round().astype(int)
        self.shadow_strength = rng.uniform(0.15, 0.45)
        self.px_per_cm = scale / field_cm * rng.uniform(0.85, 1.2)


def _rasterise(packed, angle: float, cx: float, cy: float, length: float, mirror: bool, pad: int):
    """Draw the packed polygons rotated and placed in a local crop.

    Returns (cover [h, w] uint8: covered subsamples 0.._SS**2, material [h, w] uint8, x0, y0 of the crop)."""
    pts, ends, mats = packed
    c, s = np.cos(angle), np.sin(angle)
    x, y = pts[:, 0] - length / 2, (-pts[:, 1] if mirror else pts[:, 1])
    gx, gy = cx + c * x - s * y, cy + s * x + c * y  # image coordinates of every vertex
    x0, y0 = int(np.floor(gx.min())) - pad, int(np.floor(gy.min())) - pad
    x1, y1 = int(np.ceil(gx.max())) + pad, int(np.ceil(gy.max())) + pad
    cw, ch = x1 - x0, y1 - y0
    canvas = Image.new("L", (cw * _SS, ch * _SS), 0)
    draw = ImageDraw.Draw(canvas)
    flat = np.stack([(gx - x0) * _SS, (gy - y0) * _SS], 1).ravel().tolist()
    start = 0
    for end, mat in zip((*ends, len(pts)), mats):
        draw.polygon(flat[2 * start:2 * end], fill=mat)
        start = end
    m = np.asarray(canvas)  # [ch*SS, cw*SS]
    subs = [m[i::_SS, j::_SS] for i in range(_SS) for j in range(_SS)]
    cover = (subs[0] > 0).view(np.uint8).copy()  # [ch, cw]
    for q in subs[1:]:
        cover += q > 0
    mat = np.where(subs[0] > 0, subs[0], np.maximum.reduce(subs))  # nearest subsample; max on edges
    return cover, mat, x0, y0


def _shade(height: np.ndarray, mat_px: np.ndarray, py: np.ndarray, px: np.ndarray,
           scene: _Scene, cls: InstrumentClass, angle: float, u: np.ndarray, v: np.ndarray, length: float,
           blur: float, rng: np.random.Generator) -> np.ndarray:
    """Metallic colour [P, 3] of the covered pixels (py, px) of a crop.

    Bevel normals from the blurred silhouette ``height`` (covered pixels are never on the crop border),
    diffuse + specular light, brushed streaks along the length (``v`` = across, ``u`` = along) and slow
    reflections of the room that vary along the instrument."""
    gx = (height[py, px + 1].astype(np.float32) - height[py, px - 1]) * (0.5 / 255)
    gy = (height[py + 1, px].astype(np.float32) - height[py - 1, px]) * (0.5 / 255)
    k = 2.5 * blur
    nx, ny = -k * gx, -k * gy
    inv = 1.0 / np.sqrt(nx * nx + ny * ny + 1.0)
    nx, ny, nz = nx * inv, ny * inv, inv
    lx, ly, lz = scene.light
    diffuse = np.clip(nx * lx + ny * ly + nz * lz, 0, 1)
    hx, hy, hz = scene.half
    spec = np.clip(nx * hx + ny * hy + nz * hz, 0, 1) ** scene.shininess
    streak = 1.0 + 0.07 * scene.streaks[(v * 1.5).astype(np.int64) % len(scene.streaks)]
    gain = scene.steel_tone * (0.85 + 0.2 * np.cos(2 * (angle - scene.env_angle))) * rng.uniform(0.92, 1.08)
    steel = np.array(_HANDLE_RGB["steel"], np.float32) * gain
    table = np.zeros((5, 3), np.float32)
    table[STEEL] = steel
    table[BRIGHT] = steel * 1.15
    table[DARK] = steel * 0.4
    table[HANDLE] = steel if cls.handle == "steel" else np.array(_HANDLE_RGB[cls.handle], np.float32) * rng.uniform(0.9, 1.1)
    specs = np.array([0, 1.0, _HANDLE_SPEC[cls.handle], 1.2, 0.4], np.float32)
    period, phase, depth = rng.uniform(0.3, 1.0) * length, rng.uniform(0, 2 * np.pi), rng.uniform(0.05, 0.2)
    lit = (0.5 + 0.6 * diffuse) * streak * (1 + depth * np.sin(u * (2 * np.pi / period) + phase))
    return table[mat_px] * lit[:, None] + (255 * 0.9 * specs[mat_px] * spec)[:, None]  # [P, 3]


def _blur(a: np.ndarray, radius: float) -> np.ndarray:
    """Tent blur (two box blurs, near-Gaussian and 3x cheaper than PIL's Gaussian) of a uint8 map."""
    box = ImageFilter.BoxBlur(float(radius) * 0.9)
    return np.asarray(Image.fromarray(a).filter(box).filter(box))


def _class_probs(num_classes: int, long_tail: float) -> np.ndarray | None:
    if not long_tail:
        return None
    p = np.arange(1, num_classes + 1, dtype=np.float64) ** -float(long_tail)
    return p / p.sum()


def _shift(a: np.ndarray, dx: int, dy: int) -> np.ndarray:
    """``a`` moved by (dx, dy) pixels, zero-filled."""
    out = np.zeros_like(a)
    h, w = a.shape
    out[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = a[max(-dy, 0):h - max(dy, 0), max(-dx, 0):w - max(dx, 0)]
    return out


def render_tray(rng: np.random.Generator, height: int, width: int, num_classes: int, num_instances: int,
                min_visible: float, long_tail: float = 0.0, field_cm: float = FIELD_CM) -> tuple[np.ndarray, list[dict]]:
    """One tray image [H, W, 3] uint8 and its visible instances ``{category_id (0-based), mask, full_area}``.

    Instances are painted bottom to top; a visible mask is the pixels where the instance is on top, so
    masks are disjoint. Instances with visible area below ``min_visible`` x drawn area (including any part
    outside the frame) are dropped. ``long_tail`` > 0 draws class c with probability ~ (c + 1) ** -long_tail
    (unevenly populated classes, as in real instrument sets); 0 draws classes uniformly. ``field_cm`` is
    the tray width (cm, geometric mean of both sides) the image shows: smaller zooms in, so instruments
    are longer and wider in pixels.
    """
    probs = _class_probs(num_classes, long_tail)
    classes = instrument_classes(num_classes)
    h, w = int(height), int(width)
    scene = _Scene(rng, h, w, field_cm)
    img = _background(rng, h, w).reshape(h * w, 3)  # [H*W, 3] float, flat for scattered pixel updates
    label = np.full(h * w, -1, np.int16)
    drawn = []  # (index, category, full_area, (y0, y1, x0, x1) clipped box)
    aligned = rng.random() < 0.5
    main_angle = rng.uniform(0, np.pi)
    piles = rng.uniform(0.2, 0.8, (int(rng.integers(1, 4)), 2)) * (w, h)  # instruments heap up around these
    sdx, sdy = int(scene.shadow[0]), int(scene.shadow[1])
    for k in range(int(num_instances)):
        cat = int(rng.integers(num_classes)) if probs is None else int(rng.choice(num_classes, p=probs))
        cls = classes[cat]
        length = float(cls.size_cm * scene.px_per_cm * rng.uniform(0.95, 1.05))
        ref = float(np.exp(np.round(np.log(length) / 0.1) * 0.1))  # shapes cached per class and 10% length step
        pts, ends, mats = packed_parts(cls, ref)
        packed = (pts * (length / ref), ends, mats)
        if aligned and rng.random() < 0.7:
            angle = main_angle + rng.normal(0, 0.25) + np.pi * rng.integers(2)
        else:
            angle = rng.uniform(0, 2 * np.pi)
        cx, cy = rng.uniform(0.05, 0.95) * w, rng.uniform(0.05, 0.95) * h
        if rng.random() < 0.5:
            px_, py_ = piles[rng.integers(len(piles))] + rng.normal(0, 0.12, 2) * (w, h)
            cx, cy = float(np.clip(px_, 0.05 * w, 0.95 * w)), float(np.clip(py_, 0.05 * h, 0.95 * h))
        cover, mat, x0, y0 = _rasterise(packed, angle, cx, cy, length, bool(rng.random() < 0.5), scene.pad)
        solid = cover >= (_SS * _SS + 1) // 2  # the label map and masks take pixels at least half covered
        full_area = int(np.count_nonzero(solid))
        ch, cw = cover.shape
        ix0, iy0, ix1, iy1 = max(x0, 0), max(y0, 0), min(x0 + cw, w), min(y0 + ch, h)
        if full_area == 0 or ix0 >= ix1 or iy0 >= iy1:
            continue
        blur = max(1.0, 0.006 * length)
        height_map = _blur(cover * np.uint8(255 // (_SS * _SS)), blur)  # [ch, cw] uint8 rounded profile
        sl = (slice(iy0 - y0, iy1 - y0), slice(ix0 - x0, ix1 - x0))
        shadow = _shift(height_map, sdx, sdy)[sl]
        sy, sx = np.nonzero(shadow > 2)
        flat = (sy + iy0) * w + (sx + ix0)
        img[flat] *= (1.0 - (scene.shadow_strength / 255) * shadow[sy, sx])[:, None]
        py, px = np.nonzero(cover[sl])
        py, px = py + (iy0 - y0), px + (ix0 - x0)  # crop coordinates
        dx, dy = px + x0 - cx, py + y0 - cy
        u, v = np.cos(angle) * dx + np.sin(angle) * dy, -np.sin(angle) * dx + np.cos(angle) * dy  # along, across
        colour = _shade(height_map, mat[py, px], py, px, scene, cls, angle, u, v, length, blur, rng)
        a = cover[py, px][:, None] * np.float32(1.0 / (_SS * _SS))
        flat = (py + y0) * w + (px + x0)
        img[flat] = img[flat] * (1 - a) + colour * a
        on = solid[py, px]
        label[flat[on]] = k
        drawn.append((k, cat, full_area, (iy0, iy1, ix0, ix1)))
    img = img.reshape(h, w, 3)
    label = label.reshape(h, w)
    xs = np.arange(w, dtype=np.float32) / w - 0.5
    ys = np.arange(h, dtype=np.float32) / h - 0.5
    gx, gy = rng.uniform(-0.25, 0.25, 2)
    light = 1 + (gx * xs - 0.15 * xs**2)[None, :] + (gy * ys - 0.15 * ys**2)[:, None]  # [H, W]
    img *= light[:, :, None] * rng.uniform(0.96, 1.04, 3).astype(np.float32)
    img += (rng.random((h, w), dtype=np.float32) - 0.5)[:, :, None] * rng.uniform(3.5, 12.0)  # sensor noise
    out = np.clip(img, 0, 255).astype(np.uint8)
    if rng.random() < 0.25:  # slight defocus
        out = np.asarray(Image.fromarray(out).filter(ImageFilter.GaussianBlur(float(rng.uniform(0.4, 1.0)))))
    keep = []
    for k, cat, full_area, (iy0, iy1, ix0, ix1) in drawn:
        area = int(np.count_nonzero(label[iy0:iy1, ix0:ix1] == k))
        if area > 0 and area >= min_visible * full_area:
            keep.append((k, cat, full_area, (iy0, iy1, ix0, ix1)))
    masks = np.zeros((h, w, len(keep)), bool, order="F")  # [H, W, N] Fortran order: RLE-encodable without a copy
    instances = []
    for i, (k, cat, full_area, (iy0, iy1, ix0, ix1)) in enumerate(keep):
        masks[iy0:iy1, ix0:ix1, i] = label[iy0:iy1, ix0:ix1] == k
        instances.append({"category_id": cat, "mask": masks[:, :, i], "full_area": full_area})
    return out, instances


# ---- COCO dataset ----

def _image_size(image_size) -> tuple[int, int]:
    if isinstance(image_size, (int, np.integer)) and not isinstance(image_size, bool):
        hw = (int(image_size), int(image_size))
    elif isinstance(image_size, (tuple, list)) and len(image_size) == 2:
        hw = (int(image_size[0]), int(image_size[1]))
    else:
        raise ConfigError(f"image_size={image_size!r}: expected an integer or (height, width); e.g. --image-size 512")
    if min(hw) < 32:
        raise ConfigError(f"image_size={image_size!r}: images must be at least 32 pixels; e.g. --image-size 512")
    return hw


def _mask_annotations(masks: list[np.ndarray]) -> list[tuple[dict, list[float], int]]:
    """(compressed RLE with str counts, XYWH box of the mask, pixel count) for each bool mask [H, W]."""
    out = []
    for mask in masks:
        m = mask if mask.flags.f_contiguous else np.asfortranarray(mask)
        rle = mask_util.encode(m.view(np.uint8))
        rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
        bbox = [float(cols[0]), float(rows[0]), float(cols[-1] - cols[0] + 1), float(rows[-1] - rows[0] + 1)]
        seg = {"size": [int(m.shape[0]), int(m.shape[1])], "counts": rle["counts"].decode("ascii")}
        out.append((seg, bbox, int(mask_util.area(rle))))
    return out


def _make_image(job: tuple) -> tuple[dict, list[dict]]:
    """Render, write and annotate image ``index`` of one split (runs in worker processes too)."""
    seed, split_id, index, image_dir, hw, num_classes, lo_hi, min_visible, long_tail, field_cm, ext = job
    rng = np.random.default_rng(np.random.SeedSequence(entropy=seed, spawn_key=(split_id, index)))
    n = int(rng.integers(lo_hi[0], lo_hi[1] + 1))
    img, instances = render_tray(rng, hw[0], hw[1], num_classes, n, min_visible, long_tail, field_cm)
    file_name = f"{index + 1:06d}.{ext}"
    pil = Image.fromarray(img)
    path = os.path.join(image_dir, file_name)
    if ext == "jpg":
        pil.save(path, quality=90)
    else:
        pil.save(path, compress_level=1)
    anns = []
    for inst, (seg, bbox, area) in zip(instances, _mask_annotations([i["mask"] for i in instances])):
        anns.append({"category_id": inst["category_id"] + 1, "segmentation": seg, "area": float(area),
                     "bbox": bbox, "iscrowd": 0})
    return {"id": index + 1, "file_name": file_name, "height": hw[0], "width": hw[1]}, anns


def _write_split(out_dir: str, split: str, split_id: int, num_images: int, seed: int, hw, num_classes: int,
                 lo_hi, min_visible: float, long_tail: float, field_cm: float, ext: str, workers: int,
                 progress: bool) -> tuple[str, str]:
    image_dir = os.path.join(out_dir, split)
    os.makedirs(image_dir, exist_ok=True)
    os.makedirs(os.path.join(out_dir, "annotations"), exist_ok=True)
    jobs = [(seed, split_id, i, image_dir, hw, num_classes, lo_hi, min_visible, long_tail, field_cm, ext)
            for i in range(num_images)]
    if workers and workers > 0 and num_images > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            results = pool.map(_make_image, jobs, chunksize=max(1, min(8, num_images // (4 * workers))))
            results = list(_progress(results, num_images, split, progress))
    else:
        results = list(_progress(map(_make_image, jobs), num_images, split, progress))
    images, annotations = [], []
    for image, anns in results:
        images.append(image)
        for ann in anns:
            annotations.append({"id": len(annotations) + 1, "image_id": image["id"], **ann})
    names = instrument_class_names(num_classes)
    families = [c.family for c in instrument_classes(num_classes)]
    data = {
        "info": {"description": f"SurgDINO synthetic instrument trays ({split})", "version": "1",
                 "seed": int(seed), "num_classes": int(num_classes)},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": n, "supercategory": f} for i, (n, f) in enumerate(zip(names, families))],
    }
    json_path = os.path.join(out_dir, "annotations", f"instances_{split}.json")
    tmp = json_path + ".tmp"
    with open(tmp, "w") as f:
        f.write(json.dumps(data, separators=(",", ":")))
    os.replace(tmp, json_path)
    return json_path, image_dir


def _progress(it, total: int, split: str, enabled: bool):
    if not enabled:
        return it
    from tqdm import tqdm

    return tqdm(it, total=total, desc=f"synth {split}", unit="img")


def existing_dataset_files(out_dir: str) -> list[str]:
    """What of a generated dataset already lies in ``out_dir`` (annotation jsons, non-empty split folders)."""
    out_dir = os.path.expanduser(out_dir)
    found = [os.path.join("annotations", f"instances_{s}.json") for s in ("train", "val")
             if os.path.exists(os.path.join(out_dir, "annotations", f"instances_{s}.json"))]
    found += [f"{s}/" for s in ("train", "val")
              if os.path.isdir(os.path.join(out_dir, s)) and os.listdir(os.path.join(out_dir, s))]
    return found


def generate_synthetic_dataset(out_dir: str, num_train: int = 200, num_val: int = 50, num_classes: int = 20,
                               image_size: int | tuple[int, int] = 512, seed: int = 0,
                               instances_per_image: tuple[int, int] = (20, 30), min_visible: float = 0.3,
                               workers: int = 0, progress: bool = True, image_format: str = "jpg",
                               long_tail: float = 0.0, field_cm: float = FIELD_CM) -> dict:
    """Write a COCO dataset of synthetic trays: ``annotations/instances_{train,val}.json``, ``train/``, ``val/``.

    ``image_size`` is an int or (height, width); ``instances_per_image`` (min, max) instruments are drawn
    per image, then those less than ``min_visible`` visible are dropped. Images are JPEG (quality 90) or
    PNG (``image_format``); masks are compressed RLE. ``long_tail`` > 0 makes class frequencies fall off as
    (rank + 1) ** -long_tail. ``field_cm`` is the tray width in view (40 cm: 12.8 px/cm at 512 px; the
    demo's 20 cm at 256 px draws instruments at that same pixel scale). Same seed gives identical files whatever ``workers`` (processes) is; train
    and val use different derived seeds.
    """
    instrument_classes(num_classes)  # validates
    hw = _image_size(image_size)
    for name, value in (("num_train", num_train), ("num_val", num_val)):
        if int(value) < 0:
            raise ConfigError(f"{name}={value}: the number of images cannot be negative")
    try:
        lo, hi = (int(instances_per_image[0]), int(instances_per_image[1]))
    except (TypeError, ValueError, IndexError):
        raise ConfigError(f"instances_per_image={instances_per_image!r}: expected (min, max), e.g. (20, 30)") from None
    if not 0 <= lo <= hi:
        raise ConfigError(f"instances_per_image={instances_per_image!r}: need 0 <= min <= max, e.g. (20, 30)")
    if not 0.0 <= float(min_visible) <= 1.0:
        raise ConfigError(f"min_visible={min_visible}: must be a fraction between 0 and 1")
    ext = {"jpg": "jpg", "jpeg": "jpg", "png": "png"}.get(str(image_format).lower())
    if ext is None:
        raise ConfigError(f"image_format={image_format!r}: use 'jpg' or 'png'")
    out_dir = os.path.abspath(os.path.expanduser(out_dir))
    if not 0.0 <= float(long_tail) <= 5.0:
        raise ConfigError(f"long_tail={long_tail}: use 0 (uniform classes) to 5 (steep long tail), e.g. 1.0")
    if not 2.0 <= float(field_cm) <= 1000.0:
        raise ConfigError(f"field_cm={field_cm}: the tray width in view, in cm (2 to 1000), e.g. 40")
    common = dict(seed=int(seed), hw=hw, num_classes=int(num_classes), lo_hi=(lo, hi), min_visible=float(min_visible),
                  long_tail=float(long_tail), field_cm=float(field_cm), ext=ext, workers=int(workers), progress=progress)
    train_json, train_dir = _write_split(out_dir, "train", 0, int(num_train), **common)
    val_json, val_dir = _write_split(out_dir, "val", 1, int(num_val), **common)
    return {"train_json": train_json, "val_json": val_json, "train_dir": train_dir, "val_dir": val_dir,
            "num_classes": int(num_classes)}
