"""Inference on image files: ``Predictor`` (one image → instances) and ``predict_files`` (PNGs + COCO json)."""

from __future__ import annotations

import glob
import json
import os
from typing import Any

import numpy as np
import torch

from surgdino.config import Config
from surgdino.data.imageio import read_image
from surgdino.data.paths import make_output_dir
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

    def _model_image(self, image: np.ndarray) -> torch.Tensor:
        """An RGB ``[H, W, 3]`` uint8 array as the model's input: ``[3, h, w]`` uint8 in INPUT.FORMAT, resized
        as in evaluation."""
        tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)  # [3, H, W] uint8
        if self.cfg.INPUT.FORMAT == "BGR":
            tensor = tensor.flip(0)
        return self._resize(tensor)

    @torch.no_grad()
    def __call__(self, image: np.ndarray, image_id: int = 0, file_name: str = "") -> dict[str, Any]:
        h, w = image.shape[:2]
        inputs = [{"image": self._model_image(image), "height": h, "width": w, "image_id": image_id,
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


def coco_image_ids(json_file: str, paths: list[str], image_root: str | None = None,
                   predictor: Predictor | None = None) -> dict[str, int]:
    """Image id of every path in ``paths`` from a COCO json, so predictions can be scored against it.

    With ``image_root`` a path matches the image whose ``image_root/file_name`` it is; without, the
    image whose file name (base name) it has, when that name is unique in the json. With ``predictor``,
    its labels are mapped to the json's category ids (the checkpoint's map, checked against the json,
    else the json's categories in id order, the catalog's convention).
    """
    from surgdino.evaluation.coco_evaluator import load_ground_truth

    gt = load_ground_truth(json_file)
    images = gt["images"]
    if predictor is not None:
        cat_ids = sorted(c["id"] for c in gt["categories"])
        if predictor.contiguous_to_dataset_id is None:
            predictor.contiguous_to_dataset_id = dict(enumerate(cat_ids))
        unknown = sorted(set(predictor.contiguous_to_dataset_id.values()) - set(cat_ids))
        if unknown:
            raise DataError(f"{json_file}: the model's category ids {unknown[:5]} are not among the json's "
                            f"{len(cat_ids)} categories; was it trained on this dataset?")
    by_path: dict[str, int] = {}
    if image_root is not None:
        root = os.path.abspath(os.path.expanduser(image_root))
        by_path = {os.path.normpath(os.path.join(root, str(im.get("file_name", "")))): im["id"] for im in images}
    names: dict[str, list[int]] = {}
    for im in images:
        names.setdefault(os.path.basename(str(im.get("file_name", ""))), []).append(im["id"])
    ids: dict[str, int] = {}
    for p in paths:
        key = os.path.normpath(os.path.abspath(p))
        if image_root is not None:
            if key not in by_path:
                raise DataError(f"{p}: not an image of {json_file} under {image_root}; predict only its images, "
                                "or fix --image-root")
            ids[p] = by_path[key]
            continue
        found = names.get(os.path.basename(p), [])
        if len(found) != 1:
            why = "is not the file name of any image" if not found else f"names {len(found)} images"
            raise DataError(f"{p}: its file name {why} in {json_file}; give --image-root DIR (the folder "
                            "file_name is relative to) or predict only that json's images")
        ids[p] = found[0]
    return ids


def dataset_image_ids(cfg: Config, args: Any, paths: list[str], predictor: Predictor) -> dict[str, int] | None:
    """``predict``'s ``--annotations JSON [--image-root DIR]`` or ``--dataset NAME``: the dataset's image ids."""
    json_file, image_root = getattr(args, "annotations", None), getattr(args, "image_root", None)
    name = getattr(args, "dataset", None)
    if name:
        if json_file:
            raise ConfigError("predict: give --annotations or --dataset, not both")
        from surgdino.data.catalog import DatasetCatalog, MetadataCatalog, register_datasets_from_config

        register_datasets_from_config(cfg)
        if name not in DatasetCatalog:
            DatasetCatalog.get(name)  # the unknown-dataset error, listing the registered names
        meta = MetadataCatalog.get(name).__dict__
        json_file, image_root = meta["json_file"], image_root or meta["image_root"]
    if not json_file:
        if image_root:
            raise ConfigError("predict: --image-root needs --annotations JSON")
        return None
    return coco_image_ids(json_file, paths, image_root, predictor)


def predict_files(predictor: Predictor, paths: list[str], output_dir: str, *,
                  score_threshold: float = 0.5, image_ids: dict[str, int] | None = None) -> dict[str, Any]:
    """Draw each image's instances scoring ≥ ``score_threshold`` to ``output_dir/<name>.png`` and write
    all of them as COCO results (``coco_results.json``) with ``images.json`` (id → file).

    Images are numbered 0..N-1 unless ``image_ids`` (path → id, e.g. from ``coco_image_ids``) gives the
    dataset's ids. A file that cannot be read is skipped with a warning; the others are still written.
    """
    from tqdm import tqdm

    from surgdino.evaluation.coco_evaluator import instances_to_coco_results
    from surgdino.visualize import draw_instances, save_image

    make_output_dir(output_dir, "--output")
    results: list[dict[str, Any]] = []
    images: list[dict[str, Any]] = []
    drawn: list[str] = []
    skipped: list[str] = []
    used: set[str] = set()
    for index, path in enumerate(tqdm(paths, desc="predict", unit="img", dynamic_ncols=True)):
        image_id = image_ids[path] if image_ids is not None else index
        try:
            image = read_image(path)  # [H, W, 3]
        except DataError as e:
            logger.warning("skipped: %s", e)
            skipped.append(path)
            continue
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
    if not images:
        raise DataError(f"none of the {len(paths)} input image(s) could be read (first: {skipped[0]}); "
                        "see the warnings above")
    res_path = os.path.join(output_dir, "coco_results.json")
    with open(res_path, "w") as f:
        json.dump(results, f)
    with open(os.path.join(output_dir, "images.json"), "w") as f:
        json.dump({"images": images, "thing_classes": predictor.thing_classes,
                   "score_threshold": score_threshold, "skipped": [os.path.abspath(p) for p in skipped]}, f, indent=1)
    if skipped:
        logger.warning("%d of %d images could not be read and were skipped (listed in images.json)",
                       len(skipped), len(paths))
    logger.info("%d images, %d instances ≥ %.2f: drawings and %s in %s", len(images), len(results),
                score_threshold, os.path.basename(res_path), os.path.abspath(output_dir))
    return {"images": drawn, "results": res_path, "num_instances": len(results), "skipped": skipped}
