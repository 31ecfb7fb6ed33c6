"""Inference on image files: ``Predictor`` (one image → instances) and ``predict_files`` (PNGs + COCO json)."""

from __future__ import annotations

import glob
import json
import os
from typing import Any

import numpy as np
import torch

from surgdino.config import Config
from surgdino.engine.checkpointer import load_weights
from surgdino.errors import ConfigError, DataError
from surgdino.log import get_logger

logger = get_logger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


class Predictor:
    """Loads ``MODEL.WEIGHTS`` into the configured model; ``predictor(image)`` → per-image instances.

    Images (uint8 [H, W, 3] RGB) are resized like the test loader (``INPUT.MIN_SIZE_TEST``,
    ``INPUT.MAX_SIZE_TEST``); results are in the original image's pixels. Class names come from the
    checkpoint (``thing_classes`` saved by training) or the datasets' metadata.
    """

    def __init__(self, cfg: Config):
        from surgdino.engine.defaults import Trainer, resolve_device, thing_classes

        if not cfg.MODEL.WEIGHTS:
            raise ConfigError("predict needs weights: add MODEL.WEIGHTS path/to/model_final.pth")
        if not os.path.isfile(cfg.MODEL.WEIGHTS):
            raise ConfigError(f"MODEL.WEIGHTS file not found: {cfg.MODEL.WEIGHTS}")
        self.cfg = cfg
        self.device = resolve_device(cfg)
        self.model = Trainer.build_model(cfg).to(self.device).eval()
        extra = load_weights(self.model, cfg.MODEL.WEIGHTS)
        self.thing_classes: list[str] = list(extra.get("thing_classes") or [])
        id_map = extra.get("thing_dataset_id_to_contiguous_id") or {}
        if not self.thing_classes:
            try:
                from surgdino.engine.defaults import register_datasets

                register_datasets(cfg)
                self.thing_classes = thing_classes(cfg)
            except Exception as e:  # names are a nicety; predictions work without them
                logger.info("class names unavailable (%s); labels are drawn as numbers", e)
        self.contiguous_to_dataset_id = {int(v): int(k) for k, v in id_map.items()} or None

    def _resize(self, image: torch.Tensor) -> torch.Tensor:
        from torchvision.transforms.v2 import functional as F

        from surgdino.data.transforms import ResizeShortestEdge

        short, cap = self.cfg.INPUT.MIN_SIZE_TEST, self.cfg.INPUT.MAX_SIZE_TEST
        h, w = image.shape[-2:]
        if short <= 0:
            return image
        size = ResizeShortestEdge.output_size(h, w, short, cap)
        return image if tuple(size) == (h, w) else F.resize(image, list(size), antialias=True)

    @torch.no_grad()
    def __call__(self, image: np.ndarray, image_id: int = 0, file_name: str = "") -> dict[str, Any]:
        h, w = image.shape[:2]
        tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)  # [3, H, W] uint8
        if self.cfg.INPUT.FORMAT == "BGR":
            tensor = tensor.flip(0)
        inputs = [{"image": self._resize(tensor), "height": h, "width": w, "image_id": image_id,
                   "file_name": file_name}]
        return self.model(inputs)[0]


def list_images(spec: str) -> list[str]:
    """Image files named by a file, a folder (its images, sorted) or a glob pattern."""
    if os.path.isdir(spec):
        paths = [os.path.join(spec, n) for n in sorted(os.listdir(spec))]
    elif os.path.isfile(spec):
        paths = [spec]
    else:
        paths = sorted(glob.glob(os.path.expanduser(spec), recursive=True))
    paths = [p for p in paths if os.path.isfile(p) and p.lower().endswith(IMAGE_EXTENSIONS)]
    if not paths:
        raise DataError(f"--input {spec}: no images found (a file, a folder or a glob of {', '.join(IMAGE_EXTENSIONS)})")
    return paths


def read_image(path: str) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return np.array(im.convert("RGB"))
    except OSError as e:
        raise DataError(f"{path}: cannot be read as an image ({e})") from None


def predict_files(predictor: Predictor, paths: list[str], output_dir: str, *,
                  score_threshold: float = 0.5) -> dict[str, Any]:
    """Draw each image's instances scoring ≥ ``score_threshold`` to ``output_dir/<name>.png`` and write
    all of them as COCO results (``coco_results.json``) with ``images.json`` (id → file)."""
    from tqdm import tqdm

    from surgdino.evaluation.coco_evaluator import instances_to_coco_results
    from surgdino.visualize import draw_instances, save_image

    os.makedirs(output_dir, exist_ok=True)
    results: list[dict[str, Any]] = []
    images: list[dict[str, Any]] = []
    drawn: list[str] = []
    used: set[str] = set()
    for image_id, path in enumerate(tqdm(paths, desc="predict", unit="img", dynamic_ncols=True)):
        image = read_image(path)
        out = predictor(image, image_id, path)
        keep = torch.as_tensor(out["scores"]).detach().cpu() >= score_threshold
        out = {k: (v.detach().cpu()[keep] if isinstance(v, torch.Tensor) else v) for k, v in out.items()}
        found = instances_to_coco_results(out, image_id, predictor.contiguous_to_dataset_id)
        for r, phrase in zip(found, out.get("phrases") or []):  # GroundingDINO --prompt: the phrase of each box
            r["phrase"] = phrase
        results += found
        images.append({"id": image_id, "file_name": os.path.abspath(path),
                       "height": int(image.shape[0]), "width": int(image.shape[1])})
        labels, names = out["labels"], predictor.thing_classes or None
        if "phrases" in out:
            labels, names = torch.arange(len(out["phrases"])), [p or "?" for p in out["phrases"]]
        picture = draw_instances(image, out["boxes"], out.get("masks"), labels, names, out["scores"])
        name = os.path.splitext(os.path.basename(path))[0]
        stem, k = name, 1
        while stem in used:
            stem, k = f"{name}_{k}", k + 1
        used.add(stem)
        drawn.append(save_image(os.path.join(output_dir, f"{stem}.png"), picture))
    res_path = os.path.join(output_dir, "coco_results.json")
    with open(res_path, "w") as f:
        json.dump(results, f)
    with open(os.path.join(output_dir, "images.json"), "w") as f:
        json.dump({"images": images, "thing_classes": predictor.thing_classes,
                   "score_threshold": score_threshold}, f, indent=1)
    logger.info("%d images, %d instances ≥ %.2f: drawings and %s in %s", len(paths), len(results),
                score_threshold, os.path.basename(res_path), os.path.abspath(output_dir))
    return {"images": drawn, "results": res_path, "num_instances": len(results)}
