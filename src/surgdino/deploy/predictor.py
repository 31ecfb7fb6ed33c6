"""``Predictor``: images in, instances out, from an ONNX export or from a config + weights.

    from surgdino import Predictor
    p = Predictor("model.onnx")                       # onnxruntime; settings from the file's metadata
    p = Predictor("config.yaml", "model_final.pth")   # PyTorch (EMA weights if the checkpoint has them)
    r = p(image)            # numpy [H, W, 3] uint8 RGB or PIL image → dict
    rs = p([im1, im2])      # a batch → list of dicts

Each result: ``boxes`` float32 [N, 4] (x0, y0, x1, y1 in the image's pixels), ``masks`` bool [N, H, W]
(not for a GroundingDINO), ``scores`` float32 [N], ``labels`` int64 [N], ``names`` (class name per detection).
A GroundingDINO looks for its dataset's class names (baked into an export), with ``predict --prompt``'s
box threshold. Both paths resize
like evaluation (``INPUT.MIN_SIZE_TEST`` / ``MAX_SIZE_TEST``, the test mapper's transform), run the
same graph module (``ExportModule``) and the same post-processing (``deploy.postprocess``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from surgdino.deploy.postprocess import postprocess
from surgdino.errors import SurgDinoError


def as_rgb_array(image: Any) -> np.ndarray:
    """A PIL image or a uint8 numpy ``[H, W, 3]`` (or ``[H, W]`` greyscale) array as uint8 ``[H, W, 3]``."""
    if hasattr(image, "convert") and hasattr(image, "size"):  # PIL
        return np.asarray(image.convert("RGB"))
    a = np.asarray(image)
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    if a.ndim != 3 or a.shape[2] != 3 or a.dtype != np.uint8:
        raise SurgDinoError(f"Predictor takes uint8 RGB images [H, W, 3] (numpy or PIL); got {a.dtype} {list(a.shape)}")
    return a


def prepare(images: Sequence[np.ndarray], pre: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor,
                                                                       list[tuple[int, int]], list[tuple[int, int]]]:
    """uint8 ``[B, 3, H, W]`` padded batch, ``pad_mask [B, H, W]``, resized (h, w) and original (h, w) per image.

    Resize: the test mapper's ``ResizeShortestEdge``; channels flipped for a BGR model; padding to the
    size divisibility (any size; at least ``min_side`` square for a dynamic export) or to the export's
    fixed ``height`` × ``width``."""
    from torchvision import tv_tensors

    from surgdino.data.transforms import ResizeShortestEdge
    from surgdino.structures import batch_images

    resize = ResizeShortestEdge(pre["min_size"], pre["max_size"])
    tensors, sizes, originals = [], [], []
    for im in images:
        t = torch.from_numpy(np.array(im)).permute(2, 0, 1)  # [3, H, W] uint8 (a copy: PIL arrays are read-only)
        if pre["format"] == "BGR":
            t = t.flip(0)
        originals.append((int(t.shape[1]), int(t.shape[2])))
        t = resize(tv_tensors.Image(t)).as_subclass(torch.Tensor)
        tensors.append(t)
        sizes.append((int(t.shape[1]), int(t.shape[2])))
    fixed = pre.get("height"), pre.get("width")
    if fixed[0]:
        too_big = [s for s in sizes if s[0] > fixed[0] or s[1] > fixed[1]]
        if too_big:
            raise SurgDinoError(f"an image resized to {too_big[0][0]}x{too_big[0][1]} does not fit the export's fixed "
                                f"input {fixed[0]}x{fixed[1]}; re-export with a larger --height/--width")
        tensors[0] = torch.nn.functional.pad(tensors[0], (0, fixed[1] - sizes[0][1], 0, fixed[0] - sizes[0][0]))
    elif pre.get("min_side"):  # a dynamic export's query selection needs enough encoder tokens
        side = int(pre["min_side"])
        h, w = tensors[0].shape[-2:]
        tensors[0] = torch.nn.functional.pad(tensors[0], (0, max(0, side - w), 0, max(0, side - h)))
    batch = batch_images(tensors, pre["size_divisibility"])
    return batch.tensors, batch.mask, sizes, originals


class Predictor:
    """Instances of images, from ``model`` = an ``.onnx`` file (onnxruntime) or a config file / ``Config``
    with ``weights`` (PyTorch). ``opts``: ``KEY VALUE`` config overrides and ``size``: pad every image to
    this fixed (height, width), as a fixed-size export does (PyTorch path; then both give the same results)."""

    def __init__(self, model: str | os.PathLike | Any, weights: str | None = None, *, opts: list[str] | None = None,
                 threads: int | None = None, size: tuple[int, int] | None = None):
        from surgdino.config import Config

        if isinstance(model, (str, os.PathLike)) and os.fspath(model).lower().endswith(".onnx"):
            from surgdino.deploy.runtime import OnnxModel

            if weights or opts or size:
                raise SurgDinoError("Predictor(model.onnx) takes its config and weights from the file; "
                                    "drop the weights/opts/size arguments")
            self.backend: Any = OnnxModel(model, threads=threads)
            meta = self.backend.meta
            self.pre, self.post = meta["preprocess"], meta["postprocess"]
            self.class_names: list[str] = list(meta["class_names"])
            self.dataset_ids: dict[int, int] = meta["dataset_ids"]  # label → dataset category id
            self.config_yaml: str = meta["config"]
            self.device = torch.device("cpu")
        else:
            from surgdino.config import load_config
            from surgdino.deploy.export import settings
            from surgdino.deploy.graph import ExportModule, GroundingExportModule
            from surgdino.engine.predictor import Predictor as TorchPredictor

            if isinstance(model, Config):
                cfg = model if not (weights or opts) else model.merge(
                    dict(zip((opts or [])[0::2], (opts or [])[1::2])) | ({"MODEL.WEIGHTS": weights} if weights else {}))
            else:
                cfg = load_config(os.fspath(model), list(opts or []) + (["MODEL.WEIGHTS", weights] if weights else []))
            tp = TorchPredictor(cfg)
            self.device = tp.device
            grounding = callable(getattr(tp.model, "set_class_names", None))
            module = GroundingExportModule(tp.model, list(tp.thing_classes)) if grounding else ExportModule(tp.model)
            self.backend = _TorchBackend(module.eval())
            self.pre, self.post = settings(cfg, tp.model, height=size[0] if size else None,
                                           width=size[1] if size else None)
            self.class_names = list(tp.thing_classes)
            self.dataset_ids = dict(tp.contiguous_to_dataset_id or {})  # label → dataset category id
            self.config_yaml = cfg.dump()

    def instances(self, images: Sequence[Any]) -> list[dict[str, torch.Tensor]]:
        """Per image ``{"boxes", "masks", "scores", "labels"}`` as CPU torch tensors."""
        arrays = [as_rgb_array(im) for im in images]
        if not arrays:
            return []
        if self.pre.get("height"):  # a fixed-size export runs one image at a time
            return [r for a in arrays for r in self.instances_batch([a])]
        return self.instances_batch(arrays)

    def instances_batch(self, arrays: list[np.ndarray]) -> list[dict[str, torch.Tensor]]:
        images, pad, sizes, originals = prepare(arrays, self.pre)
        raw = self.backend(images.to(self.device), pad.to(self.device))
        return [{k: v.cpu() for k, v in r.items()} for r in postprocess(raw, sizes, originals, self.post)]

    def __call__(self, images: Any) -> dict[str, Any] | list[dict[str, Any]]:
        single = not isinstance(images, (list, tuple))
        out = []
        for r in self.instances([images] if single else list(images)):
            d = {k: v.numpy() for k, v in r.items()}
            d["names"] = [self.class_names[i] if 0 <= i < len(self.class_names) else str(i)
                          for i in d["labels"].tolist()]
            out.append(d)
        return out[0] if single else out


class _TorchBackend:
    def __init__(self, module: torch.nn.Module):
        self.module = module

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, pad_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        return dict(zip(self.module.outputs, self.module(images, pad_mask)))
